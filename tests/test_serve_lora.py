"""Issue 19 on the server: the OpenAI ``model`` field picks a LoRA adapter, admins load and unload
adapters (``POST``/``DELETE /v1/adapters``, confined to ``--allowed-adapter-root``), ``/v1/models``
lists them and ``/metrics`` breaks cached bytes down by adapter.

In process and quick: the app over a tiny random Llama and the real scheduler, driven by the
official ``openai`` client through FastAPI's TestClient (an ``httpx.Client``); plus
``promptcache serve --adapter`` refusing a bad folder before it listens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from single_thread import one_torch_thread  # noqa: E402,F401
from test_lora import TEXT, make_adapter  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_KEY = "lora-api-key", "lora-admin-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(openai client, TestClient, scheduler, adapter root)``; adapter ``a`` loaded at start,
    ``b`` waiting in the allowed root, ``outside`` elsewhere."""
    from fastapi.testclient import TestClient

    from engine_fixtures import make_cache
    from promptcache.serve.app import create_app
    from promptcache.serve.config import ServeConfig
    from promptcache.serve.metrics import ServeMetrics
    from promptcache.serve.scheduler import Scheduler

    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_model("llama"), root / "a", seed=1)
    make_adapter(tiny_model("llama"), root / "b", seed=2)
    outside = make_adapter(tiny_model("llama"), tmp_path_factory.mktemp("elsewhere") / "outside", seed=3)
    (root / "link").symlink_to(outside, target_is_directory=True)  # inside the root, pointing out
    pc = make_cache("llama", adapters={"a": root / "a"})
    metrics = ServeMetrics()
    scheduler = Scheduler(pc, max_batch=4, max_queue=8, observer=metrics)
    scheduler.start()
    config = ServeConfig(model_name="tiny", api_key=API_KEY, admin_key=ADMIN_KEY, allowed_adapter_root=root)
    http = TestClient(create_app(pc, scheduler, config, metrics), raise_server_exceptions=False)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=http, max_retries=0)
    try:
        yield client, http, scheduler, root
    finally:
        scheduler.stop()


def _engine_text(scheduler, prompt, adapter: str | None, n: int) -> str:
    """The engine's own greedy text (on its thread), to compare the server's with."""
    return scheduler.call(lambda pc: pc.generate(prompt, max_new_tokens=n, adapter=adapter,
                                                 insert_prefix=False).text)


def _admin(http, method: str, url: str, body: dict | None = None, key: str = ADMIN_KEY):
    return http.request(method, url, content=None if body is None else json.dumps(body),
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_issue19_item4_model_field_picks_the_adapter(served):
    client, _, scheduler, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny", "a"]
    texts = {}
    for model, adapter in (("tiny", None), ("base", None), ("a", "a")):
        out = client.completions.create(model=model, prompt=TEXT, max_tokens=6, temperature=0)
        assert out.model == model
        texts[model] = out.choices[0].text
        assert texts[model] == _engine_text(scheduler, TEXT, adapter, 6), model
    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="a", messages=messages, max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == _engine_text(scheduler, messages, "a", 4)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=TEXT, max_tokens=2)
    assert missing.value.code == "model_not_found" and "'a'" in missing.value.message


def test_issue19_item4_admins_load_and_unload_adapters_inside_the_root(served):
    client, http, scheduler, root = served
    assert _admin(http, "POST", "/v1/adapters", {"name": "b", "path": "b"}, key=API_KEY).status_code == 401
    outside = (root / "link").resolve()  # the adapter folder outside the root
    assert (outside / "adapter_config.json").is_file()
    for path in (str(outside), "link", f"../{outside.parent.name}/outside", "nul\x00byte"):
        refused = _admin(http, "POST", "/v1/adapters", {"name": "o", "path": path})
        assert refused.status_code == 400, (path, refused.text)
    assert "outside the allowed adapter root" in _admin(
        http, "POST", "/v1/adapters", {"name": "o", "path": "link"}).json()["error"]["message"]
    escape = _admin(http, "POST", "/v1/adapters", {"name": "o", "path": "../" + root.name + "/b/../../"})
    assert escape.status_code == 400
    assert _admin(http, "POST", "/v1/adapters", {"name": "base", "path": "b"}).status_code == 400
    loaded = _admin(http, "POST", "/v1/adapters", {"name": "b", "path": "b"})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["id"] == "b" and str(root) not in loaded.text  # no server path echoed
    assert [m.id for m in client.models.list().data] == ["tiny", "a", "b"]
    out = client.completions.create(model="b", prompt=TEXT, max_tokens=4, temperature=0)
    assert out.choices[0].text == _engine_text(scheduler, TEXT, "b", 4)
    assert _admin(http, "DELETE", "/v1/adapters/b").json() == {"id": "b", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="b", prompt=TEXT, max_tokens=2)
    assert _admin(http, "DELETE", "/v1/adapters/b").status_code == 404
    assert [m.id for m in client.models.list().data] == ["tiny", "a"]


def test_issue19_item4_loading_over_http_is_off_without_a_root(served):
    from fastapi.testclient import TestClient

    from promptcache.serve.app import create_app
    from promptcache.serve.config import ServeConfig

    _, _, scheduler, _ = served
    config = ServeConfig(model_name="tiny", api_key=API_KEY, admin_key=ADMIN_KEY)
    http = TestClient(create_app(scheduler.pc, scheduler, config), raise_server_exceptions=False)
    refused = _admin(http, "POST", "/v1/adapters", {"name": "b", "path": "b"})
    assert refused.status_code == 403 and "--allowed-adapter-root" in refused.json()["error"]["message"]


def test_issue19_item2_metrics_break_cached_bytes_down_by_adapter(served):
    client, http, _, _ = served
    client.completions.create(model="a", prompt=TEXT + " again", max_tokens=3, temperature=0)
    text = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    rows = dict(re.findall(r'promptcache:adapter_cache_bytes\{adapter="([^"]+)",cache="prefix"\} (\S+)', text))
    assert float(rows["a"]) > 0 and "base" in rows


def test_issue19_item4_serve_checks_adapter_flags_before_loading_the_model(tmp_path):
    for spec, why in ((f"x={tmp_path}", "adapter_config.json"), ("base=.", "not allowed")):
        proc = subprocess.run([sys.executable, "-m", "promptcache", "serve", "--adapter", spec,
                               "--model", str(tmp_path / "no-model"), "--port", "0"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode != 0 and why in proc.stderr and "loading model" not in proc.stderr, proc.stderr

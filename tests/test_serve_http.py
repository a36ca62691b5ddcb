"""``promptcache serve`` over HTTP (issue 15): the OpenAI-compatible endpoints, schemas, errors, metrics.

Two halves:

* a real server: ``python -m promptcache serve`` (uvicorn, the default model, one torch thread,
  ``--max-batch 4 --max-queue 4``) in a subprocess on 127.0.0.1 and a free port, shared by the
  module, driven by the official ``openai`` client (and urllib for the schema endpoints, which
  OpenAI's client does not know);
* fast in-process tests of the app (FastAPI's TestClient) over a tiny random-weight model and the
  real scheduler, for what needs no real model: keys, body limits, 500s, metrics names, uploads.

Runtime is bounded: short ``max_tokens``, a 8 x 10 load test, loopback only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
MODEL = "smollm2"
STARTUP_TIMEOUT_S = 240

DOCUMENT = (ROOT / "examples" / "document_qa.txt").read_text(encoding="utf-8")[:1500]
QA_SCHEMA = f"""<schema name="qa">
  <system>Answer from the document only.</system>
  <user open="true">Document:
    <module name="doc"><![CDATA[{DOCUMENT}]]></module>
  </user>
</schema>"""


# ---------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, timeout: float = 30) -> tuple[int, dict | str, dict]:
    return _request("GET", url, None, key, timeout)


def _request(method: str, url: str, body: bytes | None, key: str | None, timeout: float = 120,
             content_type: str = "application/xml") -> tuple[int, dict | str, dict]:
    """(status, JSON or text body, headers) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), dict(e.headers)
    text = raw.decode("utf-8")
    try:
        return status, json.loads(text), headers
    except json.JSONDecodeError:
        return status, text, headers


class Server:
    """One ``promptcache serve`` subprocess; its log is kept for 500-id checks and failures."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("PROMPTCACHE_API_KEY", None)
        env.pop("PROMPTCACHE_ADMIN_KEY", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "promptcache", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--threads", "1", "--max-batch", "4", "--max-queue", "4", "--api-key", API_KEY,
             "--admin-key", ADMIN_KEY, "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if _get(self.base + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, key: str = API_KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, timeout=kw.pop("timeout", 300), **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None and _get(self.base + "/health")[0] == 200

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (0 when absent)."""
        text = _get(self.base + "/metrics")[1]
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
        m = re.search(r"^" + pattern + "$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"))
    try:
        status, body, _ = _request("POST", srv.base + "/v1/schemas", QA_SCHEMA.encode(), ADMIN_KEY, timeout=600)
        assert status == 201, body
        yield srv
    finally:
        srv.close()


def _pml(question: str) -> str:
    return f'<prompt schema="qa"><doc/> Question: {question}</prompt>'


def _usage_extra(usage) -> dict:
    """The ``promptcache`` object of a usage (the client keeps unknown fields as extras)."""
    extra = usage.model_extra or {}
    return extra["promptcache"]


def test_issue15_completions_plain_text(server):
    client = server.client()
    res = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                    temperature=0)
    assert res.object == "text_completion" and res.model == MODEL
    assert res.choices[0].text and res.choices[0].finish_reason in ("stop", "length")
    u = res.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    extra = _usage_extra(u)
    assert extra["computed_tokens"] + u.prompt_tokens_details.cached_tokens == u.prompt_tokens
    assert extra["ttft_ms"] > 0


def test_issue15_pml_prompt_uses_module_cache(server):
    client = server.client()
    res = client.completions.create(model=MODEL, prompt=_pml("what is this about?"), max_tokens=6, temperature=0)
    u = res.usage
    assert res.choices[0].text
    # The document module is cached: most of the prompt comes from it, only the question is computed.
    assert u.prompt_tokens_details.cached_tokens > 100
    assert _usage_extra(u)["computed_tokens"] < 40 and _usage_extra(u)["modules"] == ["doc"]
    # use_cache=false (extension) computes everything and gives the same greedy answer.
    base = client.completions.create(model=MODEL, prompt=_pml("what is this about?"), max_tokens=6,
                                     temperature=0, extra_body={"use_cache": False})
    assert base.usage.prompt_tokens_details.cached_tokens == 0
    assert base.choices[0].text == res.choices[0].text


def test_issue15_chat_shared_document_second_request_cached(server):
    client = server.client()
    system = {"role": "system", "content": "Answer from this document.\n" + DOCUMENT}
    first = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        system, {"role": "user", "content": "Who is it about?"}])
    second = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        system, {"role": "user", "content": "When did it happen?"}])
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 200, second.usage  # the system document was reused from the first request
    assert cached < second.usage.prompt_tokens


def test_issue15_streaming_with_usage(server):
    client = server.client()
    prompt = "Once upon a time"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    chat = list(client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello."}]))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert chat[-1].usage is not None and chat[-1].usage.prompt_tokens > 0


def test_issue15_stream_ends_with_done_marker(server):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}).encode()
    status, text, headers = _request("POST", server.base + "/v1/completions", body, API_KEY,
                                     content_type="application/json")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in text.split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_issue15_schema_upload_list_get_delete(server):
    schema = """<schema name="tmp15"><system>Be brief.</system>
      <user open="true"><union scaffold="red"><module name="red">The color is red.</module>
      <module name="blue">The color is blue.</module></union>
      <module name="city">City: <parameter name="name" length="4" scaffold="Oslo"/>.</module></user></schema>"""
    url = server.base + "/v1/schemas"
    assert _request("POST", url, schema.encode(), API_KEY)[0] == 401  # the API key is not the admin key
    status, info, _ = _request("POST", url, schema.encode(), ADMIN_KEY)
    assert status == 201 and info["id"] == "tmp15" and info["replaced"] is False
    status, listing, _ = _get(url, API_KEY)
    assert status == 200 and {"qa", "tmp15"} <= {s["id"] for s in listing["data"]}
    status, detail, _ = _get(url + "/tmp15", API_KEY)
    assert status == 200 and detail["tokens"] > 0
    assert {m["name"] for m in detail["modules"]} == {"red", "blue", "city"}
    assert detail["unions"][0]["members"] == ["red", "blue"] and detail["unions"][0]["scaffold"] == "red"
    assert detail["parameters"] == [{"module": "city", "name": "name", "length": 4}]
    assert sum(row["bytes"] for row in detail["memory"]) > 0
    res = server.client().completions.create(model=MODEL, prompt='<prompt schema="tmp15"><blue/><city name="Rome"/>'
                                             ' Which color?</prompt>', max_tokens=3, temperature=0)
    assert res.usage.prompt_tokens_details.cached_tokens > 0
    assert _request("DELETE", url + "/tmp15", None, API_KEY)[0] == 401
    assert _request("DELETE", url + "/tmp15", None, ADMIN_KEY)[0] == 200
    assert _get(url + "/tmp15", API_KEY)[0] == 404
    assert _request("DELETE", url + "/tmp15", None, ADMIN_KEY)[0] == 404


def test_issue15_uploaded_schema_reads_no_file(server):
    """Without --allowed-schema-root, an uploaded schema's src= resolves nothing (docs/security.md)."""
    for src in ("/etc/passwd", "document_qa.txt", "../README.md"):
        schema = f'<schema name="leak"><module name="m" src="{src}"/></schema>'
        status, body, _ = _request("POST", server.base + "/v1/schemas", schema.encode(), ADMIN_KEY)
        assert status == 400, body
        assert body["error"]["code"] == "pml_error" and "root:" not in body["error"]["message"]
    assert _get(server.base + "/v1/schemas/leak", API_KEY)[0] == 404


def test_issue15_errors_in_openai_shape_and_server_keeps_serving(server):
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:  # malformed PML: the PML message with line:column
        client.completions.create(model=MODEL, prompt='<prompt schema="qa">\n<doc></prompt>', max_tokens=2)
    err = bad.value.body
    assert bad.value.status_code == 400 and re.search(r":2:\d+: ", err["message"]), err
    assert set(err) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as unknown_module:
        client.completions.create(model=MODEL, prompt='<prompt schema="qa"><nosuch/></prompt>', max_tokens=2)
    assert "nosuch" in unknown_module.value.body["message"]
    with pytest.raises(openai.NotFoundError) as no_schema:
        client.completions.create(model=MODEL, prompt='<prompt schema="nope"><doc/></prompt>', max_tokens=2)
    assert "'nope'" in no_schema.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong", max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    status, body, headers = _request("POST", server.base + "/v1/completions",
                                     json.dumps({"model": MODEL, "prompt": "x"}).encode(), None,
                                     content_type="application/json")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.APIStatusError) as big:  # over the body limit: 413 with the numbers
        client.completions.create(model=MODEL, prompt="a " * (1_100_000), max_tokens=2)
    assert big.value.status_code == 413 and "2097152" in big.value.body["message"]
    with pytest.raises(openai.BadRequestError) as window:  # over the context window: 400 with the numbers
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=2)
    assert re.search(r"\d{4}", window.value.body["message"]), window.value.body
    with pytest.raises(openai.BadRequestError) as bad_field:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert bad_field.value.body["param"] == "max_tokens"
    assert server.alive()
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].text is not None


def test_issue15_queue_full_429_with_retry_after(server):
    """More concurrent requests than --max-batch 4 + --max-queue 4 can hold: some get 429."""
    body = json.dumps({"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 24, "temperature": 0}).encode()

    def one(_):
        return _request("POST", server.base + "/v1/completions", body, API_KEY, content_type="application/json")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    statuses = sorted(r[0] for r in results)
    assert 429 in statuses and 200 in statuses, statuses
    refused = next(r for r in results if r[0] == 429)
    assert int(refused[2]["retry-after"]) >= 1 and refused[1]["error"]["code"] == "queue_full"
    assert set(statuses) <= {200, 429}
    assert server.metric("promptcache:request_outcome_total", 'outcome="rejected_queue_full"') >= 1
    assert server.alive()


def test_issue15_disconnect_mid_stream_cancels(server):
    client = server.client()
    before = server.metric("promptcache:request_outcome_total", 'outcome="cancelled"')
    stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7,",
                                       max_tokens=400, temperature=0, stream=True)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    stream.close()  # the client goes away after one chunk
    deadline = time.monotonic() + 60
    while server.metric("promptcache:request_outcome_total", 'outcome="cancelled"') <= before:
        assert time.monotonic() < deadline, "the request was not cancelled after the client left"
        time.sleep(0.2)
    assert server.alive()
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].text is not None


def test_issue15_models_health_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, health, _ = _get(server.base + "/health")
    assert status == 200 and health["status"] == "ok"
    text = _get(server.base + "/metrics")[1]
    for name in ("promptcache:prompt_tokens_total", "promptcache:prompt_tokens_cached_total",
                 "promptcache:prefix_cache_queries_total", "promptcache:prefix_cache_hits_total",
                 'promptcache:request_success_total{finished_reason="length"}',
                 "promptcache:time_to_first_token_seconds_bucket", "promptcache:inter_token_latency_seconds_bucket",
                 "promptcache:request_queue_time_seconds_bucket", "promptcache:num_requests_waiting",
                 "promptcache:num_requests_running", 'promptcache:module_cache_bytes{tier="device"}'):
        assert name in text, name
    assert server.metric("promptcache:prompt_tokens_cached_total") > 0
    assert server.metric("promptcache:module_cache_bytes", 'tier="device"') > 0


def test_issue15_load_8_clients_x_10_equal_sequential_greedy(server):
    """8 concurrent clients x 10 requests, all answered, each text equal to the same request alone."""
    prompts = [_pml(q) for q in ("who?", "what?", "when?", "where?", "why?")]
    prompts += [f"Fact {i}: the sky is" for i in range(5)]
    client = server.client(max_retries=20)  # 429s (the queue is tiny on purpose) are retried
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]

    def run(worker: int) -> list[tuple[int, str]]:
        order = [(worker + k) % len(prompts) for k in range(len(prompts))]  # a different order each
        return [(i, client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=6,
                                              temperature=0).choices[0].text) for i in order]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = [a for worker in pool.map(run, range(8)) for a in worker]
    elapsed = time.perf_counter() - t0
    assert len(answers) == 80
    mismatches = [(i, text, alone[i]) for i, text in answers if text != alone[i]]
    assert not mismatches, mismatches[:5]
    print(f"load: 80 requests in {elapsed:.1f} s")
    assert server.alive()


# ---------------------------------------------------------------- in process (tiny model)


@pytest.fixture(scope="module")
def tiny_app():
    """The app over a tiny random model and the real scheduler, with TestClient."""
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_fixtures import make_cache
    from promptcache.serve.app import create_app
    from promptcache.serve.config import ServeConfig
    from promptcache.serve.metrics import ServeMetrics
    from promptcache.serve.scheduler import Scheduler

    pc = make_cache("llama")
    metrics = ServeMetrics()
    scheduler = Scheduler(pc, max_batch=2, max_queue=4, observer=metrics)
    scheduler.start()
    config = ServeConfig(model_name="tiny", api_key=API_KEY, admin_key=ADMIN_KEY)
    app = create_app(pc, scheduler, config, metrics)
    client = TestClient(app, raise_server_exceptions=False)
    client.headers["Authorization"] = f"Bearer {API_KEY}"
    try:
        yield client, app, scheduler
    finally:
        scheduler.stop()


def test_issue15_keys_compared_in_constant_time(monkeypatch):
    import hmac

    from promptcache.serve import auth

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with pytest.raises(auth.AuthError):
        auth.check_api_key("Bearer nope", "secret", "admin")
    assert calls == [(b"nope", b"secret"), (b"nope", b"admin")]  # both compared, as bytes
    auth.check_api_key("Bearer admin", "secret", "admin")  # the admin key also opens the API
    auth.check_api_key(None, None, None)  # no key configured: open
    with pytest.raises(auth.AuthError) as off:
        auth.check_admin_key("Bearer secret", None)
    assert off.value.status == 403


def test_issue15_inprocess_401_and_no_key(tiny_app):
    client, _, _ = tiny_app
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2}
    r = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    r = client.post("/v1/completions", json=body, headers={"Authorization": ""})
    assert r.status_code == 401 and "missing" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"{not json", headers={"Authorization": "Bearer wrong",
                                                                    "Content-Type": "application/json"})
    assert r.status_code == 401  # the key is checked before the body is validated
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_issue15_inprocess_body_limit_chunked_and_declared(tiny_app):
    client, app, _ = tiny_app
    limit = app.state.config.max_body_bytes
    r = client.post("/v1/completions", content=b"{" + b" " * limit + b"}",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and str(limit) in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while read
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2}).status_code == 200


def test_issue15_inprocess_500_has_logged_id_and_no_traceback(tiny_app, monkeypatch, caplog):
    client, _, scheduler = tiny_app

    def broken(req):
        raise ArithmeticError("secret internal detail")  # not one the app maps to a 4xx or 503

    monkeypatch.setattr(scheduler, "submit", broken)
    with caplog.at_level(logging.ERROR, logger="promptcache.serve"):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2})
    assert r.status_code == 500
    error = r.json()["error"]
    assert "secret" not in r.text and "Traceback" not in r.text and error["type"] == "server_error"
    error_id = re.search(r"id ([0-9a-f]{16})", error["message"]).group(1)
    assert error_id in caplog.text and "secret internal detail" in caplog.text
    monkeypatch.undo()
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "max_tokens": 2}).status_code == 200


def test_issue15_inprocess_validation_and_unsupported_fields(tiny_app):
    client, _, _ = tiny_app
    r = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "ab", "recompute": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "recompute"
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_issue15_inprocess_schema_src_only_inside_allowed_root(tmp_path):
    """With an allowed folder, an uploaded schema's src= resolves inside it and nowhere else."""
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_fixtures import make_cache
    from promptcache.serve.app import create_app
    from promptcache.serve.config import ServeConfig
    from promptcache.serve.scheduler import Scheduler

    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "doc.txt").write_text("Inside text.")
    (tmp_path / "outside.txt").write_text("Outside text.")
    pc = make_cache("llama")
    scheduler = Scheduler(pc, max_batch=2, max_queue=4)
    scheduler.start()
    try:
        app = create_app(pc, scheduler, ServeConfig(model_name="tiny", admin_key=ADMIN_KEY,
                                                    allowed_schema_root=tmp_path / "allowed"))
        client = TestClient(app, raise_server_exceptions=False)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        ok = '<schema name="s"><module name="m" src="doc.txt"/></schema>'
        r = client.post("/v1/schemas", content=ok, headers=admin)
        assert r.status_code == 201, r.text
        bad = '<schema name="s2"><module name="m" src="../outside.txt"/></schema>'
        r = client.post("/v1/schemas", content=bad, headers=admin)
        assert r.status_code == 400 and "Outside text" not in r.text
        r = client.post("/v1/schemas", content=ok)  # no admin key
        assert r.status_code == 401
        scheduler.stop()
        assert client.get("/health").status_code == 503  # the engine thread is gone: not healthy
    finally:
        scheduler.stop()


def test_issue15_inprocess_metrics_after_requests(tiny_app):
    client, _, _ = tiny_app
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3,
                                                "temperature": 0}).status_code == 200
    text = client.get("/metrics").text
    assert re.search(r"^promptcache:prompt_tokens_total [1-9]", text, re.M)
    assert re.search(r"^promptcache:time_to_first_token_seconds_count [1-9]", text, re.M)
    assert 'promptcache:request_outcome_total{outcome="invalid"}' in text

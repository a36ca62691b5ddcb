"""The oracle tests in bfloat16 on a CUDA device (skipped without one).

Tolerance: bfloat16 keeps 8 bits of mantissa, so two mathematically equal computations in a
different order differ by ~1e-2 relative; logits of these tiny models are O(1-10), so we allow an
absolute difference of 0.15 and require the same top token.
"""

from __future__ import annotations

import pytest
import torch

from promptcache.engine import PromptCache
from engine_fixtures import DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA, OVERRIDES
from tiny_models import FAMILIES, tiny_model
from tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BF16_TOL = 0.15


def _cuda_cache(family: str, encoding: str) -> PromptCache:
    model = tiny_model(family, **OVERRIDES.get(family, {})).to("cuda", torch.bfloat16)
    return PromptCache(model, tiny_tokenizer(), encoding=encoding, progress=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoding", ["scaffold", "independent"])
def test_bf16_cached_equals_oracle(family, encoding):
    pc = _cuda_cache(family, encoding)
    pc.add_schema(FULL_SCHEMA)
    for name, prompt in FULL_PROMPTS.items():
        cached, oracle = pc.next_token_logits(prompt), pc.oracle_logits(prompt)
        assert float((cached - oracle).abs().max()) <= BF16_TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_default_path_equals_baseline(family):
    pc = _cuda_cache(family, "scaffold")
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    cached = pc.next_token_logits(DEFAULT_PATH_PROMPT)
    base = pc.next_token_logits(DEFAULT_PATH_PROMPT, use_cache=False)
    assert float((cached - base).abs().max()) <= BF16_TOL


def test_host_placement_uses_pinned_memory():
    pc = PromptCache(tiny_model("llama").to("cuda"), tiny_tokenizer(), placement="host", progress=False)
    pc.add_schema(FULL_SCHEMA)
    kv = next(iter(pc.schemas["t"].kv.values()))
    assert kv.keys[0].device.type == "cpu" and kv.keys[0].is_pinned()
    dev = PromptCache(tiny_model("llama").to("cuda"), tiny_tokenizer(), progress=False)
    dev.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["union-gap-param"]
    assert torch.allclose(pc.next_token_logits(prompt), dev.next_token_logits(prompt), atol=1e-4)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_issue17_compiled_cuda_graphs_bf16_equals_oracle(placement):
    """The fast path on CUDA: compiled with mode="reduce-overhead" (CUDA graphs) over the static
    buffer, bf16; the oracle holds (bf16 tolerance), greedy text equals the bf16 baseline, and
    nothing ran eager or recompiled."""
    model = tiny_model("llama").to("cuda")
    pc = PromptCache(model, tiny_tokenizer(), placement=placement, progress=False, dtype="bf16", compile=True)
    assert pc.compile_report()["mode"] == "reduce-overhead"
    pc.add_schema(FULL_SCHEMA)
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    assert pc.warmup(suffix_lengths=[1, 16, 32, 64]).compiled
    for name, prompt in FULL_PROMPTS.items():
        cached, oracle = pc.next_token_logits(prompt), pc.oracle_logits(prompt)
        assert float((cached - oracle).abs().max()) <= BF16_TOL, name
    fast = pc.generate(DEFAULT_PATH_PROMPT, max_new_tokens=8)
    base = pc.generate(DEFAULT_PATH_PROMPT, max_new_tokens=8, use_cache=False)
    assert fast.token_ids == base.token_ids
    report = pc.compile_report()
    assert report["fallbacks"] == {} and report["recompiles"] == 0, report

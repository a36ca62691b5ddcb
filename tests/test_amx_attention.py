"""Issue 17, the AMX attention kernel (promptcache.runtime.amx_attention) of the fast path: as close
to exact attention as torch's own bf16 SDPA for every tail it tiles (rows, keys, head dims, folded
query heads, query blocks, strided queries, a mask narrower than the buffer, causal without a mask),
run by the fast path's forwards where the CPU has AMX (never by the oracle, which checks it), under
store keys of its own, and matching the bf16 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptcache.engine import PromptCache
from promptcache.runtime import amx_attention
from promptcache.runtime import compiled as compiled_mod
from promptcache.runtime.attention import AMX_FLAG, use_amx_attention
from engine_fixtures import DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

PROBE = torch.zeros((1, 1, 1, 64), dtype=torch.bfloat16)
REASON = amx_attention.unavailable(PROBE, PROBE, PROBE, PROBE[..., :1])
needs_amx = pytest.mark.skipif(REASON is not None, reason=str(REASON))
BF16_TOL = 0.25  # as tests/test_compiled.py


def _case(rows: int, keys: int, dim: int, heads: int, kv_heads: int, seed: int):
    """bf16 inputs in transformers' layouts: queries strided as after q_proj + transpose, a static
    buffer wider than the keys in use, an additive mask with some keys hidden from each query."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, rows, heads, dim, generator=g).to(torch.bfloat16).transpose(1, 2)
    key = torch.randn(1, kv_heads, keys + 24, dim, generator=g).to(torch.bfloat16)
    value = torch.randn(1, kv_heads, keys + 24, dim, generator=g).to(torch.bfloat16)
    visible = torch.rand(rows, keys, generator=g) > 0.3
    visible[:, 0] = True
    mask = torch.where(visible, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)[None, None]
    return query, key, value, mask


def _exact(query, key, value, mask, scale):
    n = mask.shape[-1]
    out = F.scaled_dot_product_attention(query.float(), key[:, :, :n].float(), value[:, :, :n].float(),
                                         attn_mask=mask.float(), scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@needs_amx
@pytest.mark.parametrize("rows,heads,kv_heads", [(1, 9, 3), (2, 9, 3), (5, 9, 3), (16, 9, 3), (48, 4, 4),
                                                 (7, 4, 1)])
@pytest.mark.parametrize("keys", [1, 7, 16, 33, 100, 1118])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_issue17_amx_attention_as_close_as_torch_bf16_sdpa(rows, heads, kv_heads, keys, dim):
    query, key, value, mask = _case(rows, keys, dim, heads, kv_heads, seed=rows * 7 + keys + dim)
    assert amx_attention.unsupported(query, key, value, mask) is None
    scale = dim ** -0.5
    got = amx_attention.attention(query, key, value, mask, scale)
    exact = _exact(query, key, value, mask, scale)
    torch_bf16 = F.scaled_dot_product_attention(query, key[:, :, :keys], value[:, :, :keys], attn_mask=mask,
                                                scale=scale, enable_gqa=True).transpose(1, 2)
    assert got.shape == exact.shape == (1, rows, heads, dim) and got.dtype == torch.bfloat16
    ours, theirs = float((got.float() - exact).abs().max()), float((torch_bf16.float() - exact).abs().max())
    assert ours <= 2 * theirs + 2e-3, (ours, theirs)


@needs_amx
@pytest.mark.parametrize("rows,heads,kv_heads", [(17, 9, 3), (100, 9, 3), (300, 4, 2), (65, 4, 4)])
def test_issue17_amx_attention_long_blocks_with_a_mask(rows, heads, kv_heads):
    """More queries than one folded block: taken 48 // groups at a time (a prefill chunk)."""
    query, key, value, mask = _case(rows, rows + 50, 64, heads, kv_heads, seed=rows)
    got = amx_attention.attention(query, key, value, mask, 0.125)
    exact = _exact(query, key, value, mask, 0.125)
    n = mask.shape[-1]
    theirs = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], attn_mask=mask, scale=0.125,
                                            enable_gqa=True).transpose(1, 2)
    assert float((got.float() - exact).abs().max()) <= 2 * float((theirs.float() - exact).abs().max()) + 2e-3


@needs_amx
@pytest.mark.parametrize("rows", [1, 16, 70, 257])
def test_issue17_amx_attention_causal_without_a_mask(rows):
    """No mask (transformers' causal case, as many keys as queries): query i sees keys 0..i."""
    g = torch.Generator().manual_seed(rows)
    query = torch.randn(1, rows, 9, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    key = torch.randn(1, 3, rows, 64, generator=g).to(torch.bfloat16)
    value = torch.randn(1, 3, rows, 64, generator=g).to(torch.bfloat16)
    assert amx_attention.unsupported(query, key, value, None) is None
    got = amx_attention.attention(query, key, value, None, 0.125)
    exact = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=True, scale=0.125,
                                           enable_gqa=True).transpose(1, 2)
    theirs = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.125,
                                            enable_gqa=True).transpose(1, 2)
    assert float((got.float() - exact).abs().max()) <= 2 * float((theirs.float() - exact).abs().max()) + 2e-3


@needs_amx
def test_issue17_amx_attention_threads_split_the_work_to_the_same_values():
    query, key, value, mask = _case(70, 120, 64, 9, 3, seed=3)
    causal = [t[..., :70, :] if i else t for i, t in enumerate((query, key, value))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [amx_attention.attention(query, key, value, mask, 0.125), amx_attention.attention(*causal, None, 0.125)]
        torch.set_num_threads(2)
        two = [amx_attention.attention(query, key, value, mask, 0.125), amx_attention.attention(*causal, None, 0.125)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_amx
def test_issue17_amx_attention_row_with_nothing_visible_is_zero():
    query, key, value, mask = _case(3, 40, 64, 6, 2, seed=5)
    mask = mask.clone()
    mask[..., 1, :] = float("-inf")  # query 1 sees nothing
    got = amx_attention.attention(query, key, value, mask, 0.125)
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))
    exact = _exact(query, key, value, mask, 0.125)
    assert float((got[0, [0, 2]].float() - exact[0, [0, 2]]).abs().max()) < 0.05


def test_issue17_amx_attention_says_what_it_does_not_take():
    query, key, value, mask = _case(16, 40, 64, 9, 3, seed=1)
    assert "bf16" in amx_attention.unsupported(query.float(), key, value, mask)
    many_heads = torch.zeros(1, 98, 2, 64, dtype=torch.bfloat16)
    assert "query heads per K/V head" in amx_attention.unsupported(many_heads, key[:, :1], value[:, :1], mask[..., :2, :])
    assert "causal" in amx_attention.unsupported(query, key, value, None)  # no mask but past keys
    assert "head dim" in amx_attention.unsupported(query[..., :48], key[..., :48], value[..., :48], mask)
    assert "mask" in amx_attention.unsupported(query, key, value, mask.float())
    assert "mask" in amx_attention.unsupported(query, key, value, None)


def _engine(monkeypatch, amx_on: bool) -> PromptCache:
    """A bf16 compiled engine over a tiny grouped-query llama with 32-wide heads (what the kernel takes)."""
    monkeypatch.setattr(compiled_mod, "SUFFIX_BUCKETS", (1, 16))
    monkeypatch.setattr(compiled_mod, "MIN_CACHE_BUCKET", 512)
    pc = PromptCache(tiny_model("llama-gqa", head_dim=32), tiny_tokenizer(), progress=False, dtype="bf16",
                     compile=True)
    if not amx_on:
        pc.fast.amx_attention = use_amx_attention(pc.model, on=False)
    pc.add_schema(FULL_SCHEMA)
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    return pc


@needs_amx
def test_issue17_compiled_graphs_run_amx_attention_and_match_the_oracle(monkeypatch):
    pc = _engine(monkeypatch, amx_on=True)
    assert pc.compile_report()["amx_attention"] is True
    before = amx_attention.calls
    for name, prompt in {**FULL_PROMPTS, "dp": DEFAULT_PATH_PROMPT}.items():
        got = pc.next_token_logits(prompt)
        oracle = pc.oracle_logits(prompt)  # one eager forward: torch's SDPA, never the AMX kernel
        assert float((got.float() - oracle.float()).abs().max()) <= BF16_TOL, name
        assert int(got.argmax()) == int(oracle.argmax()), name
    used = amx_attention.calls - before
    assert used > 0  # the compiled graphs called it (2 layers per forward)
    report = pc.compile_report()
    assert report["fallbacks"] == {} and report["compiles"] >= 1
    # the oracle never calls it (torch's SDPA checks it); the eager baseline does, near the oracle
    before = amx_attention.calls
    oracle = pc.oracle_logits(DEFAULT_PATH_PROMPT)
    assert amx_attention.calls == before
    base = pc.generate(DEFAULT_PATH_PROMPT, max_new_tokens=0, use_cache=False).first_token_logits
    assert amx_attention.calls > before
    assert float((base.float() - oracle.float()).abs().max()) <= BF16_TOL


@needs_amx
def test_issue17_amx_attention_turned_off_keeps_torch_sdpa(monkeypatch):
    pc = _engine(monkeypatch, amx_on=False)
    report = pc.compile_report()
    assert report["amx_attention"] is False and report["amx_attention_off"] == "turned off"
    assert getattr(pc.model.config, AMX_FLAG) is False
    before = amx_attention.calls
    got = pc.next_token_logits(DEFAULT_PATH_PROMPT)
    assert amx_attention.calls == before
    assert float((got.float() - pc.oracle_logits(DEFAULT_PATH_PROMPT).float()).abs().max()) <= BF16_TOL


@needs_amx
def test_issue17_amx_attention_has_store_keys_of_its_own():
    from promptcache.runtime.attention import use_fast_sdpa
    from promptcache.store.keys import config_fingerprint

    model = tiny_model("llama-gqa", head_dim=32)
    sdpa = config_fingerprint(model)["__attn_implementation"]
    assert use_fast_sdpa(model) and config_fingerprint(model)["__attn_implementation"] == sdpa
    assert use_amx_attention(model) is None
    assert config_fingerprint(model)["__attn_implementation"] == "sdpa+amx" != sdpa
    use_amx_attention(model, on=False)
    assert config_fingerprint(model)["__attn_implementation"] == sdpa

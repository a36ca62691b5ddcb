"""Issue 17, the fast path's SDPA (promptcache.runtime.attention): on CPU, a short query block of a
grouped-query model runs ONE SDPA call per K/V head (its query heads folded into rows) instead of
one per query head, and attention reads only the slots a narrower mask covers. Both must give
transformers' sdpa result to the bit, for any mask; only the fast path switches a model to it, and
module store keys do not change with it.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from promptcache.engine import PromptCache
from promptcache.runtime import attention
from promptcache.runtime import compiled as compiled_mod
from promptcache.store.keys import config_fingerprint
from engine_fixtures import DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


def _mask(rows: int, slots: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """An additive 4-D mask with random holes (gaps, unwritten slots), every row seeing something."""
    gen = torch.Generator().manual_seed(seed)
    visible = torch.rand(rows, slots, generator=gen) < 0.7
    visible[:, 0] = True
    mask = torch.zeros(rows, slots, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("gqa_env", ["1", "0"])  # transformers' SDPA with enable_gqa, or with repeat_kv copies
def test_issue17_folded_heads_equal_transformers_sdpa_to_the_bit(dtype, heads, kv_heads, gqa_env, monkeypatch):
    monkeypatch.setenv(compiled_mod.SDPA_GQA_ENV, gqa_env)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    gen = torch.Generator().manual_seed(0)
    folded_any = False
    for rows in (1, 2, 5, 16, attention.FOLD_MAX_ROWS, attention.FOLD_MAX_ROWS + 1):
        slots = 96 + rows
        # queries as the attention layers make them: [b, q, heads, d] transposed to [b, heads, q, d]
        query = torch.randn(1, rows, heads, 16, generator=gen).to(dtype).transpose(1, 2)
        key, value = (torch.randn(1, kv_heads, slots, 16, generator=gen).to(dtype) for _ in range(2))
        mask = _mask(rows, slots, dtype, seed=rows)
        ours, _ = attention.fast_sdpa_forward(module, query, key, value, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
        assert ours.shape == theirs.shape == (1, rows, heads, 16)
        assert torch.equal(ours, theirs), (rows, float((ours.float() - theirs.float()).abs().max()))
        folded_any |= 1 < rows <= attention.FOLD_MAX_ROWS
    assert folded_any


def test_issue17_narrow_mask_reads_only_the_slots_it_covers():
    """Keys past a narrower mask are never read: garbage there changes nothing, and the result is
    transformers' SDPA over the covered slots, to the bit (folded or not)."""
    gen = torch.Generator().manual_seed(3)
    for heads, kv_heads, rows in ((4, 2, 16), (4, 4, 16), (9, 3, 1)):
        module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
        covered, slots = 64, 128
        query = torch.randn(1, heads, rows, 16, generator=gen).to(torch.bfloat16)
        key, value = (torch.randn(1, kv_heads, slots, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
        mask = _mask(rows, covered, torch.bfloat16, seed=rows)
        ours, _ = attention.fast_sdpa_forward(module, query, key, value, mask, scaling=0.25)
        key[:, :, covered:], value[:, :, covered:] = 1e4, float("nan")  # stale slots past the mask
        again, _ = attention.fast_sdpa_forward(module, query, key, value, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key[:, :, :covered], value[:, :, :covered], mask,
                                           scaling=0.25)
        assert torch.equal(ours, again) and torch.equal(ours, theirs), (heads, kv_heads, rows)


def test_issue17_fast_sdpa_switch_and_same_store_keys():
    gqa = tiny_model("qwen2")
    before = config_fingerprint(gqa)
    assert attention.use_fast_sdpa(gqa) and gqa.config._attn_implementation == attention.NAME
    assert attention.grouped_query_heads(gqa)
    assert config_fingerprint(gqa) == before  # the same floats: stored modules stay valid
    attention.restore_sdpa(gqa)
    assert gqa.config._attn_implementation == "sdpa"
    plain = tiny_model("llama")  # as many K/V heads as query heads: narrowed, nothing to fold
    assert attention.use_fast_sdpa(plain) and not attention.grouped_query_heads(plain)
    eager_attn = tiny_model("qwen2", attn_implementation="eager")  # the user's choice stays
    assert not attention.use_fast_sdpa(eager_attn) and eager_attn.config._attn_implementation == "eager"
    eager_engine = PromptCache(tiny_model("qwen2"), tiny_tokenizer(), progress=False)
    assert eager_engine.model.config._attn_implementation == "sdpa"  # only the fast path switches


@pytest.mark.parametrize("kv_heads", [2, 4])  # folded and narrowed; narrowed only
def test_issue17_fast_sdpa_path_equals_transformers_sdpa_and_the_oracle(kv_heads, monkeypatch):
    """The static-buffer path (uncompiled here: the same forward) with the fast SDPA and with
    transformers' own: the same logits to the bit, and the oracle's; the masks it ran with were
    narrower than the buffer (the narrowing is in force)."""
    monkeypatch.setattr(compiled_mod, "SUFFIX_BUCKETS", (1, 16))
    engines, widths = [], []
    for fast in (True, False):
        model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=kv_heads)
        pc = PromptCache(model, tiny_tokenizer(), progress=False, compile=True)
        report = pc.compile_report()
        assert report["narrow_attention"] and report["folded_query_heads"] == (kv_heads < 4)
        if not fast:
            attention.restore_sdpa(model)

        def step(model, cache, input_ids, position_ids, mask, keep, _fast=fast, _pc=pc):
            if _fast:
                widths.append((mask.shape[-1], cache.buffer.capacity))
            return compiled_mod._step(model, cache, input_ids, position_ids, mask, keep)

        pc.fast._fn = step  # the same forward, not compiled
        pc.add_schema(FULL_SCHEMA)
        pc.add_schema(DEFAULT_PATH_SCHEMA)
        engines.append(pc)
    fast, plain = engines
    for name, prompt in {**FULL_PROMPTS, "dp": DEFAULT_PATH_PROMPT}.items():
        a, b = fast.next_token_logits(prompt), plain.next_token_logits(prompt)
        assert torch.equal(a, b), name
        assert float((a - fast.oracle_logits(prompt)).abs().max()) <= 1e-4, name
    assert widths and all(w % compiled_mod.NARROW_STEP == 0 or w == cap for w, cap in widths)
    assert any(w < cap for w, cap in widths)
    assert os.environ.get(compiled_mod.SDPA_GQA_ENV) is not None

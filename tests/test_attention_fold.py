"""Issue 17, folded query heads (promptcache.runtime.attention): on CPU, a short query block of a
grouped-query model runs ONE SDPA call per K/V head (its query heads folded into rows) instead of
one per query head. It must give transformers' sdpa result to the bit, for any mask; only the
fast path switches a model to it, and module store keys do not change with it.
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
        ours, _ = attention.folded_sdpa_forward(module, query, key, value, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
        assert ours.shape == theirs.shape == (1, rows, heads, 16)
        assert torch.equal(ours, theirs), (rows, float((ours.float() - theirs.float()).abs().max()))
        folded_any |= 1 < rows <= attention.FOLD_MAX_ROWS
    assert folded_any


def test_issue17_fold_switch_only_for_grouped_query_models_and_same_store_keys():
    gqa = tiny_model("qwen2")
    before = config_fingerprint(gqa)
    assert attention.fold_query_heads(gqa) and gqa.config._attn_implementation == attention.NAME
    assert config_fingerprint(gqa) == before  # the same floats: stored modules stay valid
    attention.unfold_query_heads(gqa)
    assert gqa.config._attn_implementation == "sdpa"
    plain = tiny_model("llama")  # as many K/V heads as query heads: nothing to fold
    assert not attention.fold_query_heads(plain) and plain.config._attn_implementation == "sdpa"
    eager_attn = tiny_model("qwen2", attn_implementation="eager")  # the user's choice stays
    assert not attention.fold_query_heads(eager_attn) and eager_attn.config._attn_implementation == "eager"
    eager_engine = PromptCache(tiny_model("qwen2"), tiny_tokenizer(), progress=False)
    assert eager_engine.model.config._attn_implementation == "sdpa"  # only the fast path switches


def test_issue17_folded_fast_path_equals_unfolded_and_the_oracle(monkeypatch):
    """The static-buffer path (uncompiled here: same forward) of a grouped-query model, folded and
    not: the same logits to the bit, and the oracle's."""
    monkeypatch.setattr(compiled_mod, "SUFFIX_BUCKETS", (1, 16))
    engines = []
    for fold in (True, False):
        model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
        pc = PromptCache(model, tiny_tokenizer(), progress=False, compile=True)
        assert pc.compile_report()["folded_query_heads"] and model.config._attn_implementation == attention.NAME
        if not fold:
            attention.unfold_query_heads(model)
        pc.fast._fn = compiled_mod._step  # the same forward, not compiled
        pc.add_schema(FULL_SCHEMA)
        pc.add_schema(DEFAULT_PATH_SCHEMA)
        engines.append(pc)
    folded, unfolded = engines
    for name, prompt in {**FULL_PROMPTS, "dp": DEFAULT_PATH_PROMPT}.items():
        a, b = folded.next_token_logits(prompt), unfolded.next_token_logits(prompt)
        assert torch.equal(a, b), name
        assert float((a - folded.oracle_logits(prompt)).abs().max()) <= 1e-4, name
    assert os.environ.get(compiled_mod.SDPA_GQA_ENV) is not None

"""Position-faithful ALiBi (MPT, Falcon alibi=True): positions matter, contiguous use is unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from promptcache.models import adapter_for
from promptcache.models.alibi import is_patched
from promptcache.models.base import additive_mask
from promptcache.models.positions import get_key_positions, set_key_positions
from tiny_models import (
    ALIBI_FAMILIES,
    block_visible,
    cached_logits,
    causal_visible,
    encode_kv,
    extend_visible,
    oracle_logits,
    prepared,
    random_ids,
    splice_cache,
    tiny_model,
)

torch.set_grad_enabled(False)

# (family, attention implementation): Falcon's ALiBi has different sdpa and eager code paths.
VARIANTS = [("mpt", None), ("falcon-alibi", "sdpa"), ("falcon-alibi", "eager")]
DTYPES = [torch.float32, torch.bfloat16]


def _pair(family, impl, dtype=torch.float32, **overrides):
    """A prepared model and an identical never-prepared one."""
    model, ad = prepared(family, attn_implementation=impl, **overrides)
    return model.to(dtype), ad, tiny_model(family, attn_implementation=impl, **overrides).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family,impl", VARIANTS)
def test_contiguous_use_reproduces_the_unpatched_model(family, impl, dtype):
    model, _, original = _pair(family, impl, dtype)
    ids = random_ids(20, seed=5).repeat(2, 1)
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[1, :4] = 0  # left padding in the second row
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert torch.equal(model(ids, attention_mask=padding).logits, original(ids, attention_mask=padding).logits)
    # prefill then token by token on a cache, without position_ids, as an ordinary caller would
    ours, theirs = DynamicCache(), DynamicCache()
    assert torch.equal(model(ids[:, :12], past_key_values=ours, use_cache=True).logits,
                       original(ids[:, :12], past_key_values=theirs, use_cache=True).logits)
    for t in range(12, 20):
        assert torch.equal(model(ids[:, t:t + 1], past_key_values=ours, use_cache=True).logits,
                           original(ids[:, t:t + 1], past_key_values=theirs, use_cache=True).logits)
    assert get_key_positions(ours)[0].tolist() == list(range(20))
    prompt = ids[:1, :10]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       original.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family,impl", VARIANTS)
def test_contiguous_4d_mask_reproduces_the_unpatched_causal_forward(family, impl):
    model, ad, original = _pair(family, impl)
    n = 16
    ids = random_ids(n)
    got = oracle_logits(model, ad, ids, torch.arange(n)[None], causal_visible(n))
    torch.testing.assert_close(got, original(ids).logits[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,overrides", [
    ("mpt", dict(d_model=48, n_heads=6)),
    ("falcon-alibi", dict(hidden_size=96, num_attention_heads=6)),
])
def test_non_power_of_two_heads_keep_the_models_slopes(family, overrides):
    model, _, original = _pair(family, None, **overrides)
    ids = random_ids(14)
    assert torch.equal(model(ids).logits, original(ids).logits)


def test_unprepared_models_ignore_positions_or_reject_4d_masks():
    """The transformers 5.23 behaviour the patch exists for (re-checked on every run)."""
    ids, n = random_ids(12), 12
    mask = additive_mask(causal_visible(n), torch.float32)
    mpt = tiny_model("mpt")
    gap = torch.cat([torch.arange(6), torch.arange(20, 26)])[None]
    assert torch.equal(mpt(ids, attention_mask=mask, position_ids=gap).logits,
                       mpt(ids, attention_mask=mask, position_ids=torch.arange(n)[None]).logits)
    with pytest.raises(ValueError, match="unpack"):
        tiny_model("falcon-alibi")(ids, attention_mask=mask)


@pytest.mark.parametrize("family,impl", VARIANTS)
def test_logits_depend_on_layout_positions(family, impl):
    """A gap changes the logits; each layout matches its own spliced-cache evaluation."""
    model, ad = prepared(family, attn_implementation=impl)
    ids = random_ids(25, seed=3)
    visible = extend_visible(block_visible([10, 10]), 5)
    layouts = {
        "gapped": [torch.arange(0, 10), torch.arange(15, 25), torch.arange(25, 30)],
        "contiguous": [torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 25)],
    }
    results = {}
    for name, (pos_a, pos_b, pos_s) in layouts.items():
        pos_a, pos_b, pos_s = pos_a[None], pos_b[None], pos_s[None]
        oracle = oracle_logits(model, ad, ids, torch.cat([pos_a, pos_b, pos_s], 1), visible)
        cache = splice_cache([encode_kv(model, ad, ids[:, :10], pos_a),
                              encode_kv(model, ad, ids[:, 10:20], pos_b)], [pos_a, pos_b])
        cached = cached_logits(model, ad, cache, ids[:, 20:], pos_s, visible[20:])
        assert (oracle[20:] - cached).abs().max().item() <= 1e-4, name
        results[name] = oracle
    assert (results["gapped"][20:] - results["contiguous"][20:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ALIBI_FAMILIES)
def test_a_gap_equals_hidden_filler_tokens(family):
    """Independent check of the bias: a gap of 5 positions must act exactly like 5 tokens that
    nobody sees, evaluated with contiguous sequence indices. For MPT the reference is the
    UNPATCHED model (its index-based ALiBi is then right); unpatched Falcon rejects 4-D masks, so
    its reference is the prepared model at contiguous positions (itself checked bit-for-bit above).
    """
    model, ad = prepared(family)
    ids = random_ids(25, seed=7)
    gapped = oracle_logits(model, ad, ids, torch.cat([torch.arange(10), torch.arange(15, 30)])[None],
                           causal_visible(25))
    filled = torch.cat([ids[:, :10], torch.full((1, 5), 7), ids[:, 10:]], dim=1)
    visible = causal_visible(30).clone()
    visible[:, 10:15] = False
    visible[10:15, :] = False
    visible[range(10, 15), range(10, 15)] = True
    reference = tiny_model(family) if family == "mpt" else model
    out = reference(filled, attention_mask=additive_mask(visible, torch.float32)).logits[0]
    keep = torch.cat([torch.arange(10), torch.arange(15, 30)])
    torch.testing.assert_close(gapped, out[keep], atol=1e-5, rtol=0)
    assert (gapped - oracle_logits(model, ad, ids, torch.arange(25)[None], causal_visible(25))).abs().max() > 1e-2


def test_mpt_bias_is_translation_invariant():
    """MPT's bias is relative to the last key: shifting every position changes nothing."""
    model, ad = prepared("mpt")
    ids = random_ids(20)
    pos = torch.cat([torch.arange(8), torch.arange(12, 24)])[None]
    base = oracle_logits(model, ad, ids, pos, causal_visible(20))
    for shift in (7, 1000):
        torch.testing.assert_close(oracle_logits(model, ad, ids, pos + shift, causal_visible(20)), base,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ALIBI_FAMILIES)
def test_forward_records_new_key_positions(family):
    model, ad = prepared(family)
    cache = DynamicCache()
    model(random_ids(4), position_ids=torch.tensor([[3, 4, 9, 10]]), past_key_values=cache, use_cache=True)
    assert get_key_positions(cache).tolist() == [[3, 4, 9, 10]]
    model(random_ids(2), position_ids=torch.tensor([[20, 21]]), past_key_values=cache, use_cache=True)
    assert get_key_positions(cache).tolist() == [[3, 4, 9, 10, 20, 21]]
    model(random_ids(1), past_key_values=cache, use_cache=True)  # no position_ids: past length, as the model does
    assert get_key_positions(cache).tolist() == [[3, 4, 9, 10, 20, 21, 6]]
    fresh = model(random_ids(3), position_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
    assert get_key_positions(fresh).tolist() == [[5, 6, 7]]  # a cache the model creates itself


@pytest.mark.parametrize("family", ALIBI_FAMILIES)
def test_unrecorded_cache_counts_as_contiguous(family):
    """A cache without recorded positions behaves like an ordinary cache at 0..past-1."""
    model, ad = prepared(family)
    ids = random_ids(10)
    full = oracle_logits(model, ad, ids, torch.arange(10)[None], causal_visible(10))
    cache = DynamicCache(ddp_cache_data=encode_kv(model, ad, ids[:, :7], torch.arange(7)[None]))
    assert get_key_positions(cache) is None
    out = model(ids[:, 7:], position_ids=torch.arange(7, 10)[None],
                attention_mask=additive_mask(causal_visible(10)[7:], torch.float32),
                past_key_values=cache, use_cache=True).logits[0]
    torch.testing.assert_close(out, full[7:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ALIBI_FAMILIES)
def test_patch_is_per_instance_and_idempotent(family):
    model, ad = prepared(family)
    wrapped = model.base_model.forward
    ad.prepare(model)
    assert model.base_model.forward == wrapped  # not wrapped twice
    other = tiny_model(family)
    assert is_patched(model) and not is_patched(other)
    assert "forward" not in vars(other.base_model)
    assert type(model.base_model).forward is type(other.base_model).forward
    ids = random_ids(12)
    mask = additive_mask(causal_visible(12), torch.float32)
    gap = torch.cat([torch.arange(6), torch.arange(20, 26)])[None]
    assert not torch.equal(model(ids, attention_mask=mask, position_ids=gap).logits,
                           model(ids, attention_mask=mask, position_ids=torch.arange(12)[None]).logits)


def test_mpt_rejects_per_row_positions():
    model, _ = prepared("mpt")
    ids = random_ids(4).repeat(2, 1)
    with pytest.raises(NotImplementedError, match="same positions"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6]]))


def test_falcon_accepts_per_row_positions():
    model, ad = prepared("falcon-alibi")
    ids = random_ids(6)
    pos = torch.tensor([[0, 1, 2, 8, 9, 10]])
    mask = additive_mask(causal_visible(6), torch.float32)
    single = model(ids, position_ids=pos, attention_mask=mask).logits
    both = model(ids.repeat(2, 1), position_ids=torch.cat([pos, torch.arange(6)[None]]),
                 attention_mask=mask.expand(2, -1, -1, -1)).logits
    torch.testing.assert_close(both[0], single[0], atol=1e-5, rtol=0)
    assert (both[1] - single[0]).abs().max() > 1e-2


def test_adapter_for_alibi_families():
    assert adapter_for(tiny_model("mpt")).family == "mpt"
    assert adapter_for(tiny_model("falcon-alibi")).family == "falcon"
    cache = DynamicCache()
    set_key_positions(cache, torch.tensor([1, 2]))
    assert get_key_positions(cache).tolist() == [[1, 2]]
    with pytest.raises(TypeError):
        set_key_positions(cache, torch.tensor([1.0]))

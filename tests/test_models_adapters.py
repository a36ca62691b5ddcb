"""Adapters of every family against the one-forward oracle (tiny random models, float32)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconFlashAttention2

from promptcache.models import UnsupportedModelError, adapter_for, supported_families
from promptcache.models.base import additive_mask
from promptcache.models.positions import get_key_positions, set_key_positions
from tiny_models import (
    FAMILIES,
    SLIDING_WINDOW,
    block_visible,
    cached_logits,
    causal_visible,
    encode_kv,
    extend_visible,
    gapped_layout,
    greedy_cached,
    greedy_oracle,
    oracle_logits,
    prepared,
    random_ids,
    splice_cache,
    tiny_model,
)

torch.set_grad_enabled(False)

FAMILY_OF = {"llama": "llama", "llama-gqa": "llama", "falcon-rope": "falcon", "falcon-new-arch": "falcon",
             "falcon-alibi": "falcon", "mpt": "mpt", "qwen2": "qwen2", "mistral": "mistral",
             "gemma3": "gemma3"}
QWEN2_SLIDING = dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)


def _splice_case(model, ad):
    """Modules A (0..9) and B (15..24) encoded alone, suffix 25..29 sees everything."""
    pos_a, pos_b, pos_s = gapped_layout()
    ids = random_ids(25, seed=3)
    visible = extend_visible(block_visible([10, 10]), 5)
    positions = torch.cat([pos_a, pos_b, pos_s], dim=1)
    oracle = oracle_logits(model, ad, ids, positions, visible)
    cache = splice_cache([encode_kv(model, ad, ids[:, :10], pos_a), encode_kv(model, ad, ids[:, 10:20], pos_b)],
                         [pos_a, pos_b])
    cached = cached_logits(model, ad, cache, ids[:, 20:], pos_s, visible[20:])
    return ids, positions, visible, oracle, cache, cached


@pytest.mark.parametrize("family", FAMILIES)
def test_contiguous_4d_mask_equals_ordinary_causal_forward(family):
    model, ad = prepared(family)
    reference = tiny_model(family)  # never prepared: the library's own causal forward
    n = 30  # longer than the tiny sliding window, so windowed layers are exercised
    ids = random_ids(n)
    expected = reference(ids).logits[0]
    got = oracle_logits(model, ad, ids, torch.arange(n)[None], causal_visible(n))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_spliced_gapped_cache_matches_one_forward_oracle_and_greedy_decode(family):
    model, ad = prepared(family)
    ids, positions, visible, oracle, cache, cached = _splice_case(model, ad)
    assert (oracle[20:] - cached).abs().max().item() <= 1e-4
    assert get_key_positions(cache)[0].tolist() == positions[0].tolist()
    expected = greedy_oracle(model, ad, ids, positions, visible, steps=8)
    assert greedy_cached(model, ad, cache, cached[-1], next_pos=30, steps=8) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_visibility_is_detected(family):
    """The splice test can fail: the suffix seeing only itself gives different logits."""
    model, ad = prepared(family)
    ids, positions, visible, oracle, _, _ = _splice_case(model, ad)
    blind = visible.clone()
    blind[20:, :20] = False
    other = oracle_logits(model, ad, ids, positions, blind)
    assert (other[20:] - oracle[20:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_shape_matches_cache_tensors(family):
    model, ad = prepared(family)
    layers, heads, head_dim = ad.kv_shape(model)
    kv = encode_kv(model, ad, random_ids(6), torch.arange(6)[None])
    assert len(kv) == layers
    for keys, values in kv:
        assert tuple(keys.shape) == (1, heads, 6, head_dim) == tuple(values.shape)


def test_falcon_kv_heads_per_architecture():
    """new_decoder_architecture caches all attention heads (K/V broadcast), multi-query one."""
    assert adapter_for(tiny_model("falcon-new-arch")).kv_shape()[1] == 4  # num_kv_heads=2 in config
    assert adapter_for(tiny_model("falcon-rope")).kv_shape()[1] == 1
    assert adapter_for(tiny_model("falcon-alibi")).kv_shape()[1] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_family_and_roles(family):
    ad = adapter_for(tiny_model(family))
    assert ad.family == FAMILY_OF[family]
    roles = ad.fallback_roles()
    for role in ("system", "user", "assistant"):
        opening, closing = roles[role]
        assert isinstance(opening, str) and isinstance(closing, str)
    assert isinstance(roles["generation"], str)


def test_additive_mask_values():
    visible = torch.tensor([[True, False], [True, True]])
    mask = additive_mask(visible, torch.bfloat16)
    assert mask.shape == (1, 1, 2, 2) and mask.dtype == torch.bfloat16
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 1, 1] == 0
    assert mask[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


def test_mask_rejects_mismatched_positions():
    ad = adapter_for(tiny_model("llama"))
    with pytest.raises(ValueError):
        ad.attention_mask(causal_visible(3), torch.arange(2), torch.arange(3), torch.float32)


# -- sliding windows ------------------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", [("gemma3", {}), ("mistral", {}), ("qwen2", QWEN2_SLIDING)])
def test_plain_4d_mask_drops_the_window_adapter_mask_keeps_it(family, overrides):
    """transformers 5.23 applies no window to a ready 4-D mask: the adapter must build it."""
    model, ad = prepared(family, **overrides)
    n = 3 * SLIDING_WINDOW
    ids = random_ids(n)
    expected = tiny_model(family, **overrides)(ids).logits[0]
    plain = additive_mask(causal_visible(n), torch.float32)
    ignored = model(ids, position_ids=torch.arange(n)[None], attention_mask=plain).logits[0]
    assert (ignored - expected).abs().max().item() > 1e-2
    got = oracle_logits(model, ad, ids, torch.arange(n)[None], causal_visible(n))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mask_kinds_per_family():
    pos = torch.arange(12)
    vis = causal_visible(12)
    gemma = adapter_for(tiny_model("gemma3")).attention_mask(vis, pos, pos, torch.float32)
    assert set(gemma) == {"full_attention", "sliding_attention"}
    assert (gemma["full_attention"] == 0).sum() == vis.sum()
    window = (pos[:, None] - pos[None, :] < SLIDING_WINDOW) & vis
    assert torch.equal(gemma["sliding_attention"][0, 0] == 0, window)
    mistral = adapter_for(tiny_model("mistral")).attention_mask(vis, pos, pos, torch.float32)
    assert torch.is_tensor(mistral) and torch.equal(mistral[0, 0] == 0, window)  # no dict: all layers slide
    assert torch.is_tensor(adapter_for(tiny_model("qwen2")).attention_mask(vis, pos, pos, torch.float32))
    sliding_qwen = adapter_for(tiny_model("qwen2", **QWEN2_SLIDING)).attention_mask(vis, pos, pos, torch.float32)
    assert isinstance(sliding_qwen, dict)


def test_window_counts_layout_gaps():
    """Sliding layers hide keys by layout distance, gaps included."""
    ad = adapter_for(tiny_model("gemma3"))
    q_pos, k_pos = torch.tensor([20]), torch.tensor([11, 12, 13, 20])
    mask = ad.attention_mask(torch.ones(1, 4, dtype=torch.bool), q_pos, k_pos, torch.float32)
    assert (mask["sliding_attention"][0, 0, 0] == 0).tolist() == [False, False, True, True]
    assert (mask["full_attention"][0, 0, 0] == 0).all()


def test_qwen2_sliding_layers_splice():
    model, ad = prepared("qwen2", **QWEN2_SLIDING)
    _, _, _, oracle, _, cached = _splice_case(model, ad)
    assert (oracle[20:] - cached).abs().max().item() <= 1e-4


def test_gemma3_modules_longer_than_window():
    """Module of 3 windows, then a suffix: cached keys beyond the window are only masked."""
    model, ad = prepared("gemma3")
    length = 3 * SLIDING_WINDOW
    pos_m, pos_s = torch.arange(4, 4 + length)[None], torch.arange(40, 44)[None]
    ids = random_ids(length + 4, seed=11)
    visible = extend_visible(causal_visible(length), 4)
    oracle = oracle_logits(model, ad, ids, torch.cat([pos_m, pos_s], 1), visible)
    kv = encode_kv(model, ad, ids[:, :length], pos_m)
    assert all(k.shape[-2] == length for k, _ in kv)  # nothing evicted
    cache = splice_cache([kv], [pos_m])
    cached = cached_logits(model, ad, cache, ids[:, length:], pos_s, visible[length:])
    assert (oracle[length:] - cached).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family,overrides", [("gemma3", {}), ("mistral", {}), ("qwen2", QWEN2_SLIDING)])
def test_cache_built_with_config_crops_sliding_layers(family, overrides):
    """Why the engine must build caches WITHOUT config: sliding layers keep window-1 keys."""
    model = tiny_model(family, **overrides)
    keys = torch.randn(1, 2, 20, 16)
    with_config = DynamicCache(ddp_cache_data=[(keys, keys)] * 2, config=model.config)
    assert min(layer.keys.shape[-2] for layer in with_config.layers) == SLIDING_WINDOW - 1
    plain = DynamicCache(ddp_cache_data=[(keys, keys)] * 2)
    assert [layer.keys.shape[-2] for layer in plain.layers] == [20, 20]


def test_gemma3_positions_reach_local_and_global_rope():
    model, ad = prepared("gemma3")
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, kwargs):
        x, position_ids, layer_type = (list(args) + [None, None, None])[:3]
        layer_type = kwargs.get("layer_type", layer_type)
        seen[layer_type] = kwargs.get("position_ids", position_ids)

    handle = model.model.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pos = torch.tensor([[0, 1, 2, 9, 10, 30]])
        oracle_logits(model, ad, random_ids(6), pos, causal_visible(6))
    finally:
        handle.remove()
    assert set(seen) == {"sliding_attention", "full_attention"}
    assert all(torch.equal(p, pos) for p in seen.values())


# -- adapter selection, preparation ---------------------------------------------------------

def test_unsupported_model_names_supported_families():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(UnsupportedModelError) as err:
        adapter_for(model)
    for family in ("llama", "falcon", "mpt", "qwen2", "mistral", "gemma3"):
        assert family in str(err.value)
    assert sorted(supported_families()) == sorted(set(FAMILY_OF.values()))


@pytest.mark.parametrize("family", ["llama", "gemma3", "falcon-alibi", "mpt"])
def test_flash_attention_falls_back_with_one_warning(family):
    model = tiny_model(family)
    # flash-attn is not installed on CPU: set the config as a flash-loaded model would have it
    model.config._attn_implementation_internal = "flash_attention_2"
    ad = adapter_for(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ad.prepare(model)
        ad.prepare(model)
    ours = [w for w in caught if "promptcache" in str(w.message)]
    assert len(ours) == 1 and "flash_attention_2" in str(ours[0].message)
    assert model.config._attn_implementation in ("sdpa", "eager")
    n = 12
    ids = random_ids(n)
    torch.testing.assert_close(oracle_logits(model, ad, ids, torch.arange(n)[None], causal_visible(n)),
                               tiny_model(family)(ids).logits[0], atol=1e-5, rtol=0)


def test_falcon_flash_modules_become_plain_attention():
    model = tiny_model("falcon-rope")
    model.config._attn_implementation_internal = "flash_attention_2"
    for block in model.transformer.h:
        block.self_attention.__class__ = FalconFlashAttention2  # what a flash-loaded Falcon has
    ad = adapter_for(model)
    with pytest.warns(UserWarning, match="promptcache"):
        ad.prepare(model)
    assert all(type(b.self_attention) is FalconAttention for b in model.transformer.h)
    ids = random_ids(10)
    torch.testing.assert_close(oracle_logits(model, ad, ids, torch.arange(10)[None], causal_visible(10)),
                               tiny_model("falcon-rope")(ids).logits[0], atol=1e-5, rtol=0)


def test_recorded_positions_must_cover_the_cache():
    model, ad = prepared("mpt")
    cache = DynamicCache()
    model(random_ids(6), past_key_values=cache, use_cache=True)
    set_key_positions(cache, torch.arange(3)[None])  # fewer positions than keys
    with pytest.raises(ValueError, match="key positions"):
        model(random_ids(1), past_key_values=cache, use_cache=True)


def test_gemma3_multimodal_wrapper_takes_the_same_masks():
    """``Gemma3ForConditionalGeneration`` (model_type "gemma3") forwards the mask mapping too."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = tiny_model("gemma3").config.to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_id=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    ad = adapter_for(model)
    ad.prepare(model)
    assert ad.family == "gemma3" and ad.sliding_window() == SLIDING_WINDOW and ad.kv_shape() == (2, 2, 16)
    n = 3 * SLIDING_WINDOW
    ids = random_ids(n) % 120  # keep clear of the image tokens
    torch.testing.assert_close(oracle_logits(model, ad, ids, torch.arange(n)[None], causal_visible(n)),
                               model(ids).logits[0], atol=1e-5, rtol=0)
    pos_a, pos_b, pos_s = gapped_layout()
    ids = random_ids(25, seed=3) % 120
    visible = extend_visible(block_visible([10, 10]), 5)
    oracle = oracle_logits(model, ad, ids, torch.cat([pos_a, pos_b, pos_s], 1), visible)
    cache = splice_cache([encode_kv(model, ad, ids[:, :10], pos_a), encode_kv(model, ad, ids[:, 10:20], pos_b)],
                         [pos_a, pos_b])
    cached = cached_logits(model, ad, cache, ids[:, 20:], pos_s, visible[20:])
    assert (oracle[20:] - cached).abs().max().item() <= 1e-4

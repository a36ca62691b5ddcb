"""Relocatable modules: content keys with relative positions, RoPE rotation on load, the oracle."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine_fixtures import make_cache
from promptcache.runtime.kv import ModuleKV
from promptcache.modules.relocate import Relocation, relocation_for, rotate_keys, rotation
from promptcache.store import open_store
from tiny_models import prepared
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

# Under the independent policy m's context is the root text after x only (the tiny tokenizer has no
# BOS), so in S2 m and its whole context sit 17 positions later than in S1, with the same content.
S1 = ('<schema name="s1"><module name="x">short</module>Root text before m. '
      '<module name="m">Module m, the one that moves.</module></schema>')
S2 = S1.replace('name="s1"', 'name="s2"').replace("short", "a much longer x module")
SHIFT = len("a much longer x module") - len("short")
PROMPTS_2 = ['<prompt schema="s2"><m/> Question?</prompt>', '<prompt schema="s2"><x/><m/> Q</prompt>']
TOL = 1e-4


def relocated_engine(family: str, store):
    """A fresh engine that adds S2 with S1's modules already in ``store``."""
    make_cache(family, "independent", store=store).add_schema(S1)
    pc = make_cache(family, "independent", store=store)
    return pc, pc.add_schema(S2)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "falcon-rope", "mistral", "mpt"])
def test_relocated_module_matches_one_encoded_at_the_new_offset(family):
    store = open_store("memory://")
    pc, rep = relocated_engine(family, store)
    # The root text and m came from the store (S1's entries); only x was encoded.
    assert rep.store_hits == 2 and rep.encoded_segments == 1, rep
    assert pc.memory_report()["tiers"]["relocations"] == 2
    fresh = make_cache(family, "independent")
    fresh.add_schema(S2)
    for prompt in PROMPTS_2:
        got = pc.next_token_logits(prompt)
        assert (got - fresh.next_token_logits(prompt)).abs().max() < TOL
        assert (got - pc.oracle_logits(prompt)).abs().max() < TOL


def test_without_rotation_the_llama_answer_would_be_wrong():
    """The control: the same load without the rotation does not match (so the test above can fail)."""
    store = open_store("memory://")
    make_cache("llama", "independent", store=store).add_schema(S1)
    pc = make_cache("llama", "independent", store=store)
    pc.relocation.shift = lambda kv, delta: kv  # type: ignore[method-assign]
    pc.add_schema(S2)
    prompt = PROMPTS_2[0]
    assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() > 100 * TOL


def test_relocation_from_memory_without_store():
    """The same content at another offset is relocated from the copy already in memory."""
    pc = make_cache("llama", "independent")
    pc.add_schema(S1)
    rep = pc.add_schema(S2)
    assert rep.memory_hits == 2 and rep.encoded_segments == 1
    for prompt in PROMPTS_2 + ['<prompt schema="s1"><m/> Question?</prompt>']:
        assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() < TOL


def test_falcon_alibi_is_keyed_by_absolute_positions():
    store = open_store("memory://")
    pc, rep = relocated_engine("falcon-alibi", store)
    assert pc.relocation.mode == "absolute"
    assert rep.store_hits == 0 and rep.encoded_segments == 3
    prompt = PROMPTS_2[0]
    assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() < TOL


def test_mpt_relocation_changes_no_tensor():
    store = open_store("memory://")
    make_cache("mpt", "independent", store=store).add_schema(S1)
    pc = make_cache("mpt", "independent", store=store)
    pc.add_schema(S2)
    st = pc.schemas["s2"]
    m = next(i for i in st.keys if st.layout.segments[i].owner == ("m",))
    stored = store.get(st.keys[m].store_key)
    assert stored.meta["offset"] == st.keys[m].base - SHIFT
    assert all(torch.equal(k, k2) for k, k2 in zip(stored.kv.keys, st.kv[m].keys))


def test_rotation_composes_like_rope():
    """R(d) applied to a key rotated at p equals the key rotated at p + d (HF's own apply_rotary)."""
    model, ad = prepared("llama")
    rel = relocation_for(model, ad)
    inv = rel.inv_freq[0]
    k = torch.randn(1, 4, 6, 16)
    q = torch.zeros_like(k)

    def rope_at(pos: torch.Tensor) -> torch.Tensor:
        ang = pos[:, None].double() * inv.double()[None]
        emb = torch.cat([ang, ang], -1)
        return apply_rotary_pos_emb(q, k, emb.cos().float()[None], emb.sin().float()[None])[1]

    pos = torch.arange(3, 9)
    moved = rotate_keys(rope_at(pos), *rotation(inv, 1000, k.device))
    assert (moved - rope_at(pos + 1000)).abs().max() < 1e-4
    back = rotate_keys(moved, *rotation(inv, -1000, k.device))
    assert (back - rope_at(pos)).abs().max() < 1e-5
    kv = ModuleKV([rope_at(pos)[0]] * 2, [k[0]] * 2)
    out = rel.shift(kv, 0)
    assert out is kv
    out = rel.shift(kv, 5)
    assert out.values[0] is kv.values[0] and not torch.equal(out.keys[0], kv.keys[0])


@pytest.mark.parametrize("rope,mode", [
    ({"rope_type": "default"}, "rotate"),
    ({"rope_type": "linear", "factor": 2.0}, "rotate"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 128}, "rotate"),
    ({"rope_type": "dynamic", "factor": 2.0}, "absolute"),
    ({"rope_type": "yarn", "factor": 2.0}, "absolute"),
])
def test_which_rope_types_relocate(rope, mode):
    model, ad = prepared("llama", rope_parameters={**rope, "rope_theta": 10000.0})
    assert relocation_for(model, ad).mode == mode


def test_linear_rope_relocation_oracle():
    from promptcache.engine import PromptCache
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    store = open_store("memory://")

    def engine():
        model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
        return PromptCache(model, tiny_tokenizer(), encoding="independent", progress=False, store=store)

    engine().add_schema(S1)
    pc = engine()
    rep = pc.add_schema(S2)
    assert rep.store_hits == 2
    prompt = PROMPTS_2[1]
    assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() < TOL


def test_gemma3_rotates_each_layer_with_its_own_frequencies():
    model, ad = prepared("gemma3")
    rel = relocation_for(model, ad)
    types = model.config.layer_types
    assert rel.mode == "rotate" and len(rel.inv_freq) == len(types)
    rot = model.model.rotary_emb
    for t, inv in zip(types, rel.inv_freq):
        assert inv is getattr(rot, f"{t}_inv_freq")
    assert not torch.equal(rel.inv_freq[0], rel.inv_freq[1])  # local and global bases differ


def test_absolute_relocation_refuses_to_shift():
    with pytest.raises(ValueError):
        Relocation("absolute", "test").shift(ModuleKV([torch.zeros(1, 1, 2)], [torch.zeros(1, 1, 2)]), 3)

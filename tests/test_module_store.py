"""The engine with a persistent store: content keys, loading instead of encoding, integrity fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.modules.keys import module_keys
from promptcache.plan import encoding_contexts, stored_segments
from promptcache.store import CacheEntry, StoreWarning, open_store
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

# Two schemas with the same root text and module "m" at the same place; what follows differs.
SHARED_A = """<schema name="sa"><system>Shared system text.</system><user open="true">
Root words. <module name="m">The shared module body.</module> <module name="p">Only in A.</module>
</user></schema>"""
SHARED_B = """<schema name="sb"><system>Shared system text.</system><user open="true">
Root words. <module name="m">The shared module body.</module> <module name="q">B has another module, longer.</module>
</user></schema>"""
OTHER_CONTEXT = SHARED_A.replace('name="sa"', 'name="sc"').replace("Root words.", "Other root!")
PROMPT_A = '<prompt schema="sa"><m/><p/> Question?</prompt>'
PROMPT_B = '<prompt schema="sb"><m/> Question?</prompt>'


def entries_of(store, module: str) -> list:
    return [i for i in store.list() if i.meta.get("module") == module]


@pytest.mark.parametrize("encoding", ["independent", "scaffold"])
def test_same_module_same_context_is_stored_once(encoding):
    store = open_store("memory://")
    pc = make_cache("llama", encoding, store=store)
    pc.add_schema(SHARED_A)
    puts = store.counters["puts"]
    rep = pc.add_schema(SHARED_B)
    key_a = pc.schemas["sa"].keys
    key_b = pc.schemas["sb"].keys
    seg_m = lambda name: next(i for i, s in enumerate(pc.layout(name).segments) if s.owner == ("m",))  # noqa: E731
    assert key_a[seg_m("sa")] == key_b[seg_m("sb")]
    assert len(entries_of(store, "m")) == 1
    # B reused m and the root text before it from memory (one copy held), encoded only the rest.
    assert rep.memory_hits >= 2 and rep.encoded_segments >= 1
    assert store.counters["puts"] - puts == rep.encoded_segments
    held = [r for r in pc.module_cache.residents() if r.key == key_a[seg_m("sa")]]
    assert len(held) == 1
    # Both schemas answer exactly like the oracle.
    for prompt in (PROMPT_A, PROMPT_B):
        assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() < 1e-4


def test_different_context_gives_different_key():
    store = open_store("memory://")
    pc = make_cache("llama", "independent", store=store)
    pc.add_schema(SHARED_A)
    pc.add_schema(OTHER_CONTEXT)
    assert len(entries_of(store, "m")) == 2
    a, c = pc.schemas["sa"], pc.schemas["sc"]
    m = lambda st: next(k for i, k in st.keys.items() if st.layout.segments[i].owner == ("m",))  # noqa: E731
    assert m(a).store_key != m(c).store_key


def _keys(pc, schema_text, **overrides):
    pc.add_schema(schema_text)
    state = next(iter(pc.schemas.values()))
    kw = dict(model="fp", dtype="float32", policy=pc.encoding, relative=True, offset_sensitive=True)
    kw.update(overrides)
    return module_keys(state.layout, state.contexts, stored_segments(state.layout), **kw)


SHIFT_1 = '<schema name="s1"><module name="x">short</module>Root text. <module name="m">Body of m.</module></schema>'
SHIFT_2 = SHIFT_1.replace("short", "a much longer x module")


def test_key_covers_model_dtype_policy_and_positions():
    pc = make_cache("llama", "independent")
    base = _keys(pc, SHARED_A)
    for change in ({"model": "fp2"}, {"dtype": "bfloat16"}, {"policy": "scaffold"}, {"relative": False}):
        other = _keys(pc, SHARED_A, **change)
        assert all(base[i].store_key != other[i].store_key for i in base), change
    # m (and the root text before it) see the same content in both schemas, shifted by x's length:
    # the same relative key, different absolute keys.
    for relative in (True, False):
        k1 = _keys(make_cache("llama", "independent"), SHIFT_1, relative=relative)
        k2 = _keys(make_cache("llama", "independent"), SHIFT_2, relative=relative)
        assert (k1[2].store_key == k2[2].store_key) is relative
        assert k1[0].store_key != k2[0].store_key  # x itself differs
        shift = len("a much longer x module") - len("short")
        assert k2[2].base - k1[2].base == (shift if relative else 0)


def test_model_fingerprint_is_part_of_the_key():
    store = open_store("memory://")
    a = make_cache("llama", "scaffold", store=store)
    a.add_schema(FULL_SCHEMA)
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer
    from promptcache.engine import PromptCache

    other = PromptCache(tiny_model("llama", seed=5), tiny_tokenizer(), progress=False, store=store)
    rep = other.add_schema(FULL_SCHEMA)
    assert rep.store_hits == 0 and rep.encoded_segments == rep.segments
    assert len(store.list()) == 2 * rep.segments


def test_second_engine_loads_everything_with_identical_logits():
    store = open_store("memory://")
    a = make_cache("llama", "scaffold", store=store)
    rep_a = a.add_schema(FULL_SCHEMA)
    assert rep_a.encoded_segments == rep_a.segments and rep_a.forwards > 0
    b = make_cache("llama", "scaffold", store=store)
    rep_b = b.add_schema(FULL_SCHEMA)
    assert rep_b.forwards == 0 and rep_b.encoded_tokens == 0 and rep_b.encode_s == 0.0
    assert rep_b.store_hits == rep_b.segments and rep_b.load_s > 0
    assert b.store_report() == {"store_hits": rep_b.segments, "store_misses": 0}
    assert a.store_report() == {"store_hits": 0, "store_misses": rep_a.segments}
    for prompt in FULL_PROMPTS.values():
        assert torch.equal(a.next_token_logits(prompt), b.next_token_logits(prompt))


def test_no_store_report_without_store():
    assert make_cache("llama").store_report() is None


def test_encode_report_counts_loads_separately():
    store = open_store("memory://")
    make_cache("llama", "independent", store=store).add_schema(SHARED_A)
    pc = make_cache("llama", "independent", store=store)
    rep = pc.add_schema(SHARED_B)  # shares m and root text with A, must encode q
    assert 0 < rep.store_hits < rep.segments
    assert rep.encoded_segments == rep.segments - rep.store_hits
    assert rep.forwards >= 1 and rep.encode_s > 0 and rep.load_s > 0


class CorruptingStore:
    """Wraps a store; ``get`` returns tampered entries (what a buggy writer could have stored)."""

    def __init__(self, inner, how: str) -> None:
        self.inner, self.how = inner, how
        self.url = "corrupt://"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key, expect=None):
        e = self.inner.get(key, expect)
        if e is None:
            return None
        if self.how == "shape":
            return CacheEntry(e.kv.slice(0, e.kv.length - 1), e.meta)
        if self.how == "offset":
            return CacheEntry(e.kv, {**e.meta, "offset": "x"})
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["shape", "offset"])
def test_malformed_entries_are_recomputed(how):
    from promptcache.store import CacheStore

    inner = open_store("memory://")
    make_cache("llama", "scaffold", store=inner).add_schema(FULL_SCHEMA)
    wrapped = CorruptingStore(inner, how)
    CacheStore.register(CorruptingStore)
    pc = make_cache("llama", "scaffold", store=wrapped)
    with pytest.warns(StoreWarning, match="ignored"):
        rep = pc.add_schema(FULL_SCHEMA)
    assert rep.store_hits == 0 and rep.encoded_segments == rep.segments
    prompt = FULL_PROMPTS["default-ish"]
    assert (pc.next_token_logits(prompt) - pc.oracle_logits(prompt)).abs().max() < 1e-4


def test_corrupted_directory_entry_is_recomputed(tmp_path):
    a = make_cache("llama", "scaffold", store=str(tmp_path))
    a.add_schema(FULL_SCHEMA)
    expected = a.next_token_logits(FULL_PROMPTS["default-ish"])
    files = sorted((tmp_path / "entries").rglob("*.safetensors"))
    assert files
    data = bytearray(files[0].read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's bytes
    files[0].write_bytes(bytes(data))
    b = make_cache("llama", "scaffold", store=str(tmp_path))
    with pytest.warns(StoreWarning):
        rep = b.add_schema(FULL_SCHEMA)
    assert rep.encoded_segments == 1 and rep.store_hits == rep.segments - 1
    assert (b.next_token_logits(FULL_PROMPTS["default-ish"]) - expected).abs().max() < 1e-5


def test_foreign_dtype_entry_is_a_miss(tmp_path):
    """An entry whose meta names another dtype under the same key is refused by ``expect``."""
    store = open_store("memory://")
    a = make_cache("llama", "scaffold", store=store)
    a.add_schema(FULL_SCHEMA)
    for info in store.list():
        e = store.get(info.key)
        store.put(info.key, CacheEntry(e.map(torch.Tensor.double).kv, {**e.meta, "dtype": "float64"}))
    b = make_cache("llama", "scaffold", store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        rep = b.add_schema(FULL_SCHEMA)
    assert rep.store_hits == 0 and rep.encoded_segments == rep.segments


def test_keys_are_stable_for_the_same_layout():
    pc = make_cache("llama", "scaffold")
    pc.add_schema(FULL_SCHEMA)
    st = pc.schemas["t"]
    again = module_keys(st.layout, encoding_contexts(st.layout, "scaffold"), stored_segments(st.layout),
                        **{k: v for k, v in st.expect.items() if k in ("model", "dtype", "policy")},
                        relative=True, offset_sensitive=True)
    assert {i: k.store_key for i, k in again.items()} == {i: k.store_key for i, k in st.keys.items()}

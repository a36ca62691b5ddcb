"""One contract for every store backend (memory, directory, Redis), plus keys and fingerprints."""

from __future__ import annotations

import copy
import uuid
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.runtime.kv import ModuleKV
from promptcache.store import (CacheEntry, LocalStore, MemoryStore, StoreError, StoreWarning,
                               make_key, model_fingerprint, open_store)

try:
    from store_helpers import make_entry, same_bits
    from redis_fixture import redis_url  # noqa: F401  (pytest fixture)
except ImportError:  # tests/ imported as a package
    from tests.store_helpers import make_entry, same_bits
    from tests.redis_fixture import redis_url  # noqa: F401

BACKENDS = ["memory", "local", "redis"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "memory":
        s = open_store("memory://")
    elif request.param == "local":
        s = open_store(str(tmp_path / "store"))
    else:
        url = request.getfixturevalue("redis_url")
        # Tiny chunks so multi-chunk payloads are exercised; a fresh prefix isolates each test.
        s = open_store(f"{url}?prefix=t{uuid.uuid4().hex[:8]}&chunk_bytes=1000")
    yield s
    s.close()


def _key(**kw) -> str:
    return make_key({"test": "contract", **kw})


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bit_exact(store, dtype):
    entry = make_entry(n_layers=4, seq=33, dtype=dtype)
    # Values that only a bit-exact store preserves.
    k0 = entry.kv.keys[0].view(-1)
    k0[:5] = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 1e-40]).to(dtype)
    key = _key(dtype=str(dtype))
    assert store.put(key, entry) is True
    got = store.get(key)
    assert got is not None
    assert same_bits(got, entry)
    assert got.meta == entry.meta
    assert got.n_layers == 4 and got.seq_len == 33 and got.dtype == str(dtype).removeprefix("torch.")
    assert got.nbytes == entry.nbytes == 4 * 2 * 2 * 33 * 8 * torch.empty((), dtype=dtype).element_size()


def test_meta_is_stored_as_canonical_json(store):
    entry = make_entry(meta={"token_ids": (1, 2, 3), "nested": {"b": [1.5, None], "a": True}})
    store.put(_key(), entry)
    got = store.get(_key())
    assert got.meta["token_ids"] == [1, 2, 3]
    assert got.meta["nested"] == {"a": True, "b": [1.5, None]}


def test_meta_must_be_jsonable(store):
    with pytest.raises(StoreError):
        store.put(_key(), make_entry(meta={"bad": {1, 2}}))
    with pytest.raises(StoreError):
        store.put(_key(), make_entry(meta={"bad": float("nan")}))


def test_missing_key(store):
    key = _key(missing=True)
    assert store.get(key) is None
    assert store.contains(key) is False
    assert store.delete(key) is False


def test_contains_delete_list_stats(store):
    entries = {_key(i=i): make_entry(seq=5 + i, seed=i, meta={"module": f"m{i}"}) for i in range(3)}
    for k, e in entries.items():
        store.put(k, e)
    assert all(store.contains(k) for k in entries)
    infos = {i.key: i for i in store.list()}
    assert set(infos) == set(entries)
    for k, e in entries.items():
        info = infos[k]
        assert (info.nbytes, info.n_layers, info.seq_len, info.dtype) == (e.nbytes, 3, e.seq_len, "float32")
        assert info.meta["module"] == e.meta["module"]
        assert info.created > 0 and info.last_access >= info.created - 1
    stats = store.stats()
    assert stats["entries"] == 3 and stats["bytes"] == sum(e.nbytes for e in entries.values())
    assert stats["puts"] == 3

    victim = next(iter(entries))
    assert store.delete(victim) is True
    assert not store.contains(victim) and store.get(victim) is None
    assert {i.key for i in store.list()} == set(entries) - {victim}
    assert store.stats()["entries"] == 2
    assert store.verify() == []


def test_overwrite_replaces_entry(store):
    key = _key()
    store.put(key, make_entry(seq=4, seed=1))
    newer = make_entry(seq=9, seed=2, dtype=torch.bfloat16)
    store.put(key, newer)
    got = store.get(key)
    assert same_bits(got, newer) and got.meta["seed"] == 2
    assert [i.key for i in store.list()] == [key]
    assert store.list()[0].seq_len == 9


def test_stored_entry_is_isolated_from_caller_mutation(store):
    key = _key()
    entry = make_entry()
    original = copy.deepcopy(entry)
    store.put(key, entry)
    entry.kv.keys[0].add_(1)  # caller keeps using its tensors
    entry.meta["seed"] = 99
    got = store.get(key)
    assert same_bits(got, original) and got.meta == original.meta
    got.kv.values[1].mul_(3)  # and mutates what it got back
    assert same_bits(store.get(key), original)


def test_views_of_one_buffer_are_stored(store):
    """Layers sliced out of one preallocated cache share storage and may be non-contiguous."""
    big = torch.randn(4, 2, 2, 20, 8)
    entry = CacheEntry(ModuleKV([big[i, 0, :, 3:13] for i in range(4)], [big[i, 1, :, 3:13] for i in range(4)]),
                       {"module": "x"})
    store.put(_key(), entry)
    assert same_bits(store.get(_key()), entry)


def test_empty_and_zero_length(store):
    entry = CacheEntry(ModuleKV([torch.empty(2, 0, 8)], [torch.empty(2, 0, 8)]), {"module": "empty"})
    store.put(_key(), entry)
    got = store.get(_key())
    assert got is not None and got.seq_len == 0 and got.kv.keys[0].shape == (2, 0, 8)


def test_expect_mismatch_is_a_reported_miss(store):
    key = _key()
    store.put(key, make_entry(dtype=torch.bfloat16))
    assert store.get(key, expect={"model": "fp-test", "dtype": torch.bfloat16}) is not None
    assert store.get(key, expect={"dtype": "bfloat16"}) is not None
    with pytest.warns(StoreWarning, match=f"{key}.*model"):
        assert store.get(key, expect={"model": "another-model"}) is None
    assert not store.contains(key)  # removed/quarantined, so the engine recomputes and re-puts
    store.put(key, make_entry(dtype=torch.bfloat16))
    with pytest.warns(StoreWarning, match="dtype mismatch"):
        assert store.get(key, expect={"dtype": torch.float16}) is None


def test_invalid_keys_rejected(store):
    for bad in ["", "../etc/passwd", "a/b", "UPPER", ".hidden", "x" * 200, 5]:
        with pytest.raises(StoreError):
            store.put(bad, make_entry())
        with pytest.raises(StoreError):
            store.get(bad)


def test_counters(store):
    key = _key()
    store.get(key)
    store.put(key, make_entry())
    store.get(key)
    s = store.stats()
    assert (s["hits"], s["misses"], s["puts"]) == (1, 1, 1)


def test_get_updates_last_access(store):
    import time
    key = _key()
    store.put(key, make_entry())
    before = store.list()[0].last_access
    time.sleep(0.02)
    store.get(key)
    assert store.list()[0].last_access > before


# -- factory -----------------------------------------------------------------------------------

def test_open_store_factory(tmp_path):
    assert isinstance(open_store("memory://"), MemoryStore)
    assert open_store("memory://shared") is open_store("memory://shared")
    assert open_store("memory://") is not open_store("memory://")
    d = open_store(str(tmp_path / "a"))
    assert isinstance(d, LocalStore) and (tmp_path / "a" / "entries").is_dir()
    f = open_store(f"file://{tmp_path / 'b'}?fsync=0&load=pread")
    assert isinstance(f, LocalStore) and f.fsync is False and f.load == "pread"
    f.put("k1", make_entry())
    assert same_bits(f.get("k1"), make_entry())
    with pytest.raises(StoreError):
        open_store("s3://bucket/x")
    with pytest.raises(StoreError):
        open_store("file://otherhost/x")


def test_directory_store_shared_between_instances(tmp_path):
    a, b = open_store(str(tmp_path)), open_store(f"file://{tmp_path}")
    a.put("k1", make_entry())
    assert same_bits(b.get("k1"), make_entry())
    assert [i.key for i in b.list()] == ["k1"]


def test_redis_url_options(redis_url):
    s = open_store(f"{redis_url}?prefix=opt{uuid.uuid4().hex[:6]}&ttl=100&chunk_mb=1")
    assert s.ttl == 100 and s.chunk_bytes == 1024 * 1024
    s.put("k1", make_entry())
    assert 0 < s.client.ttl(s.manifest_key("k1")) <= 100
    assert same_bits(s.get("k1"), make_entry())
    with pytest.raises(StoreError):
        open_store(f"{redis_url}?chunk_mb=1024")


# -- keys --------------------------------------------------------------------------------------

BASE_PARTS = {
    "model": "a" * 64, "dtype": "float32", "policy": {"scaffold": True, "rope": "absolute"},
    "token_ids": [5, 6, 7, 8], "position_ids": [10, 11, 12, 13],
    "context": {"token_ids": [1, 2, 3], "position_ids": [0, 1, 2]},
}


def test_key_is_deterministic_and_canonical():
    k = make_key(BASE_PARTS)
    assert len(k) == 64 and int(k, 16) >= 0
    shuffled = dict(reversed(list(BASE_PARTS.items())))
    assert make_key(shuffled) == k
    as_tuples = {**BASE_PARTS, "token_ids": (5, 6, 7, 8), "position_ids": torch.tensor([10, 11, 12, 13])}
    assert make_key(as_tuples) == k
    assert make_key({**BASE_PARTS, "dtype": torch.float32}) == k  # dtype objects by name


@pytest.mark.parametrize("change", [
    {"token_ids": [5, 6, 7, 9]},
    {"token_ids": [5, 6, 7]},
    {"position_ids": [10, 11, 12, 14]},
    {"position_ids": [0, 1, 2, 3]},
    {"dtype": "bfloat16"},
    {"model": "b" + "a" * 63},
    {"policy": {"scaffold": False, "rope": "absolute"}},
    {"context": {"token_ids": [1, 2, 4], "position_ids": [0, 1, 2]}},
    {"context": {"token_ids": [1, 2, 3], "position_ids": [0, 1, 3]}},
    {"extra": None},
])
def test_key_changes_with_any_value_input(change):
    assert make_key({**BASE_PARTS, **change}) != make_key(BASE_PARTS)


def test_key_distinguishes_types():
    assert make_key({"x": 1}) != make_key({"x": 1.0})
    assert make_key({"x": 1}) != make_key({"x": True})
    assert make_key({"x": "1"}) != make_key({"x": 1})
    assert make_key({"x": [1, 2]}) != make_key({"x": [[1, 2]]})
    for bad in ({"x": {1, 2}}, {"x": object()}, {1: "int key"}, {"x": float("inf")}):
        with pytest.raises(StoreError):
            make_key(bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50000), min_size=1, max_size=40), st.data())
def test_key_sensitive_to_every_token(tokens, data):
    i = data.draw(st.integers(0, len(tokens) - 1))
    delta = data.draw(st.integers(1, 1000))
    changed = tokens.copy()
    changed[i] += delta
    assert make_key({"token_ids": tokens}) != make_key({"token_ids": changed})
    assert make_key({"token_ids": tokens}) == make_key({"token_ids": list(tokens)})


# -- model fingerprint -------------------------------------------------------------------------

def _tiny_model(seed: int = 0, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64, **cfg)
    return LlamaForCausalLM(config).eval()


def test_fingerprint_deterministic_and_cached():
    a, b = _tiny_model(0), _tiny_model(0)
    fa = model_fingerprint(a)
    assert len(fa) == 64
    assert model_fingerprint(b) == fa  # same weights and config, other object
    b.config._name_or_path = "/some/other/path"  # volatile fields do not matter
    assert model_fingerprint(b, refresh=True) == fa
    assert model_fingerprint(a) == fa and hasattr(a, "_promptcache_fingerprint")
    assert model_fingerprint(_tiny_model(1)) != fa  # other random init


def test_fingerprint_changes_when_one_weight_changes():
    model = _tiny_model(0)
    before = model_fingerprint(model)
    w = model.model.layers[1].mlp.down_proj.weight
    # An element the strided sample skips: only the full bit-sum can notice it.
    with torch.no_grad():
        w.view(-1)[1] += 1e-3
    after = model_fingerprint(model)  # in-place edit invalidates the cached value
    assert after != before
    with torch.no_grad():
        w.view(-1)[1] -= 1e-3
    # Float round-off may not restore the bits exactly; compare against a fresh twin instead.
    assert model_fingerprint(_tiny_model(0)) == before


def test_fingerprint_data_surgery_needs_refresh():
    model = _tiny_model(0)
    before = model_fingerprint(model)
    model.lm_head.weight.data[3, 5] = 7.0  # .data bypasses autograd's version counter
    assert model_fingerprint(model, refresh=True) != before
    assert model_fingerprint(model, full=True) != model_fingerprint(_tiny_model(0), full=True)


def test_fingerprint_covers_config_and_dtype():
    base = model_fingerprint(_tiny_model(0))
    assert model_fingerprint(_tiny_model(0, rms_norm_eps=1e-5)) != base
    assert model_fingerprint(_tiny_model(0).to(torch.bfloat16)) != base
    eager = _tiny_model(0)
    eager.config._attn_implementation = "eager"
    assert model_fingerprint(eager) != base


def test_fingerprint_feeds_keys():
    a, b = _tiny_model(0), _tiny_model(1)
    parts = {"dtype": "float32", "token_ids": [1, 2]}
    assert make_key({**parts, "model": model_fingerprint(a)}) != make_key({**parts, "model": model_fingerprint(b)})


def test_no_warnings_on_clean_use(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.put(_key(), make_entry())
        store.get(_key())
        store.list()
        store.verify()


# ---------------------------------------------------------------- Redis chunk layout (no server needed)

def test_redis_chunks_hold_whole_tensors_when_sizes_match():
    from promptcache.store.redis_format import aligned_chunk_bytes

    assert aligned_chunk_bytes([600] * 10, 1000) == 600          # one tensor per chunk
    assert aligned_chunk_bytes([300] * 10, 1000) == 900          # three per chunk
    assert aligned_chunk_bytes([5000] * 4, 1000) == 5000         # larger than the target: its own chunk
    assert aligned_chunk_bytes([300, 200], 1000) == 1000         # mixed sizes: the plain target
    assert aligned_chunk_bytes([], 1000) == 1000


@pytest.mark.parametrize("cut", [4, 12, 28, 1000])
def test_redis_reader_rebuilds_tensors_whatever_the_chunk_boundaries(cut):
    """Entries written with any chunk size (older ones were not aligned) read back exactly."""
    import torch

    from promptcache.store.redis_format import ChunkedBytes

    tensors = [torch.arange(6, dtype=torch.float32) + 10 * i for i in range(3)]
    payload = b"".join(t.numpy().tobytes() for t in tensors)
    data = ChunkedBytes([payload[i:i + cut] for i in range(0, len(payload), cut)])
    for i, t in enumerate(tensors):
        got = data.tensor("float32", [2, 3], 24 * i, 24)
        assert torch.equal(got, t.reshape(2, 3))

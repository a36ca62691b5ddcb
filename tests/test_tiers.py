"""The tiered module cache: budgets after every request, pins, eviction and return, per-tier report."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.runtime.kv import ModuleKV
from promptcache.modules.keys import ModuleKey
from promptcache.modules.relocate import Relocation
from promptcache.store import open_store
from promptcache.modules.tiers import TieredModuleCache
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

PROMPTS = list(FULL_PROMPTS.values())


def reference_logits() -> dict[str, torch.Tensor]:
    pc = make_cache("llama", "scaffold")
    pc.add_schema(FULL_SCHEMA)
    return {p: pc.next_token_logits(p) for p in PROMPTS}


@pytest.fixture(scope="module")
def reference():
    return reference_logits()


def within_budgets(pc) -> None:
    tiers = pc.memory_report()["tiers"]
    for name in ("device", "host"):
        t = tiers[name]
        if t["budget"] is not None:
            assert t["bytes"] <= t["budget"], (name, t)
        assert t["pinned"] == 0, "a finished request left pins behind"


@pytest.mark.parametrize("device_kb,host_kb,store", [
    (40, 60, True),      # device -> host -> store
    (40, None, False),   # device -> host only
    (30, 30, False),     # dropped when host overflows: re-encoded on demand
    (0, 0, True),        # everything lives in the store between requests
])
def test_budgets_hold_after_every_request_and_answers_do_not_change(reference, device_kb, host_kb, store):
    kw = {"max_device_bytes": device_kb * 1024,
          "max_host_bytes": None if host_kb is None else host_kb * 1024}
    if store:
        kw["store"] = open_store("memory://")
    pc = make_cache("llama", "scaffold", **kw)
    pc.add_schema(FULL_SCHEMA)
    within_budgets(pc)
    for _ in range(2):
        for p in PROMPTS:
            logits = pc.next_token_logits(p)
            within_budgets(pc)
            if store or host_kb is None:  # from host/store: the very same bits
                assert torch.equal(logits, reference[p])
            else:  # re-encoded (possibly in a shorter forward): equal up to float rounding
                assert (logits - reference[p]).abs().max() < 1e-5
        res = pc.generate(PROMPTS[0], max_new_tokens=3)
        within_budgets(pc)
        assert torch.equal(res.first_token_logits, reference[PROMPTS[0]]) or not (store or host_kb is None)
    tiers = pc.memory_report()["tiers"]
    assert tiers["device"]["evictions"] > 0
    if store:
        assert tiers["store"]["hits"] > 0
    if not store and host_kb is not None:
        assert tiers["dropped"] > 0


def test_evicted_entries_come_back_bit_identical_from_host(reference):
    pc = make_cache("llama", "scaffold", max_device_bytes=0)
    pc.add_schema(FULL_SCHEMA)
    rep = pc.memory_report()
    assert rep["tiers"]["device"]["bytes"] == 0 and rep["tiers"]["host"]["entries"] == len(pc.schemas["t"].keys)
    assert rep["tiers"]["host"]["bytes"] == rep["total_bytes"] > 0
    p = PROMPTS[0]
    assert torch.equal(pc.next_token_logits(p), reference[p])
    rep = pc.memory_report()["tiers"]
    assert rep["host"]["hits"] > 0 and rep["device"]["bytes"] == 0


def test_store_write_back_when_write_through_failed(reference):
    """An entry whose write-through failed is written when it is evicted from host memory."""
    store = open_store("memory://")
    real_put = store.put
    store.put = lambda key, entry: False  # the store refuses writes while the schema is encoded
    pc = make_cache("llama", "scaffold", store=store, max_device_bytes=None, max_host_bytes=0)
    pc.add_schema(FULL_SCHEMA)
    assert pc.memory_report()["tiers"]["store"]["failed_puts"] == len(pc.schemas["t"].keys)
    store.put = real_put
    pc.module_cache.budget["device"] = 0  # now evict everything: device -> host -> store (write-back)
    pc.module_cache.enforce()
    tiers = pc.memory_report()["tiers"]
    assert tiers["store"]["write_backs"] == len(pc.schemas["t"].keys) == len(store.list())
    assert tiers["device"]["entries"] == tiers["host"]["entries"] == 0
    p = PROMPTS[1]
    assert torch.equal(pc.next_token_logits(p), reference[p])


def test_memory_report_lists_tiers_and_modules():
    pc = make_cache("llama", "scaffold", max_device_bytes=50_000, max_host_bytes=10**9)
    pc.add_schema(FULL_SCHEMA)
    rep = pc.memory_report()
    t = rep["tiers"]
    assert set(t) >= {"device", "host", "store"} and t["store"] is None
    for name in ("device", "host"):
        assert set(t[name]) >= {"bytes", "entries", "budget", "hits", "misses", "evictions", "pinned"}
    assert t["device"]["budget"] == 50_000 and t["host"]["budget"] == 10**9
    assert t["device"]["bytes"] + t["host"]["bytes"] == rep["total_bytes"] == rep["total_tokens"] * rep[
        "bytes_per_token"]
    rows = rep["modules"]
    assert sum(r["device_bytes"] + r["host_bytes"] for r in rows) == rep["total_bytes"]
    assert any(r["host_bytes"] for r in rows) and any(r["device_bytes"] for r in rows)


def test_host_placement_uses_the_host_tier_only(reference):
    pc = make_cache("llama", "scaffold", placement="host", max_host_bytes=60_000, store=open_store("memory://"))
    pc.add_schema(FULL_SCHEMA)
    for p in PROMPTS:
        assert torch.equal(pc.next_token_logits(p), reference[p])
        within_budgets(pc)
    t = pc.memory_report()["tiers"]
    assert t["device"]["entries"] == 0 and t["host"]["evictions"] > 0


def test_remove_schema_frees_memory_but_shared_entries_stay():
    pc = make_cache("llama", "scaffold")
    pc.add_schema(FULL_SCHEMA)
    pc.add_schema(FULL_SCHEMA.replace('name="t"', 'name="t2"'))  # same content: same keys
    one = pc.memory_report()
    assert one["total_bytes"] > 0 and len({r["schema"] for r in one["modules"]}) == 2
    pc.remove_schema("t")
    assert pc.memory_report()["total_bytes"] == one["total_bytes"]  # t2 still needs every entry
    pc.remove_schema("t2")
    assert pc.memory_report()["total_bytes"] == 0


def test_readding_a_schema_releases_entries_it_no_longer_needs():
    pc = make_cache("llama", "scaffold")
    pc.add_schema(FULL_SCHEMA)
    before = pc.memory_report()["total_tokens"]
    pc.add_schema(FULL_SCHEMA.replace("Epsilon final.", "Eps."))  # e changes; the rest is reused
    after = pc.memory_report()
    assert after["total_tokens"] == before - len("Epsilon final.") + len("Eps.")


def test_pinned_entries_are_never_evicted_during_a_request(monkeypatch):
    """Within a request, every module the request uses stays in its tier until the prefill copied it."""
    pc = make_cache("llama", "scaffold", max_device_bytes=0, max_host_bytes=0, store=open_store("memory://"))
    pc.add_schema(FULL_SCHEMA)
    seen = []
    state, request = pc.request(PROMPTS[0])

    def spy(call):  # runs before the request's prefill forward, modules fetched and pinned
        pc.module_cache.enforce()  # eviction pressure in the middle of the request
        held = {pc.module_cache.where(state.keys[i].tier_key) for i, _ in request.cached_spans}
        seen.append((held, pc.memory_report()["tiers"]["device"]["pinned"]))

    monkeypatch.setattr(pc.runner, "forward_hooks", [spy])
    pc.next_token_logits(PROMPTS[0])
    held, pinned = seen[0]
    assert held == {"device"} and pinned > 0
    within_budgets(pc)
    assert pc.memory_report()["tiers"]["device"]["entries"] == 0


def _entry(n: int, seed: int) -> ModuleKV:
    g = torch.Generator().manual_seed(seed)
    return ModuleKV([torch.randn(2, n, 4, generator=g)], [torch.randn(2, n, 4, generator=g)])


def test_tier_unit_lru_order_and_pins():
    tiers = TieredModuleCache(torch.device("cpu"), "device", None, Relocation("absolute", "test"),
                              (1, 2, 4), torch.float32, max_device_bytes=4 * 256, max_host_bytes=256)
    keys = [ModuleKey(f"k{i}", f"k{i}", 0, 4) for i in range(4)]  # 2 x 2 x 4 x 4 floats: 256 bytes each
    for i, k in enumerate(keys[:4]):
        tiers.put(k, _entry(4, i), {"module": f"m{i}"}, persist=False)
    tiers.get(keys[1], pin=True)  # k1 pinned, then made the least recently used
    for i in (2, 3, 0):
        tiers.get(keys[i])        # LRU order now: k1, k2, k3, k0
    assert tiers.nbytes("device") == 4 * 256 and tiers.nbytes("host") == 0
    tiers.budget["device"] = 256  # room for one entry
    tiers.enforce()
    assert tiers.where("k1") == "device"               # pinned: stays although over budget
    assert tiers.nbytes("device") == 256
    assert tiers.where("k0") == "host"                 # k2, k3, k0 fell to host, which keeps the newest
    assert tiers.where("k2") is None and tiers.where("k3") is None
    assert tiers.report()["dropped"] == 2
    tiers.release(["k1"])
    tiers.budget["device"] = 0
    tiers.enforce()
    assert tiers.nbytes("device") == 0 and tiers.where("k1") == "host" and tiers.where("k0") is None


def test_tier_rejects_bad_budgets():
    with pytest.raises(ValueError):
        make_cache("llama", max_device_bytes=-1)


def test_a_failed_add_schema_leaves_nothing_in_memory(monkeypatch):
    pc = make_cache("llama", "scaffold")
    calls = []

    def failing(call):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pc.runner, "forward_hooks", [failing])
    with pytest.raises(KeyboardInterrupt):
        pc.add_schema(FULL_SCHEMA)
    rep = pc.memory_report()
    assert rep["total_bytes"] == 0 and rep["tiers"]["device"]["pinned"] == 0 and not pc.schemas

"""The engine on a Redis store: loading across engines, and Redis going away mid-run."""

from __future__ import annotations

import uuid
import warnings

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.store import StoreWarning
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

try:
    from redis_fixture import redis_server, redis_url  # noqa: F401  (fixtures)
except ImportError:  # pragma: no cover - run from the repository root
    from tests.redis_fixture import redis_server, redis_url  # noqa: F401

PROMPTS = list(FULL_PROMPTS.values())


def test_engine_with_redis_url_loads_instead_of_encoding(redis_url):
    url = f"{redis_url}?prefix=eng-{uuid.uuid4().hex[:8]}"
    a = make_cache("llama", "scaffold", store=url)
    rep_a = a.add_schema(FULL_SCHEMA)
    assert rep_a.encoded_segments == rep_a.segments
    b = make_cache("llama", "scaffold", store=url)
    rep_b = b.add_schema(FULL_SCHEMA)
    assert rep_b.forwards == 0 and rep_b.store_hits == rep_b.segments
    assert b.memory_report()["tiers"]["store"]["url"].startswith("redis://")
    for p in PROMPTS:
        assert torch.equal(a.next_token_logits(p), b.next_token_logits(p))


def test_redis_stopped_mid_run_warns_and_recomputes(redis_server):
    url = f"{redis_server.url}?retry_after=0"
    ref = make_cache("llama", "scaffold")
    ref.add_schema(FULL_SCHEMA)
    expected = {p: ref.next_token_logits(p) for p in PROMPTS}
    # Nothing stays in memory between requests: every request reads the store.
    pc = make_cache("llama", "scaffold", store=url, max_device_bytes=0, max_host_bytes=0)
    pc.add_schema(FULL_SCHEMA)
    assert torch.equal(pc.next_token_logits(PROMPTS[0]), expected[PROMPTS[0]])
    assert pc.memory_report()["tiers"]["store"]["hits"] > 0
    redis_server.stop()
    with pytest.warns(StoreWarning, match="unreachable"):
        got = pc.next_token_logits(PROMPTS[1])
    assert (got - expected[PROMPTS[1]]).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        for p in PROMPTS:
            assert (pc.next_token_logits(p) - expected[p]).abs().max() < 1e-5
            res = pc.generate(p, max_new_tokens=2)
            assert (res.first_token_logits - expected[p]).abs().max() < 1e-5
        # A schema added while Redis is down is encoded (its writes are skipped).
        rep = pc.add_schema(FULL_SCHEMA.replace('name="t"', 'name="t2"'))
    assert rep.encoded_segments == rep.segments
    tiers = pc.memory_report()["tiers"]
    assert tiers["device"]["bytes"] == 0 and tiers["host"]["bytes"] == 0
    assert tiers["store"]["failed_puts"] > 0 and tiers["dropped"] > 0

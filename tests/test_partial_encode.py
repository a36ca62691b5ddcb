"""Planning the forwards that recompute missing segments, and the engine re-encoding dropped modules."""

from __future__ import annotations

import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.plan import forwards_needed
from promptcache.plan import EncodeGroup, encode_groups, encoding_contexts, stored_segments
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


def full_layout(encoding: str = "scaffold"):
    pc = make_cache("llama", encoding)
    pc.add_schema(FULL_SCHEMA)
    layout = pc.layout("t")
    return pc, layout, encoding_contexts(layout, encoding)


def test_nothing_available_reproduces_the_full_encode():
    _, layout, contexts = full_layout()
    groups = encode_groups(contexts)
    runs = forwards_needed(groups, lambda i: False, stored_segments(layout))
    # Every run is a whole group from its start (at most cut after its last needed segment).
    by_start = {g.segments[0]: g for g in groups}
    for r in runs:
        g = by_start[r.segments[0]]
        assert r.context == g.context and r.segments == g.segments[:len(r.segments)]
    covered = {i for r in runs for i in r.segments}
    assert set(stored_segments(layout)) <= covered
    assert len(runs) == sum(1 for g in groups if set(g.segments) & set(stored_segments(layout)))


def test_a_missing_segment_after_a_parameter_slot_recomputes_the_slot():
    _, layout, contexts = full_layout()
    segs = layout.segments
    slot = next(s.index for s in segs if s.kind == "parameter")
    after = slot + 1  # "tail of gamma": its context holds the slot, which is never stored
    assert slot in contexts[after]
    stored = set(stored_segments(layout))
    calls = []

    def available(i):
        calls.append(i)
        return i in stored and i != after

    runs = forwards_needed(encode_groups(contexts), available, [after])
    assert len(runs) == 1
    run = runs[0]
    assert run.segments == [slot, after]  # starts at the slot, ends at the missing segment
    assert run.context == [c for c in contexts[slot]]
    assert len(calls) == len(set(calls))  # each segment asked once


def test_a_missing_context_segment_is_computed_in_its_own_run_first():
    # Group 0: segments 0, 1 (chain); group 1: segment 2 with context [0, 1].
    groups = [EncodeGroup([], [0, 1]), EncodeGroup([0, 1], [2])]
    runs = forwards_needed(groups, lambda i: i == 0, [2])
    assert runs == [EncodeGroup([0], [1]), EncodeGroup([0, 1], [2])]
    runs = forwards_needed(groups, lambda i: False, [2])
    assert runs == [EncodeGroup([], [0, 1]), EncodeGroup([0, 1], [2])]
    assert forwards_needed(groups, lambda i: True, []) == []


def test_engine_re_encodes_one_dropped_module_exactly():
    pc, layout, _ = full_layout()
    prompt = FULL_PROMPTS["param-full-slot"]
    expected = pc.next_token_logits(prompt)
    state = pc.schemas["t"]
    victim = next(s.index for s in layout.segments if s.kind == "parameter") + 1
    pc.module_cache.drop(state.keys[victim].tier_key)  # as if evicted with no store
    forwards = []
    pc.runner.forward_hooks.append(lambda call: forwards.append(len(call.ids)))  # each forward's query count
    got = pc.next_token_logits(prompt)
    assert len(forwards) == 2  # the re-encode run (slot + segment), then the request's prefill
    assert forwards[0] == len(layout.segments[victim - 1].tokens) + len(layout.segments[victim].tokens)
    assert (got - expected).abs().max() < 1e-5
    assert pc.module_cache.where(state.keys[victim].tier_key) == "device"
    assert torch.equal(pc.next_token_logits(prompt), got)

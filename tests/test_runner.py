"""The model runner (promptcache.runtime.runner): the one forward path, its caches and decode step."""

from __future__ import annotations

import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.runtime.kv import ModuleKV, SplicedCache
from promptcache.runtime.runner import DecodeSequence

PROMPTS = list(FULL_PROMPTS.values())[:2]


def test_every_cache_carries_its_key_positions():
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    with torch.inference_mode():
        _check_positions(pc)


def _check_positions(pc):
    state, request = pc.request(PROMPTS[0])
    _, cache = pc.runner.prefill_baseline([1, 2, 3])
    assert isinstance(cache, SplicedCache) and cache.key_positions.tolist() == [0, 1, 2]
    _, cache, next_pos, _ = pc.prefill_cached(state, request)
    want = sorted([state.layout.segments[i].start + k for i, n in request.cached_spans for k in range(n)])
    assert cache.key_positions.tolist()[:request.num_cached] == want
    assert len(cache.key_positions) == cache.get_seq_length() == request.num_cached + len(request.computed_ids)
    pc.runner.decode_step([DecodeSequence(cache, 5, next_pos)])
    assert cache.key_positions.tolist()[-1] == next_pos


def test_decode_step_takes_a_batch_of_sequences_with_their_own_caches():
    pc = make_cache("falcon-alibi")  # ALiBi reads the positions of each sequence's own cache
    pc.add_schema(FULL_SCHEMA)
    with torch.inference_mode():
        _check_batch(pc)


def _check_batch(pc):
    seqs, alone = [], []
    for prompt in PROMPTS:
        state, request = pc.request(prompt)
        logits, cache, next_pos, _ = pc.prefill_cached(state, request)
        token = int(logits.argmax())
        seqs.append(DecodeSequence(cache, token, next_pos))
        _, other, _, _ = pc.prefill_cached(state, request)
        alone.append(pc.runner.decode_step([DecodeSequence(other, token, next_pos)])[0])
    together = pc.runner.decode_step(seqs)
    assert len(together) == 2
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def test_forward_hooks_see_every_forward():
    pc = make_cache("llama")
    seen: list[int] = []
    pc.runner.forward_hooks.append(lambda call: seen.append(len(call.ids)))
    pc.generate("plain text prompt", max_new_tokens=3)
    assert len(seen) >= 1 and seen[1:] == [1] * (len(seen) - 1)  # the prefill, then one token each


def test_module_kv_views_keep_positions():
    kv = ModuleKV([torch.arange(12.0).view(1, 6, 2)], [torch.zeros(1, 6, 2)], torch.arange(10, 16))
    left, right = kv.split(4)
    assert left.positions.tolist() == [10, 11, 12, 13] and right.length == 2
    assert kv.slice(3).positions.tolist() == [10, 11, 12]
    assert ModuleKV.cat([left, right]).positions.tolist() == kv.positions.tolist()
    assert kv.nbytes == 2 * 12 * 4

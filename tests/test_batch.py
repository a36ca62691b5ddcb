"""Batched decode steps (promptcache.runtime.batch): every row decodes exactly as it would alone."""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.runtime.batch import LoopDecodeBatch
from promptcache.runtime.runner import DecodeSequence

TOL = 1e-4  # float32; measured differences are reported in the module docstring of batch.py
PROMPTS = [FULL_PROMPTS[k] for k in ("default-ish", "union-gap-param", "single-module-no-suffix", "turns")]


def _prefill(pc, prompt):
    """(first logits, cache, next position) of a PML prompt through the engine's cached path."""
    state, request = pc.request(prompt)
    logits, cache, next_pos, _ = pc.prefill_cached(state, request)
    return logits, cache, next_pos


def _alone(pc, prompt, steps):
    """Greedy tokens and per-step logits of ``prompt`` decoded alone through runner.decode_step."""
    logits, cache, pos = _prefill(pc, prompt)
    tokens, out = [int(logits.argmax())], []
    for k in range(steps):
        step = pc.runner.decode_step([DecodeSequence(cache, tokens[-1], pos + k)])[0].float()
        out.append(step)
        tokens.append(int(step.argmax()))
    return tokens, out, cache


@pytest.mark.parametrize("impl", [LoopDecodeBatch])
def test_reference_batch_matches_alone(impl):
    pc = make_cache("falcon-alibi")
    pc.add_schema(FULL_SCHEMA)
    with torch.inference_mode():
        steps = 5
        want = [_alone(pc, p, steps) for p in PROMPTS[:3]]
        batch = impl(pc.runner, max_rows=4)
        rows, toks, pos = [], [], []
        for p in PROMPTS[:3]:
            logits, cache, next_pos = _prefill(pc, p)
            rows.append(batch.add(cache))
            toks.append(int(logits.argmax()))
            pos.append(next_pos)
        assert len(batch) == 3
        for k in range(steps):
            out = batch.step([(r, toks[i], pos[i] + k) for i, r in enumerate(rows)])
            for i, logits in enumerate(out):
                assert (logits - want[i][1][k]).abs().max() <= TOL
                toks[i] = int(logits.argmax())
        kv = batch.remove(rows[0])
        assert kv.length == want[0][2].get_seq_length()
        assert torch.equal(kv.positions, want[0][2].key_positions)
        assert len(batch) == 2

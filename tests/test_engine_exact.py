"""The correctness oracle on every supported family (tiny random models, float32, CPU).

The spliced-cache path must match ONE ordinary forward over the plan's tokens, positions and
4-D visibility; where that equals plain causal attention it must match the no-cache baseline.
"""

from __future__ import annotations

import pytest
import torch

from promptcache.runtime.runner import oracle_forward
from engine_fixtures import (DEFAULT_PATH_PROMPT, DEFAULT_PATH_SCHEMA, FULL_PROMPTS, FULL_SCHEMA,
                             extend_plan, make_cache)
from tiny_models import FAMILIES

TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_scaffold_default_path_equals_baseline(family):
    pc = make_cache(family, "scaffold")
    pc.add_schema(DEFAULT_PATH_SCHEMA)
    cached = pc.next_token_logits(DEFAULT_PATH_PROMPT, use_cache=True)
    base = pc.next_token_logits(DEFAULT_PATH_PROMPT, use_cache=False)
    assert (cached - base).abs().max() <= TOL
    a = pc.generate(DEFAULT_PATH_PROMPT, max_new_tokens=16, use_cache=True)
    b = pc.generate(DEFAULT_PATH_PROMPT, max_new_tokens=16, use_cache=False)
    assert a.token_ids == b.token_ids
    assert a.cached_tokens > 0 and b.cached_tokens == 0
    assert a.prompt_tokens == b.prompt_tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoding", ["scaffold", "independent"])
def test_cached_logits_equal_oracle(family, encoding):
    pc = make_cache(family, encoding)
    pc.add_schema(FULL_SCHEMA)
    for name, prompt in FULL_PROMPTS.items():
        cached = pc.next_token_logits(prompt)
        oracle = pc.oracle_logits(prompt)
        diff = float((cached - oracle).abs().max())
        assert diff <= TOL, f"{family}/{encoding}/{name}: max diff {diff:.2e}"


@pytest.mark.parametrize("family", ["llama-gqa", "mpt", "falcon-alibi", "gemma3"])
def test_gaps_change_logits(family):
    """A gapped layout is really honoured: it differs from the baseline (contiguous positions)."""
    pc = make_cache(family, "independent")
    pc.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["union-gap-param"]
    assert (pc.next_token_logits(prompt) - pc.next_token_logits(prompt, use_cache=False)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "falcon-alibi", "mpt", "gemma3"])
def test_greedy_decoding_equals_oracle_step_by_step(family):
    pc = make_cache(family, "independent")
    pc.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["union-gap-param"]
    res = pc.generate(prompt, max_new_tokens=16)
    plan = pc.plan(prompt)
    expected = []
    for _ in range(len(res.token_ids)):
        tok = int(oracle_forward(pc.model, pc.adapter, plan, pc.device, pc.dtype).argmax())
        expected.append(tok)
        plan = extend_plan(plan, tok)
    assert res.token_ids == expected


def test_plan_is_complete_only_without_ghost_context():
    pc = make_cache("llama", "independent")
    pc.add_schema(FULL_SCHEMA)
    assert pc.plan(FULL_PROMPTS["single-module-no-suffix"]).complete
    plan = pc.plan(FULL_PROMPTS["union-gap-param"])  # the parameter's scaffold is ghost context
    assert not plan.complete
    assert plan.num_prompt_tokens == pc.generate(FULL_PROMPTS["union-gap-param"], max_new_tokens=1).prompt_tokens
    sc = make_cache("llama", "scaffold")
    sc.add_schema(FULL_SCHEMA)
    assert not sc.plan('<prompt schema="t"><b2/><e/> Q</prompt>').complete  # e saw scaffold b1


def test_plan_positions_and_visibility_rules():
    pc = make_cache("llama", "independent")
    pc.add_schema(FULL_SCHEMA)
    layout = pc.layout("t")
    plan = pc.plan(FULL_PROMPTS["union-gap-param"])
    pos = plan.position_ids[plan.in_prompt]
    assert torch.all(pos[1:] > pos[:-1]), "prompt positions strictly increase"
    b2 = layout.modules[("b2",)]
    union = layout.unions[b2.union]
    assert union.length > b2.end - b2.start  # the gap after the short member exists
    assert not any(b2.end <= p < union.start + union.length for p in pos.tolist())
    # Computed tokens see every prompt token at an earlier position and nothing later.
    comp = (~plan.cached).nonzero().flatten()
    for i in comp.tolist():
        sees = plan.visible[i]
        earlier = (plan.position_ids < plan.position_ids[i]) & plan.in_prompt
        assert torch.equal(sees & plan.in_prompt & plan.cached, earlier & plan.cached)
        assert not (sees & (plan.position_ids > plan.position_ids[i])).any()


def test_host_placement_matches_device_placement():
    dev = make_cache("llama-gqa", "scaffold")
    host = make_cache("llama-gqa", "scaffold", placement="host")
    for pc in (dev, host):
        pc.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["union-gap-param"]
    assert torch.equal(dev.next_token_logits(prompt), host.next_token_logits(prompt))

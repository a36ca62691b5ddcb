"""Shared schemas, prompts and helpers for the engine's exactness tests on tiny random models."""

from __future__ import annotations

import torch

from promptcache.engine import PromptCache
from promptcache.plan import Plan
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

# Every construct: system turn, open user turn, module, union with unequal members, parameter,
# cache="false" module, nested module.
FULL_SCHEMA = """<schema name="t">
<system>You are a tester.</system>
<user open="true">
Intro text.
<module name="a">Alpha module text.<module name="a2">Nested in alpha.</module></module>
<union scaffold="b1">
  <module name="b1">Beta one long text here.</module>
  <module name="b2">Beta two.</module>
</union>
<module name="c">Gamma <parameter name="x" length="6" scaffold="xx"/> tail of gamma.</module>
<module name="d" cache="false">Delta uncached.</module>
<module name="e">Epsilon final.</module>
</user>
</schema>"""

FULL_PROMPTS = {
    "default-ish": '<prompt schema="t"><a><a2/></a><b1/><d/><e/> Question?</prompt>',
    "union-gap-param": '<prompt schema="t"><b2/><c x="yy"/><e/> Question?</prompt>',
    "param-full-slot": '<prompt schema="t"><a/><c x="abcdef"/><d/> Q</prompt>',
    "single-module-no-suffix": '<prompt schema="t"><e/></prompt>',
    "nothing-selected": '<prompt schema="t"> Only question</prompt>',
    "turns": '<prompt schema="t"><b1/><user>Hi there</user><assistant>Hello.</assistant>'
             '<user>More?</user></prompt>',
}

# No parameters, scaffold = longest member: selecting the default path leaves no gap, so the
# scaffold policy must reproduce the no-cache baseline exactly.
DEFAULT_PATH_SCHEMA = """<schema name="dp">
<system>Be short.</system>
<user open="true">
<module name="doc">Some document text, fairly long, about caches.</module>
<union scaffold="long">
  <module name="long">The longer union member comes first.</module>
  <module name="short">Short one.</module>
</union>
<module name="live" cache="false">Computed every time.</module>
<module name="tail">Tail module.</module>
</user>
</schema>"""
DEFAULT_PATH_PROMPT = '<prompt schema="dp"><doc/><long/><live/><tail/> What is it?</prompt>'

OVERRIDES = {"mpt": {"max_seq_len": 512}}


def make_cache(family: str, encoding: str = "scaffold", **kw) -> PromptCache:
    model = tiny_model(family, **OVERRIDES.get(family, {}))
    return PromptCache(model, tiny_tokenizer(), encoding=encoding, progress=False, **kw)


def extend_plan(plan: Plan, token: int) -> Plan:
    """The plan after one generated token: next position, sees every prompt token and itself."""
    n = plan.token_ids.shape[0]
    visible = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    visible[:n, :n] = plan.visible
    visible[n, :n] = plan.in_prompt
    visible[n, n] = True
    cat = lambda t, v: torch.cat([t, torch.tensor([v], dtype=t.dtype)])  # noqa: E731
    return Plan(cat(plan.token_ids, token), cat(plan.position_ids, int(plan.position_ids.max()) + 1),
                cat(plan.cached, False), cat(plan.in_prompt, True), visible, cat(plan.segment, -1),
                plan.policy, plan.schema)

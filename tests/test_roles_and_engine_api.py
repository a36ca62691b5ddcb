"""Role rendering against the tokenizer's chat template, and the engine's user-facing behaviour."""

from __future__ import annotations

import pytest
import torch

from promptcache.pml.errors import PromptError
from promptcache.roles import ChatRenderer
from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from tiny_tokenizer import tiny_tokenizer

CHAT_SCHEMA = """<schema name="chat">
<system><module name="persona">You are a pirate.</module> Answer briefly.</system>
<user><module name="doc">The treasure is buried under the palm tree.</module></user>
<assistant>Arr, I read it.</assistant>
</schema>"""
CHAT_PROMPT = '<prompt schema="chat"><persona/><doc/><user>Where is the treasure?</user></prompt>'
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a pirate. Answer briefly."},
    {"role": "user", "content": "The treasure is buried under the palm tree."},
    {"role": "assistant", "content": "Arr, I read it."},
    {"role": "user", "content": "Where is the treasure?"},
]


def _template_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_baseline_tokens_equal_apply_chat_template_tiny():
    pc = make_cache("llama")
    pc.add_schema(CHAT_SCHEMA)
    plan = pc.plan(CHAT_PROMPT)
    assert plan.prompt_token_ids.tolist() == _template_ids(pc.tokenizer, CHAT_MESSAGES)


def test_open_user_turn_continued_by_prompt_text():
    schema = ('<schema name="qa"><user open="true">Read this: <module name="doc">Cats sleep a lot.</module>'
              '</user></schema>')
    pc = make_cache("llama")
    pc.add_schema(schema)
    plan = pc.plan('<prompt schema="qa"><doc/> Question: do cats sleep?</prompt>')
    expected = _template_ids(pc.tokenizer, [{"role": "user",
                                             "content": "Read this: Cats sleep a lot. Question: do cats sleep?"}])
    assert plan.prompt_token_ids.tolist() == expected


def test_markers_fall_back_without_chat_template():
    renderer = ChatRenderer(tiny_tokenizer(chat_template=False))
    assert not renderer.markers.from_template
    assert renderer.tokenizer.decode(renderer.role_open("user", True)) == "User: "


@pytest.mark.parametrize("bad, needle", [
    ('<prompt schema="nope"><a/></prompt>', "has not been added"),
    ('<prompt schema="t"><zz/></prompt>', "unknown module"),
    ('<prompt schema="t"><c/></prompt>', "needs parameter"),
    ('<prompt schema="t"><c x="far too long for six"/></prompt>', "longer than its slot"),
    ('<prompt schema="t"><c x="a" y="b"/></prompt>', "no parameter"),
    ('<prompt schema="t"><b1/><b2/></prompt>', "same union"),
])
def test_bad_prompts_raise_and_engine_stays_usable(bad, needle):
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    good = FULL_PROMPTS["union-gap-param"]
    before = pc.next_token_logits(good)
    with pytest.raises(PromptError, match=needle) as info:
        pc.generate(bad, max_new_tokens=2)
    assert info.value.line == 1
    assert torch.equal(pc.next_token_logits(good), before)


def test_schema_replace_and_remove():
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    first = pc.next_token_logits(FULL_PROMPTS["union-gap-param"])
    pc.add_schema(FULL_SCHEMA.replace("Epsilon final.", "Epsilon changed."))
    assert not torch.equal(first, pc.next_token_logits(FULL_PROMPTS["union-gap-param"]))
    pc.add_schema(CHAT_SCHEMA)
    assert set(pc.schemas) == {"t", "chat"}
    pc.remove_schema("t")
    with pytest.raises(PromptError):
        pc.next_token_logits(FULL_PROMPTS["union-gap-param"])
    pc.next_token_logits(CHAT_PROMPT)


def test_memory_report_matches_kv_formula():
    pc = make_cache("llama-gqa")
    pc.add_schema(FULL_SCHEMA)
    rep = pc.memory_report()
    cfg = pc.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert rep["bytes_per_token"] == per_token
    assert rep["total_bytes"] == rep["total_tokens"] * per_token > 0
    assert rep["consistent"]
    assert {r["module"] for r in rep["modules"]} >= {"(root)", "a", "a/a2", "b1", "b2", "c", "e"}


def test_sampling_is_reproducible_and_streams():
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["default-ish"]
    a = pc.generate(prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    b = pc.generate(prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    assert a.token_ids == b.token_ids
    pieces = []
    c = pc.generate(prompt, max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == c.text
    assert c.ttft_s > 0 and c.total_s >= c.ttft_s


def test_stop_string_cuts_text():
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    full = pc.generate(FULL_PROMPTS["default-ish"], max_new_tokens=12)
    if len(full.text) < 3:
        pytest.skip("random model produced too little text")
    stop = full.text[2:4]
    cut = pc.generate(FULL_PROMPTS["default-ish"], max_new_tokens=12, stop=[stop])
    assert stop not in cut.text and full.text.startswith(cut.text)
    assert len(cut.token_ids) < len(full.token_ids)


def test_repetition_penalty_covers_the_prompt():
    """A penalty over the whole prompt lowers the first token's choice among prompt tokens."""
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    plain = pc.generate(FULL_PROMPTS["default-ish"], max_new_tokens=1)
    plan_tokens = set(pc.plan(FULL_PROMPTS["default-ish"]).prompt_token_ids.tolist())
    if plain.token_ids[0] not in plan_tokens:
        pytest.skip("greedy token is not a prompt token for this random model")
    penal = pc.generate(FULL_PROMPTS["default-ish"], max_new_tokens=1, repetition_penalty=1e6)
    assert penal.token_ids[0] not in plan_tokens

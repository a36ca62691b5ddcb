"""Automatic prefix caching in the engine: plain-text and chat prompts on tiny random models.

Exactness: a reused prefix is the same computation as the baseline prefill split in two, so the
first-token logits must match ``use_cache=False`` (float32, <= 1e-4) and greedy generations must be
identical. The tiny tokenizer is one token per character, so expected reuse counts are exact.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from promptcache.pml.errors import PMLError
from promptcache.pml.parser import parse_prompt
from promptcache.prefix.runner import CHAT, PML, TEXT, prompt_kind
from promptcache.engine import PromptCache
from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, OVERRIDES, make_cache
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

TOL = 1e-4
FAMILIES = ["llama", "llama-gqa", "mpt", "gemma3"]  # GQA, ALiBi, sliding window
DOC = "Caches keep keys and values. A radix tree shares prefixes between prompts. "


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_text_reuse_equals_baseline(family):
    pc = make_cache(family)
    first, second = DOC + "Question one?", DOC + "Another question?"
    res = pc.generate(first, max_new_tokens=4)
    assert (res.cached_tokens, res.computed_tokens) == (0, len(first))

    # Diverges inside the cached edge: a partial match, trimmed on the fly.
    base = pc.next_token_logits(second, use_cache=False)
    got = pc.generate(second, max_new_tokens=6)
    assert got.cached_tokens == common_prefix(list(first), list(second)) == len(DOC)
    assert got.computed_tokens == len(second) - got.cached_tokens
    assert maxdiff(got.first_token_logits, base) <= TOL
    assert got.token_ids == pc.generate(second, max_new_tokens=6, use_cache=False).token_ids

    # The same prompt again reuses all but its last token (whose logits are needed).
    again = pc.generate(second, max_new_tokens=6)
    assert again.cached_tokens == len(second) - 1
    assert maxdiff(again.first_token_logits, base) <= TOL
    assert again.token_ids == got.token_ids

    # A prompt that is a strict prefix of what is cached, crossing the split made above.
    short = DOC[:30]
    assert pc.generate(short, max_new_tokens=1).cached_tokens == len(short) - 1
    assert maxdiff(pc.next_token_logits(short), pc.next_token_logits(short, use_cache=False)) <= TOL


def chat_cache(family: str, **kw) -> PromptCache:
    """A tiny model whose vocabulary is exactly the tokenizer's, so answers decode and re-encode."""
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tok), **OVERRIDES.get(family, {}))
    return PromptCache(model, tok, progress=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_second_turn_reuses_previous_answer(family):
    pc = chat_cache(family)
    tok = pc.tokenizer
    turn1 = [{"role": "system", "content": "You answer in riddles."},
             {"role": "user", "content": "What has keys but no locks?"}]
    ids1 = list(tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True)["input_ids"])
    r1 = pc.generate(turn1, max_new_tokens=12)
    assert r1.prompt_tokens == len(ids1) and r1.cached_tokens == 0
    base1 = pc.generate(turn1, max_new_tokens=12, use_cache=False)
    assert r1.token_ids == base1.token_ids
    assert maxdiff(r1.first_token_logits, base1.first_token_logits) <= TOL

    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And?"}]
    ids2 = list(tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True)["input_ids"])
    held = ids1 + r1.token_ids[:-1]  # the last generated token never got KV
    expected = min(common_prefix(held, ids2), len(ids2) - 1)
    assert expected > len(ids1), "turn 2 should repeat part of the answer"
    r2 = pc.generate(turn2, max_new_tokens=12)
    assert r2.cached_tokens == expected
    base2 = pc.generate(turn2, max_new_tokens=12, use_cache=False)
    assert maxdiff(r2.first_token_logits, base2.first_token_logits) <= TOL
    assert r2.token_ids == base2.token_ids


def test_chat_without_template_uses_renderer_markers():
    pc = PromptCache(tiny_model("llama"), tiny_tokenizer(chat_template=False), progress=False)
    marks = pc.renderer.markers
    assert not marks.from_template
    msgs = [{"role": "user", "content": "hi"}]
    ids = pc.prefix.token_ids(msgs)
    assert pc.tokenizer.decode(ids) == marks.open_first["user"] + "hi" + marks.close["user"] + marks.generation
    pc.generate(msgs, max_new_tokens=3)
    longer = msgs + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]
    res = pc.generate(longer, max_new_tokens=3)
    assert res.cached_tokens >= len(pc.tokenizer.decode(ids)) - len(marks.generation)
    assert maxdiff(res.first_token_logits, pc.next_token_logits(longer, use_cache=False)) <= TOL
    with pytest.raises(ValueError, match="role 'tool'"):
        pc.generate([{"role": "tool", "content": "x"}])


def test_dispatch_rules(tmp_path):
    prompt_file = Path(__file__).resolve().parents[1] / "examples" / "persona.prompt.xml"
    assert prompt_kind(parse_prompt('<prompt schema="s"/>')) == PML
    assert prompt_kind(prompt_file) == PML
    assert prompt_kind(str(prompt_file)) == TEXT  # issue 12 item 3: a str is never opened as a file
    assert prompt_kind(prompt_file.read_text()) == PML  # starts with a comment
    assert prompt_kind('<?xml version="1.0"?>\n<prompt schema="s"/>') == PML
    assert prompt_kind('  <prompt schema="s">x</prompt>') == PML
    assert prompt_kind("missing/file.prompt.xml") == TEXT
    assert prompt_kind("Hello there") == TEXT
    assert prompt_kind("<b>bold</b> and <prompts> are plain text") == TEXT
    assert prompt_kind("Summarise examples/persona.prompt.xml please\n") == TEXT
    assert prompt_kind([{"role": "user", "content": "hi"}]) == CHAT
    for bad in ([], 42, [1, 2]):
        with pytest.raises(TypeError):
            prompt_kind(bad)


def test_pml_requests_do_not_touch_the_tree():
    pc = make_cache("llama")
    pc.add_schema(FULL_SCHEMA)
    prompt = FULL_PROMPTS["default-ish"]
    before = pc.next_token_logits(prompt)
    pc.generate(prompt, max_new_tokens=3)
    assert torch.equal(pc.next_token_logits(prompt), before)
    stats = pc.prefix_stats()
    assert stats["requests"] == stats["bytes_held"] == stats["hits"] + stats["misses"] == 0
    with pytest.raises(PMLError):
        pc.plan("missing/file.prompt.xml")


def test_options_use_cache_insert_and_disabled():
    pc = make_cache("llama")
    text = DOC + "Why?"
    res = pc.generate(text, max_new_tokens=2, use_cache=False)
    assert not res.use_cache and res.cached_tokens == 0
    assert pc.prefix_stats()["requests"] == 0  # the baseline never looks up
    pc.generate(text, max_new_tokens=2, insert_prefix=False)
    pc.next_token_logits(text, insert_prefix=False)
    stats = pc.prefix_stats()
    assert stats["bytes_held"] == 0 and stats["misses"] == 2 and stats["requests"] == 2

    off = make_cache("llama", prefix_cache=False)
    a, b = off.generate(text, max_new_tokens=3), off.generate(text, max_new_tokens=3)
    assert a.cached_tokens == b.cached_tokens == 0 and a.token_ids == b.token_ids
    assert off.prefix_stats()["enabled"] is False

    with pytest.raises(ValueError, match="prefix_policy"):
        make_cache("llama", prefix_policy="nope")
    with pytest.raises(ValueError, match="prefix_ttl_s"):
        make_cache("llama", prefix_policy="ttl")


def test_stats_and_stored_values_own_their_memory():
    pc = make_cache("llama-gqa")
    a, b, c = DOC + "A?", DOC + "B?", "Unrelated text here."
    for p in (a, b, c):
        pc.generate(p, max_new_tokens=5)
    s = pc.prefix_stats()
    reused = common_prefix(list(a), list(b))
    assert (s["hits"], s["misses"], s["requests"]) == (1, 2, 3)
    assert s["tokens_reused"] == reused
    assert s["tokens_computed"] == len(a) + len(b) + len(c) - reused
    assert s["hit_rate"] == pytest.approx(1 / 3)
    tree = pc.prefix.tree
    tree.check_invariants()
    per_token = pc.bytes_per_token()
    assert s["bytes_held"] == s["tokens_held"] * per_token
    storages = {}
    for node in tree.iter_nodes():
        assert node.value.num_layers == pc.num_layers
        assert node.value.positions.tolist() == list(range(len(node.prefix_tokens()) - len(node.key),
                                                           len(node.prefix_tokens())))
        for k, v in zip(node.value.keys, node.value.values):
            assert k.shape == v.shape == (pc.kv_heads, len(node.key), pc.head_dim)
            for t in (k, v):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    # Stored KV owns exactly the cached tokens: no request buffer (with its room for generation)
    # is kept alive by a view (edges cut by later inserts share their halves' storage).
    assert sum(storages.values()) == s["bytes_held"]


def test_eviction_under_budget_keeps_in_use_nodes():
    pc = make_cache("llama")
    per_token = pc.bytes_per_token()
    budget = 150 * per_token
    pc = make_cache("llama", prefix_max_bytes=budget)
    tree = pc.prefix.tree
    prompts = [f"Topic {i}: " + DOC[: 40 + 7 * i] + f"question {i}?" for i in range(8)]
    for p in prompts:
        res = pc.generate(p, max_new_tokens=4)
        assert pc.prefix_stats()["bytes_held"] <= budget
        assert maxdiff(res.first_token_logits, pc.next_token_logits(p, use_cache=False)) <= TOL
        tree.check_invariants()
    s = pc.prefix_stats()
    assert s["evictions"] > 0 and s["bytes_evicted"] > 0
    assert s["bytes_held"] == s["tokens_held"] * per_token

    # During a request its matched path is locked: even an explicit evict-everything keeps it.
    held = prompts[-1]
    seen = {}

    def during(_text: str) -> None:
        if not seen:
            tree.evict(10 ** 12)
            seen["tokens"] = tree.tokens_held
            seen["locked"] = [n.lock_ref for n in tree.iter_nodes()]

    res = pc.generate(held + " more", max_new_tokens=3, stream=during)
    assert res.cached_tokens >= len(held)
    assert seen["tokens"] >= res.cached_tokens and all(seen["locked"])
    base = pc.generate(held + " more", max_new_tokens=3, use_cache=False)
    assert res.token_ids == base.token_ids
    assert all(n.lock_ref == 0 for n in tree.iter_nodes())  # released after the request
    tree.evict(10 ** 12)
    assert pc.prefix_stats()["bytes_held"] == 0


def test_insert_larger_than_budget_is_skipped():
    pc = make_cache("llama", prefix_max_bytes=10 * make_cache("llama").bytes_per_token())
    pc.generate(DOC, max_new_tokens=2)
    s = pc.prefix_stats()
    assert s["inserts_skipped"] == 1 and s["bytes_held"] == 0 and s["evictions"] == 0


def test_ttl_policy_expires_idle_entries():
    pc = make_cache("llama", prefix_policy="ttl", prefix_ttl_s=0.05)
    pc.generate(DOC + "one?", max_new_tokens=2)
    assert pc.prefix_stats()["bytes_held"] > 0
    assert pc.generate(DOC + "two?", max_new_tokens=2).cached_tokens > 0  # within the TTL
    time.sleep(0.1)
    res = pc.generate(DOC + "three?", max_new_tokens=2)
    assert res.cached_tokens == 0
    assert pc.prefix_stats()["expirations"] > 0

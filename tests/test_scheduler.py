"""The engine lifecycle (``PromptCache.begin`` / ``ActiveRequest``), chunked prefill, and the server's
scheduler (promptcache.serve.scheduler) without HTTP.

Exactness: a chunked prefill sees, per chunk, exactly the rows of the unchunked visibility, so the
first-token logits agree to float rounding (float32 tiny models, ``TOL``). Requests served
concurrently by the scheduler must produce the greedy ids and text of ``pc.generate`` alone.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache.pml.errors import PMLError, PromptError
from promptcache.runtime.sampling import SamplingOptions
from promptcache.serve.scheduler import GenRequest, QueueFull, Scheduler
from single_thread import one_torch_thread  # noqa: F401

TOL = 1e-4
DOC = "Caches keep keys and values. A radix tree shares prefixes between prompts. "
PML_PROMPTS = [FULL_PROMPTS[k] for k in ("default-ish", "union-gap-param", "turns", "param-full-slot")]
OTHER_PROMPTS = [DOC + "What is shared?", [{"role": "user", "content": "Hi, how are caches kept?"}]]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def engine(family: str = "llama", **kw):
    pc = make_cache(family, **kw)
    pc.add_schema(FULL_SCHEMA)
    return pc


@pytest.fixture
def serve():
    """``serve(pc, **kw)``: a started scheduler, stopped after the test."""
    started = []

    def make(pc, **kw):
        s = Scheduler(pc, **kw)
        s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def slow_forwards(pc, seconds: float) -> None:
    """Every forward sleeps: a request then takes long enough to be cancelled or expire."""
    pc.runner.forward_hooks.append(lambda call: time.sleep(seconds))


# ---------------------------------------------------------------------------- engine lifecycle

@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding window, 4-D masks
@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_issue15_chunked_prefill_equals_unchunked_pml(family: str, chunk: int):
    """Several modules, a parameter, a gap and turns: every chunking gives the same logits."""
    pc = engine(family)
    forwards = []
    for prompt in PML_PROMPTS:
        whole = pc.begin(prompt)
        pc.runner.forward_hooks.append(forwards.append)
        parts = pc.begin(prompt, prefill_chunk=chunk)
        pc.runner.forward_hooks.clear()
        assert parts.computed_tokens > chunk or chunk == 9
        assert len(forwards) == math.ceil(parts.computed_tokens / chunk)  # one forward per chunk
        assert maxdiff(whole.logits, parts.logits) <= TOL
        assert torch.equal(whole.cache.key_positions, parts.cache.key_positions)
        assert whole.cached_tokens == parts.cached_tokens > 0 and parts.modules
        whole.finish([], whole.cache)
        parts.finish([], parts.cache)
        forwards.clear()


def test_issue15_chunked_prefill_equals_unchunked_text_and_baseline():
    pc = engine()
    text = DOC * 3 + "Question?"
    base = pc.next_token_logits(text, use_cache=False)
    for chunk in (1, 7, 64):
        for use_cache in (False, True):
            req = pc.begin(text, use_cache=use_cache, prefill_chunk=chunk, insert_prefix=False)
            assert maxdiff(req.logits, base) <= TOL, (chunk, use_cache)
            req.abort()
    pml = pc.begin(PML_PROMPTS[0], use_cache=False, prefill_chunk=5)  # PML baseline, chunked
    assert maxdiff(pml.logits, pc.next_token_logits(PML_PROMPTS[0], use_cache=False)) <= TOL
    pml.abort()


def test_issue15_deferred_prefill_steps_and_releases():
    """``prefill=False``: the caller drives chunks; finish caches prompt + answer, abort nothing."""
    pc = engine()
    text = DOC + "Tell me."
    req = pc.begin(text, prefill=False, prefill_chunk=10)
    steps = 1
    while not req.prefill_step(10):
        assert req.logits is None and req.ttft_s is None
        steps += 1
    assert steps == math.ceil(len(req.prompt_ids) / 10) and req.ttft_s > 0
    tree = pc.prefix.tree
    assert all(n.lock_ref == 0 for n in tree.iter_nodes())  # nothing cached yet: nothing locked
    req.abort()
    assert pc.prefix_stats()["tokens_held"] == 0  # abort caches nothing
    held = pc.begin(text)
    assert held.cached_tokens == 0
    held.finish([5, 6], held.cache)  # the cache holds only the prompt: only that is inserted
    assert pc.prefix_stats()["tokens_held"] == len(held.prompt_ids)
    again = pc.begin(text + " More.")
    assert again.cached_tokens == len(held.prompt_ids)
    assert any(n.lock_ref for n in tree.iter_nodes())  # locked while the request lives
    again.abort()
    assert all(n.lock_ref == 0 for n in tree.iter_nodes())


def test_issue15_begin_errors_hold_nothing():
    pc = engine(max_positions=200)
    with pytest.raises(PromptError):
        pc.begin('<prompt schema="t"><nosuch/></prompt>')
    with pytest.raises(ValueError, match="context window"):
        pc.begin("x" * 300)
    with pytest.raises(ValueError):
        pc.begin("text", max_new_tokens=-1)
    assert pc.memory_report()["tiers"]["device"]["pinned"] == 0


# ---------------------------------------------------------------------------- scheduler

def submit_concurrently(sched: Scheduler, prompts: list[str], max_new_tokens: int, timeout: float) -> list:
    """Each prompt submitted from its own client thread at once; their results, in prompt order."""
    results: dict[int, object] = {}

    def client(i: int) -> None:
        results[i] = sched.submit(GenRequest(prompts[i], max_new_tokens)).result(timeout=timeout)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * timeout)
    return [results[i] for i in range(len(prompts))]


def _alone(prompts, n: int, family: str = "llama") -> list:
    ref = engine(family)
    return [ref.generate(p, max_new_tokens=n) for p in prompts]


def test_issue15_concurrent_submits_equal_greedy_alone(serve):
    prompts = PML_PROMPTS + OTHER_PROMPTS + [DOC + "Another question?", FULL_PROMPTS["nothing-selected"]]
    expected = _alone(prompts, 12)
    sched = serve(engine(), max_batch=3, prefill_chunk=16)  # chunks interleave with decode steps
    results = submit_concurrently(sched, prompts, 12, timeout=60)
    for i, exp in enumerate(expected):
        got = results[i]
        assert got.token_ids == exp.token_ids and got.text == exp.text, prompts[i]
        assert got.finish_reason in ("length", "stop")
        assert got.usage.prompt_tokens == exp.prompt_tokens and got.usage.completion_tokens == len(exp.token_ids)
    st = sched.stats()
    assert st["queue_depth"] == st["running"] == 0 and st["submitted"] == len(prompts)
    assert st["steps"] < sum(len(e.token_ids) for e in expected)  # decode steps were shared


def test_issue15_sampled_requests_follow_their_own_seed(serve):
    options = SamplingOptions(temperature=1.0, top_p=0.9, seed=11)
    ref = engine().generate(PML_PROMPTS[0], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    sched = serve(engine(), max_batch=4)
    handles = [sched.submit(GenRequest(PML_PROMPTS[0], 10, options)) for _ in range(3)]
    assert all(h.result(timeout=60).token_ids == ref.token_ids for h in handles)


def test_issue15_queue_full_raises_with_retry_after():
    sched = Scheduler(engine(), max_batch=1, max_queue=2)  # not started: requests wait
    handles = [sched.submit(GenRequest("one", 2)), sched.submit(GenRequest("two", 2))]
    with pytest.raises(QueueFull) as err:
        sched.submit(GenRequest("three", 2))
    assert err.value.retry_after_s >= 1 and sched.stats()["rejected"] == 1
    sched.start()
    try:
        assert [h.result(timeout=60).finish_reason in ("length", "stop") for h in handles] == [True, True]
    finally:
        sched.stop()
    with pytest.raises(RuntimeError):
        sched.submit(GenRequest("four", 2))


def test_issue15_cancel_mid_stream_frees_the_slot(serve):
    pc = engine()
    slow_forwards(pc, 0.01)
    sched = serve(pc, max_batch=1)
    long = sched.submit(GenRequest(PML_PROMPTS[0], 200))
    queued = sched.submit(GenRequest(DOC, 3))
    events = iter(long)
    first = next(events)
    assert first.kind == "token"
    assert sched.stats()["queue_depth"] == 1  # the only slot is taken
    long.cancel()
    rest = list(events)
    assert rest[-1].kind == "done" and rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 200
    done = queued.result(timeout=60)  # started once the slot was freed
    assert done.finish_reason in ("length", "stop") and done.usage.queue_s > 0
    st = sched.stats()
    assert st["cancelled"] == 1 and st["running"] == 0


def test_issue15_leaving_the_iterator_cancels(serve):
    pc = engine()
    slow_forwards(pc, 0.01)
    sched = serve(pc, max_batch=1)
    handle = sched.submit(GenRequest(DOC, 200))
    for event in handle:
        break  # the client stops reading
    after = sched.submit(GenRequest("next", 2))
    assert after.result(timeout=60).finish_reason in ("length", "stop")
    assert sched.stats()["cancelled"] == 1


def test_issue15_deadline_ends_requests(serve):
    pc = engine()
    slow_forwards(pc, 0.01)
    sched = serve(pc, max_batch=1)
    running = sched.submit(GenRequest(PML_PROMPTS[0], 300, deadline_s=0.3))  # runs 300 alone
    waiting = sched.submit(GenRequest(DOC, 5, deadline_s=0.1))  # expires in the queue
    r, w = running.result(timeout=60), waiting.result(timeout=60)
    assert (r.finish_reason, w.finish_reason) == ("deadline", "deadline")
    assert 0 < r.usage.completion_tokens < 300 and w.usage is None
    assert pc.memory_report()["tiers"]["device"]["pinned"] == 0


def test_issue15_bad_requests_error_while_others_complete(serve):
    pc = engine(max_positions=256)
    good = PML_PROMPTS[:2] + OTHER_PROMPTS
    expected = _alone(good, 6)
    sched = serve(pc, max_batch=2)
    bad = ['<prompt schema="t"><nosuch/></prompt>', '<prompt schema="t"><a>', '<prompt schema="zz"/>',
           "y" * 400, 12345]
    handles = [sched.submit(GenRequest(p, 6)) for p in good[:2]] + \
              [sched.submit(GenRequest(p, 6)) for p in bad] + \
              [sched.submit(GenRequest(p, 6)) for p in good[2:]] + [sched.submit(GenRequest("ok", -1))]
    outcomes = []
    for h in handles:
        try:
            outcomes.append(h.result(timeout=60))
        except Exception as err:  # noqa: BLE001 - the events' errors
            outcomes.append(err)
    oks = outcomes[:2] + outcomes[7:9]
    assert [o.token_ids for o in oks] == [e.token_ids for e in expected]
    errs = outcomes[2:7] + outcomes[9:]
    assert all(isinstance(e, PMLError) for e in errs[:3])
    assert "nosuch" in str(errs[0]) and "zz" in str(errs[2])
    assert isinstance(errs[3], ValueError) and "context window" in str(errs[3])
    assert isinstance(errs[4], TypeError) and isinstance(errs[5], ValueError)
    st = sched.stats()
    assert st["error"] == 6 and st["running"] == 0 and st["alive"]


def test_issue15_call_runs_between_steps_on_the_engine_thread(serve):
    pc = engine()
    slow_forwards(pc, 0.005)
    sched = serve(pc, max_batch=2)
    running = sched.submit(GenRequest(PML_PROMPTS[0], 40))
    events = iter(running)  # kept: dropping a half-read iterator cancels the request
    next(events)
    schema = FULL_SCHEMA.replace('name="t"', 'name="t2"')
    seen = {}

    def add(engine_):
        seen["thread"] = threading.current_thread().name
        seen["decoding"] = sched.stats()["decoding"]
        return engine_.add_schema(schema).schema

    assert sched.call(add, timeout=60) == "t2"
    assert seen == {"thread": "promptcache-engine", "decoding": 1}
    with pytest.raises(KeyError, match="nope"):
        sched.call(lambda engine_: engine_.remove_schema("nope"), timeout=60)
    out = sched.submit(GenRequest(PML_PROMPTS[0].replace('schema="t"', 'schema="t2"'), 4)).result(timeout=60)
    assert out.usage.cached_tokens > 0
    assert list(events)[-1].finish_reason in ("length", "stop")


def test_issue15_usage_counts_cached_tokens(serve):
    sched = serve(engine(), max_batch=2)
    pml = sched.submit(GenRequest(PML_PROMPTS[0], 3)).result(timeout=60)
    assert pml.usage.cached_tokens > 0 and pml.usage.computed_tokens > 0
    assert pml.usage.cached_tokens + pml.usage.computed_tokens == pml.usage.prompt_tokens
    assert set(pml.usage.modules) == {"a", "a/a2", "b1", "d", "e"}
    first = sched.submit(GenRequest(DOC + "First question?", 3)).result(timeout=60)
    second = sched.submit(GenRequest(DOC + "Second one?", 3)).result(timeout=60)
    assert first.usage.cached_tokens == 0 and first.usage.modules == []
    assert second.usage.cached_tokens >= len(DOC)  # shared prefix, one token per character
    assert second.usage.ttft_s >= second.usage.queue_s >= 0


def test_issue15_async_iteration_from_another_thread(serve):
    expected = _alone([PML_PROMPTS[2]], 8)[0]
    sched = serve(engine())

    async def consume():
        handle = sched.submit(GenRequest(PML_PROMPTS[2], 8))
        return [e async for e in handle]

    events = asyncio.run(consume())
    assert [e.kind for e in events] == ["token"] * len(expected.token_ids) + ["done"]
    assert "".join(e.text for e in events) == expected.text
    assert [t for e in events for t in e.token_ids] == expected.token_ids


def test_issue15_observer_hooks(serve):
    calls: list[tuple] = []

    class Obs:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    sched = serve(engine(), observer=Obs())
    sched.submit(GenRequest(DOC, 4)).result(timeout=60)
    names = [c[0] for c in calls]
    assert names[:3] == ["on_queued", "on_started", "on_first_token"]
    assert names.count("on_token") == 3 and names[-1] == "on_finished"
    assert calls[-1][1] == "length" and calls[-1][2].completion_tokens == 4


def test_issue15_stop_strings_are_never_streamed(serve):
    base = engine().generate(PML_PROMPTS[0], max_new_tokens=12)
    if len(base.text) < 4:
        pytest.skip("random model produced too little text")
    stop = base.text[2:4]
    sched = serve(engine())
    events = list(sched.submit(GenRequest(PML_PROMPTS[0], 12, SamplingOptions(stop=[stop]))))
    text = "".join(e.text for e in events)
    assert stop not in text and text == base.text[:base.text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_issue15_default_model_concurrent_equals_alone(serve):
    """SmolLM2-135M (the default model): 4 concurrent chat/text requests, greedy as if alone."""
    from promptcache import PromptCache, load_model

    model, tokenizer = load_model("smollm2", device="cpu")
    pc = PromptCache(model, tokenizer, progress=False)
    prompts = [[{"role": "user", "content": "What is a cache?"}],
               [{"role": "user", "content": "Name three colours."}],
               "The capital of France is", "def fibonacci(n):"]
    expected = [pc.generate(p, max_new_tokens=8, insert_prefix=False) for p in prompts]
    sched = serve(pc, max_batch=4)
    handles = [sched.submit(GenRequest(p, 8)) for p in prompts]
    got = [h.result(timeout=300) for h in handles]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected]

"""Batched decode steps (promptcache.runtime.batch): every row decodes exactly as it would alone.

Each row is a PML prompt of the engine's test schema (gapped layout positions, different lengths),
prefilled through the cached path; "alone" is the same prompt decoded by ``runner.decode_step`` on
its own cache. Float32 tiny random models; tolerance ``TOL`` on the logits, greedy ids identical.
"""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import FULL_PROMPTS, FULL_SCHEMA, make_cache
from promptcache import PromptCache, load_model
from promptcache.runtime.batch import BatchedDecodeBatch, DecodeBatch, LoopDecodeBatch
from promptcache.runtime.runner import DecodeSequence
from single_thread import one_torch_thread  # noqa: F401
from test_e2e_default_model import EXAMPLES
from test_roles_and_engine_api import CHAT_MESSAGES, CHAT_PROMPT, CHAT_SCHEMA
from tiny_tokenizer import tiny_tokenizer
from tiny_models import FAMILIES, tiny_model

TOL = 1e-4  # float32 logits; measured max differences are printed by the tests (run with -s)
PROMPTS = [FULL_PROMPTS[k] for k in ("default-ish", "union-gap-param", "single-module-no-suffix", "turns")]
STEPS = 6


def _prefill(pc, prompt):
    """(first logits, cache, next position) of a PML prompt through the engine's cached path."""
    state, request = pc.request(prompt)
    logits, cache, next_pos, _ = pc.prefill_cached(state, request)
    return logits, cache, next_pos


class Alone:
    """One prompt decoded greedily by itself: its tokens, per-step logits and final cache."""

    def __init__(self, pc, prompt: str, steps: int) -> None:
        logits, self.cache, self.start = _prefill(pc, prompt)
        self.tokens, self.logits = [int(logits.argmax())], []
        for k in range(steps):
            out = pc.runner.decode_step([DecodeSequence(self.cache, self.tokens[-1], self.start + k)])[0]
            self.logits.append(out.float())
            self.tokens.append(int(out.argmax()))


class Row:
    """One prompt inside a batch: its row id, greedy tokens, and the next step's input."""

    def __init__(self, pc, batch, prompt: str) -> None:
        logits, cache, self.start = _prefill(pc, prompt)
        self.row = batch.add(cache)
        self.tokens, self.logits = [int(logits.argmax())], []

    def input(self) -> tuple[int, int, int]:
        return self.row, self.tokens[-1], self.start + len(self.logits)

    def take(self, logits: torch.Tensor) -> None:
        self.logits.append(logits)
        self.tokens.append(int(logits.argmax()))


def _step(batch, rows: list[Row]) -> None:
    for row, logits in zip(rows, batch.step([r.input() for r in rows])):
        row.take(logits)


def _check(rows: list[Row], alone: list[Alone]) -> float:
    """Each row's logits against its alone run (as far as the row got); returns the max abs diff."""
    worst = 0.0
    for row, ref in zip(rows, alone):
        assert row.logits, "row never stepped"
        assert row.tokens == ref.tokens[: len(row.tokens)]
        for got, want in zip(row.logits, ref.logits):
            worst = max(worst, float((got - want).abs().max()))
    assert worst <= TOL, f"max abs logit difference {worst:.3g} > {TOL}"
    return worst


def _setup(family: str):
    pc = make_cache(family)
    pc.add_schema(FULL_SCHEMA)
    return pc


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_match_decoding_alone(family):
    pc = _setup(family)
    with torch.inference_mode():
        alone = [Alone(pc, p, STEPS) for p in PROMPTS]
        batch = DecodeBatch(pc.runner, max_rows=4)
        assert batch.batched == (family != "mpt")  # MPT: per-row ALiBi needs the loop
        rows = [Row(pc, batch, p) for p in PROMPTS]
        assert len({r.start for r in rows}) > 1, "prompts of different lengths"
        for _ in range(STEPS):
            _step(batch, rows)
        worst = _check(rows, alone)
    print(f"\n{family}: batched vs alone max abs logit diff {worst:.2e} over {STEPS} steps x {len(rows)} rows")


@pytest.mark.parametrize("family", ["llama", "falcon-alibi", "gemma3", "qwen2"])
def test_rows_join_late_and_leave_early(family):
    pc = _setup(family)
    with torch.inference_mode():
        alone = [Alone(pc, p, STEPS) for p in PROMPTS[:3]]
        batch = BatchedDecodeBatch(pc.runner, max_rows=4)
        rows = [Row(pc, batch, p) for p in PROMPTS[:2]]
        _step(batch, rows)
        _step(batch, rows)
        rows.append(Row(pc, batch, PROMPTS[2]))  # joins late
        _step(batch, rows)
        left = batch.remove(rows[0].row)  # leaves early; the last slot moves into its place
        assert len(batch) == 2
        kept = rows[0]
        want = Alone(pc, PROMPTS[0], len(kept.logits))  # its cache holds the same tokens
        assert torch.equal(left.positions, want.cache.key_positions)
        for i, layer in enumerate(want.cache.layers):
            assert (left.keys[i] - layer.keys[0]).abs().max() <= TOL
            assert (left.values[i] - layer.values[0]).abs().max() <= TOL
        for _ in range(STEPS - 3):
            _step(batch, rows[1:])
        _check(rows, alone)


def test_removed_kv_is_a_clone_and_rows_are_reused():
    pc = _setup("llama")
    with torch.inference_mode():
        batch = BatchedDecodeBatch(pc.runner, max_rows=2)
        a, b = Row(pc, batch, PROMPTS[0]), Row(pc, batch, PROMPTS[1])
        with pytest.raises(RuntimeError, match="full"):
            batch.add(_prefill(pc, PROMPTS[2])[1])
        _step(batch, [a, b])
        kv = batch.remove(a.row)
        snapshot = kv.clone()
        _step(batch, [b])  # b moved into a's slot; a's returned KV must not change
        assert all(torch.equal(x, y) for x, y in zip(kv.keys + kv.values, snapshot.keys + snapshot.values))
        assert kv.length == len(kv.positions) and int(kv.positions[-1]) == a.start  # the fed token
        assert Row(pc, batch, PROMPTS[2]).row == a.row
        with pytest.raises(KeyError):
            batch.step([(7, 1, 1)])
        with pytest.raises(ValueError, match="twice"):
            batch.step([b.input(), b.input()])


def test_a_step_over_some_rows_leaves_the_others_exact():
    pc = _setup("falcon-alibi")
    with torch.inference_mode():
        alone = [Alone(pc, p, STEPS) for p in PROMPTS[:3]]
        batch = BatchedDecodeBatch(pc.runner, max_rows=4)
        rows = [Row(pc, batch, p) for p in PROMPTS[:3]]
        for k in range(STEPS):
            _step(batch, rows if k % 2 == 0 else rows[1:])  # row 0 sits out every other step
        _check(rows, alone)


@pytest.mark.parametrize("family", ["llama", "falcon-alibi", "gemma3"])
def test_capacity_growth_stays_exact(family, monkeypatch):
    import promptcache.runtime.batch as batch_module

    monkeypatch.setattr(batch_module, "CAPACITY_HEADROOM", 0)  # grow within the 40 steps
    monkeypatch.setattr(batch_module, "CAPACITY_ROUND", 1)
    pc = _setup(family)
    steps = 40
    with torch.inference_mode():
        alone = [Alone(pc, p, steps) for p in PROMPTS[2:4]]
        batch = BatchedDecodeBatch(pc.runner, max_rows=2)
        rows = [Row(pc, batch, p) for p in PROMPTS[2:4]]
        capacity = [batch.cache.capacity]
        for _ in range(steps):
            _step(batch, rows)
            capacity.append(batch.cache.capacity)
        assert len(set(capacity)) >= 2, f"capacity never grew: {capacity}"
        _check(rows, alone)


def test_loop_reference_matches_alone():
    pc = _setup("falcon-alibi")
    with torch.inference_mode():
        alone = [Alone(pc, p, STEPS) for p in PROMPTS[:3]]
        batch = LoopDecodeBatch(pc.runner, max_rows=4)
        rows = [Row(pc, batch, p) for p in PROMPTS[:3]]
        for _ in range(STEPS):
            _step(batch, rows)
        _check(rows, alone)
        kv = batch.remove(rows[0].row)
        assert torch.equal(kv.positions, alone[0].cache.key_positions)
        assert len(batch) == 2


def test_default_model_greedy_answers_equal_alone():
    """SmolLM2 (float32, CPU): 2 PML prompts and 2 plain ones (a chat rendered by the template and
    plain text, baseline prefill), 16 greedy tokens batched vs alone: identical ids."""
    model, tokenizer = load_model("smollm2", device="cpu")
    pc = PromptCache(model, tokenizer, progress=False)
    pc.add_schema(EXAMPLES / "document_qa.xml")
    pc.add_schema(CHAT_SCHEMA)
    chat = tokenizer.apply_chat_template(CHAT_MESSAGES[:2] + [{"role": "user", "content": "Say it again."}],
                                         add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    plain = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    steps = 16

    def prefill(source):
        if isinstance(source, str):
            return _prefill(pc, source)
        logits, cache = pc.runner.prefill_baseline(list(source))
        return logits, cache, len(source)

    sources = [(EXAMPLES / "document_qa.prompt.xml").read_text(), CHAT_PROMPT, list(chat), plain]
    with torch.inference_mode():
        alone = []
        for src in sources:
            logits, cache, start = prefill(src)
            tokens, out = [int(logits.argmax())], []
            for k in range(steps - 1):
                out.append(pc.runner.decode_step([DecodeSequence(cache, tokens[-1], start + k)])[0].float())
                tokens.append(int(out[-1].argmax()))
            alone.append((tokens, out))
        batch = DecodeBatch(pc.runner, max_rows=4)
        assert batch.batched
        rows = []
        for src in sources:
            logits, cache, start = prefill(src)
            rows.append([batch.add(cache), start, [int(logits.argmax())], []])
        for k in range(steps - 1):
            outs = batch.step([(row, tokens[-1], start + k) for row, start, tokens, _ in rows])
            for (_, _, tokens, got), logits in zip(rows, outs):
                got.append(logits)
                tokens.append(int(logits.argmax()))
    worst = max(float((g - w).abs().max()) for (_, _, _, gs), (_, ws) in zip(rows, alone) for g, w in zip(gs, ws))
    print(f"\nsmollm2: batched vs alone max abs logit diff {worst:.2e}")
    assert [r[2] for r in rows] == [a[0] for a in alone]
    assert worst <= 1e-3  # measured 8.0e-5 (one thread); the tiny models stay within TOL


def test_an_emptied_batch_frees_its_buffers_and_starts_again_exact():
    pc = _setup("gemma3")
    with torch.inference_mode():
        alone = [Alone(pc, p, 3) for p in PROMPTS[:2]]
    batch = DecodeBatch(pc.runner, max_rows=2)  # outside inference mode: the batch enters it itself
    rows = [Row(pc, batch, p) for p in PROMPTS[:2]]
    _step(batch, rows)
    for r in rows:
        batch.remove(r.row)
    assert len(batch) == 0 and batch.impl.cache.capacity == 0
    rows = [Row(pc, batch, p) for p in PROMPTS[:2]]
    for _ in range(3):
        _step(batch, rows)
    _check(rows, alone)


@pytest.mark.parametrize("family", ["llama", "falcon-alibi", "gemma3"])
def test_rows_never_see_padding(family):
    """Slots past a row's length hold another row's worth of junk: the mask must hide them."""
    pc = _setup(family)
    with torch.inference_mode():
        alone = [Alone(pc, p, 2) for p in PROMPTS]
        batch = BatchedDecodeBatch(pc.runner, max_rows=4)
        rows = [Row(pc, batch, p) for p in PROMPTS]
        for slot, length in enumerate(batch.cache.state.lengths):
            for layer in batch.cache.layers:
                layer.buf_k[slot, :, length:] = 50.0
                layer.buf_v[slot, :, length:] = -50.0
            batch.cache.positions[slot, length:] = 3
        for _ in range(2):
            _step(batch, rows)
        _check(rows, alone)


def test_falcon_alibi_eager_attention():
    """Falcon's eager path adds the per-row ALiBi bias a second time inside attention."""
    from promptcache.engine import PromptCache
    from tiny_models import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    pc = PromptCache(tiny_model("falcon-alibi", attn_implementation="eager"), tiny_tokenizer(), progress=False)
    pc.add_schema(FULL_SCHEMA)
    assert pc.model.config._attn_implementation == "eager"
    with torch.inference_mode():
        alone = [Alone(pc, p, 4) for p in PROMPTS]
        batch = BatchedDecodeBatch(pc.runner, max_rows=4)
        rows = [Row(pc, batch, p) for p in PROMPTS]
        for _ in range(4):
            _step(batch, rows)
        _check(rows, alone)


def test_batched_step_calls_the_forward_hooks_once_per_forward():
    """The runner's forward hooks see every forward, batched decode steps included (the scheduler's
    deadline/cancel tests slow forwards down through them)."""
    pc = PromptCache(tiny_model("llama"), tiny_tokenizer())
    runner = pc.runner
    calls = []
    runner.forward_hooks.append(lambda call: calls.append((list(call.ids), call.q_pos.tolist())))
    batch = DecodeBatch(runner, max_rows=2, batched=True)
    rows = []
    for text in ("hello there", "a longer plain prompt here"):
        req = pc.begin(text, use_cache=False)
        rows.append((batch.add(req.cache), req.next_pos))
    calls.clear()
    batch.step([(rows[0][0], 5, rows[0][1]), (rows[1][0], 7, rows[1][1])])
    assert calls == [([5, 7], [rows[0][1], rows[1][1]])]


def test_capacity_grows_by_headroom_not_doubling(monkeypatch):
    """A row that outgrows the buffer gets room for what it needs plus a headroom, at least a
    quarter more, not twice its length (doubling eight 4k-token rows allocated gigabytes and
    paused the server for seconds). Headroom and rounding are zeroed so the rule is visible."""
    import promptcache.runtime.batch as batch_module

    monkeypatch.setattr(batch_module, "CAPACITY_HEADROOM", 0)
    monkeypatch.setattr(batch_module, "CAPACITY_ROUND", 1)
    pc = _setup("llama")
    with torch.inference_mode():
        batch = BatchedDecodeBatch(pc.runner, max_rows=2)
        row = Row(pc, batch, PROMPTS[3])
        length = batch.cache.state.lengths[0]
        cap = batch.cache.capacity
        assert cap == length + 1
        for _ in range(cap - length + 1):  # the last step needs key slot ``cap``
            _step(batch, [row])
        assert batch.cache.capacity == -(-5 * cap // 4)

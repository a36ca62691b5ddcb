"""Automatic prefix caching in the engine, for prompts written without PML.

:class:`PrefixRunner` gets the model runner, the tokenizer and renderer and the EOS ids from the
engine; it never imports the engine.

Dispatch (:func:`prompt_kind`; ``PromptCache.generate`` and ``next_token_logits`` call it first):

* a :class:`~promptcache.pml.model.Prompt`, an ``os.PathLike`` (a prompt file, loaded with the
  bounded reader), or a string whose first element (after an optional XML declaration and
  comments) is ``<prompt``: **PML**, handled as before. A string is never opened as a file, even
  when it names one (docs/security.md): file loading is explicit (``load_prompt`` or a ``Path``);
* a list of message dicts (``{"role", "content"}``): **chat**, the token ids of
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (without a template:
  the engine renderer's role markers, as PML uses them);
* any other string: **plain text**, tokenized with the tokenizer's default special tokens (its own
  BOS/EOS; special-token text inside the string stays literal text).

One request with ``use_cache=True`` (see docs/prefix.md):

1. Look up the longest cached prefix of the prompt's first ``n - 1`` tokens: the last prompt
   token is always computed, its logits being the first answer token's distribution.
2. Lock the matched path for the request, so eviction never drops KV a request is using.
3. Prefill the rest at positions ``m..n-1`` with the model runner over a spliced cache whose
   pieces ARE the tree's values (:class:`~promptcache.runtime.kv.ModuleKV` with positions; a match
   ending inside an edge is trimmed with ``ModuleKV.split``, also views). Positions are contiguous from 0, so this is exactly
   the baseline computation, split at ``m``.
4. Decode as usual; then insert the prompt AND the generated tokens whose KV exists (all but the
   last one, which was never fed back), so that the next turn of a chat, which repeats the
   answer, reuses it. Only the new tokens' KV is stored, cloned out of the request buffer.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..pml.model import Prompt
from ..results import GenerationResult
from ..roles import SENTINEL, encode_literal
from ..runtime.kv import ModuleKV, SplicedCache
from ..runtime.request import ActiveRequest, ChunkedPrefill
from ..runtime.runner import ModelRunner
from ..runtime.sampling import SamplingOptions, check_max_new_tokens
from .radix import MatchResult, RadixTree

PML, CHAT, TEXT = "pml", "chat", "text"
# Optional XML declaration and comments, then the <prompt element itself. A comment's body may not
# contain "-->" (a lazy ".*?" could span several comments: exponential backtracking on text).
_PML_START = re.compile(r"\s*(?:<\?xml\b(?:(?!\?>).)*\?>\s*)?(?:<!--(?:(?!-->).)*-->\s*)*<prompt(?![\w.:-])",
                        re.S)


def prompt_kind(prompt: Any) -> str:
    """``"pml"``, ``"chat"`` or ``"text"``: which path serves ``prompt`` (rules in the module doc)."""
    if isinstance(prompt, (Prompt, os.PathLike)):
        return PML
    if isinstance(prompt, str):
        if _PML_START.match(prompt):
            return PML
        return TEXT
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
        return CHAT
    raise TypeError("a prompt is PML (a Prompt, a pathlib.Path, or text starting with <prompt), a "
                    f"plain string, or a non-empty list of message dicts; got {type(prompt).__name__}")


def is_pml_prompt(prompt: Any) -> bool:
    return prompt_kind(prompt) == PML


def chat_token_ids(tokenizer, renderer, messages: Sequence[Mapping]) -> list[int]:
    """Token ids of ``messages`` plus the generation prompt, as the model is served them.

    Message contents are literal text: special-token text in a content never becomes a control
    token (issue 12, item 1); see :func:`_template_ids`.
    """
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs string 'role' and 'content' fields, got {dict(m)!r}")
    if getattr(tokenizer, "chat_template", None):
        return _template_ids(tokenizer, renderer, [dict(m) for m in messages])
    ids = renderer.bos()
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in renderer.markers.close:
            raise ValueError(f"message {i}: role {role!r} has no markers without a chat template "
                             f"(known: {', '.join(renderer.markers.close)})")
        ids += renderer.role_open(role, i == 0) + renderer.encode(m["content"]) + renderer.role_close(role)
    return ids + renderer.generation_prompt()


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _template_ids(tokenizer, renderer, messages: list[dict]) -> list[int]:
    """``apply_chat_template`` ids when the contents add no control token, else a piecewise encoding.

    Benign contents (the usual case) give exactly ``apply_chat_template(..., tokenize=True)``: the
    rendered text tokenized as the template meant it. The control tokens in it must be those of
    the same conversation with every content replaced by a sentinel (the template's own). When a
    content adds one (its text spells ``<|im_end|>`` and the like), the template is rendered with
    sentinels, cut at them, and its pieces are tokenized as template text while every content is
    tokenized literally: token boundaries next to a content may then differ from
    ``apply_chat_template``, but no content ever becomes a control token.
    """
    controls = renderer.controls
    ids = list(tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"])
    sentinels = [SENTINEL.format(i) for i in range(len(messages))]
    probe = _render(tokenizer, [{**m, "content": s} for m, s in zip(messages, sentinels)])
    expected = [i for i in tokenizer(probe, add_special_tokens=False)["input_ids"] if i in controls]
    if [i for i in ids if i in controls] == expected:
        return ids
    pieces = _cut_at(probe, sentinels)
    out = renderer.encode_trusted(pieces[0])
    for m, piece in zip(messages, pieces[1:]):
        out += renderer.encode(m["content"]) + renderer.encode_trusted(piece)
    return out


def _cut_at(text: str, sentinels: list[str]) -> list[str]:
    """``text`` cut at each sentinel, which must appear once each, in order."""
    pieces, rest = [], text
    for s in sentinels:
        if rest.count(s) != 1:
            raise ValueError("a message contains special-token text and the chat template does not "
                             "render each message content exactly once, so the contents cannot be "
                             "kept literal; remove the special-token text from the messages")
        before, rest = rest.split(s)
        pieces.append(before)
    return pieces + [rest]


def kv_split(value: ModuleKV, at: int) -> tuple[ModuleKV, ModuleKV]:
    """The tree's split callback: a value cut at token ``at`` (views)."""
    return value.split(at)


@dataclass
class _Lease:
    """One request's hold on the tree: the locked match and how many tokens it reused."""

    match: MatchResult | None
    reused: int
    tree: RadixTree | None = None  # the tree matched (the request's adapter's)

    @property
    def cached(self) -> bool:
        return self.match is not None


class PrefixRunner:
    """Serves plain-text and chat prompts over a model runner with an optional prefix tree.

    ``enabled=False`` keeps no tree: every such request runs the baseline prefill.
    Not thread-safe (nor is the engine).
    """

    def __init__(self, runner: ModelRunner, tokenizer, renderer, eos_ids: set[int], *,
                 enabled: bool = True, max_bytes: int | None = None, policy: str = "lru",
                 ttl_s: float | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.eos_ids = eos_ids
        self.tree: RadixTree | None = None  # the base model's tree
        self.trees: dict[str, RadixTree] = {}  # LoRA adapter model key -> that adapter's own tree
        self._tree_args = dict(max_bytes=max_bytes, policy=policy, ttl=ttl_s, split=kv_split)
        if enabled:
            try:
                self.tree = RadixTree(max_bytes=max_bytes, policy=policy, ttl=ttl_s, split=kv_split)
            except ValueError as err:  # name the engine's options, not the tree's
                raise ValueError(f"prefix_policy={policy!r}, prefix_ttl_s={ttl_s!r}, "
                                 f"prefix_max_bytes={max_bytes!r}: {err}") from None
        self.requests = 0
        self.tokens_reused = 0
        self.tokens_computed = 0
        self.inserts_skipped = 0

    # ------------------------------------------------------------------ tokens

    def token_ids(self, prompt: str | Sequence[Mapping], kind: str | None = None) -> list[int]:
        kind = kind or prompt_kind(prompt)
        tok = self.tokenizer
        if kind == TEXT:
            # The tokenizer's own BOS/EOS only: the text itself never becomes a control token.
            ids = encode_literal(tok, prompt, add_special_tokens=True, controls=self.renderer.controls)
        elif kind == CHAT:
            ids = chat_token_ids(tok, self.renderer, prompt)
        else:
            raise ValueError("PML prompts are served by the engine's module cache, not the prefix tree")
        if not ids:
            raise ValueError("the prompt has no tokens")
        self.runner.check_window(len(ids), f"{kind} prompt of {len(ids)} tokens")
        return ids

    # ----------------------------------------------------------------- prefill

    def open(self, ids: list[int], use_cache: bool) -> tuple[list[ModuleKV], _Lease]:
        """Look up and lock the longest cached prefix of ``ids[:-1]``: ``(pieces, lease)``.

        The pieces are the tree's own tensors (views) at positions ``0..lease.reused - 1``; the
        caller prefills ``ids[lease.reused:]`` after them and must :meth:`close` the lease.
        Without the tree (or ``use_cache=False``) there are no pieces and nothing is locked.
        """
        if not use_cache or self.tree is None:
            return [], _Lease(None, 0)
        tree = self.scope_tree()
        match = tree.match_prefix(ids[:-1])
        tree.lock(match)
        lease = _Lease(match, match.length, tree)
        try:
            pieces = tree.gather(match)
        except BaseException:
            self._release(lease)
            raise
        self.requests += 1
        self.tokens_reused += match.length
        self.tokens_computed += len(ids) - match.length
        return pieces, lease

    def close(self, lease: _Lease, ids: list[int], kv: SplicedCache | ModuleKV | None, insert: bool) -> None:
        """End a request: cache ``ids`` (prompt + generated) as far as ``kv`` holds their KV when
        ``insert`` (and the tree was consulted), then unlock the lease. Idempotent."""
        try:
            if insert and lease.cached and kv is not None:
                self._insert(ids, kv, lease.reused, lease.tree)
        finally:
            self._release(lease)

    def begin(self, prompt, use_cache: bool = True, insert: bool = True, *, t0: float | None = None,
              reserve: int | None = None, prefill_chunk: int | None = None) -> ActiveRequest:
        """Tokenize (window checked), look up and lock the cached prefix; the prefill is left to
        :meth:`ActiveRequest.prefill_step` (positions ``m..n-1``: the baseline split at ``m``).

        ``finish`` caches prompt + generated tokens when ``insert``; ``abort`` only unlocks.
        ``t0``: when the request started (TTFT runs from it; default now). ``prefill_chunk``
        only sizes the buffer (chunks that follow the first need room too)."""
        t0 = time.perf_counter() if t0 is None else t0
        kind = prompt_kind(prompt)
        ids = self.token_ids(prompt, kind)
        pieces, lease = self.open(ids, use_cache)
        runner = self.runner
        try:
            m, n = lease.reused, len(ids)
            room = runner.reserve_tokens if reserve is None else reserve
            if prefill_chunk is not None:
                room += max(0, n - m - prefill_chunk)
            # visible by the causal rule: all of the past, causal among the new tokens
            job = ChunkedPrefill(runner, runner.new_cache(pieces, room), ids[m:],
                                 torch.arange(m, n, device=runner.device), by_position=False)
        except BaseException:
            self._release(lease)
            raise

        def close(generated: list[int], kv, completed: bool) -> None:
            self.close(lease, ids + generated, kv, insert and completed)

        return ActiveRequest(runner, kind, job, n, m, n - m, 0, use_cache and self.tree is not None, [],
                             t0, ids, close)

    def _release(self, lease: _Lease) -> None:
        if lease.match is not None and lease.tree is not None:
            lease.tree.unlock(lease.match)
            lease.match = None

    # ------------------------------------------------------------------ LoRA adapters

    def scope_tree(self) -> RadixTree | None:
        """The tree of the runner's adapter scope: the base tree, or the adapter's own, keyed by its
        fingerprint (weights and config), so a prefix computed under one adapter never serves
        another and two names of one adapter share a tree (docs/lora.md)."""
        name = self.runner.lora_name
        if name is None or self.tree is None:
            return self.tree
        key = self.runner.lora.fingerprint(name)
        tree = self.trees.get(key)
        if tree is None:
            tree = self.trees[key] = RadixTree(**self._tree_args)
        return tree

    def drop_tree(self, key: str) -> int:
        """Forget adapter ``key``'s tree (its adapter was unloaded); returns the bytes it held."""
        tree = self.trees.pop(key, None)
        return 0 if tree is None else tree.bytes_held

    def bytes_by_tree(self) -> dict[str | None, int]:
        """Bytes held per tree: ``None`` for the base tree, else the adapter's model key."""
        out: dict[str | None, int] = {None: self.tree.bytes_held if self.tree is not None else 0}
        out.update((key, tree.bytes_held) for key, tree in self.trees.items())
        return out

    def _enforce_total(self, keep: RadixTree) -> None:
        """``prefix_max_bytes`` bounds all trees together: evict from the others (largest
        first, each by its own policy) until the total fits."""
        limit = self.tree.max_bytes if self.tree is not None else None
        if limit is None or not self.trees:
            return
        others = sorted((t for t in [self.tree, *self.trees.values()] if t is not keep),
                        key=lambda t: -t.bytes_held)
        for tree in others:
            excess = sum(t.bytes_held for t in [self.tree, *self.trees.values()]) - limit
            if excess <= 0:
                return
            tree.evict(excess)

    def _insert(self, ids: list[int], kv: SplicedCache | ModuleKV, start: int,
                tree: RadixTree | None = None) -> None:
        """Cache ``ids[:kv_len]`` (what ``kv`` holds KV for); store only the new tokens' KV.

        ``kv`` is the request's cache, or its KV as a :class:`ModuleKV` (what a decode batch
        hands back when a row leaves it). ``tree``: the request's (default: the base tree)."""
        tree = self.tree if tree is None else tree
        kv_len = kv.length if isinstance(kv, ModuleKV) else kv.get_seq_length()
        kv_len = min(kv_len, len(ids))
        if tree is None or kv_len <= start:
            return
        # Views into the request buffer; the tree trims what it already holds, then the stored
        # leaf gets its own copy so the request's buffer is not kept alive.
        if isinstance(kv, ModuleKV):
            value = kv.slice(start, kv_len)
        else:
            value = ModuleKV([layer.keys[0, :, start:kv_len] for layer in kv.layers],
                             [layer.values[0, :, start:kv_len] for layer in kv.layers],
                             kv.key_positions[start:kv_len])
        nbytes = value.nbytes
        if tree.max_bytes is not None and nbytes > tree.max_bytes:
            self.inserts_skipped += 1  # would evict everything, itself included
            return
        res = tree.insert(ids[:kv_len], value, nbytes, start=start)
        node = res.node
        if res.added_tokens and node is not None and node.alive:
            node.value = node.value.clone()
        self._enforce_total(tree)

    # ---------------------------------------------------------------- requests

    def next_token_logits(self, prompt, use_cache: bool = True, insert: bool = True) -> torch.Tensor:
        req = self.begin(prompt, use_cache, insert)
        req.prefill_step()
        logits = req.logits
        req.finish([], req.cache)
        return logits.float()

    def generate(self, prompt, max_new_tokens: int, use_cache: bool, insert: bool,
                 options: SamplingOptions, stream: Callable[[str], None] | None) -> GenerationResult:
        """Same contract and TTFT definition as ``PromptCache.generate`` (tokenization timed)."""
        check_max_new_tokens(max_new_tokens)
        self.runner.sync()
        req = self.begin(prompt, use_cache, insert, t0=time.perf_counter())
        return req.generate(options, max_new_tokens, stream, self.eos_ids, self.renderer.decode)

    # ------------------------------------------------------------------- stats

    def reset_stats(self) -> None:
        """Zero the counters (not the cached KV), e.g. after a warm-up request."""
        self.requests = self.tokens_reused = self.tokens_computed = self.inserts_skipped = 0
        for tree in [self.tree, *self.trees.values()]:
            if tree is not None:
                tree.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Tree counters plus the engine's own token counts (see docs/prefix.md)."""
        out: dict[str, Any] = {"enabled": self.tree is not None, "requests": self.requests,
                               "tokens_reused": self.tokens_reused,
                               "tokens_computed": self.tokens_computed,
                               "inserts_skipped": self.inserts_skipped}
        looked = self.tokens_reused + self.tokens_computed
        out["token_hit_rate"] = self.tokens_reused / looked if looked else 0.0
        if self.tree is None:
            out.update(hits=0, misses=0, hit_rate=0.0, bytes_held=0, evictions=0, max_bytes=None,
                       policy=None)
            return out
        st = self.tree.stats()
        out.update(hits=st.hits, misses=st.misses, hit_rate=st.hit_rate, bytes_held=st.bytes_held,
                   tokens_held=st.tokens_held, nodes=st.nodes, inserts=st.inserts,
                   evictions=st.evictions, expirations=st.expirations,
                   bytes_evicted=st.bytes_evicted, max_bytes=self.tree.max_bytes,
                   policy=self.tree.policy.name)
        # LoRA adapters' own trees (hits and bytes above are the base tree's); see docs/lora.md
        out["adapter_trees"] = {key: {"bytes_held": t.bytes_held, "hits": t.stats().hits,
                                      "misses": t.stats().misses} for key, t in self.trees.items()}
        return out


"""A request's life between admission and its end: its prefill (whole or in chunks), its cache,
and how what it holds is released.

Made by ``PromptCache.begin`` (PML) or ``PrefixRunner.begin`` (plain text, chat) and driven either
by :meth:`ActiveRequest.generate` (one request) or by the server's scheduler (many requests, decode
steps batched by :class:`~promptcache.runtime.batch.DecodeBatch`). Every forward still goes through
:class:`~promptcache.runtime.runner.ModelRunner`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..results import GenerationResult
from .kv import ModuleKV, SplicedCache
from .runner import ModelRunner
from .sampling import SamplingOptions


class ChunkedPrefill:
    """The prefill of a request's computed tokens, runnable in chunks (each chunk one forward).

    Why: a server interleaves a long prefill with the running requests' decode steps. Chunk ``k``
    appends its tokens to ``cache`` and attends to everything the cache holds by the request rule:
    ``by_position`` (PML: :meth:`ModelRunner.causal_visible` of the keys' layout positions, gaps
    and all; the tokens must be sorted by position), else every past key and causally among the
    new tokens (plain text and baselines: contiguous positions after the past). That is the
    unchunked prefill's visibility restricted to the chunk's rows, so the result equals it to
    float rounding. One chunk (``step()`` with no limit) IS the unchunked prefill.
    """

    def __init__(self, runner: ModelRunner, cache: SplicedCache, ids: Sequence[int], q_pos: torch.Tensor,
                 by_position: bool) -> None:
        if len(ids) == 0:
            raise ValueError("a prefill needs at least one token (the last prompt token is always computed)")
        self.runner = runner
        self.cache = cache
        self.ids = list(ids)
        self.q_pos = q_pos
        self.by_position = by_position
        self.done_tokens = 0
        self.logits: torch.Tensor | None = None
        self.forwards = 0

    @classmethod
    def finished(cls, runner: ModelRunner, cache: SplicedCache, logits: torch.Tensor) -> "ChunkedPrefill":
        """A prefill already run elsewhere (the fused recompute path, which is not chunked)."""
        job = cls.__new__(cls)
        job.runner, job.cache, job.ids, job.q_pos, job.by_position = runner, cache, [], None, True
        job.done_tokens, job.logits, job.forwards = 0, logits, 1
        return job

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done_tokens

    @property
    def done(self) -> bool:
        return self.logits is not None

    def step(self, max_tokens: int | None = None) -> torch.Tensor | None:
        """Run the next chunk of at most ``max_tokens`` tokens (``None``: all that remain).

        Returns the first-token logits after the last chunk, ``None`` before."""
        if self.done:
            return self.logits
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"a prefill chunk needs at least one token, got {max_tokens}")
        a = self.done_tokens
        b = len(self.ids) if max_tokens is None else min(len(self.ids), a + max_tokens)
        q_pos = self.q_pos[a:b]
        visible = self.runner.causal_visible(self.cache.key_positions, q_pos) if self.by_position else None
        last = b == len(self.ids)
        out = self.runner.forward(self.cache, self.ids[a:b], q_pos, visible, logits=last)
        self.done_tokens = b
        self.forwards += 1
        if last:
            self.logits = out
        return self.logits


CloseFn = Callable[[list[int], "SplicedCache | ModuleKV | None", bool], None]


@dataclass(eq=False)
class ActiveRequest:
    """One request between admission and its end: its prefill, its cache and how it is released.

    Made by ``PromptCache.begin`` (PML) or ``PrefixRunner.begin`` (plain text, chat). The life of
    a request: :meth:`prefill_step` until :attr:`prefilled` (one call without a limit runs the
    whole prefill; with ``max_tokens`` one chunk per call), then decoding by the caller (the
    :meth:`generate` loop, or a server's batch), then exactly one of :meth:`finish` (caches the
    prompt and the generated tokens in the prefix tree where that applies, releases leases and
    pins) or :meth:`abort` (releases only). Not thread-safe: the engine's thread owns it.

    ``cached_tokens``/``computed_tokens``/``recomputed_tokens``: prompt tokens reused, prefilled,
    recomputed; ``modules``: PML modules the prompt selected; ``ttft_s``: from ``t0`` (the call,
    prompt not yet parsed) to the first-token logits, set when the prefill ends.
    """

    runner: ModelRunner
    kind: str                       # "pml", "text" or "chat"
    job: ChunkedPrefill
    next_pos: int                   # position of the first generated token
    cached_tokens: int
    computed_tokens: int
    recomputed_tokens: int
    consulted_cache: bool           # GenerationResult.use_cache: a cache was looked up
    modules: list[str]
    t0: float
    prompt_source: list[int] | Callable[[], list[int]]
    on_close: CloseFn
    on_prefilled: Callable[[], None] | None = None
    ttft_s: float | None = None
    closed: bool = False

    @property
    def cache(self) -> SplicedCache:
        return self.job.cache

    @property
    def logits(self) -> torch.Tensor | None:
        """First-token logits once :attr:`prefilled`, else ``None``."""
        return self.job.logits

    @property
    def prefilled(self) -> bool:
        return self.job.done

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's tokens in position order (built on first use: after TTFT for PML)."""
        if callable(self.prompt_source):
            self.prompt_source = self.prompt_source()
        return self.prompt_source

    @torch.inference_mode()
    def prefill_step(self, max_tokens: int | None = None) -> bool:
        """Run (the next chunk of) the prefill; True once it is complete. Aborts on error."""
        if self.closed:
            raise RuntimeError("this request has already finished or been aborted")
        if self.job.done:  # e.g. a fused recompute prefill, finished before the request began
            if self.ttft_s is None:
                self._prefilled()
            return True
        try:
            self.job.step(max_tokens)
            if self.job.done:
                self._prefilled()
        except BaseException:
            self.abort()
            raise
        return self.job.done

    def _prefilled(self) -> None:
        if self.on_prefilled is not None:
            callback, self.on_prefilled = self.on_prefilled, None
            callback()
        self.runner.sync()
        self.ttft_s = time.perf_counter() - self.t0

    def finish(self, generated_ids: Sequence[int] = (), kv: SplicedCache | ModuleKV | None = None) -> None:
        """End normally: ``kv`` (the request's cache, or the KV a decode batch gave back) holds
        the prompt and the generated tokens fed back; the prefix path caches them. Idempotent."""
        self._close(list(generated_ids), kv, True)

    def abort(self) -> None:
        """End without caching anything (error, cancel, deadline); releases leases and pins."""
        self._close([], None, False)

    def _close(self, generated: list[int], kv, completed: bool) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.on_prefilled is not None:  # pins not released yet (prefill never finished)
                callback, self.on_prefilled = self.on_prefilled, None
                callback()
        finally:
            self.on_close(generated, kv, completed)

    def generate(self, options: SamplingOptions, max_new_tokens: int, stream: Callable[[str], None] | None,
                 eos_ids: set[int], detokenize: Callable[[list[int]], str]) -> GenerationResult:
        """The one-request path: prefill, decode loop, finish (abort on any error)."""
        try:
            self.prefill_step()
            logits = self.logits
            first = logits.float().cpu()
            prompt_ids = self.prompt_ids  # for the repetition penalty; after TTFT
            generated, text, window_full = self.runner.decode(logits, self.cache, prompt_ids, options,
                                                              max_new_tokens, stream, self.next_pos,
                                                              eos_ids, detokenize)
        except BaseException:
            self.abort()
            raise
        self.finish(generated, self.cache)
        self.runner.sync()
        return GenerationResult(text, generated, self.ttft_s, time.perf_counter() - self.t0,
                                len(prompt_ids), self.cached_tokens, self.computed_tokens,
                                self.consulted_cache, self.recomputed_tokens, first, window_full)

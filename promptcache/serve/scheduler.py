"""The engine thread: a bounded request queue, chunked prefills and batched decode steps.

:class:`Scheduler` owns one :class:`~promptcache.PromptCache` (the engine is not thread-safe, so
only its thread touches it). Clients :meth:`Scheduler.submit` a :class:`GenRequest` from any
thread and read :class:`Event` objects from the returned :class:`Handle` (blocking, or ``async
for`` from an asyncio loop in another thread).

One loop iteration (:meth:`Scheduler._iteration`):

1. run the functions queued with :meth:`Scheduler.call` (schema add/remove, reports);
2. end the requests whose client cancelled or whose deadline passed (queued, prefilling or
   decoding: their slot is free for step 3);
3. admit queued requests while fewer than ``max_batch`` are admitted: ``pc.begin(...,
   prefill=False)`` parses/binds or tokenizes, checks the window and takes the cached KV; a
   request that fails there (bad PML, unknown schema, over the window) gets an ``"error"`` event
   and the loop goes on;
4. prefill: at most ``prefill_chunk`` prompt tokens in all while other requests are decoding
   (one chunk of one request, or several short prompts), so a long prefill delays their next
   token by one chunk's forward, not by the whole prompt; without running requests a prefill
   runs whole. A finished prefill chooses the request's first token and joins the decode batch;
5. ONE decode step over all decoding requests through
   :class:`~promptcache.runtime.batch.DecodeBatch`; each request chooses its token with its own
   :class:`~promptcache.runtime.sampling.TokenStream` (its own seeded sampler and stop checker).

A finished request leaves the batch; ``ActiveRequest.finish`` caches prompt and answer in the
prefix tree (plain text and chat); cancelled, expired and failed requests are aborted (nothing
cached, leases released).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from ..pml.errors import PMLError
from ..runtime.request import ActiveRequest
from ..runtime.sampling import TokenStream
from .requests import Completion, Event, GenRequest, Handle, QueueFull, Usage

__all__ = ["Completion", "Event", "GenRequest", "Handle", "QueueFull", "Scheduler", "Usage"]

log = logging.getLogger("promptcache.serve")
T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    """A request inside the scheduler."""

    req: GenRequest
    handle: Handle
    submitted: float
    deadline: float
    admitted: float | None = None
    active: ActiveRequest | None = None
    stream: TokenStream | None = None
    row: int | None = None
    last_token_at: float = 0.0
    first_token_at: float | None = None


class Scheduler:
    """Serves generation requests for one engine from a thread (module docstring).

    ``max_batch``: requests admitted at once (prefilling or decoding; the decode batch's rows).
    ``max_queue``: requests waiting beyond those; one more raises :class:`QueueFull`.
    ``prefill_chunk``: prompt tokens prefilled per iteration while others decode.
    ``default_deadline_s``: a request's time from submit to its end unless it sets its own.
    ``observer``: optional object with ``on_queued(depth)``, ``on_started(queue_s)``,
    ``on_first_token(ttft_s)``, ``on_token(inter_token_s)``, ``on_finished(outcome, usage)``
    (each optional; called on the engine thread except ``on_queued``; exceptions are logged).
    """

    def __init__(self, pc, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
                 default_deadline_s: float = 600, observer: Any = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not default_deadline_s > 0:
            raise ValueError(f"default_deadline_s must be > 0 seconds, got {default_deadline_s!r}")
        self.pc = pc
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.default_deadline_s = float(default_deadline_s)
        self.observer = observer
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: collections.deque[_Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._prefilling: list[_Job] = []
        self._running: list[_Job] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch = None
        self._service_s = 1.0  # moving average of admission-to-end time (for Retry-After)
        self._counts: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the scheduler has already been started")
        from ..runtime.batch import DecodeBatch  # the batch helper's module (contract)

        self._batch = DecodeBatch(self.pc.runner, max_rows=self.max_batch)
        self._thread = threading.Thread(target=self._main, name="promptcache-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current iteration, then fail every waiting or running request and pending
        call with ``RuntimeError("... stopped")``; joins the thread."""
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    # ------------------------------------------------------------------ client API

    def submit(self, req: GenRequest) -> Handle:
        """Queue ``req``; raises :class:`QueueFull` (with ``retry_after_s``) when ``max_queue``
        requests already wait, ``RuntimeError`` once stopped. Request errors come as events."""
        now = time.perf_counter()
        deadline_s = self.default_deadline_s if req.deadline_s is None else req.deadline_s
        handle = Handle(next(self._ids), self._wake)
        with self._work:
            if self._stopping:
                raise RuntimeError("the scheduler has been stopped")
            depth = len(self._queue)
            if depth >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(depth, self._retry_after(depth))
            self._queue.append(_Job(req, handle, now, now + deadline_s))
            self._counts["submitted"] += 1
            depth += 1
            self._work.notify_all()
        self._notify("on_queued", depth)
        return handle

    def _retry_after(self, depth: int) -> float:
        """Seconds until a queued slot likely frees: the queue ahead, ``max_batch`` at a time."""
        waves = math.ceil((depth + 1) / self.max_batch)
        return float(min(60.0, max(1.0, math.ceil(self._service_s * waves))))

    def call(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """Run ``fn(pc)`` on the engine thread between steps and return its result (its exception
        is raised here). ``TimeoutError`` after ``timeout`` seconds (``fn`` may still run later)."""
        if threading.current_thread() is self._thread:
            return fn(self.pc)  # from an observer or a call: already between steps
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._work:
            if self._stopping or self._thread is None:
                raise RuntimeError("the scheduler is not running")
            self._calls.append((fn, fut))
            self._work.notify_all()
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the engine did not run the call within {timeout} s") from None

    def stats(self) -> dict[str, Any]:
        """Queue depth, running (prefilling + decoding) requests, limits and counters."""
        with self._lock:
            out: dict[str, Any] = {"queue_depth": len(self._queue), "running": len(self._prefilling) + len(self._running),
                                   "prefilling": len(self._prefilling), "decoding": len(self._running),
                                   "pending_calls": len(self._calls)}
            out.update(max_batch=self.max_batch, max_queue=self.max_queue, prefill_chunk=self.prefill_chunk,
                       default_deadline_s=self.default_deadline_s, alive=self.alive)
            out.update(dict(self._counts))
        return out

    # ------------------------------------------------------------------ engine thread

    def _main(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as err:  # a bug, or a failure of the whole step: fail the admitted, go on
                    log.exception("scheduler iteration failed")
                    for job in self._prefilling + self._running:
                        self._fail(job, err)
                    self._prefilling, self._running = [], []
            self._shutdown()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping."""
        with self._work:
            while not self._stopping:
                if self._calls or self._prefilling or self._running:
                    return True
                if self._queue:
                    return True
                self._work.wait()
            return False

    def _iteration(self) -> None:
        self._run_calls()
        self._reap()
        self._admit()
        self._prefill()
        self._decode()

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.pc))
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                fut.set_exception(err)

    def _reap(self) -> None:
        """End cancelled and expired requests wherever they are."""
        now = time.perf_counter()
        with self._lock:
            gone = [j for j in self._queue if j.handle.cancelled or now >= j.deadline]
            for job in gone:
                self._queue.remove(job)
        for job in gone:
            self._end(job, "cancelled" if job.handle.cancelled else "deadline")
        for group in (self._prefilling, self._running):
            for job in [j for j in group if j.handle.cancelled or now >= j.deadline]:
                group.remove(job)
                self._end(job, "cancelled" if job.handle.cancelled else "deadline")

    def _admit(self) -> None:
        while len(self._prefilling) + len(self._running) < self.max_batch:
            with self._lock:
                if not self._queue:
                    return
                job = self._queue.popleft()
            job.admitted = time.perf_counter()
            self._notify("on_started", job.admitted - job.submitted)
            req = job.req
            try:
                job.active = self.pc.begin(req.prompt, use_cache=req.use_cache, recompute=req.recompute,
                                           max_new_tokens=req.max_tokens, prefill=False,
                                           prefill_chunk=self.prefill_chunk,
                                           reserve=min(req.max_tokens, self.pc.reserve_tokens),
                                           **({"adapter": req.adapter} if req.adapter is not None else {}))
            except Exception as err:  # a bad request: this one errors, the others go on
                self._fail(job, err)
                continue
            self._prefilling.append(job)

    def _prefill(self) -> None:
        """Prefill admitted requests: ``prefill_chunk`` tokens in all while others decode."""
        budget = self.prefill_chunk if self._running else None
        for job in list(self._prefilling):
            if budget is not None and budget <= 0:
                return
            active = job.active
            before = active.job.remaining
            try:
                done = active.prefill_step(budget)
            except Exception as err:
                self._prefilling.remove(job)
                self._fail(job, err)
                continue
            if budget is not None:
                budget -= max(1, before - active.job.remaining)
            self._counts["prefill_tokens"] += before - active.job.remaining
            if done:
                self._prefilling.remove(job)
                self._first_token(job)

    def _first_token(self, job: _Job) -> None:
        """The first token from the prefill's logits; then the request joins the decode batch."""
        pc, active, req = self.pc, job.active, job.req
        try:
            job.stream = TokenStream(req.options, active.prompt_ids, pc.runner.device, pc.eos_ids,
                                     pc.renderer.decode, req.max_tokens, active.next_pos, pc.runner.max_positions)
            if not job.stream.done:
                self._emit_token(job, job.stream.push(active.logits))
            if job.stream.done:
                self._complete(job)
                return
            job.row = self._batch.add(active.cache)
        except Exception as err:
            self._fail(job, err)
            return
        self._running.append(job)

    def _decode(self) -> None:
        """ONE decode step over every decoding request."""
        if not self._running:
            return
        jobs = list(self._running)
        inputs = [(j.row, j.stream.generated[-1], j.stream.next_pos) for j in jobs]
        try:
            logits = self._batch.step(inputs)
        except Exception as err:  # the step failed for all of them
            log.exception("decode step failed")
            for job in jobs:
                self._running.remove(job)
                self._fail(job, err)
            return
        self._counts["steps"] += 1
        for job, row_logits in zip(jobs, logits):
            try:
                job.stream.next_pos += 1  # the token just fed sits at next_pos
                self._emit_token(job, job.stream.push(row_logits))
                if job.stream.done:
                    self._running.remove(job)
                    self._complete(job)
            except Exception as err:
                if job in self._running:
                    self._running.remove(job)
                self._fail(job, err)

    # ------------------------------------------------------------------ endings and events

    def _emit_token(self, job: _Job, token: int) -> None:
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self._notify("on_first_token", now - job.submitted)
        else:
            self._notify("on_token", now - job.last_token_at)
        job.last_token_at = now
        self._counts["completion_tokens"] += 1
        job.handle._push(Event("token", job.stream.take_text(), [token]))

    def _usage(self, job: _Job) -> Usage | None:
        active = job.active
        if active is None or not active.prefilled:
            return None
        now = time.perf_counter()
        first = job.first_token_at if job.first_token_at is not None else now
        generated = job.stream.generated if job.stream is not None else []
        return Usage(len(active.prompt_ids), len(generated), active.cached_tokens, active.computed_tokens,
                     active.recomputed_tokens, first - job.submitted,
                     (job.admitted or now) - job.submitted, list(active.modules))

    def _release_row(self, job: _Job):
        """The request's KV: out of the decode batch if it is in it, else its own cache."""
        if job.row is not None:
            row, job.row = job.row, None
            return self._batch.remove(row)
        return job.active.cache if job.active is not None else None

    def _complete(self, job: _Job) -> None:
        """A normal end (stop, length, window): cache prompt and answer, report."""
        kv = self._release_row(job)
        job.active.finish(job.stream.generated, kv)
        self._done(job, job.stream.finish_reason)

    def _end(self, job: _Job, reason: str) -> None:
        """Cancelled or expired: abort (nothing cached). A deadline shows the text held back."""
        try:
            self._release_row(job)
        finally:
            if job.active is not None:
                job.active.abort()
        if reason == "deadline" and job.stream is not None and not job.stream.done:
            job.stream.done = True
            rest = job.stream.take_text()
            if rest:
                job.handle._push(Event("token", rest))
        self._done(job, reason)

    def _done(self, job: _Job, reason: str) -> None:
        usage = self._usage(job)
        self._counts[reason] += 1
        self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - (job.admitted or job.submitted))
        job.handle._push(Event("done", finish_reason=reason, usage=usage))
        self._notify("on_finished", reason, usage)

    def _fail(self, job: _Job, err: BaseException) -> None:
        try:
            self._release_row(job)
        except Exception:  # noqa: BLE001 - the error event below matters more
            log.exception("could not free the decode row of request %s", job.handle.id)
        if job.active is not None:
            job.active.abort()
        self._counts["error"] += 1
        if not isinstance(err, (PMLError, ValueError, TypeError, LookupError)):
            log.error("request %s failed: %r", job.handle.id, err)
        job.handle._push(Event("error", error=err))
        self._notify("on_finished", "error", None)

    def _shutdown(self) -> None:
        err = RuntimeError("the scheduler was stopped before this request finished")
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
        for job in self._prefilling + self._running + queued:
            self._fail(job, err)
        self._prefilling, self._running = [], []
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("the scheduler was stopped before running this call"))

    def _notify(self, name: str, *args) -> None:
        hook = getattr(self.observer, name, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            log.exception("observer %s failed", name)

"""What a client of the scheduler sees: a request, its events, its usage, and the handle it reads
them from (blocking, or ``async for`` from an asyncio loop in another thread).

Kept apart from :mod:`.scheduler` (the engine thread) so the HTTP layer and tests can name the
request and event types without the scheduling machinery.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from ..runtime.sampling import SamplingOptions

FINAL = ("done", "error")


@dataclass
class GenRequest:
    """One generation: ``prompt`` is PML text (``<prompt ...>``), plain text or chat messages."""

    prompt: str | list[dict]
    max_tokens: int
    options: SamplingOptions = field(default_factory=SamplingOptions)
    use_cache: bool = True
    recompute: str | None = None
    deadline_s: float | None = None   # seconds from submit; None = the scheduler's default
    adapter: str | None = None        # LoRA adapter name (the OpenAI ``model`` field); None = base


@dataclass
class Usage:
    """What a request cost. ``ttft_s`` runs from submit to the first token (queue time
    included, like vLLM's TTFT); ``queue_s`` from submit to admission."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    computed_tokens: int
    recomputed_tokens: int
    ttft_s: float
    queue_s: float
    modules: list[str]


@dataclass
class Event:
    """``"token"`` (``text``: new text, already cut at stop strings, possibly empty while a stop
    string may still be forming; ``token_ids``: the new token), ``"done"`` (``finish_reason``,
    ``usage``; its ``text`` is always empty: every kept character came in a token event) or
    ``"error"`` (``error``: ``PMLError``/``PromptError``/``ValueError``/``TypeError`` for a bad
    request, anything else for a failure)."""

    kind: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "deadline" | "window"
    usage: Usage | None = None
    error: BaseException | None = None


@dataclass
class Completion:
    """A whole answer (:meth:`Handle.result`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage | None


class QueueFull(Exception):
    """The bounded queue is full; ``retry_after_s`` estimates when a slot frees up."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"{depth} requests waiting, the most this server queues")
        self.retry_after_s = retry_after_s


class Handle:
    """A submitted request's events, in order, ending with one ``"done"`` or ``"error"``.

    Read them once, with ``for`` (blocking) or ``async for`` (from any asyncio loop: the engine
    thread hands events over with ``loop.call_soon_threadsafe``). Leaving either loop before the
    final event cancels the request. Thread-safe.
    """

    def __init__(self, request_id: int, wake: Callable[[], None]) -> None:
        self.id = request_id
        self._wake = wake
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: collections.deque[Event] = collections.deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._cancelled = False
        self.finished = False  # the final event has been pushed

    # ---------------------------------------------------------------- engine side

    def _push(self, event: Event) -> None:
        with self._lock:
            if self.finished:
                return
            self._events.append(event)
            self.finished = event.kind in FINAL
            waiter, self._waiter = self._waiter, None
            self._ready.notify_all()
        if waiter is not None:
            loop, fut = waiter
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # ---------------------------------------------------------------- client side

    def cancel(self) -> None:
        """The client is gone: the scheduler ends the request at its next iteration (idempotent,
        a no-op after the final event)."""
        if not self._cancelled and not self.finished:
            self._cancelled = True
            self._wake()

    def __iter__(self) -> Iterator[Event]:
        done = False
        try:
            while not done:
                with self._lock:
                    while not self._events:
                        self._ready.wait()
                    event = self._events.popleft()
                done = event.kind in FINAL
                yield event
        finally:
            if not done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        done = False
        try:
            while not done:
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        fut = loop.create_future()
                        self._waiter = (loop, fut)
                if event is None:
                    await fut
                    continue
                done = event.kind in FINAL
                yield event
        finally:
            if not done:
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole answer; raises the request's error. ``timeout``: seconds of waiting
        for each event (``TimeoutError`` then; the request goes on)."""
        text, ids = [], []
        while True:
            with self._lock:
                if not self._events and not self._ready.wait_for(lambda: self._events, timeout):
                    raise TimeoutError(f"no event from request {self.id} within {timeout} s")
                event = self._events.popleft()
            if event.kind == "token":
                text.append(event.text)
                ids += event.token_ids
            elif event.kind == "error":
                raise event.error
            else:
                return Completion("".join(text), ids, event.finish_reason or "", event.usage)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)

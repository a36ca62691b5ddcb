"""Eviction policies for the prefix tree, and the lazy heap that applies them.

Only *leaves* are evictable (a node's KV is useless without its ancestors'), and only when no
running request holds a lock on them. A policy turns a node into a priority (smaller goes
first); the :class:`LeafQueue` keeps candidate leaves in a heap ordered by that priority.

Why a lazy heap: a node's priority changes on every access (LRU stamp, LFU hit count), and
re-ordering a heap on each lookup would put a ``heappush`` on the hottest path. Instead a heap
entry stores the priority the node had when it was pushed. Priorities only ever *grow* (stamps
and hit counts increase), so an entry's key is always <= its node's true priority; when an entry
reaches the top with an out-of-date key it is simply re-pushed with the current one. Entries of
nodes that stopped being evictable (evicted, got a child, got locked) are dropped when they
surface. The tree re-pushes a node whenever it becomes an evictable leaf again.
"""

from __future__ import annotations

import heapq
from itertools import count
from operator import attrgetter
from typing import Any, Callable, Iterable, Protocol


class EvictableNode(Protocol):
    """The node attributes policies and the queue read (see ``radix.RadixNode``)."""

    parent: Any
    children: dict
    lock_ref: int
    stamp: float
    hits: int


class EvictionPolicy:
    """Orders evictable leaves; subclasses set ``name`` and ``priority``.

    ``priority(node)`` must only grow over a node's life (see the module docstring).
    ``uses_clock``: stamps are wall-clock seconds from the tree's clock instead of an operation
    counter (needed when age in seconds matters, i.e. TTL). A policy that sets ``ttl`` must
    order by ``stamp`` alone: the tree reads the oldest queued key to skip expiry checks.
    """

    name: str = "base"
    uses_clock: bool = False
    ttl: float | None = None
    priority: Callable[[Any], Any]

    def expired(self, node: EvictableNode, now: float) -> bool:
        """Whether ``node`` must go regardless of the byte budget."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LRUPolicy(EvictionPolicy):
    """Least recently used leaf first: the one whose last insert or lookup is oldest."""

    name = "lru"
    priority = staticmethod(attrgetter("stamp"))


class LFUPolicy(EvictionPolicy):
    """Least frequently matched leaf first; ties go to the least recently used."""

    name = "lfu"
    priority = staticmethod(attrgetter("hits", "stamp"))


class TTLPolicy(EvictionPolicy):
    """Entries idle for ``ttl`` seconds expire; under budget pressure the oldest go first (LRU).

    Idle time counts from the last insert or lookup that used the node, as hosted prompt caches
    do (a hit refreshes the lifetime), so a shared system prompt in constant use never expires
    while a one-off suffix does. Expired leaves are evicted on every insert, lookup and
    ``evict()`` even when the budget is met. A locked node never expires while locked, and an
    expired interior node goes once its descendants have gone and it has become a leaf.
    """

    name = "ttl"
    uses_clock = True
    priority = staticmethod(attrgetter("stamp"))

    def __init__(self, ttl: float) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        self.ttl = float(ttl)

    def expired(self, node: EvictableNode, now: float) -> bool:
        return now - node.stamp >= self.ttl

    def __repr__(self) -> str:
        return f"TTLPolicy(ttl={self.ttl})"


POLICIES = ("lru", "lfu", "ttl")


def make_policy(spec: str | EvictionPolicy | None = None,
                ttl: float | None = None) -> EvictionPolicy:
    """A policy from a name (``"lru"`` default, ``"lfu"``, ``"ttl"`` needing ``ttl``) or as is."""
    if isinstance(spec, EvictionPolicy):
        if ttl is not None:
            raise ValueError("pass ttl to TTLPolicy(...) itself, not alongside a policy object")
        return spec
    name = (spec or "lru").lower()
    if name == "ttl":
        if ttl is None:
            raise ValueError("the ttl policy needs ttl=<seconds>")
        return TTLPolicy(ttl)
    if ttl is not None:
        raise ValueError(f"ttl={ttl!r} only applies to the ttl policy, not {name!r}")
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"unknown eviction policy {spec!r}; choose one of {', '.join(POLICIES)}")


def evictable(node: EvictableNode) -> bool:
    """A live, unlocked leaf (the root has no parent, so it never qualifies)."""
    return node.parent is not None and not node.children and node.lock_ref == 0


class LeafQueue:
    """Lazy min-heap of evictable leaves under one policy (see the module docstring)."""

    __slots__ = ("heap", "_priority", "_seq")

    def __init__(self, policy: EvictionPolicy) -> None:
        # (priority when pushed, tie-breaking sequence number, node); read-only outside: the
        # top key is a lower bound of every queued node's current priority.
        self.heap: list[tuple[Any, int, Any]] = []
        self._priority = policy.priority
        self._seq = count()

    def __len__(self) -> int:
        """Heap entries, stale ones included (used to decide when to compact)."""
        return len(self.heap)

    def push(self, node: EvictableNode) -> None:
        heapq.heappush(self.heap, (self._priority(node), next(self._seq), node))

    def rebuild(self, leaves: Iterable[EvictableNode]) -> None:
        """Replace all entries by fresh ones for ``leaves`` (drops accumulated stale entries)."""
        prio, seq = self._priority, self._seq
        self.heap[:] = [(prio(n), next(seq), n) for n in leaves if evictable(n)]
        heapq.heapify(self.heap)

    def peek(self) -> EvictableNode | None:
        """The evictable leaf with the smallest current priority, left in the queue."""
        heap, prio = self.heap, self._priority
        while heap:
            key, _, node = heap[0]
            if node.parent is None or node.children or node.lock_ref:
                heapq.heappop(heap)
                continue
            current = prio(node)
            if current != key:
                heapq.heapreplace(heap, (current, next(self._seq), node))
                continue
            return node
        return None

    def pop(self) -> EvictableNode | None:
        """Remove and return the next victim, or None when no leaf is evictable."""
        node = self.peek()
        if node is not None:
            heapq.heappop(self.heap)
        return node

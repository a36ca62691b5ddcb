"""A radix tree over token-id sequences whose edges own opaque KV segments.

Automatic prefix caching: before prefilling a prompt the engine asks for the longest cached
prefix, reuses that KV, computes only the rest, then inserts the whole sequence with the KV of
the new suffix. Shared prefixes (system prompts, few-shot examples) are stored once.

Layout. Every non-root node owns one edge: a run of tokens (a tuple) plus the caller's value for
exactly those tokens (e.g. per-layer ``(k, v)`` slices) and its size in bytes. Children are keyed
by their edge's first token, so a step down the tree is one dict lookup plus one slice compare.

Values are opaque. When an edge must be cut (an insert diverges inside it, or
``match_prefix(split=True)``) the tree calls the caller's ``split(value, at) -> (left, right)``
and divides ``nbytes`` in proportion to the tokens (KV size is linear in tokens). Values of
``None`` (no KV, as in :mod:`.analyze`) never need a callback.

Lookups do not split by default: a match ending inside an edge reports how many tokens of that
last edge apply (``MatchResult.last_used``), and :meth:`RadixTree.gather` trims that value on
the fly. Keeping lookups free of structural changes keeps them cheap and keeps ``split`` off the
read path; the edge gets cut anyway when the caller inserts the diverging sequence.

Eviction (see :mod:`.eviction`): unlocked leaves only, in policy order, whenever the bytes held
exceed ``max_bytes`` after an insert or unlock, or on explicit :meth:`RadixTree.evict`.
``lock(node)`` pins a node and all its ancestors for a running request.

Not thread-safe: one tree per engine loop, or a lock around every call.

Size (~590 lines): one data structure; its walk, split, lock and eviction bookkeeping share the
node invariants (bytes, locks, the eviction queue) and would only leak them if split apart.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from .eviction import EvictionPolicy, LeafQueue, evictable, make_policy

SplitFn = Callable[[Any, int], "tuple[Any, Any]"]


class PrefixCacheError(RuntimeError):
    """Misuse of the tree: missing split callback, unlocking too often, a vanished prefix."""


class RadixNode:
    """One edge of the tree; ``key`` is the edge's tokens, ``value`` the KV covering them."""

    __slots__ = ("key", "value", "nbytes", "children", "parent", "lock_ref", "stamp", "hits")

    def __init__(self, key: tuple[int, ...], value: Any, nbytes: int, parent: RadixNode | None,
                 stamp: float) -> None:
        self.key = key
        self.value = value
        self.nbytes = nbytes
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.lock_ref = 0  # locks on this node or any descendant
        self.stamp = stamp  # last use: operation counter, or clock seconds for clock policies
        self.hits = 0  # lookups that matched into this edge

    @property
    def alive(self) -> bool:
        """False once evicted (the root, having no parent, counts as alive)."""
        return self.parent is not None or not self.key

    def prefix_tokens(self) -> tuple[int, ...]:
        """All tokens from the root down to the end of this edge."""
        parts = []
        node: RadixNode | None = self
        while node is not None:
            parts.append(node.key)
            node = node.parent
        return tuple(t for part in reversed(parts) for t in part)

    def __repr__(self) -> str:
        head = self.key[:6]
        more = "..." if len(self.key) > 6 else ""
        return (f"RadixNode(key={head}{more} len={len(self.key)}, nbytes={self.nbytes}, "
                f"children={len(self.children)}, lock_ref={self.lock_ref})")


class MatchResult(NamedTuple):
    """Longest cached prefix of a lookup.

    ``nodes``: the path's nodes, root excluded, in order. ``values``: their values as they were
    at lookup time (a later insert may cut those nodes; the snapshot stays right). The first
    ``length`` tokens of the query are covered by the values, the last one only for its first
    ``last_used`` tokens (``partial`` is True when that is fewer than its edge holds).
    """

    length: int
    nodes: list[RadixNode]
    values: list[Any]
    last_used: int
    partial: bool

    @property
    def hit(self) -> bool:
        return self.length > 0

    @property
    def last_node(self) -> RadixNode | None:
        """Deepest node reached (lock this one to pin the whole path), or None on a miss."""
        return self.nodes[-1] if self.nodes else None

    def segments(self) -> list[tuple[Any, int]]:
        """``(value, tokens_used)`` per node: what the caller concatenates."""
        if not self.nodes:
            return []
        out = [(v, len(n.key)) for n, v in zip(self.nodes[:-1], self.values[:-1])]
        out.append((self.values[-1], self.last_used))
        return out


class InsertResult(NamedTuple):
    """What an insert changed: ``prefix_len`` tokens were already cached, ``added_tokens`` new.

    ``node`` is the deepest node covering the sequence's last token (new or existing; its edge may
    run past the sequence when a longer one is cached); lock it if needed.
    """

    node: RadixNode | None
    prefix_len: int
    added_tokens: int
    added_bytes: int


@dataclass(frozen=True)
class TreeStats:
    """Counters since creation (or :meth:`RadixTree.reset_stats`) and the current footprint.

    A lookup is a hit when it reuses at least one token; ``tokens_computed`` counts the tokens
    lookups did not find (what the engine must prefill). ``evictions`` counts removed nodes,
    TTL ``expirations`` included.
    """

    lookups: int
    hits: int
    misses: int
    hit_rate: float
    tokens_looked_up: int
    tokens_reused: int
    tokens_computed: int
    token_hit_rate: float
    inserts: int
    tokens_inserted: int
    evictions: int
    expirations: int
    bytes_evicted: int
    bytes_held: int
    tokens_held: int
    nodes: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# Builds the result tuples without the Python-level namedtuple __new__ (hot path).
_new_tuple = tuple.__new__


def sequence_split(value: Any, at: int) -> tuple[Any, Any]:
    """Split callback for values sliced along tokens on their first axis (lists, tensors)."""
    return value[:at], value[at:]


def common_len(edge: tuple, key: tuple, i: int, limit: int) -> int:
    """Length of the common prefix of ``edge`` and ``key[i:]``, at most ``limit``.

    Known: the first token matches and the whole window does not. Binary search over slice
    compares keeps a divergence deep inside a long edge (a 2k-token document) to O(log n)
    interpreted steps; each compare only looks at the not-yet-checked part.
    """
    lo, hi = 1, limit  # edge[:lo] matches; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if edge[lo:mid] == key[i + lo:i + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _proportional(nbytes: int, at: int, total: int) -> tuple[int, int]:
    left = nbytes * at // total
    return left, nbytes - left


class RadixTree:
    """Prefix cache over token sequences (see the module docstring for the model).

    max_bytes: budget for the summed ``nbytes`` of all values (None: unbounded).
    policy: ``"lru"`` (default), ``"lfu"``, ``"ttl"`` (with ``ttl`` seconds) or an
    :class:`~.eviction.EvictionPolicy`. split: cuts a value at a token offset (required as soon as
    non-None values must be cut). clock: seconds source for clock policies (default
    ``time.monotonic``; inject one in tests); counter-based policies ignore it. on_evict: called
    with each evicted node (its ``prefix_tokens()`` and ``value`` still readable) before its value
    is dropped.
    """

    __slots__ = ("max_bytes", "policy", "on_evict", "_split_fn", "_clock", "_ttl", "_tick",
                 "_root", "_queue", "_queue_live", "_bytes", "_tokens", "_nodes", "_lookups",
                 "_hits", "_looked_up", "_reused", "_inserts", "_tokens_inserted", "_evictions",
                 "_expirations", "_bytes_evicted")

    def __init__(self, max_bytes: int | None = None, policy: str | EvictionPolicy | None = None,
                 *, ttl: float | None = None, split: SplitFn | None = None,
                 clock: Callable[[], float] | None = None,
                 on_evict: Callable[[RadixNode], None] | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.policy = make_policy(policy, ttl)
        self._split_fn = split
        self._clock = (clock or time.monotonic) if self.policy.uses_clock else None
        self._ttl = self.policy.ttl
        self.on_evict = on_evict
        self._tick = 0
        self._root = RadixNode((), None, 0, None, 0)
        self._queue = LeafQueue(self.policy)
        # The queue is an index over nodes' own metadata, built the first time anything must be
        # evicted: an unbounded tree never pays for it, a bounded one keeps it from then on.
        self._queue_live = False
        self._bytes = 0
        self._tokens = 0
        self._nodes = 0
        self.reset_stats()

    # ----------------------------------------------------------------- lookup

    def match_prefix(self, tokens: Sequence[int], *, split: bool = False) -> MatchResult:
        """Longest cached prefix of ``tokens``; refreshes the path's recency and hit counts.

        split=True cuts the last edge where the match ends, so every returned node is used whole
        (needs the split callback when that value is not None).
        """
        key = tokens if type(tokens) is tuple else tuple(tokens)
        if self._clock is None:
            self._tick = now = self._tick + 1
        else:
            now = self._clock()
            if self._ttl is not None:
                self._expire(now)
        n = len(key)
        values: list[Any] = []
        nodes: list[RadixNode] = []
        _, i, child, j = self._descend(key, now, nodes, values)
        used = len(nodes[-1].key) if nodes else 0
        partial = False
        if child is not None:  # the match ends inside this edge, after j of its tokens
            i += j
            if split:
                child = self._split(child, j)
                used = j
            else:
                used, partial = j, True
            nodes.append(child)
            values.append(child.value)
        self._lookups += 1
        self._looked_up += n
        if i:
            self._hits += 1
            self._reused += i
        return _new_tuple(MatchResult, (i, nodes, values, used, partial))

    def _descend(self, key: tuple, now: float, nodes: list | None, values: list | None
                 ) -> tuple[RadixNode, int, RadixNode | None, int]:
        """The edge walk shared by lookups and inserts: follow the edges ``key`` matches whole.

        Returns ``(last node matched whole (the root if none), tokens matched so far, the child
        whose edge the key leaves inside or None, how many of that edge's tokens match)``. Every
        edge entered gets ``now`` as its stamp. A lookup passes the lists ``nodes`` and ``values``
        (filled with the nodes matched whole and their values) and counts a hit on every edge
        entered; an insert passes ``None`` for both.
        """
        node = self._root
        n = len(key)
        i = 0
        while i < n:
            child = node.children.get(key[i])
            if child is None:
                break
            edge = child.key
            m = len(edge)
            child.stamp = now
            if nodes is not None:
                child.hits += 1
            if key[i:i + m] == edge:
                if nodes is not None:
                    nodes.append(child)
                    values.append(child.value)
                i += m
                node = child
                continue
            return node, i, child, common_len(edge, key, i, min(m, n - i))
        return node, i, None, 0

    def gather(self, result: MatchResult) -> list[Any]:
        """Values covering exactly ``result.length`` tokens: the last one trimmed if partial."""
        if not result.partial:
            return list(result.values)
        left, _ = self._cut(result.values[-1], result.last_used)
        return result.values[:-1] + [left]

    # ----------------------------------------------------------------- insert

    def insert(self, tokens: Sequence[int], value: Any = None, nbytes: int = 0, *,
               start: int | None = None, lock: bool = False) -> InsertResult:
        """Cache ``tokens``; ``value`` (``nbytes`` big) is the KV of ``tokens[start:]``.

        start=None means the value covers exactly the tokens the tree does not hold yet (the
        usual match-then-insert flow). With an explicit ``start``, tokens the tree already holds
        are trimmed off the value's front; if the tree holds fewer than ``start`` tokens (the
        matched prefix was evicted meanwhile: lock it next time) PrefixCacheError is raised.
        lock=True locks the resulting node before the budget is enforced (unlock it later).
        Shared prefixes are stored once; an already cached sequence only refreshes recency.
        """
        key = tokens if type(tokens) is tuple else tuple(tokens)
        if self._clock is None:
            self._tick = now = self._tick + 1
        else:
            now = self._clock()
        n = len(key)
        node, i, child, j = self._descend(key, now, None, None)
        if child is not None:  # diverges (or ends) inside this edge, after j of its tokens
            i += j
            # Ending inside the edge needs no cut: the edge already covers the whole sequence.
            node = child if i == n else self._split(child, j)
        self._inserts += 1
        added = n - i
        if added:
            if start is None or start == i:
                pass
            elif start > i:
                raise PrefixCacheError(
                    f"value covers tokens from {start} but only {i} tokens of the prefix are "
                    "cached (evicted since the lookup? lock the match until the insert)")
            elif start < 0:
                raise ValueError(f"start must be >= 0, got {start}")
            else:
                value, nbytes = self._trim_front(value, nbytes, i - start, n - start)
            if nbytes < 0:
                raise ValueError(f"nbytes must be >= 0, got {nbytes}")
            leaf = RadixNode(key[i:], value, nbytes, node, now)
            node.children[key[i]] = leaf
            self._bytes += nbytes
            self._tokens += added
            self._nodes += 1
            self._tokens_inserted += added
            if self._queue_live:
                self._enqueue(leaf)
            node = leaf
        else:
            nbytes = 0
        if lock:
            self.lock(node)
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            self._shrink_to(self.max_bytes)
        if self._ttl is not None:
            self._expire(now)
        end = node if node is not self._root else None
        return _new_tuple(InsertResult, (end, i, added, nbytes))

    # ---------------------------------------------------------------- locking

    def lock(self, node: RadixNode | MatchResult | InsertResult | None) -> None:
        """Pin ``node`` and its ancestors against eviction (re-entrant: counts locks)."""
        node = self._as_node(node)
        if node is None:
            return
        if not node.alive:
            raise PrefixCacheError(f"cannot lock an evicted node: {node!r}")
        root = self._root
        while node is not root:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode | MatchResult | InsertResult | None) -> None:
        """Undo one :meth:`lock`; the budget is enforced again if the node became evictable."""
        node = self._as_node(node)
        if node is None:
            return
        if node.lock_ref <= 0:
            raise PrefixCacheError(f"unlock without a matching lock: {node!r}")
        bottom, root = node, self._root
        while node is not root:
            node.lock_ref -= 1
            node = node.parent
        if evictable(bottom):
            if self._queue_live:
                self._enqueue(bottom)
            if self.max_bytes is not None and self._bytes > self.max_bytes:
                self._shrink_to(self.max_bytes)

    @contextmanager
    def locked(self, node: RadixNode | MatchResult | InsertResult | None) -> Iterator[None]:
        """``with tree.locked(match): ...`` pins the match for the block."""
        self.lock(node)
        try:
            yield
        finally:
            self.unlock(node)

    # --------------------------------------------------------------- eviction

    def evict(self, nbytes: int) -> int:
        """Evict leaves in policy order until ``nbytes`` are freed or none is evictable.

        Expired entries (TTL) go first and do count. Returns the bytes actually freed.
        """
        before = self._bytes
        if self._ttl is not None:
            self._expire(self._clock())
        freed = before - self._bytes
        if nbytes > freed:
            self._shrink_to(self._bytes - (nbytes - freed))
        return before - self._bytes

    def _enqueue(self, node: RadixNode) -> None:
        queue = self._queue
        if len(queue) > 2 * self._nodes + 256:  # mostly stale entries: start afresh
            queue.rebuild(self.iter_nodes())
        else:
            queue.push(node)

    def _live_queue(self) -> LeafQueue:
        if not self._queue_live:
            self._queue.rebuild(self.iter_nodes())
            self._queue_live = True
        return self._queue

    def _shrink_to(self, limit: int) -> None:
        queue = self._live_queue()
        while self._bytes > limit:
            node = queue.pop()
            if node is None:
                return
            self._remove(node)

    def _expire(self, now: float) -> None:
        """Evict expired leaves; O(1) when the oldest queued key shows none can have expired."""
        heap = self._live_queue().heap
        if heap and now - heap[0][0] >= self._ttl:
            self._purge_expired(now)

    def _purge_expired(self, now: float) -> None:
        queue, policy = self._queue, self.policy
        while True:
            node = queue.peek()
            if node is None or not policy.expired(node, now):
                return
            queue.pop()
            self._remove(node)
            self._expirations += 1

    def _remove(self, node: RadixNode) -> None:
        parent = node.parent
        if self.on_evict is not None:
            self.on_evict(node)
        del parent.children[node.key[0]]
        node.parent = None
        node.value = None
        self._bytes -= node.nbytes
        self._tokens -= len(node.key)
        self._nodes -= 1
        self._evictions += 1
        self._bytes_evicted += node.nbytes
        if parent is not self._root and evictable(parent):
            self._enqueue(parent)

    # ---------------------------------------------------------------- helpers

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut ``child``'s edge after ``at`` tokens; return the new node holding the front.

        The existing node keeps the back half so that references to it (locks held by requests)
        still walk up through every node they counted on; the new front inherits its lock count.
        """
        left_val, right_val = self._cut(child.value, at)
        left_bytes, right_bytes = _proportional(child.nbytes, at, len(child.key))
        parent = child.parent
        front = RadixNode(child.key[:at], left_val, left_bytes, parent, child.stamp)
        front.lock_ref = child.lock_ref
        front.hits = child.hits
        parent.children[child.key[0]] = front
        child.key = child.key[at:]
        child.value = right_val
        child.nbytes = right_bytes
        child.parent = front
        front.children[child.key[0]] = child
        self._nodes += 1
        return front

    def _cut(self, value: Any, at: int) -> tuple[Any, Any]:
        if value is None:
            return None, None
        if self._split_fn is None:
            raise PrefixCacheError("an edge holding a value must be cut but the tree has no "
                                   "split callback: pass RadixTree(split=...)")
        return self._split_fn(value, at)

    def _trim_front(self, value: Any, nbytes: int, drop: int, total: int) -> tuple[Any, int]:
        _, kept = self._cut(value, drop)
        return kept, _proportional(nbytes, drop, total)[1]

    def _as_node(self, target: Any) -> RadixNode | None:
        if target is None or isinstance(target, RadixNode):
            return target
        if isinstance(target, MatchResult):
            return target.last_node
        if isinstance(target, InsertResult):
            return target.node
        raise TypeError(f"expected a RadixNode, MatchResult or InsertResult, got {type(target)}")

    def iter_nodes(self) -> Iterator[RadixNode]:
        """Every node but the root (depth first, no order promised)."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------- inspection

    @property
    def queue_length(self) -> int:
        """Entries in the eviction queue, stale ones included (compaction keeps it bounded)."""
        return len(self._queue)

    @property
    def root(self) -> RadixNode:
        return self._root

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def tokens_held(self) -> int:
        """Sum of edge lengths: tokens stored once each."""
        return self._tokens

    @property
    def node_count(self) -> int:
        return self._nodes

    def sequences(self) -> list[tuple[int, ...]]:
        """Every cached root-to-leaf token sequence (for debugging and tests; walks the tree)."""
        return [n.prefix_tokens() for n in self.iter_nodes() if not n.children]

    def reset_stats(self) -> None:
        self._lookups = self._hits = self._looked_up = self._reused = 0
        self._inserts = self._tokens_inserted = 0
        self._evictions = self._expirations = self._bytes_evicted = 0

    def stats(self) -> TreeStats:
        lookups, looked = self._lookups, self._looked_up
        return TreeStats(
            lookups=lookups, hits=self._hits, misses=lookups - self._hits,
            hit_rate=self._hits / lookups if lookups else 0.0,
            tokens_looked_up=looked, tokens_reused=self._reused,
            tokens_computed=looked - self._reused,
            token_hit_rate=self._reused / looked if looked else 0.0,
            inserts=self._inserts, tokens_inserted=self._tokens_inserted,
            evictions=self._evictions, expirations=self._expirations,
            bytes_evicted=self._bytes_evicted, bytes_held=self._bytes,
            tokens_held=self._tokens, nodes=self._nodes)

    def check_invariants(self) -> None:
        """Raise AssertionError if the structure is inconsistent (used by the tests)."""
        total_bytes = total_tokens = count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            child_locks = 0
            for first, child in node.children.items():
                assert child.key and child.key[0] == first, f"bad child key under {node!r}"
                assert child.parent is node, f"bad parent link on {child!r}"
                assert child.nbytes >= 0, f"negative size on {child!r}"
                child_locks += child.lock_ref
                total_bytes += child.nbytes
                total_tokens += len(child.key)
                count += 1
                stack.append(child)
            if node is not self._root:
                assert node.lock_ref >= child_locks, f"lock count below children's on {node!r}"
        assert total_bytes == self._bytes, (total_bytes, self._bytes)
        assert total_tokens == self._tokens, (total_tokens, self._tokens)
        assert count == self._nodes, (count, self._nodes)

"""The prefix radix tree: matching, edge splits, locking, eviction order, stats, and a
stateful property test against a brute-force model of what is cached."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 rule)

from promptcache.prefix import (LFUPolicy, PrefixCacheError, RadixTree, TTLPolicy,
                                make_policy, sequence_split)
from promptcache.prefix.radix import common_len

BPT = 3  # bytes per token in these tests: sizes stay exact under proportional splits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tree_of(**kw) -> RadixTree:
    kw.setdefault("split", sequence_split)
    return RadixTree(**kw)


def put(tree: RadixTree, tokens, **kw):
    """Engine-style insert: look up, 'compute' KV (the token list itself) for the rest, insert."""
    m = tree.match_prefix(tokens)
    suffix = list(tokens[m.length:])
    return tree.insert(tokens, suffix, BPT * len(suffix), start=m.length, **kw)


# --------------------------------------------------------------------------- basics


def test_empty_tree_misses_and_insert_reports_what_is_new():
    t = tree_of()
    m = t.match_prefix([1, 2, 3])
    assert (m.length, m.nodes, m.values, m.hit, m.last_node) == (0, [], [], False, None)
    r = t.insert([1, 2, 3], [1, 2, 3], 9)
    assert (r.prefix_len, r.added_tokens, r.added_bytes) == (0, 3, 9)
    assert r.node.key == (1, 2, 3)
    r2 = t.insert([1, 2, 3, 4, 5], [4, 5], 6)
    assert (r2.prefix_len, r2.added_tokens, r2.added_bytes) == (3, 2, 6)
    assert r2.node.parent is r.node
    assert t.tokens_held == 5 and t.bytes_held == 15 and t.node_count == 2
    t.check_invariants()


def test_shared_prefix_is_stored_once():
    t = tree_of()
    system = list(range(100, 120))
    for user in ([1, 2], [3, 4, 5], [6]):
        put(t, system + user)
    assert t.tokens_held == 20 + 2 + 3 + 1
    assert sorted(t.sequences()) == sorted(tuple(system + u) for u in ([1, 2], [3, 4, 5], [6]))
    m = t.match_prefix(system + [3, 4, 9])
    assert m.length == 22
    assert [n.key for n in m.nodes] == [tuple(system), (3, 4, 5)]
    t.check_invariants()


def test_reinserting_a_cached_sequence_or_its_prefix_adds_nothing():
    t = tree_of()
    put(t, [1, 2, 3, 4])
    r = t.insert([1, 2, 3, 4], ["ignored"], 100)
    assert (r.added_tokens, r.added_bytes, r.prefix_len) == (0, 0, 4)
    r = t.insert([1, 2], None, 0)  # ends inside the edge: no cut needed
    assert r.added_tokens == 0 and r.node.key == (1, 2, 3, 4)
    assert t.node_count == 1 and t.bytes_held == 4 * BPT


def test_insert_empty_sequence_is_a_no_op():
    t = tree_of()
    r = t.insert([], None)
    assert r.node is None and r.added_tokens == 0 and t.node_count == 0


# ----------------------------------------------------------------------- edge splits


def test_insert_diverging_inside_an_edge_splits_value_and_bytes():
    calls = []

    def split(value, at):
        calls.append((list(value), at))
        return value[:at], value[at:]

    t = RadixTree(split=split)
    a = t.insert([1, 2, 3, 4, 5], ["k1", "k2", "k3", "k4", "k5"], 50).node
    b = t.insert([1, 2, 3, 9], ["k1", "k2", "k3", "q9"], 40, start=0).node
    assert calls == [(["k1", "k2", "k3", "k4", "k5"], 3), (["k1", "k2", "k3", "q9"], 3)]
    front = a.parent
    assert front.key == (1, 2, 3) and front.value == ["k1", "k2", "k3"] and front.nbytes == 30
    assert a.key == (4, 5) and a.value == ["k4", "k5"] and a.nbytes == 20
    assert b.key == (9,) and b.value == ["q9"] and b.nbytes == 10  # 40 * 1/4 kept
    assert front.parent is t.root and set(front.children) == {4, 9}
    assert t.bytes_held == 60 and t.tokens_held == 6 and t.node_count == 3
    t.check_invariants()


def test_split_keeps_the_existing_node_as_the_back_half_and_copies_locks():
    t = tree_of()
    leaf = put(t, [1, 2, 3, 4]).node
    t.lock(leaf)
    put(t, [1, 2, 7])
    front = leaf.parent
    assert front.key == (1, 2) and front.lock_ref == 1 and leaf.lock_ref == 1
    t.unlock(leaf)
    assert front.lock_ref == 0 and leaf.lock_ref == 0
    t.check_invariants()


def test_split_needs_a_callback_for_non_none_values():
    t = RadixTree()
    t.insert([1, 2, 3], object(), 3)
    with pytest.raises(PrefixCacheError, match="split callback"):
        t.insert([1, 2, 9], object(), 3)
    t2 = RadixTree()  # values of None never need one
    t2.insert([1, 2, 3])
    t2.insert([1, 2, 9])
    assert t2.node_count == 3


def test_partial_match_reports_used_tokens_and_gather_trims():
    t = tree_of()
    put(t, [1, 2, 3, 4, 5])
    put(t, [1, 2, 3, 4, 5, 6, 7])
    m = t.match_prefix([1, 2, 3, 4, 5, 6, 9])
    assert m.length == 6 and m.partial and m.last_used == 1
    assert m.segments() == [([1, 2, 3, 4, 5], 5), ([6, 7], 1)]
    assert t.gather(m) == [[1, 2, 3, 4, 5], [6]]
    assert t.node_count == 2  # a lookup does not cut edges by default
    full = t.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert not full.partial and t.gather(full) == [[1, 2, 3, 4, 5], [6, 7]]


def test_match_with_split_cuts_the_edge_so_every_node_is_used_whole():
    t = tree_of()
    put(t, [1, 2, 3, 4, 5])
    m = t.match_prefix([1, 2, 3, 9], split=True)
    assert m.length == 3 and not m.partial and m.last_used == 3
    assert [n.key for n in m.nodes] == [(1, 2, 3)] and m.values == [[1, 2, 3]]
    assert t.node_count == 2 and t.bytes_held == 5 * BPT
    t.check_invariants()


def test_match_snapshot_survives_a_later_split():
    t = tree_of()
    put(t, [1, 2, 3, 4])
    m = t.match_prefix([1, 2, 3, 4])
    put(t, [1, 2, 8])  # cuts the node m points at
    assert t.gather(m) == [[1, 2, 3, 4]]


def test_insert_with_explicit_start_trims_what_the_tree_already_holds():
    t = tree_of()
    put(t, [1, 2, 3])
    # value covers tokens 1.. (start=1) but the tree already holds 3 tokens
    r = t.insert([1, 2, 3, 4, 5], [2, 3, 4, 5], 4 * BPT, start=1)
    assert r.node.key == (4, 5) and r.node.value == [4, 5] and r.added_bytes == 2 * BPT
    with pytest.raises(PrefixCacheError, match="only 0 tokens"):
        t.insert([7, 8, 9], [9], BPT, start=2)


def test_module_kv_values_split_along_the_token_axis():
    torch = pytest.importorskip("torch")
    from promptcache.prefix.runner import kv_split
    from promptcache.runtime.kv import ModuleKV

    tokens = [5, 6, 7, 8, 9]
    # two layers of keys/values shaped [heads, tokens, head_dim]; entry = token id
    ids = torch.tensor(tokens, dtype=torch.float32).view(1, 5, 1).expand(2, 5, 3)
    full = ModuleKV([ids + layer for layer in (0, 100)], [-ids for _ in (0, 100)], torch.arange(5))
    t = RadixTree(split=kv_split)
    t.insert(tokens, full, 5 * 48)
    t.insert([5, 6, 1], None, 0)  # diverges after 2 tokens: cuts the KV edge
    m = t.match_prefix([5, 6, 7, 0])
    assert m.length == 3 and [n.key for n in m.nodes] == [(5, 6), (7, 8, 9)] and m.partial
    parts = t.gather(m)
    for layer in range(2):
        k = torch.cat([p.keys[layer] for p in parts], dim=-2)
        assert k.shape == (2, 3, 3)
        assert torch.equal(k, full.keys[layer][:, :3, :])
    assert torch.cat([p.positions for p in parts]).tolist() == [0, 1, 2]
    assert t.bytes_held == 5 * 48 and m.nodes[0].nbytes == 2 * 48


def test_negative_sizes_are_rejected():
    with pytest.raises(ValueError, match="nbytes"):
        tree_of().insert([1], [1], -1)


@settings(max_examples=300, deadline=None)
@given(edge=st.lists(st.integers(0, 2), min_size=1, max_size=300),
       rest=st.lists(st.integers(0, 2), max_size=300), offset=st.integers(0, 5))
def test_common_len_matches_a_per_token_scan(edge, rest, offset):
    key = tuple([9] * offset + edge[:1] + rest)
    edge = tuple(edge)
    limit = min(len(edge), len(key) - offset)
    want = lcp(edge, key[offset:])
    if want == limit and limit == len(edge):
        return  # whole edge matches: the tree never asks
    assert common_len(edge, key, offset, limit) == want


def test_long_edges_diverging_deep_inside():
    t = tree_of()
    doc = list(range(1000, 3000))
    put(t, doc)
    other = doc[:1777] + [5, 6]
    assert t.match_prefix(other).length == 1777
    r = put(t, other)
    assert r.prefix_len == 1777 and r.node.parent.key == tuple(doc[:1777])
    assert t.match_prefix(doc[:1500] + [0]).length == 1500


# --------------------------------------------------------------------------- locking


def test_locked_path_is_never_evicted_and_unlock_enforces_the_budget():
    t = tree_of(max_bytes=100 * BPT)
    keep = put(t, list(range(0, 40)))
    t.lock(keep)
    other = put(t, list(range(100, 140)))
    # Over budget with a new leaf: the unlocked one goes, the locked one stays
    put(t, list(range(200, 240)))
    assert not other.node.alive and keep.node.alive
    assert t.bytes_held <= t.max_bytes
    # Everything left locked: nothing can go, the budget is exceeded
    t.lock(t.match_prefix(list(range(200, 240))))
    put(t, list(range(300, 340)), lock=True)
    assert t.bytes_held == 120 * BPT and t.evict(10**9) == 0
    t.unlock(keep)
    assert not keep.node.alive and t.bytes_held <= t.max_bytes
    t.check_invariants()


def test_lock_protects_ancestors_but_children_of_a_locked_node_may_go():
    t = tree_of()
    base = put(t, [1, 2, 3]).node
    child = put(t, [1, 2, 3, 4]).node
    t.lock(base)
    assert t.evict(10**9) == 1 * BPT  # the unlocked child goes, then base is locked
    assert not child.alive and base.alive
    with t.locked(base):
        assert t.evict(10**9) == 0
    t.unlock(base)
    assert t.evict(10**9) == 3 * BPT and t.node_count == 0


def test_lock_misuse_is_reported():
    t = tree_of()
    n = put(t, [1, 2]).node
    with pytest.raises(PrefixCacheError, match="unlock without"):
        t.unlock(n)
    t.evict(10**9)
    with pytest.raises(PrefixCacheError, match="evicted"):
        t.lock(n)
    with pytest.raises(TypeError):
        t.lock("nope")
    t.lock(t.match_prefix([5]))  # a miss locks nothing
    t.unlock(None)


# -------------------------------------------------------------------------- eviction


def test_leaves_go_first_and_a_parent_becomes_evictable_after_its_children():
    evicted = []
    t = tree_of(on_evict=lambda n: evicted.append(n.prefix_tokens()))
    put(t, [1, 2, 3])
    put(t, [1, 2, 3, 4, 5])
    put(t, [1, 2, 3, 6])
    assert t.evict(1) == 2 * BPT  # oldest leaf: (4, 5)
    assert evicted == [(1, 2, 3, 4, 5)]
    t.evict(1)
    t.evict(1)
    assert evicted == [(1, 2, 3, 4, 5), (1, 2, 3, 6), (1, 2, 3)]
    assert t.stats().evictions == 3 and t.stats().bytes_evicted == 6 * BPT


def test_lru_evicts_the_least_recently_used_leaf():
    evicted = []
    t = tree_of(max_bytes=3 * 4 * BPT, on_evict=lambda n: evicted.append(n.key[0]))
    for first in (10, 20, 30):
        put(t, [first, 1, 2, 3])
    t.match_prefix([10, 1])  # touches A (partially): A is now more recent than B and C
    put(t, [40, 1, 2, 3])
    assert evicted == [20]
    t.match_prefix([30, 1, 2, 3])
    put(t, [50, 1, 2, 3])
    assert evicted == [20, 10]


def test_lru_insert_refreshes_recency_too():
    evicted = []
    t = tree_of(max_bytes=2 * 2 * BPT, on_evict=lambda n: evicted.append(n.key[0]))
    put(t, [1, 1])
    put(t, [2, 2])
    t.insert([1, 1])  # re-insert counts as a use
    put(t, [3, 3])
    assert evicted == [2]


def test_lfu_evicts_the_least_matched_leaf_ties_by_recency():
    evicted = []
    t = tree_of(max_bytes=3 * 2 * BPT, policy="lfu", on_evict=lambda n: evicted.append(n.key[0]))
    for first in (1, 2, 3):
        put(t, [first, 0])  # put() looks up first: each node's first lookup was a miss
    for _ in range(3):
        t.match_prefix([1, 0])
    t.match_prefix([2, 0])
    t.match_prefix([3, 0])
    t.match_prefix([3, 0])
    # hits: 1 -> 3, 2 -> 1, 3 -> 2
    t.evict(1)
    assert evicted == [2]
    put(t, [4, 0])  # new leaf, 0 hits, least frequently used; the budget is met again
    assert t.bytes_held <= t.max_bytes
    t.evict(1)
    assert evicted == [2, 4]
    t.match_prefix([1, 0])
    t.evict(1)
    assert evicted[-1] == 3


def test_lfu_with_equal_counts_falls_back_to_recency():
    evicted = []
    t = tree_of(policy="lfu", on_evict=lambda n: evicted.append(n.key[0]))
    for first in (7, 8, 9):
        put(t, [first, 0])
    t.match_prefix([7, 0])
    t.match_prefix([8, 0])
    t.evict(1)
    t.evict(1)
    assert evicted == [9, 7]  # 9: no hit; then 7 and 8 have one each, 7 older


def test_lfu_split_node_inherits_hit_count():
    t = tree_of(policy=LFUPolicy())
    put(t, [1, 2, 3])
    for _ in range(4):
        t.match_prefix([1, 2, 3])
    leaf = put(t, [1, 2, 9]).node  # its lookup matched 2 tokens into the edge: a 5th hit
    front = leaf.parent
    back = front.children[3]
    assert (front.hits, back.hits, leaf.hits) == (5, 5, 0)


def test_ttl_expires_idle_entries_even_under_budget_and_hits_refresh_them():
    clock = FakeClock()
    evicted = []
    t = tree_of(policy="ttl", ttl=10, clock=clock, on_evict=lambda n: evicted.append(n.key[0]))
    put(t, [1, 1])
    clock.now += 4
    put(t, [2, 2])
    clock.now += 4
    t.match_prefix([1, 1])  # refreshes [1, 1] at t=8
    clock.now += 4  # t=12: [2, 2] idle for 8s, [1, 1] for 4s
    assert t.match_prefix([2, 2]).length == 2
    clock.now += 10.5  # both idle >= 10s
    m = t.match_prefix([1, 1])
    assert m.length == 0 and sorted(evicted) == [1, 2]
    assert t.stats().expirations == 2 and t.node_count == 0


def test_ttl_expired_parent_goes_after_children_and_locked_entries_wait():
    clock = FakeClock()
    evicted = []
    t = tree_of(policy=TTLPolicy(5), clock=clock, on_evict=lambda n: evicted.append(n.key))
    put(t, [1, 2])
    leaf = put(t, [1, 2, 3]).node
    t.lock(leaf)
    clock.now += 6
    t.evict(0)
    assert evicted == [] and leaf.alive  # locked: waits
    t.unlock(leaf)
    t.evict(0)
    assert evicted == [(3,), (1, 2)]


def test_ttl_orders_by_age_under_budget_pressure():
    clock = FakeClock()
    evicted = []
    t = tree_of(policy="ttl", ttl=1000, max_bytes=2 * 2 * BPT, clock=clock,
                on_evict=lambda n: evicted.append(n.key[0]))
    for first in (1, 2):
        put(t, [first, 0])
        clock.now += 1
    t.match_prefix([1, 0])
    clock.now += 1
    put(t, [3, 0])
    assert evicted == [2] and t.stats().expirations == 0


def test_policy_construction_errors():
    assert make_policy(None).name == "lru"
    with pytest.raises(ValueError, match="needs ttl"):
        make_policy("ttl")
    with pytest.raises(ValueError, match="only applies"):
        make_policy("lru", ttl=3)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        RadixTree(policy="fifo")
    with pytest.raises(ValueError, match="positive"):
        TTLPolicy(0)
    with pytest.raises(ValueError, match="max_bytes"):
        RadixTree(max_bytes=-1)


def test_evict_returns_bytes_freed_and_stops_when_enough():
    t = tree_of()
    for first in range(5):
        put(t, [first, 1, 2, 3])
    assert t.evict(5) == 4 * BPT and t.node_count == 4  # one whole 12-byte leaf covers 5
    assert t.evict(4 * BPT + 1) == 2 * 4 * BPT and t.node_count == 2
    assert t.evict(0) == 0 and t.node_count == 2


def test_stale_queue_entries_are_compacted_and_eviction_still_complete():
    evicted = []
    t = tree_of(max_bytes=10**9, on_evict=lambda n: evicted.append(n.key[0]))
    t.evict(1)  # an empty tree: builds the (empty) queue, which is maintained from now on
    leaves = [put(t, [first, 1]).node for first in range(10)]
    for _ in range(1000):  # every unlock re-queues the leaf: duplicates pile up
        with t.locked(leaves[3]):
            pass
    assert t.queue_length <= 2 * t.node_count + 256 + 1
    t.match_prefix([0, 1])
    assert t.evict(10**12) == 10 * 2 * BPT and t.node_count == 0
    assert evicted == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


# ---------------------------------------------------------------------------- stats


def test_stats_count_lookups_hits_and_tokens():
    t = tree_of()
    put(t, [1, 2, 3, 4])  # lookup: miss, 4 looked up
    put(t, [1, 2, 3, 4, 5, 6])  # lookup: hit 4 of 6
    t.match_prefix([9, 9])  # miss
    t.match_prefix([1, 2, 7])  # hit 2 of 3
    s = t.stats()
    assert (s.lookups, s.hits, s.misses) == (4, 2, 2)
    assert s.hit_rate == 0.5
    assert (s.tokens_looked_up, s.tokens_reused, s.tokens_computed) == (15, 6, 9)
    assert s.token_hit_rate == pytest.approx(6 / 15)
    assert (s.inserts, s.tokens_inserted) == (2, 6)
    assert (s.bytes_held, s.tokens_held, s.nodes, s.evictions) == (6 * BPT, 6, 2, 0)
    assert s.as_dict()["hits"] == 2
    t.reset_stats()
    assert t.stats().lookups == 0 and t.stats().bytes_held == 6 * BPT


# ------------------------------------------------------------ stateful property test


TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=8)


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixTreeMachine(RuleBasedStateMachine):
    """Random inserts, lookups, locks, evictions and clock ticks against a brute-force model.

    The model is the set of cached sequences; it learns of evictions only through ``on_evict``
    (which sequence lost which tail) and checks each one was legal: a leaf with no locked
    request under it. Values are the token lists themselves, so gathered values must spell the
    matched tokens.
    """

    locks = Bundle("locks")

    def __init__(self) -> None:
        super().__init__()
        self.model: set[tuple[int, ...]] = set()
        self.locked: list[tuple[int, ...]] = []  # matched token prefixes held by locks
        self.clock = FakeClock()
        self.tree: RadixTree | None = None

    @initialize(policy=st.sampled_from(["lru", "lfu", "ttl"]),
                budget=st.one_of(st.none(), st.integers(0, 40)))
    def setup(self, policy, budget):
        self.tree = RadixTree(max_bytes=None if budget is None else budget * BPT, policy=policy,
                              ttl=7.0 if policy == "ttl" else None, split=sequence_split,
                              clock=self.clock, on_evict=self.on_evict)

    def on_evict(self, node) -> None:
        path, cut = node.prefix_tokens(), len(node.prefix_tokens()) - len(node.key)
        assert node.lock_ref == 0 and not node.children
        for held in self.locked:  # no lock covers tokens of this edge
            assert lcp(held, path) <= cut, (held, path)
        new = set()
        for s in self.model:
            if len(s) > cut and s[:cut + 1] == path[:cut + 1]:
                assert s == path[:len(s)], "evicted a node that was not a leaf"
                s = s[:cut]
            if s:
                new.add(s)
        self.model = new

    def model_match(self, tokens) -> int:
        return max((lcp(s, tokens) for s in self.model), default=0)

    def check_match(self, tokens, m) -> None:
        assert m.length == self.model_match(tokens)
        assert tuple(tokens[:m.length]) == tuple(t for v in self.tree.gather(m) for t in v)

    @rule(tokens=TOKENS, explicit_start=st.booleans())
    def insert(self, tokens, explicit_start):
        m = self.tree.match_prefix(tokens)
        self.check_match(tokens, m)
        suffix = tokens[m.length:]
        start = m.length if explicit_start else None
        # The model holds the sequence before the insert: evictions the insert triggers (which
        # may take the new leaf itself) reach the model through on_evict, in order.
        self.model.add(tuple(tokens))
        r = self.tree.insert(tokens, suffix, BPT * len(suffix), start=start)
        assert r.prefix_len == m.length and r.added_tokens == len(suffix)

    @rule(tokens=TOKENS, split=st.booleans())
    def lookup(self, tokens, split):
        self.check_match(tokens, self.tree.match_prefix(tokens, split=split))

    @rule(target=locks, tokens=TOKENS)
    def lock(self, tokens):
        m = self.tree.match_prefix(tokens)
        self.check_match(tokens, m)
        self.tree.lock(m)
        held = m.last_node.prefix_tokens() if m.nodes else ()
        self.locked.append(held)
        return (m, held)

    @rule(entry=consumes(locks))
    def unlock(self, entry):
        m, held = entry
        self.tree.unlock(m)
        self.locked.remove(held)

    @rule(nbytes=st.integers(0, 60))
    def evict(self, nbytes):
        before = self.tree.bytes_held
        freed = self.tree.evict(nbytes)
        assert freed == before - self.tree.bytes_held
        if freed < nbytes:  # stopped early: nothing left was evictable
            assert all(n.lock_ref for n in self._nodes() if not n.children)

    @rule(seconds=st.sampled_from([0.5, 3.0, 8.0]))
    def tick(self, seconds):
        self.clock.now += seconds

    def _nodes(self):
        stack = list(self.tree.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    @invariant()
    def structure(self):
        if self.tree is None:
            return
        self.tree.check_invariants()
        for n in self._nodes():
            assert n.nbytes == BPT * len(n.key) and list(n.value) == list(n.key)
        assert sorted(self.tree.sequences()) == sorted(
            s for s in self.model if not any(o != s and o[:len(s)] == s for o in self.model))

    @invariant()
    def budget_and_locks(self):
        if self.tree is None:
            return
        if self.tree.max_bytes is not None and self.tree.bytes_held > self.tree.max_bytes:
            assert all(n.lock_ref for n in self._nodes())  # all that remains is locked
        for held in self.locked:
            assert self.model_match(held) == len(held)


TestPrefixTreeMachine = PrefixTreeMachine.TestCase
TestPrefixTreeMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])

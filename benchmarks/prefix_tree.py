"""Throughput of the prefix radix tree on the reference workload.

Workload (fixed): 50,000 sequences of 30 token ids whose first 20 tokens are one of 10 shared
group prefixes, inserted one by one with a value and its size (so eviction metadata is kept),
then 10,000 lookups of randomly chosen inserted sequences. Reported: the median over repeats
of inserts/s and lookups/s, and the ratio to the figures an engine-agnostic trie library
reached on the same machine kind (390k inserts/s, 550k lookups/s).

    .venv/bin/python benchmarks/prefix_tree.py [--repeats 5] [--policy lru] [--budget 0.5]

``--budget F`` also runs with ``max_bytes`` at F times the unbounded footprint, so inserts pay
for eviction too (reported separately; the reference figures have no eviction).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptcache.prefix import RadixTree  # noqa: E402

REFERENCE_INSERTS_PER_S = 390_000
REFERENCE_LOOKUPS_PER_S = 550_000
N_SEQUENCES, SEQ_LEN, SHARED_LEN, N_GROUPS, N_LOOKUPS = 50_000, 30, 20, 10, 10_000
BYTES_PER_TOKEN = 64


def workload(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """The sequences to insert and the lookups (lists, as a tokenizer returns them)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(SHARED_LEN)] for _ in range(N_GROUPS)]
    seqs = [prefixes[k % N_GROUPS] + [rng.randrange(50_000) for _ in range(SEQ_LEN - SHARED_LEN)]
            for k in range(N_SEQUENCES)]
    lookups = [seqs[rng.randrange(N_SEQUENCES)] for _ in range(N_LOOKUPS)]
    return seqs, lookups


def run_once(seqs: list[list[int]], lookups: list[list[int]], policy: str,
             max_bytes: int | None) -> tuple[float, float, RadixTree]:
    tree = RadixTree(max_bytes=max_bytes, policy=policy, ttl=3600.0 if policy == "ttl" else None,
                     split=lambda v, at: (v, v))
    insert, match = tree.insert, tree.match_prefix
    value = object()  # stands for a KV segment; sizes are what eviction works from
    nbytes = SEQ_LEN * BYTES_PER_TOKEN
    t0 = time.perf_counter()
    for s in seqs:
        insert(s, value, nbytes)
    t1 = time.perf_counter()
    for s in lookups:
        match(s)
    t2 = time.perf_counter()
    return len(seqs) / (t1 - t0), len(lookups) / (t2 - t1), tree


def measure(policy: str, repeats: int, max_bytes: int | None,
            freeze: bool) -> tuple[float, float, RadixTree]:
    """Median rates over ``repeats`` fresh trees; the garbage collector stays enabled.

    freeze=True moves the workload lists (and whatever the process held before) into the
    collector's permanent generation, so full collections triggered while the tree grows scan
    the tree's objects, not the harness's 50k token lists.
    """
    seqs, lookups = workload()
    ins, look = [], []
    tree = None
    for _ in range(repeats):
        tree = None
        gc.collect()
        if freeze:
            gc.freeze()
        try:
            i, lk, tree = run_once(seqs, lookups, policy, max_bytes)
        finally:
            gc.unfreeze()
        ins.append(i)
        look.append(lk)
    return statistics.median(ins), statistics.median(look), tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="lru", choices=["lru", "lfu", "ttl"])
    ap.add_argument("--budget", type=float, default=None,
                    help="also run with max_bytes = BUDGET x the unbounded footprint")
    args = ap.parse_args(argv)

    print(f"workload: {N_SEQUENCES} inserts of {SEQ_LEN} tokens ({SHARED_LEN} shared in "
          f"{N_GROUPS} groups), then {N_LOOKUPS} lookups; policy={args.policy}; "
          f"median of {args.repeats}")
    ins, look, tree = measure(args.policy, args.repeats, None, freeze=True)
    st = tree.stats()
    print(f"inserts/s: {ins:,.0f}   lookups/s: {look:,.0f}   "
          f"(nodes={st.nodes}, tokens held={st.tokens_held}, hit rate={st.hit_rate:.2f}; "
          "gc on, workload frozen)")
    print(f"ratio vs reference (390k inserts/s, 550k lookups/s): "
          f"inserts x{ins / REFERENCE_INSERTS_PER_S:.2f}, "
          f"lookups x{look / REFERENCE_LOOKUPS_PER_S:.2f}")
    ins_u, look_u, _ = measure(args.policy, args.repeats, None, freeze=False)
    print(f"same, workload not frozen (full collections rescan the harness's lists too): "
          f"inserts/s: {ins_u:,.0f}   lookups/s: {look_u:,.0f}")
    if args.budget is not None:
        budget = int(st.bytes_held * args.budget)
        ins_b, look_b, tree_b = measure(args.policy, args.repeats, budget, freeze=True)
        st_b = tree_b.stats()
        print(f"with max_bytes={budget:,} ({args.budget:g} x footprint): inserts/s: {ins_b:,.0f}   "
              f"lookups/s: {look_b:,.0f}   (evictions={st_b.evictions}, "
              f"hit rate={st_b.hit_rate:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

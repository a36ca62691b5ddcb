"""Throughput of the prefix radix tree against an engine-agnostic trie library's figures.

Insert phase (both workloads): 50,000 sequences of 30 token ids whose first 20 tokens are one of
10 group prefixes, inserted one by one, each with a value and its size (so the tree keeps values
and eviction metadata). Then 10,000 lookups on that tree.

``reference`` workload: built the way the library's own benchmark builds it, since its figures
(390k inserts/s, 550k lookups/s on this machine kind) come from there: token tuples made from
``range``s (the group prefix rebuilt per sequence, so equal tokens are distinct int objects, as
with a real tokenizer), lookups = the first 5,000 inserted sequences plus 5,000 sequences that
extend them by 5 tokens, in insertion order. The library measured those lookups on a 10k-entry
trie; here they run on the 50k tree.

``random`` workload (harsher): random token lists (converted by the tree), lookups of
uniformly random inserted sequences: no locality, so it mostly measures cache misses.

Reported: the median over repeats of inserts/s and lookups/s by wall clock and by process CPU
time (which other processes on a busy machine do not inflate; on an idle machine the two
agree), and the ratio to the reference figures.

    .venv/bin/python benchmarks/prefix_tree.py [--repeats 5] [--policy lru] [--budget 0.5]

``--budget F`` also runs the reference workload with ``max_bytes`` at F times the unbounded
footprint, so inserts pay for eviction (the reference figures have no eviction).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from promptcache.prefix import RadixTree  # noqa: E402

REFERENCE_INSERTS_PER_S = 390_000
REFERENCE_LOOKUPS_PER_S = 550_000
N_SEQUENCES, SEQ_LEN, SHARED_LEN, N_GROUPS, N_LOOKUPS = 50_000, 30, 20, 10, 10_000
BYTES_PER_TOKEN = 64

Workload = tuple[list[Sequence[int]], list[Sequence[int]]]


def reference_workload() -> Workload:
    """Sequences and lookups shaped like the trie library's benchmark (see module docstring)."""
    tail = SEQ_LEN - SHARED_LEN

    def seq(i: int, tail_len: int) -> tuple[int, ...]:
        g = i % N_GROUPS
        return tuple(range(g * 1000, g * 1000 + SHARED_LEN)) + tuple(
            range(i * 10_000, i * 10_000 + tail_len))

    seqs = [seq(i, tail) for i in range(N_SEQUENCES)]
    half = N_LOOKUPS // 2
    lookups = seqs[:half] + [seq(i, tail + 5) for i in range(N_LOOKUPS - half)]
    return seqs, lookups


def random_workload(seed: int = 0) -> Workload:
    """Random token lists, lookups of random inserted sequences (no locality)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(SHARED_LEN)] for _ in range(N_GROUPS)]
    seqs = [prefixes[k % N_GROUPS] + [rng.randrange(50_000) for _ in range(SEQ_LEN - SHARED_LEN)]
            for k in range(N_SEQUENCES)]
    lookups = [seqs[rng.randrange(N_SEQUENCES)] for _ in range(N_LOOKUPS)]
    return seqs, lookups


WORKLOADS = {"reference": reference_workload, "random": random_workload}


@dataclass
class Rates:
    """Median operations per second over the repeats, by wall clock and by process CPU time."""

    inserts_wall: float
    lookups_wall: float
    inserts_cpu: float
    lookups_cpu: float


def run_once(work: Workload, policy: str,
             max_bytes: int | None) -> tuple[tuple[float, float, float, float], RadixTree]:
    seqs, lookups = work
    tree = RadixTree(max_bytes=max_bytes, policy=policy, ttl=3600.0 if policy == "ttl" else None,
                     split=lambda v, at: (v, v))
    insert, match = tree.insert, tree.match_prefix
    value = object()  # stands for a KV segment; sizes are what eviction works from
    nbytes = SEQ_LEN * BYTES_PER_TOKEN
    wall, cpu = time.perf_counter, time.process_time
    w0, c0 = wall(), cpu()
    for s in seqs:
        insert(s, value, nbytes)
    w1, c1 = wall(), cpu()
    for s in lookups:
        match(s)
    w2, c2 = wall(), cpu()
    n_ins, n_look = len(seqs), len(lookups)
    return (n_ins / (w1 - w0), n_look / (w2 - w1), n_ins / max(c1 - c0, 1e-9),
            n_look / max(c2 - c1, 1e-9)), tree


def measure(work: Workload, policy: str, repeats: int, max_bytes: int | None,
            freeze: bool = True) -> tuple[Rates, RadixTree]:
    """Median rates over ``repeats`` fresh trees; the garbage collector stays enabled.

    freeze=True moves the workload (and whatever the process held before) into the collector's
    permanent generation, so full collections triggered while the tree grows scan the tree's
    objects, not the harness's 50k sequences.
    """
    runs = []
    tree = None
    for _ in range(repeats):
        tree = None
        gc.collect()
        if freeze:
            gc.freeze()
        try:
            rates, tree = run_once(work, policy, max_bytes)
        finally:
            gc.unfreeze()
        runs.append(rates)
    return Rates(*(statistics.median(col) for col in zip(*runs))), tree


def _line(label: str, r: Rates) -> str:
    return (f"{label}: inserts/s {r.inserts_wall:,.0f} wall, {r.inserts_cpu:,.0f} cpu   "
            f"lookups/s {r.lookups_wall:,.0f} wall, {r.lookups_cpu:,.0f} cpu")


def _ratio(r: Rates) -> str:
    return (f"ratio vs reference (390k inserts/s, 550k lookups/s): "
            f"inserts x{r.inserts_wall / REFERENCE_INSERTS_PER_S:.2f} wall "
            f"(x{r.inserts_cpu / REFERENCE_INSERTS_PER_S:.2f} cpu), "
            f"lookups x{r.lookups_wall / REFERENCE_LOOKUPS_PER_S:.2f} wall "
            f"(x{r.lookups_cpu / REFERENCE_LOOKUPS_PER_S:.2f} cpu)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="lru", choices=["lru", "lfu", "ttl"])
    ap.add_argument("--budget", type=float, default=None,
                    help="also run with max_bytes = BUDGET x the unbounded footprint")
    args = ap.parse_args(argv)

    print(f"{N_SEQUENCES} inserts of {SEQ_LEN} tokens ({SHARED_LEN} shared in {N_GROUPS} "
          f"groups), then {N_LOOKUPS} lookups; policy={args.policy}; median of {args.repeats}; "
          "gc enabled, workload frozen")
    footprint = 0
    for name, make in WORKLOADS.items():
        work = make()
        r, tree = measure(work, args.policy, args.repeats, None)
        st = tree.stats()
        footprint = footprint or st.bytes_held
        print(_line(f"[{name}]", r))
        print(f"  tree: nodes={st.nodes:,}, tokens held={st.tokens_held:,}, "
              f"lookup hit rate={st.hit_rate:.2f}, tokens reused={st.tokens_reused:,} "
              f"of {st.tokens_looked_up:,}")
        print("  " + _ratio(r))
        if name == "reference":
            r_u, _ = measure(work, args.policy, args.repeats, None, freeze=False)
            print("  " + _line("same, workload not frozen (full collections rescan it)", r_u))
            if args.budget is not None:
                budget = int(footprint * args.budget)
                r_b, tree_b = measure(work, args.policy, args.repeats, budget)
                st_b = tree_b.stats()
                print("  " + _line(f"max_bytes={budget:,} ({args.budget:g} x footprint)", r_b))
                print(f"    evictions={st_b.evictions:,}, lookup hit rate={st_b.hit_rate:.2f}, "
                      f"tokens reused={st_b.tokens_reused:,} of {st_b.tokens_looked_up:,}")
        del work
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

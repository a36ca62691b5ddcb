#!/usr/bin/env python
"""Cached TTFT of two checkouts side by side: ``benchmarks/ttft.py`` of each, run alternately.

Each round runs the OLD checkout's ``benchmarks/ttft.py`` and then this one's, each in its own
subprocess with the same arguments (so both see the same machine load, interleaved), and prints
the medians over rounds of every round's medians, old vs new, for the cached paths (c) scaffold,
(d) independent, and the (e) floor, with new/old ratios.

    git worktree add /work/wt-old 06b0d15
    python benchmarks/ab_ttft.py --old /work/wt-old --rounds 2 -- --lengths 1024,4096 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
KEYS = ["c_scaffold_ms", "d_independent_ms", "e_floor_ms", "b_prefix_reuse_ms"]


def run(checkout: Path, args: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, str(checkout / "benchmarks" / "ttft.py"), *args, "--out", str(out)]
    subprocess.run(cmd, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
    with open(out.with_suffix(".csv"), newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the other checkout (e.g. a git worktree of the old revision)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("ttft_args", nargs="*", help="arguments for benchmarks/ttft.py (after --)")
    args = ap.parse_args(argv)
    runs: dict[str, list[list[dict]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, checkout in (("old", Path(args.old).resolve()), ("new", HERE)):
                runs[name].append(run(checkout, args.ttft_args, Path(tmp) / f"{name}{r}"))
                print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    cases = [row["case"] for row in runs["new"][0]]
    print("| case | path | old ms | new ms | new/old |")
    print("|---|---|---|---|---|")
    for i, case in enumerate(cases):
        for key in KEYS:
            old = statistics.median(float(rows[i][key]) for rows in runs["old"])
            new = statistics.median(float(rows[i][key]) for rows in runs["new"])
            print(f"| {case} | {key.removesuffix('_ms')} | {old:.1f} | {new:.1f} | {new / old:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Cached TTFT of two checkouts side by side, run alternately in fresh processes.

The cases are the TTFT benchmark's (a cached document module of N tokens plus a question, and the
persona schema; :mod:`benchmarks.common`), written once to files. Each round starts one worker
process per checkout (OLD, then this one), each importing ``promptcache`` from its own checkout:
it loads the default model, adds every case's schema (scaffold encoding), warms up, then times
``generate(prompt, max_new_tokens=1).ttft_s`` ``--repeats`` times per case, cases interleaved.
The table gives, per case, the median and the minimum over all rounds of each checkout, and the
new/old ratios. Only the cached path is timed: that is what a refactoring of the engine can slow.

    git worktree add /work/wt-old 06b0d15
    python benchmarks/ab_ttft.py --old /work/wt-old --lengths 1024,4096 --rounds 3 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import torch

    torch.set_num_threads(args.threads)
    import promptcache
    from promptcache import PromptCache, load_model

    assert Path(promptcache.__file__).resolve().is_relative_to(Path(args.repo).resolve()), promptcache.__file__
    cases = json.loads(Path(args.cases).read_text())
    model, tokenizer = load_model("smollm2")
    pc = PromptCache(model, tokenizer, progress=False)
    for case in cases:
        pc.add_schema(case["schema"])
        pc.generate(case["prompt"], max_new_tokens=1)  # warm-up
    times: dict[str, list[float]] = {c["name"]: [] for c in cases}
    for _ in range(args.repeats):
        for case in cases:
            times[case["name"]].append(pc.generate(case["prompt"], max_new_tokens=1).ttft_s * 1000)
    print(json.dumps({"file": promptcache.__file__, "times": times}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="the other checkout (e.g. a git worktree of the old revision)")
    ap.add_argument("--lengths", default="1024,4096", help="document lengths in tokens")
    ap.add_argument("--no-persona", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="timed requests per case and worker")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repo", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.old:
        ap.error("--old is required")
    if __package__ in (None, ""):
        sys.path[0] = str(HERE)
    from benchmarks.common import doc_case, persona_case
    from promptcache.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    cases = [dict(zip(("schema", "prompt"), doc_case(tokenizer, int(n))), name=f"doc {n}")
             for n in args.lengths.split(",") if n]
    if not args.no_persona:
        cases.append(dict(zip(("schema", "prompt"), persona_case(tokenizer)), name="persona"))
    times: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.json"
        path.write_text(json.dumps(cases))
        for r in range(args.rounds):
            for name, repo in (("old", Path(args.old).resolve()), ("new", HERE)):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--repo", str(repo),
                       "--cases", str(path), "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                for case, ts in res["times"].items():
                    times[name].setdefault(case, []).extend(ts)
                print(f"round {r + 1}: {name} ({res['file']})", file=sys.stderr, flush=True)
    print(f"cached TTFT, ms; {args.rounds} rounds x {args.repeats} requests per checkout, "
          f"{args.threads} torch thread(s)")
    print("| case | old median | new median | new/old | old min | new min | new/old (min) |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        o, n = times["old"][c["name"]], times["new"][c["name"]]
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"| {c['name']} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | {min(o):.1f} | {min(n):.1f} | "
              f"{min(n) / min(o):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

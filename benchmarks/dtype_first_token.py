#!/usr/bin/env python
"""What bf16 costs in answers: how often it changes the first token against fp32, on longbench-mini.

The trade-off a user picks with ``dtype="bfloat16"`` (issue 17): per LongBench sample (the same
prompt as eval.py/eval_acc.py: context cut LongBench's way to ``--max-length``, context as a cached
module, question as uncached suffix), the first-token logits of

- the baseline path (full prefill, ``use_cache=False``) and
- the cached path (module KV spliced, suffix computed),

once with float32 weights (the reference) and once with the other dtype (``--dtype``, default
bfloat16; ``--compile``: the other side compiled, when this checkout's engine has ``compile=``).
Reported per path: how often the argmax (the greedy first token) differs, and KL(P_fp32 || P_dtype)
of the first-token distribution in nats (float64 softmax), max and mean; also, per dtype, the cache's
own fidelity (first token and KL, baseline vs cached), so one sees whether bf16 hurts the cache more
than the baseline. Samples run round-robin over the tasks, so a ``--time-budget`` cut still covers every task.

    python benchmarks/dtype_first_token.py --threads 1 --limit 3 --max-length 1024
    python benchmarks/dtype_first_token.py --random-weights tiny --limit 1 --tasks lcc,trec   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval import runner  # noqa: E402  (no torch import at module level: --help stays fast)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-weights", default=None,
                   help="random weights of a benchmarks/ttft.py preset (tiny, llama-1b, ...) with the --model "
                        "tokenizer: a smoke run of the script itself (the numbers mean nothing)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="compared against float32")
    p.add_argument("--compile", action="store_true", help="the --dtype engine compiled (PromptCache(compile=True))")
    p.add_argument("--tasks", default="all", help="task list or 'all' (every file in --data-dir)")
    p.add_argument("--data-dir", default=None, help=f"LongBench JSONL folder (default: {runner.DATA_DIR_HELP})")
    p.add_argument("--limit", type=runner.positive_int, default=None, help="at most N samples per task")
    p.add_argument("--max-length", type=runner.positive_int, default=1024,
                   help="prompt tokens (context cut LongBench's way; default 1024)")
    p.add_argument("--encoding", default="scaffold", choices=["scaffold", "independent"])
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds: no new sample starts after this (default 540; the summary says how many ran)")
    p.add_argument("--threads", type=runner.non_negative_int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "results" / "dtype_first_token"),
                   help="output prefix: .jsonl (one line per sample) and .json (summary)")
    return p.parse_args(argv)


def round_robin(samples: dict[str, list]) -> list[tuple[str, object]]:
    """(task, sample) pairs taking one sample of each task in turn."""
    order, depth = [], max((len(v) for v in samples.values()), default=0)
    for i in range(depth):
        order += [(task, items[i]) for task, items in samples.items() if i < len(items)]
    return order


def build_engines(args):
    """(fp32 engine, other-dtype engine): the same weights, the other one cast (and compiled if asked)."""
    import copy

    import torch

    from benchmarks.ttft import build_model
    from promptcache import PromptCache

    ns = argparse.Namespace(model=args.model, device="cpu", dtype="float32", random_weights=args.random_weights)
    model, tokenizer = build_model(ns)
    other = copy.deepcopy(model).to(getattr(torch, args.dtype)).eval()
    kwargs = {}
    if args.compile:
        import inspect

        if "compile" not in inspect.signature(PromptCache.__init__).parameters:
            raise runner.UserError("--compile: this checkout's PromptCache has no compile= argument")
        kwargs["compile"] = True
    ref = PromptCache(model, tokenizer, encoding=args.encoding, progress=False)
    # compiled: graphs are built at each new bucket's first request (no timing is taken here)
    alt = PromptCache(other, tokenizer, encoding=args.encoding, progress=False, **kwargs)
    return ref, alt


def first_token_logits(pc, prepared) -> dict:
    """Baseline and cached first-token logits of one prepared sample (float32 tensors)."""
    with runner.schema_added(pc, prepared):
        return {"baseline": pc.next_token_logits(prepared.prompt_xml, use_cache=False),
                "cached": pc.next_token_logits(prepared.prompt_xml)}


def compare(ref: dict, alt: dict) -> dict:
    """Per path: does the argmax change, and KL(P_fp32 || P_dtype); per dtype: KL(baseline || cached)."""
    out = {}
    for path in ("baseline", "cached"):
        out[f"{path}_top_fp32"] = int(ref[path].argmax())
        out[f"{path}_top_dtype"] = int(alt[path].argmax())
        out[f"{path}_changed"] = out[f"{path}_top_fp32"] != out[f"{path}_top_dtype"]
        out[f"{path}_kl"] = runner.first_token_kl(ref[path], alt[path])
    for side, logits in (("fp32", ref), ("dtype", alt)):
        out[f"cache_kl_{side}"] = runner.first_token_kl(logits["baseline"], logits["cached"])
        out[f"cache_changed_{side}"] = int(logits["baseline"].argmax()) != int(logits["cached"].argmax())
    return out


def summarize(records: list[dict], planned: int, skipped: list[str]) -> dict:
    """Counts of changed first tokens, max/mean KL per path, the cache's own KL per dtype."""
    n = len(records)
    summary: dict = {"samples": n, "planned": planned, "skipped": skipped}
    for path in ("baseline", "cached"):
        kls = [r[f"{path}_kl"] for r in records]
        summary[f"{path}_changed"] = sum(r[f"{path}_changed"] for r in records)
        summary[f"{path}_changed_pct"] = 100.0 * summary[f"{path}_changed"] / n if n else float("nan")
        summary[f"{path}_kl_max"] = max(kls, default=float("nan"))
        summary[f"{path}_kl_mean"] = statistics.fmean(kls) if kls else float("nan")
    for side in ("fp32", "dtype"):
        kls = [r[f"cache_kl_{side}"] for r in records]
        summary[f"cache_kl_{side}_max"] = max(kls, default=float("nan"))
        summary[f"cache_kl_{side}_mean"] = statistics.fmean(kls) if kls else float("nan")
        summary[f"cache_changed_{side}"] = sum(r[f"cache_changed_{side}"] for r in records)
    summary["per_task"] = {t: {"samples": len(rs), "baseline_changed": sum(r["baseline_changed"] for r in rs),
                               "cached_changed": sum(r["cached_changed"] for r in rs)}
                           for t in sorted({r["task"] for r in records})
                           for rs in [[r for r in records if r["task"] == t]]}
    return summary


def report(summary: dict, dtype: str) -> str:
    """The summary as a Markdown table (what goes into docs/fastpath.md)."""
    n = summary["samples"]
    lines = [f"| path | first token changed ({dtype} vs float32) | max KL | mean KL |", "|---|---|---|---|"]
    for path in ("baseline", "cached"):
        lines.append(f"| {path} | {summary[path + '_changed']}/{n} ({summary[path + '_changed_pct']:.1f}%) | "
                     f"{summary[path + '_kl_max']:.3g} | {summary[path + '_kl_mean']:.3g} |")
    lines.append(f"\nCache fidelity within one dtype, cached vs baseline: float32 first token changed "
                 f"{summary['cache_changed_fp32']}/{n}, KL max {summary['cache_kl_fp32_max']:.3g} mean "
                 f"{summary['cache_kl_fp32_mean']:.3g}; {dtype} changed {summary['cache_changed_dtype']}/{n}, KL max "
                 f"{summary['cache_kl_dtype_max']:.3g} mean {summary['cache_kl_dtype_mean']:.3g}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner.set_threads(args.threads)
    data_dir = runner.resolve_data_dir(args.data_dir)
    tasks = runner.resolve_tasks(args.tasks, data_dir)
    order = round_robin(runner.load_samples(tasks, data_dir, args.limit))
    t_start = time.perf_counter()
    ref, alt = build_engines(args)
    setup_s = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records, skipped = [], []
    t0 = time.perf_counter()
    with open(out.with_suffix(".jsonl"), "w") as f:
        for i, (task, sample) in enumerate(order):
            if time.perf_counter() - t0 > args.time_budget:
                print(f"time budget {args.time_budget:.0f} s spent after {len(records)} of {len(order)} samples",
                      file=sys.stderr, flush=True)
                break
            try:
                prepared = runner.prepare_sample(task, sample, ref.tokenizer, ref.renderer, args.max_length, 1)
            except runner.PromptTooLong as exc:
                skipped.append(str(exc))
                continue
            rec = {"task": task, "id": sample.id, "prompt_tokens": prepared.prompt_tokens,
                   **compare(first_token_logits(ref, prepared), first_token_logits(alt, prepared))}
            records.append(rec)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"[{i + 1}/{len(order)}] {task}/{sample.id}: baseline changed={rec['baseline_changed']} "
                  f"kl={rec['baseline_kl']:.3g}; cached changed={rec['cached_changed']} kl={rec['cached_kl']:.3g}",
                  file=sys.stderr, flush=True)
    summary = summarize(records, len(order), skipped)
    summary.update(model=args.model, random_weights=args.random_weights, dtype=args.dtype, compile=args.compile,
                   encoding=args.encoding, max_length=args.max_length, limit=args.limit, threads=args.threads,
                   setup_s=round(setup_s, 1), run_s=round(time.perf_counter() - t0, 1), load_average=os.getloadavg())
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(report(summary, args.dtype))
    print(f"\n{summary['samples']} samples in {summary['run_s']:.0f} s (+{setup_s:.0f} s setup), load average "
          f"{summary['load_average'][0]:.2f}; wrote {out.with_suffix('.jsonl')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(runner.run_main(main))

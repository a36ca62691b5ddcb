#!/usr/bin/env python
"""Latency on LongBench: time-to-first-token with Prompt Cache vs without, same tokens, same model.

For every sample: the context (truncated LongBench's way to fit ``--max-length``) becomes a cached
module of a per-sample schema (encoded once, ``encode_ms``), the instruction/question is the
uncached suffix; then the first token is produced with the module caches (``ttft_ms_cached``) and
by one ordinary forward over exactly the same prompt tokens (``ttft_ms_baseline``). The schema is
removed after each sample, so memory stays flat.

Outputs (never replaced without ``--overwrite``, each written atomically): the per-sample JSONL
(``--output``), ``<output>.summary.json`` and ``.summary.md`` with the per-task table, and with
``--plot`` a PNG of TTFT vs prompt length.

Example::

    python eval.py --dataset all --max-length 2048 --plot
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from eval import runner
from eval.runner import UserError

DEFAULT_OUTPUT = "results/eval_latency.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="TTFT with and without Prompt Cache on LongBench samples (see the module docstring).")
    runner.add_common_arguments(parser, DEFAULT_OUTPUT)
    parser.add_argument("--repeats", type=runner.positive_int, default=1,
                        help="time each mode N times per sample and keep the median (default 1)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="write a PNG of TTFT vs prompt length (default path: <output>.png)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    return parser


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    plot = None
    if args.plot is not None:
        plot = Path(args.plot) if args.plot else runner.derived_path(Path(args.output), ".png")
    return runner.output_paths(args.output, plot)


def time_sample(pc, prepared: runner.PreparedSample, repeats: int) -> dict:
    """Median TTFT of each mode over ``repeats`` alternating runs, plus first-token agreement."""
    cached_runs, base_runs = [], []
    cached = base = None
    for _ in range(repeats):
        cached = pc.generate(prepared.prompt_xml, max_new_tokens=1, use_cache=True)
        base = pc.generate(prepared.prompt_xml, max_new_tokens=1, use_cache=False)
        cached_runs.append(cached.ttft_s * 1000)
        base_runs.append(base.ttft_s * 1000)
    assert cached is not None and base is not None
    if cached.prompt_tokens != base.prompt_tokens:  # cannot happen: both come from the same prompt
        raise RuntimeError(f"{prepared.schema}: prompt tokens differ ({cached.prompt_tokens} vs {base.prompt_tokens})")
    return {
        "prompt_tokens": cached.prompt_tokens, "cached_tokens": cached.cached_tokens,
        "computed_tokens": cached.computed_tokens,
        "ttft_ms_cached": runner.median(cached_runs), "ttft_ms_baseline": runner.median(base_runs),
        "ttft_ms_cached_runs": cached_runs, "ttft_ms_baseline_runs": base_runs,
        "same_first_token": cached.token_ids[:1] == base.token_ids[:1],
        "first_token_kl": runner.first_token_kl(base.first_token_logits, cached.first_token_logits),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = runner.resolve_data_dir(args.data_dir)
    tasks = runner.resolve_tasks(args.tasks, data_dir)
    paths = output_paths(args)
    runner.refuse_existing(paths.values(), args.overwrite)
    samples = runner.load_samples(tasks, data_dir, args.limit)
    device = runner.check_device(args.device)
    runner.set_threads(args.threads)
    budgets = runner.task_budgets(tasks, runner.model_window(args.model), args.max_length, args.max_new_tokens)
    engine_kw = runner.engine_kwargs(args, max(gen for _, gen in budgets.values()))

    from tqdm.auto import tqdm  # noqa: PLC0415 - after the cheap checks: fail fast without imports

    from eval.report import LATENCY_COLUMNS, format_table, latency_figure, latency_summary  # noqa: PLC0415
    from promptcache.engine import PromptCache  # noqa: PLC0415
    from promptcache.loading import load_model  # noqa: PLC0415
    from promptcache.pml.errors import PMLError  # noqa: PLC0415

    print(f"loading {args.model} on {device}...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    pc = PromptCache(model, tokenizer, **engine_kw)
    machine = runner.machine_info(device)

    total = sum(len(s) for s in samples.values())
    first_task = next(t for t in tasks if samples[t])
    if not args.no_warmup:
        runner.warm_up(pc, first_task, samples[first_task][0], args.split_passages)

    records: list[dict] = []
    skipped: list[dict] = []
    started = time.time()
    bar = tqdm(total=total, desc="latency", unit="sample", disable=args.no_progress, file=sys.stderr)
    for task in tasks:
        max_length, gen_len = budgets[task]
        for sample in samples[task]:
            try:
                prepared = runner.prepare_sample(task, sample, tokenizer, pc.renderer, max_length, gen_len,
                                                 args.split_passages)
                with runner.schema_added(pc, prepared) as report:
                    timing = time_sample(pc, prepared, args.repeats)
            except (runner.PromptTooLong, PMLError) as err:
                print(f"warning: skipping {task}/{sample.id}: {err}", file=sys.stderr)
                skipped.append({"dataset": task, "id": sample.id, "error": str(err)})
                bar.update(1)
                continue
            record = {
                "id": sample.id, "dataset": task, **timing,
                "encode_ms": report.encode_s * 1000, "encode_forwards": report.forwards,
                "modules": prepared.modules, "context_tokens": prepared.context_tokens,
                "kept_context_tokens": prepared.kept_context_tokens, "truncated": prepared.truncated,
                "max_length": max_length, "speedup": timing["ttft_ms_baseline"] / timing["ttft_ms_cached"],
                "model": args.model, "device": device, "encoding": args.encoding,
                "split_passages": args.split_passages, "repeats": args.repeats,
            }
            records.append(record)
            bar.set_postfix(task=task, speedup=f"{record['speedup']:.1f}x")
            bar.update(1)
    bar.close()
    if not records:
        raise UserError("every sample was skipped; nothing to report")

    rows = latency_summary(records)
    title = (f"TTFT, {args.model} on {device} ({args.encoding}"
             f"{', split passages' if args.split_passages else ''})")
    table = format_table(rows, LATENCY_COLUMNS)
    runner.write_jsonl_atomic(paths["jsonl"], records)
    runner.write_json_atomic(paths["summary_json"], {
        "kind": "latency", "command": sys.argv, "args": vars(args), "machine": machine,
        "seconds": round(time.time() - started, 1), "loadavg_1m_end": runner.machine_info(device).get("loadavg_1m"),
        "skipped": skipped, "rows": rows})
    runner.write_text_atomic(paths["summary_md"], f"### {title}\n\n{format_table(rows, LATENCY_COLUMNS, markdown=True)}\n")
    if "plot" in paths:
        runner.save_figure_atomic(latency_figure(records, title), paths["plot"])
    print(title)
    print(table)
    if skipped:
        print(f"skipped {len(skipped)} sample(s): " + ", ".join(f"{s['dataset']}/{s['id']}" for s in skipped))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(runner.run_main(main))

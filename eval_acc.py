#!/usr/bin/env python
"""Accuracy on LongBench: greedy answers with Prompt Cache vs without, scored with LongBench's metrics.

Per sample: the same prompt as ``eval.py`` (context truncated LongBench's way to ``--max-length``,
context as cached module(s), question as uncached suffix); one greedy generation without the cache
(the baseline, computed once per sample) and one with it per recompute policy. Recorded per
sample: both predictions and their task scores, whether the two greedy answers are identical
(same generated token ids), and the first-token KL divergence KL(P_baseline || P_cached) in nats
(float64 softmax of the first-token logits): much more sensitive than task scores for small models.

Modes:
  default                 one cached run per sample with ``--recompute POLICY`` (default ``none``)
  --recompute-sweep LIST  one cached run per policy in LIST (default: the issue's sweep); writes a
                          per-policy table and a PNG of quality vs TTFT.

Resuming and ``--overwrite``: the JSONL (``--output``) is appended line by line (flush + fsync);
re-running the same command skips every (task, id, policy) already in it and a torn last line
is dropped. The run settings are stored in each line, and resuming with different settings is
refused. ``--overwrite`` discards the existing JSONL and starts over. The summary files
(``<output>.summary.json``/``.md``, and ``.sweep.png``) are derived from the whole JSONL and are
rewritten on every run that resumes it; without an existing JSONL they are, like every output,
never replaced without ``--overwrite``.

Example::

    python eval_acc.py --tasks all --max-length 1024 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from eval import runner
from eval.runner import UserError

DEFAULT_OUTPUT = "results/eval_acc.jsonl"
DEFAULT_SWEEP = "none,boundary:4,deviation:0.05,deviation:0.15,deviation:0.3,full"
# Settings that change the numbers: a resumed file must have been written with the same ones.
CONFIG_KEYS = ("model", "dtype", "encoding", "split_passages", "max_length", "max_new_tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Task scores, identical answers and first-token KL with and without Prompt Cache "
                    "on LongBench samples (see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_common_arguments(parser, DEFAULT_OUTPUT)
    mode = parser.add_mutually_exclusive_group()
    # default None, not "none": argparse would run the (torch-importing) check on a string default
    mode.add_argument("--recompute", type=runner.check_policy, default=None, metavar="POLICY",
                      help="selective-recompute policy for the cached run: none (default), full, "
                           "boundary:K, boundary:P%%, deviation:R, auto:B (promptcache.recompute)")
    # const stays a string (argparse does not apply `type` to it): validating it here would import
    # torch (via the engine's policy parser) and make `--help` take seconds; parse_args() converts it.
    mode.add_argument("--recompute-sweep", type=runner.policy_list, nargs="?", const=DEFAULT_SWEEP,
                      default=None, metavar="LIST",
                      help=f"comma list of policies, each one cached run per sample (default {DEFAULT_SWEEP})")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="sweep plot path (default <output>.sweep.png; sweep mode only)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    parser.add_argument("--cpu-ttft", action="store_true",
                        help="also time one extra first-token prefill per run in CPU seconds of this process "
                             "(ttft_cpu_ms_*: with --threads 1, the work done, unaffected by other load)")
    parser.add_argument("--split", default="all", choices=["all", "tune", "heldout"],
                        help="only the samples of this split (eval/synthetic.py SPLITS, fixed by sample id; "
                             "synthetic samples follow their source): recompute policies were tuned on "
                             "'tune', 'heldout' is never tuned on. --limit applies within the split")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the flags (no torch import); a bare ``--recompute-sweep`` becomes the default sweep's list."""
    args = build_parser().parse_args(argv)
    if args.recompute is None:
        args.recompute = "none"
    if isinstance(args.recompute_sweep, str):
        args.recompute_sweep = runner.policy_list(args.recompute_sweep)
    return args


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    plot = None
    if args.recompute_sweep is not None:
        plot = Path(args.plot) if args.plot else runner.derived_path(Path(args.output), ".sweep.png")
    elif args.plot:
        raise UserError("--plot needs --recompute-sweep (the plot is quality vs TTFT per policy)")
    return runner.output_paths(args.output, plot)


def load_split(tasks: list[str], data_dir: Path, split: str, limit: int | None) -> dict:
    """The samples of ``split`` per task, at most ``limit`` each (file order)."""
    if split == "all":
        return runner.load_samples(tasks, data_dir, limit)
    from eval.synthetic import in_split  # noqa: PLC0415

    loaded = {task: in_split(task, samples, split)[:limit]
              for task, samples in runner.load_samples(tasks, data_dir, None).items()}
    if not any(loaded.values()):
        raise UserError(f"no samples of split {split!r} in {', '.join(tasks)} (eval/synthetic.py SPLITS)")
    return loaded


def run_config(args: argparse.Namespace) -> dict:
    return {"model": args.model, "dtype": args.dtype, "encoding": args.encoding,
            "split_passages": args.split_passages, "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens}


def existing_records(paths: dict[str, Path], args: argparse.Namespace) -> list[dict]:
    """Records to resume from ([] for a fresh run); refuses unsafe situations before any work."""
    jsonl = paths["jsonl"]
    derived = [p for key, p in paths.items() if key != "jsonl"]
    if args.overwrite or not jsonl.exists():
        runner.refuse_existing(derived, args.overwrite)
        if jsonl.is_dir():
            raise UserError(f"output path is a folder: {jsonl}")
        return []
    if jsonl.is_dir():
        raise UserError(f"output path is a folder: {jsonl}")
    records, _ = runner.read_jsonl_records(jsonl)
    config = run_config(args)
    for lineno, record in enumerate(records, start=1):
        theirs = record.get("config")
        if not isinstance(theirs, dict) or any(key not in record for key in ("dataset", "id", "recompute")):
            raise UserError(f"{jsonl}: record {lineno} is not an eval_acc.py result; use --overwrite "
                            "or another --output")
        diff = [f"{k}={theirs.get(k)!r} (now {config[k]!r})" for k in CONFIG_KEYS if theirs.get(k) != config[k]]
        if diff:
            raise UserError(f"{jsonl} was written with other settings: {', '.join(diff)}; resume with the "
                            "same settings, or use --overwrite or another --output")
    return records


def _result_fields(prefix: str, result) -> dict:
    return {f"ttft_ms_{prefix}": result.ttft_s * 1000, f"gen_tokens_{prefix}": len(result.token_ids)}


def cpu_ttft_ms(pc, prompt: str, **kw) -> float:
    """CPU milliseconds of one first-token prefill (``--cpu-ttft``): load-independent with one thread."""
    t0 = time.process_time()
    pc.next_token_logits(prompt, **kw)
    return (time.process_time() - t0) * 1000


def evaluate_sample(pc, prepared: runner.PreparedSample, policies: list[str], cpu: bool = False) -> list[dict]:
    """Baseline once, then one cached run per policy; one record per policy."""
    from eval.metrics import score_sample  # noqa: PLC0415

    spec = runner.get_task(prepared.task)
    sample = prepared.sample
    stop = ["\n"] if spec.stop_on_newline else None
    gen = prepared.max_new_tokens
    records = []
    with runner.schema_added(pc, prepared) as report:
        base = pc.generate(prepared.prompt_xml, max_new_tokens=gen, use_cache=False, stop=stop)
        score_base = score_sample(prepared.task, base.text, sample.answers, sample.all_classes)
        cpu_base = {"ttft_cpu_ms_baseline": cpu_ttft_ms(pc, prepared.prompt_xml, use_cache=False)} if cpu else {}
        for policy in policies:
            cached = pc.generate(prepared.prompt_xml, max_new_tokens=gen, use_cache=True, stop=stop,
                                 recompute=policy)
            cpu_cached = {"ttft_cpu_ms_cached": cpu_ttft_ms(pc, prepared.prompt_xml, recompute=policy)} if cpu else {}
            records.append({
                "id": sample.id, "dataset": prepared.task, "answers": sample.answers,
                "all_classes": sample.all_classes,
                "pred_cached": cached.text, "pred_baseline": base.text,
                "score_cached": score_sample(prepared.task, cached.text, sample.answers, sample.all_classes),
                "score_baseline": score_base,
                "identical": cached.token_ids == base.token_ids,
                "same_first_token": cached.token_ids[:1] == base.token_ids[:1],
                "first_token_kl": runner.first_token_kl(base.first_token_logits, cached.first_token_logits),
                "recompute": policy, "recomputed_tokens": cached.recomputed_tokens,
                "prompt_tokens": cached.prompt_tokens, "cached_tokens": cached.cached_tokens,
                "computed_tokens": cached.computed_tokens,
                **_result_fields("cached", cached), **_result_fields("baseline", base), **cpu_base, **cpu_cached,
                "chosen": pc.select_tokens(prepared.prompt_xml, policy).policy if policy.startswith("auto") else policy,
                "encode_ms": report.encode_s * 1000, "modules": prepared.modules,
                "context_tokens": prepared.context_tokens, "kept_context_tokens": prepared.kept_context_tokens,
                "truncated": prepared.truncated, "max_length": prepared.max_length, "max_new_tokens": gen,
            })
    return records


# The selective-recompute issue's table (issue 18): one row per task and policy.
TASK_POLICY_COLUMNS = [
    ("task", "task"), ("policy", "policy"), ("n", "n"), ("recompute_ratio", "recomputed/cached"),
    ("mean_first_token_kl", "mean 1st-token KL"), ("kl_gap_recovered_pct", "KL gap recovered %"),
    ("identical_pct", "identical %"), ("delta", "score delta"), ("ttft_vs_none", "TTFT / none"),
    ("cpu_ttft_vs_none", "CPU TTFT / none"), ("baseline_vs_ttft", "base / TTFT"),
    ("cpu_baseline_vs_ttft", "CPU base / TTFT"),
]


def write_summaries(records: list[dict], paths: dict[str, Path], args: argparse.Namespace,
                    policies: list[str], extra: dict) -> str:
    """Rebuild the tables from every record in the JSONL; returns the printed text."""
    from eval.report import (ACCURACY_COLUMNS, SWEEP_COLUMNS, VS_NONE_COLUMNS,  # noqa: PLC0415
                             accuracy_summary, format_table, split_by_policy, sweep_figure, sweep_summary)

    mode = f"{args.model}, {args.encoding}{', split passages' if args.split_passages else ''}"
    if args.split != "all":
        mode += f", {args.split} split"
    if args.recompute_sweep is None:
        policy = policies[0]
        recs = split_by_policy(records).get(policy, [])
        rows = accuracy_summary(recs) if recs else []
        title = f"Accuracy, cache vs baseline ({mode}, recompute {policy})"
        text = f"{title}\n{format_table(rows, ACCURACY_COLUMNS)}"
        md = f"### {title}\n\n{format_table(rows, ACCURACY_COLUMNS, markdown=True)}\n"
        summary = {"kind": "accuracy", "recompute": policy, "rows": rows}
    else:
        present = list(dict.fromkeys(policies + list(split_by_policy(records))))
        overall, per_task = sweep_summary(records, present)
        title = f"Recompute sweep ({mode})"
        text = f"{title}\n{format_table(overall, SWEEP_COLUMNS)}"
        md = f"### {title}\n\n{format_table(overall, SWEEP_COLUMNS, markdown=True)}\n"
        columns = ACCURACY_COLUMNS[:2] + [("recompute_ratio", "recomputed/cached")] + ACCURACY_COLUMNS[2:]
        for policy, rows in per_task.items():
            text += f"\n\nrecompute {policy}\n{format_table(rows, columns + VS_NONE_COLUMNS)}"
            md += (f"\n#### recompute {policy}\n\n"
                   f"{format_table(rows, columns + VS_NONE_COLUMNS, markdown=True)}\n")
        by_task = [{"policy": policy, **row} for row_task in dict.fromkeys(r["task"] for rows in per_task.values()
                                                                           for r in rows)
                   for policy, rows in per_task.items() for row in rows if row["task"] == row_task]
        md += f"\n#### per task and policy\n\n{format_table(by_task, TASK_POLICY_COLUMNS, markdown=True)}\n"
        summary = {"kind": "recompute_sweep", "policies": present, "rows": overall, "per_task": per_task}
        if overall:
            runner.save_figure_atomic(sweep_figure(overall, title), paths["plot"])
    runner.write_json_atomic(paths["summary_json"], {**summary, "command": sys.argv, "args": vars(args),
                                                     "records": len(records), **extra})
    runner.write_text_atomic(paths["summary_md"], md)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = args.recompute_sweep if args.recompute_sweep is not None else [args.recompute]
    data_dir = runner.resolve_data_dir(args.data_dir)
    tasks = runner.resolve_tasks(args.tasks, data_dir)
    paths = output_paths(args)
    records = existing_records(paths, args)
    samples = load_split(tasks, data_dir, args.split, args.limit)
    done = {(r["dataset"], r["id"], r["recompute"]) for r in records}
    todo = [(task, sample, [p for p in policies if (task, sample.id, p) not in done])
            for task in tasks for sample in samples[task]]
    todo = [item for item in todo if item[2]]
    if records:
        print(f"resuming {paths['jsonl']}: {len(records)} records already there, "
              f"{len(todo)} samples to do", file=sys.stderr)
    device = runner.check_device(args.device)
    runner.set_threads(args.threads)
    budgets = runner.task_budgets(tasks, runner.model_window(args.model), args.max_length, args.max_new_tokens)
    engine_kw = runner.engine_kwargs(args, max(gen for _, gen in budgets.values()))
    extra: dict = {"skipped": []}

    if todo:
        from tqdm.auto import tqdm  # noqa: PLC0415

        from promptcache.engine import PromptCache  # noqa: PLC0415
        from promptcache.loading import load_model  # noqa: PLC0415
        from promptcache.pml.errors import PMLError  # noqa: PLC0415

        from eval.synthetic import split_of  # noqa: PLC0415

        print(f"loading {args.model} on {device}...", file=sys.stderr)
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
        pc = PromptCache(model, tokenizer, **engine_kw)
        extra["machine"] = runner.machine_info(device)
        if args.overwrite and paths["jsonl"].exists():
            runner.write_text_atomic(paths["jsonl"], "")
        records, dropped = runner.read_jsonl_records(paths["jsonl"], repair=True) \
            if paths["jsonl"].exists() else ([], False)
        if dropped:
            print(f"dropped a torn last line of {paths['jsonl']}", file=sys.stderr)
        if not args.no_warmup:
            runner.warm_up(pc, todo[0][0], todo[0][1], args.split_passages)

        config = run_config(args)
        started = time.time()
        bar = tqdm(total=len(todo), desc="accuracy", unit="sample", disable=args.no_progress, file=sys.stderr)
        same = 0
        with runner.JsonlAppender(paths["jsonl"]) as out:
            for task, sample, todo_policies in todo:
                max_length, gen_len = budgets[task]
                try:
                    prepared = runner.prepare_sample(task, sample, tokenizer, pc.renderer, max_length, gen_len,
                                                     args.split_passages)
                    new = evaluate_sample(pc, prepared, todo_policies, args.cpu_ttft)
                except (runner.PromptTooLong, PMLError) as err:  # PMLError: text XML cannot carry
                    print(f"warning: skipping {task}/{sample.id}: {err}", file=sys.stderr)
                    extra["skipped"].append({"dataset": task, "id": sample.id, "error": str(err)})
                    bar.update(1)
                    continue
                for record in new:
                    record["config"] = config
                    record["split"] = split_of(task, sample)
                    out.append(record)
                records.extend(new)
                same += all(r["identical"] for r in new)
                bar.update(1)
                bar.set_postfix(task=task, identical=f"{same}/{bar.n}")
        bar.close()
        extra["seconds"] = round(time.time() - started, 1)
        extra["loadavg_1m_end"] = runner.machine_info(device).get("loadavg_1m")
    else:
        print("nothing to do: every selected sample is already in the output", file=sys.stderr)

    if not records:
        raise UserError("no results to summarise (every sample was skipped)")
    print(write_summaries(records, paths, args, policies, extra))
    if extra["skipped"]:
        print(f"skipped {len(extra['skipped'])} sample(s): "
              + ", ".join(f"{s['dataset']}/{s['id']}" for s in extra["skipped"]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(runner.run_main(main))

#!/usr/bin/env python
"""Decode throughput of the batched DecodeBatch vs the looping reference, side by side in ONE run.

Each row is a different slice of real prose (``--context`` tokens plus a few per row, so rows
differ in length), prefilled once per measurement (untimed). Then ``--steps`` greedy decode steps
over all rows are timed: the batched implementation (:class:`BatchedDecodeBatch`, one forward per
step) against the reference (:class:`LoopDecodeBatch`, one forward per row per step), at every
batch size of ``--batches``. Prints decode tokens/s (rows x steps / seconds, best of
``--repeats``) and the ratio batched/loop, by wall clock and by CPU time (a shared machine's
load moves the wall clock; with ``--threads 1`` the CPU time of this process is the steadier one).

    python benchmarks/batch_decode.py --threads 1
    python benchmarks/batch_decode.py --threads 1 --context 300 --steps 24 --batches 1,4,8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import document_text, print_table, set_threads, sync  # noqa: E402
from promptcache import PromptCache, load_model  # noqa: E402
from promptcache.runtime.batch import BatchedDecodeBatch, LoopDecodeBatch  # noqa: E402

IMPLS = {"loop": LoopDecodeBatch, "batched": BatchedDecodeBatch}


def row_prompts(tokenizer, rows: int, context: int) -> list[list[int]]:
    """``rows`` token-id prompts of ``context + 7 * i`` tokens, each from a different part of the text."""
    ids = tokenizer(document_text(tokenizer, rows * (context + 7 * rows) + 10), add_special_tokens=False)["input_ids"]
    out, at = [], 0
    for i in range(rows):
        n = context + 7 * i
        out.append(ids[at:at + n])
        at += n
    return out


def decode_rate(pc: PromptCache, impl, prompts: list[list[int]], steps: int,
                warmup: int = 2) -> tuple[float, float]:
    """Tokens/s of ``steps`` greedy batched steps over one row per prompt (prefill untimed), by
    wall clock and by this process's CPU time (steadier on a shared machine with ``--threads 1``)."""
    batch = impl(pc.runner, max_rows=len(prompts))
    rows = []
    for ids in prompts:
        logits, cache = pc.runner.prefill_baseline(ids)
        rows.append([batch.add(cache), len(ids), int(logits.argmax())])
    elapsed = cpu = 0.0
    for k in range(warmup + steps):
        sync(pc.runner.device)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = batch.step([(row, token, pos + k) for row, pos, token in rows])
        sync(pc.runner.device)
        if k >= warmup:
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
        for r, logits in zip(rows, outs):
            r[2] = int(logits.argmax())
    return len(prompts) * steps / elapsed, len(prompts) * steps / cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    ap.add_argument("--context", type=int, default=300, help="prompt tokens of the first row (+7 per row)")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per measurement")
    ap.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per cell (best is kept)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    pc = PromptCache(model, tokenizer, progress=False)
    sizes = [int(b) for b in args.batches.split(",")]
    prompts = row_prompts(tokenizer, max(sizes), args.context)
    table = []
    with torch.inference_mode():
        for impl in IMPLS.values():  # warm-up: first forwards of a process are slow
            decode_rate(pc, impl, prompts[:2], 2)
        for size in sizes:
            runs = {name: [decode_rate(pc, impl, prompts[:size], args.steps) for _ in range(args.repeats)]
                    for name, impl in IMPLS.items()}
            wall = {name: max(r[0] for r in rs) for name, rs in runs.items()}
            cpu = {name: max(r[1] for r in rs) for name, rs in runs.items()}
            table.append({"batch": size, "loop": wall["loop"], "batched": wall["batched"],
                          "ratio": wall["batched"] / wall["loop"], "loop_cpu": cpu["loop"],
                          "batched_cpu": cpu["batched"], "ratio_cpu": cpu["batched"] / cpu["loop"]})
    print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} "
          f"context={args.context}+7/row steps={args.steps} repeats={args.repeats}")
    print_table(table, [("batch", "batch", "{}"), ("loop tok/s", "loop", "{:.1f}"),
                        ("batched tok/s", "batched", "{:.1f}"), ("batched/loop", "ratio", "{:.2f}x"),
                        ("loop tok/cpu-s", "loop_cpu", "{:.1f}"), ("batched tok/cpu-s", "batched_cpu", "{:.1f}"),
                        ("batched/loop (cpu)", "ratio_cpu", "{:.2f}x")])


if __name__ == "__main__":
    main()

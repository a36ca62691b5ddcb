#!/usr/bin/env python
"""Serving benchmark (issue 15): ``promptcache serve`` and vLLM's OpenAI server side by side.

Two workloads, each at client concurrency 1 and 8, through the official ``openai`` client with
streaming, temperature 0 and a short ``max_tokens``:

1. modular RAG: 20 hotpotqa passages from longbench-mini; each request picks 4 in random order
   (seeded) plus a question. Ours: one PML module per passage (``--encoding independent``: any
   subset in any order is valid) and a PML prompt selecting the 4; vLLM: the same passages' text
   and question as a plain completion (``/v1/completions`` on both).
2. shared document: 20 questions over one ~4k-token document (``/v1/chat/completions`` on both:
   system message, then the document and the question in the user message).

Measured per cell: TTFT (first streamed content chunk) p50/p99, inter-token latency p50/p99,
requests/s and output tokens/s; ``--warmup`` requests per workload and server run first and are
excluded. The servers run one at a time, each with ``--threads`` CPU threads. vLLM comes from a
separate virtual environment (``--vllm-venv``, built with ``--build-vllm``); it is not a project
dependency. Prints one table with both servers and the issue's target ratios; writes
``<out>.csv``, ``<out>.json``, ``<out>.md`` and ``<out>.requests.jsonl``.

    python benchmarks/serve.py --threads 1                 # both servers, full run
    python benchmarks/serve.py --quick --only vllm         # smoke run of one side
    python -m benchmarks.serve --ours-url http://127.0.0.1:8000   # an already running server of ours
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ROOT, print_table, write_csv  # noqa: E402
from benchmarks.serve_client import run_cell, summarize  # noqa: E402
from benchmarks.serve_servers import (Server, default_vllm_venv, external, find_vllm, model_folder,  # noqa: E402
                                      start_ours, start_vllm)
from benchmarks.serve_workloads import Workloads, build_workloads, write_schema  # noqa: E402

SERVERS = ("ours", "vllm")
WORKLOADS = {"rag": "modular RAG", "doc": "shared document"}
TARGETS = {  # name: (description, comparison, bound)
    "rag_ttft_ours_over_vllm": ("modular RAG p50 TTFT at concurrency 1, ours / vLLM", "<=", 1 / 3),
    "doc_ttft_ours_over_vllm": ("shared document p50 TTFT at concurrency 1, ours / vLLM", "<=", 1.5),
    "ours_throughput_c8_over_c1": ("our output tokens/s at the highest / the lowest concurrency (both workloads "
                                   "together)", ">=", 3.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=SERVERS, default=None, help="run one server only (default: both)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 requests per cell, 1 warm-up, 1k-token document, 120-token passages, "
                        "16 new tokens")
    p.add_argument("--workloads", default="rag,doc", help="comma-separated: rag, doc")
    p.add_argument("--concurrency", default="1,8", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=20, help="measured requests per cell (server x workload x "
                                                            "concurrency)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per server and workload (excluded)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each server (OMP_NUM_THREADS)")
    p.add_argument("--max-batch", type=int, default=8, help="our --max-batch and vLLM's --max-num-seqs")
    p.add_argument("--model", default="smollm2", help="our model name; vLLM gets promptcache's converted folder")
    p.add_argument("--passages", type=int, default=20, help="RAG passage pool size")
    p.add_argument("--passage-tokens", type=int, default=200, help="each passage cut to this many tokens")
    p.add_argument("--pick", type=int, default=4, help="passages per RAG request")
    p.add_argument("--doc-tokens", type=int, default=4000, help="shared document length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-venv", type=Path, default=None,
                   help="vLLM's virtual environment (default: <promptcache cache home>/vllm-venv)")
    p.add_argument("--build-vllm", action="store_true", help="build the vLLM venv when it is missing")
    p.add_argument("--ours-url", default=None, help="use this running server of ours; start it with "
                   "--schema <out folder>/serve_schema/serve-rag.xml --encoding independent (the benchmark writes "
                   "that file on every run)")
    p.add_argument("--vllm-url", default=None, help="use this running vLLM server")
    p.add_argument("--port-ours", type=int, default=8401)
    p.add_argument("--port-vllm", type=int, default=8402)
    p.add_argument("--ours-args", default="", help="extra arguments for promptcache serve (one string)")
    p.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="vLLM's --dtype (default float32, as our server on CPU; vLLM's own CPU default, auto, "
                        "downcasts this float32 model to bfloat16)")
    p.add_argument("--vllm-args", default="", help="extra arguments for vLLM's server (one string)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for a server")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--out", default=str(ROOT / "results" / "serve"), help="output prefix")
    p.add_argument("--figure-csv", type=Path, default=None, help="also write the side-by-side table here")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.doc_tokens = min(args.requests, 6), min(args.warmup, 1), 1000
        args.passage_tokens, args.max_tokens = 120, 16
    return args


def server_plan(args) -> list[str]:
    """The servers to run, ours first (``--only`` picks one)."""
    return [args.only] if args.only else list(SERVERS)


def open_server(name: str, args, schema: Path, out: Path) -> Server:
    """Start the named server (or attach to ``--ours-url``/``--vllm-url``)."""
    url = args.ours_url if name == "ours" else args.vllm_url
    if url:
        return external(name, url)
    if name == "ours":
        return start_ours(args.model, args.port_ours, schema, args.threads, args.max_batch, args.ours_args.split(),
                          out.with_suffix(".ours.log"), args.startup_timeout)
    python = find_vllm(args.vllm_venv or default_vllm_venv(), args.build_vllm)
    return start_vllm(python, model_folder(args.model), args.port_vllm, args.threads, args.max_batch,
                      args.vllm_dtype, args.vllm_args.split(), out.with_suffix(".vllm.log"), args.startup_timeout)


def bench_server(name: str, server: Server, work: Workloads, args, log, texts: dict) -> list[dict]:
    """Warm-up then every (workload, concurrency) cell on one server; one row per cell.

    ``texts[(server, workload, concurrency)]`` receives the answers (None for failed requests)."""
    rows = []
    for workload in args.workloads.split(","):
        if args.warmup:
            warm = work.requests(workload, args.warmup, f"warmup-{name}")
            samples, _ = asyncio.run(run_cell(server.base_url, server.model_id, warm, name, 1, args.max_tokens,
                                              args.request_timeout))
            bad = [s.error for s in samples if s.error]
            print(f"  {name} {workload}: warm-up {len(samples)} requests"
                  f"{', errors: ' + bad[0] if bad else ''}", flush=True)
        for c in (int(x) for x in args.concurrency.split(",")):
            reqs = work.requests(workload, args.requests, f"c{c}")
            load0 = os.getloadavg()[0]
            samples, wall = asyncio.run(run_cell(server.base_url, server.model_id, reqs, name, c, args.max_tokens,
                                                 args.request_timeout))
            row = {"server": name, "workload": workload, "concurrency": c, **summarize(samples, wall),
                   "load1_start": load0, "load1_end": os.getloadavg()[0]}
            rows.append(row)
            texts[(name, workload, c)] = [None if s.error else s.text for s in samples]
            for i, s in enumerate(samples):
                log.write(json.dumps({"server": name, "workload": workload, "concurrency": c, "i": i,
                                      **asdict(s)}) + "\n")
            print(f"  {name} {workload} c={c}: TTFT p50 {row['ttft_p50_ms']:.0f} ms, p99 {row['ttft_p99_ms']:.0f} ms,"
                  f" ITL p50 {row['itl_p50_ms']:.0f} ms, {row['out_tok_per_s']:.1f} tok/s, {row['errors']} errors,"
                  f" load {load0:.2f}", flush=True)
    return rows


def add_agreement(rows: list[dict], texts: dict) -> None:
    """``same_text``: the share of a cell's requests whose greedy answers are equal on both servers (same
    requests, temperature 0); NaN with one server. Exact prefix reuse (shared document) should agree up to
    float noise; independently encoded passage modules (modular RAG) need not."""
    for row in rows:
        key = (row["workload"], row["concurrency"])
        a, b = texts.get(("ours", *key)), texts.get(("vllm", *key))
        pairs = [(x, y) for x, y in zip(a or [], b or []) if x is not None and y is not None]
        row["same_text"] = sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def find_row(rows: list[dict], server: str, workload: str, c: int) -> dict | None:
    """The row of one cell, or None when that server or cell did not run."""
    return next((r for r in rows if (r["server"], r["workload"], r["concurrency"]) == (server, workload, c)), None)


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def ratios(rows: list[dict], concurrency: list[int]) -> dict[str, float]:
    """The issue's target ratios (and a few more), NaN where a side is missing or zero."""
    def val(server, workload, c, key):
        r = find_row(rows, server, workload, c)
        return r[key] if r else float("nan")

    lo, hi = min(concurrency), max(concurrency)
    out = {f"{w}_ttft_ours_over_vllm": _div(val("ours", w, lo, "ttft_p50_ms"), val("vllm", w, lo, "ttft_p50_ms"))
           for w in WORKLOADS}
    for server in SERVERS:
        tok = {c: sum(val(server, w, c, "out_tok_per_s") for w in WORKLOADS) for c in (lo, hi)}
        out[f"{server}_throughput_c8_over_c1"] = _div(tok[hi], tok[lo])
        for w in WORKLOADS:
            out[f"{server}_{w}_throughput_c8_over_c1"] = _div(val(server, w, hi, "out_tok_per_s"),
                                                              val(server, w, lo, "out_tok_per_s"))
    for w in WORKLOADS:
        out[f"{w}_c{hi}_ttft_ours_over_vllm"] = _div(val("ours", w, hi, "ttft_p50_ms"),
                                                     val("vllm", w, hi, "ttft_p50_ms"))
        out[f"{w}_c{hi}_tok_s_ours_over_vllm"] = _div(val("ours", w, hi, "out_tok_per_s"),
                                                      val("vllm", w, hi, "out_tok_per_s"))
    return out


def _pair(rows, workload, c, key, fmt) -> str:
    """``ours / vLLM`` for one metric of one cell; ``-`` for a side that did not run."""
    vals = []
    for server in SERVERS:
        r = find_row(rows, server, workload, c)
        vals.append(fmt.format(r[key]) if r and not math.isnan(r[key]) else "-")
    return " / ".join(vals)


SIDE_COLUMNS = [("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"), ("TTFT p99 ms", "ttft_p99_ms", "{:.0f}"),
                ("ITL p50 ms", "itl_p50_ms", "{:.1f}"), ("ITL p99 ms", "itl_p99_ms", "{:.0f}"),
                ("req/s", "req_per_s", "{:.2f}"), ("out tok/s", "out_tok_per_s", "{:.1f}"),
                ("prompt tok", "prompt_tokens_mean", "{:.0f}"), ("cached tok", "cached_tokens_mean", "{:.0f}"),
                ("errors", "errors", "{}"), ("no text", "no_text", "{}"), ("load", "load1_start", "{:.1f}")]


def side_by_side(rows: list[dict], workloads: list[str], concurrency: list[int]) -> list[dict]:
    """One row per (workload, concurrency); each metric as ``ours / vLLM``."""
    out = []
    for w in workloads:
        for c in concurrency:
            row = {"workload": WORKLOADS.get(w, w), "c": c}
            row.update({h: _pair(rows, w, c, k, f) for h, k, f in SIDE_COLUMNS})
            same = find_row(rows, "ours", w, c) or find_row(rows, "vllm", w, c) or {}
            row["same answer"] = "-" if math.isnan(same.get("same_text", math.nan)) else f"{same['same_text']:.0%}"
            out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    """The side-by-side table as Markdown (for docs/serve_benchmark.md)."""
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in table]
    return "\n".join(lines)


def ratio_lines(rat: dict[str, float]) -> list[str]:
    """One line per issue target: the value, the bound, met / MISSED / n/a."""
    lines = []
    for key, (text, op, bound) in TARGETS.items():
        value = rat.get(key, float("nan"))
        met = "n/a" if math.isnan(value) else ("met" if (value <= bound if op == "<=" else value >= bound)
                                               else "MISSED")
        lines.append(f"{text}: {value:.3f} (target {op} {bound:.3g}): {met}")
    return lines


def setup_notes(args, servers: dict[str, Server]) -> dict:
    """What a reader needs to reproduce the run: command, commit, threads, each server's command and env."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": args.threads,
            "max_tokens": args.max_tokens, "requests_per_cell": args.requests, "warmup": args.warmup,
            "servers": {n: {"url": s.base_url, "model_id": s.model_id, "startup_s": s.startup_s,
                            "command": s.command, "env": s.env} for n, s in servers.items()}}


def main(argv=None) -> int:
    """Build the workloads, run each server in turn, print the table and ratios, write the results."""
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = build_workloads(args.model, args.passages, args.passage_tokens, args.pick, args.doc_tokens, args.seed)
    schema = write_schema(work, out.parent / "serve_schema")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    print(f"{len(work.passages)} passages ({args.passage_tokens} tokens max), pick {args.pick}; document "
          f"{args.doc_tokens} tokens; {args.requests} requests per cell, {args.warmup} warm-up, max_tokens "
          f"{args.max_tokens}, {args.threads} thread(s) per server; load {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict] = []
    texts: dict = {}
    servers: dict[str, Server] = {}
    with open(out.with_suffix(".requests.jsonl"), "w") as log:
        for name in server_plan(args):
            server = open_server(name, args, schema, out)
            servers[name] = server
            try:
                rows += bench_server(name, server, work, args, log, texts)
            finally:
                server.stop()
    add_agreement(rows, texts)
    table = side_by_side(rows, workloads, concurrency)
    rat = ratios(rows, concurrency)
    print("\nours / vLLM (TTFT: first streamed content chunk; ITL: gaps between content chunks; warm-up excluded)")
    print_table(table, [(h, h, "{}") for h in table[0]])
    print()
    for line in ratio_lines(rat):
        print(line)
    write_csv(rows, out.with_suffix(".csv"))
    if args.figure_csv:
        write_csv(table, args.figure_csv)
    notes = setup_notes(args, servers)
    out.with_suffix(".json").write_text(json.dumps({"setup": notes, "rows": rows, "ratios": rat}, indent=2,
                                                   default=str))
    out.with_suffix(".md").write_text(markdown(table) + "\n\n" + "\n".join(f"- {l}" for l in ratio_lines(rat))
                                      + "\n")
    print(f"\nwrote {out.with_suffix('.csv')}, .json, .md, .requests.jsonl")
    return 0


if __name__ == "__main__":  # required: vLLM's and our servers run as child processes
    raise SystemExit(main())

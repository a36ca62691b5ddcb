#!/usr/bin/env python
"""Automatic prefix caching: TTFT with and without it, side by side in ONE run, plus tree throughput.

(a) chat: the 10-turn conversation of examples/chat_multiturn.py; every turn sends the whole
    history (chat messages, no PML). With prefix caching each turn reuses the previous turns and
    the previous answer; without, the whole history is prefilled.
(b) document QA: one long document (LongBench gov_report prose cut to --doc-tokens tokens) in a
    user message, followed by one of --questions different questions. The first request is a miss
    (it computes the document and caches it); the others reuse it.
(c) radix tree throughput: inserts/s and lookups/s for 50k sequences (benchmarks/prefix_tree.py's
    reference workload and measurement).

Each request is timed without prefix caching (``use_cache=False``) right before the cached
request on the same prompt (interleaved, so load drift on a shared machine hits both alike).
TTFT is ``GenerationResult.ttft_s``: from the call (tokenization included) to the first token's
logits. Also checked per request: the first-token logits of both paths agree (max abs diff).

    .venv/bin/python benchmarks/prefix.py                       # default model, CPU, float32
    .venv/bin/python benchmarks/prefix.py --threads 1 --questions 20 --doc-tokens 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ROOT, set_threads  # noqa: E402

QUESTIONS = [
    "What is the main purpose of the report?",
    "Which agency or department is the report mainly about?",
    "What problem does the report identify first?",
    "What recommendations does the report make?",
    "Which years or time period does the report cover?",
    "What data sources did the authors use?",
    "What are the main risks the report describes?",
    "Who is responsible for carrying out the recommendations?",
    "How much money is involved, according to the report?",
    "What did the agency say in response to the findings?",
    "What is the most surprising finding?",
    "Summarise the report in one sentence.",
    "What changes in law or policy are discussed?",
    "Which groups of people are affected?",
    "What progress has been made so far?",
    "What challenges remain unresolved?",
    "How was the review or audit carried out?",
    "What would happen if nothing changed?",
    "Give three keywords that describe the report.",
    "What should a reader do after reading this report?",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); say which in reports")
    p.add_argument("--turns", type=int, default=10, help="chat turns in (a)")
    p.add_argument("--chat-new-tokens", type=int, default=48, help="answer length per chat turn")
    p.add_argument("--doc-tokens", type=int, default=4096, help="document length in (b)")
    p.add_argument("--questions", type=int, default=20, help="questions in (b), at most 20")
    p.add_argument("--qa-new-tokens", type=int, default=8, help="answer length per question")
    p.add_argument("--tree-repeats", type=int, default=3, help="repeats of the tree throughput runs")
    p.add_argument("--skip", default="", help="comma list of parts to skip: chat,doc,tree")
    p.add_argument("--out", default=str(ROOT / "results" / "prefix"), help="output prefix for .csv")
    return p.parse_args(argv)


def maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def summarise(name: str, rows: list[dict]) -> None:
    """Per-request table, then medians (all requests, and reusing requests only)."""
    print(f"\n({name}) per request")
    head = f"{'req':>4} {'prompt':>7} {'reused':>7} {'computed':>8} {'without ms':>11} {'with ms':>9} " \
           f"{'speedup':>8} {'logit diff':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['request']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} {r['computed_tokens']:>8} "
              f"{r['without_ms']:>11.1f} {r['with_ms']:>9.1f} {r['speedup']:>7.1f}x {r['logit_diff']:>10.2e}")
    med_wo = statistics.median(r["without_ms"] for r in rows)
    med_w = statistics.median(r["with_ms"] for r in rows)
    print(f"median over {len(rows)} requests: without {med_wo:.1f} ms, with {med_w:.1f} ms, "
          f"speedup {med_wo / med_w:.1f}x")
    hits = [r for r in rows if r["cached_tokens"]]
    if hits and len(hits) < len(rows):
        wo = statistics.median(r["without_ms"] for r in hits)
        w = statistics.median(r["with_ms"] for r in hits)
        print(f"median over the {len(hits)} reusing requests: without {wo:.1f} ms, with {w:.1f} ms, "
              f"speedup {wo / w:.1f}x")
    print(f"largest first-token logit difference: {max(r['logit_diff'] for r in rows):.2e}; "
          f"same first token in {sum(r['same_token'] for r in rows)}/{len(rows)}")


def row_of(part: str, i: int, base, res) -> dict:
    return {"part": part, "request": i, "prompt_tokens": res.prompt_tokens,
            "cached_tokens": res.cached_tokens, "computed_tokens": res.computed_tokens,
            "without_ms": base.ttft_s * 1000, "with_ms": res.ttft_s * 1000,
            "speedup": base.ttft_s / res.ttft_s,
            "logit_diff": maxdiff(base.first_token_logits, res.first_token_logits),
            "same_token": int(base.first_token_logits.argmax()) == int(res.first_token_logits.argmax())}


def chat_part(model, tokenizer, args) -> list[dict]:
    from examples.chat_multiturn import USER_TURNS, run_chat
    from promptcache import PromptCache

    pc = PromptCache(model, tokenizer, progress=False)
    rows = []

    def on_turn(i: int, r: dict) -> None:
        rows.append({"part": "chat", "request": i, "prompt_tokens": r["prompt_tokens"],
                     "cached_tokens": r["cached_tokens"], "computed_tokens": r["computed_tokens"],
                     "without_ms": r["baseline_ttft_s"] * 1000, "with_ms": r["prefix_ttft_s"] * 1000,
                     "speedup": r["baseline_ttft_s"] / r["prefix_ttft_s"],
                     "logit_diff": maxdiff(r["baseline_first_logits"], r["first_logits"]),
                     "same_token": int(r["baseline_first_logits"].argmax()) == int(r["first_logits"].argmax())})
        print(f"  turn {i}: without {rows[-1]['without_ms']:.0f} ms, with {rows[-1]['with_ms']:.0f} ms "
              f"({r['cached_tokens']}/{r['prompt_tokens']} reused)", flush=True)

    run_chat(pc, USER_TURNS[: args.turns], args.chat_new_tokens, on_turn=on_turn)
    summarise(f"a: {args.turns}-turn chat", rows)
    print("prefix stats:", fmt_stats(pc.prefix_stats()))
    return rows


def doc_part(model, tokenizer, args) -> list[dict]:
    from benchmarks.common import document_text
    from promptcache import PromptCache

    doc = document_text(tokenizer, args.doc_tokens)
    pc = PromptCache(model, tokenizer, progress=False)
    rows = []
    for i, q in enumerate(QUESTIONS[: args.questions], 1):
        messages = [{"role": "user", "content": f"Read this report.\n\n{doc}\n\nQuestion: {q}"}]
        base = pc.generate(messages, max_new_tokens=1, use_cache=False)
        res = pc.generate(messages, max_new_tokens=args.qa_new_tokens)
        rows.append(row_of("doc", i, base, res))
        print(f"  question {i}: without {rows[-1]['without_ms']:.0f} ms, with {rows[-1]['with_ms']:.0f} ms "
              f"({res.cached_tokens}/{res.prompt_tokens} reused)", flush=True)
    summarise(f"b: {args.questions} questions over one {args.doc_tokens}-token document", rows)
    print("prefix stats:", fmt_stats(pc.prefix_stats()))
    return rows


def tree_part(args) -> None:
    from benchmarks.prefix_tree import N_SEQUENCES, N_LOOKUPS, SEQ_LEN, measure, reference_workload

    rates, tree = measure(reference_workload(), "lru", args.tree_repeats, None)
    print(f"\n(c) radix tree: {N_SEQUENCES:,} inserts of {SEQ_LEN} tokens, then {N_LOOKUPS:,} lookups "
          f"(benchmarks/prefix_tree.py reference workload, LRU, median of {args.tree_repeats})")
    print(f"inserts/s {rates.inserts_wall:,.0f} wall ({rates.inserts_cpu:,.0f} per CPU second); "
          f"lookups/s {rates.lookups_wall:,.0f} wall ({rates.lookups_cpu:,.0f} per CPU second); "
          f"{tree.node_count:,} nodes")


def fmt_stats(stats: dict) -> str:
    keys = ["hits", "misses", "hit_rate", "tokens_reused", "tokens_computed", "bytes_held", "evictions"]
    return ", ".join(f"{k}={stats[k]:.3f}" if isinstance(stats[k], float) else f"{k}={stats[k]:,}"
                     for k in keys)


def main(argv=None) -> int:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    import torch

    from promptcache import PromptCache, load_model

    set_threads(args.threads)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          "(shared machine: other processes compete)", flush=True)
    rows: list[dict] = []
    if not {"chat", "doc"} <= skip:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        print(f"model {args.model} on {model.device}, {model.dtype}, torch threads {torch.get_num_threads()}",
              flush=True)
        warm = PromptCache(model, tokenizer, progress=False, prefix_cache=False)
        warm.generate("Warm-up request.", max_new_tokens=2)
        if "chat" not in skip:
            print(f"\n(a) chat, {args.turns} turns", flush=True)
            rows += chat_part(model, tokenizer, args)
        if "doc" not in skip:
            print(f"\n(b) document QA, {args.questions} questions", flush=True)
            rows += doc_part(model, tokenizer, args)
    if "tree" not in skip:
        tree_part(args)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if rows:
        from benchmarks.common import write_csv

        out = Path(args.out).with_suffix(".csv")
        write_csv(rows, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

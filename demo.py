#!/usr/bin/env python
"""Prompt Cache demo: the same answer, with and without module caches, and how long each takes.

    python demo.py                      # default model, persona example, cache on
    python demo.py --compare            # both modes, both answers, the TTFT speedup, and why they differ
    python demo.py --compare --recompute full   # the remedy: cached tokens recomputed in the prompt's context
    python demo.py --no-use-cache       # the baseline: full prefill of the same tokens
    python demo.py --threads 0          # torch's own thread count (default 1: cannot stall)
    python demo.py --schema examples/code_generation_game.xml \
                   --prompt examples/code_generation_game.prompt.xml --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SCHEMA = HERE / "examples" / "persona.xml"
DEFAULT_PROMPT = HERE / "examples" / "persona.prompt.xml"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth showing (not None, not off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, []) or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from promptcache.loading import DEFAULT_THREADS, THREADS_HELP  # light: no torch

    p = argparse.ArgumentParser(
        description="Run one PML prompt against its schema with Prompt Cache (module KV caches encoded "
                    "once, spliced per request) and print the answer and the time to first token. "
                    "Progress goes to stderr; the answers and measurements to stdout.",
        formatter_class=_HelpFormatter)
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="PML schema file")
    p.add_argument("--prompt", default=str(DEFAULT_PROMPT),
                   help="PML prompt: a file, or inline PML text starting with '<prompt'")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled default), 'gemma3-270m', a local folder or a Hugging Face id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=non_negative_int, default=DEFAULT_THREADS, metavar="N", help=THREADS_HELP)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compile", action="store_true",
                   help="compiled cached prefill and decode over a static KV buffer; compiles once "
                        "(warm-up, reported) before the first answer (docs/fastpath.md)")
    p.add_argument("--use-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="splice module caches (on) or run the full-prefill baseline (off)")
    p.add_argument("--compare", action="store_true",
                   help="run both modes; print the speedup, the first-token KL between them and why "
                        "the cached answer can differ (with --recompute, the cached mode recomputes)")
    p.add_argument("--encoding", choices=["scaffold", "independent"], default="scaffold",
                   help="how module caches are encoded (see docs/engine.md)")
    p.add_argument("--placement", choices=["device", "host"], default="device",
                   help="where module caches live between requests")
    p.add_argument("--recompute", default="none",
                   help="selective recompute policy: none, boundary:K, deviation:R, full")
    p.add_argument("--store", default=None,
                   help="persistent module-cache store: a directory or redis://host:port/db")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut (with --temperature)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same sample)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true",
                   help="no streaming; the last line of stdout is one JSON object with the measurements")
    return p.parse_args(argv)


def _result_json(res, encode_ms: float, store_stats: dict | None) -> dict:
    out = {"use_cache": res.use_cache, "ttft_ms": round(res.ttft_s * 1000, 3),
           "encode_ms": round(encode_ms, 3), "prompt_tokens": res.prompt_tokens,
           "cached_tokens": res.cached_tokens, "computed_tokens": res.computed_tokens,
           "recomputed_tokens": res.recomputed_tokens, "new_tokens": len(res.token_ids),
           "total_ms": round(res.total_s * 1000, 3), "text": res.text}
    if store_stats is not None:
        out.update(store_stats)
    return out


class Progress:
    """One-line status messages on stderr with the seconds since start, so no phase is silent."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {message}", file=sys.stderr, flush=True)


def _mode_message(use_cache: bool, max_new_tokens: int) -> str:
    how = ("with cache: splicing module caches, prefill of the new text" if use_cache
           else "without cache (baseline): full prefill of the whole prompt")
    return f"{how}, then up to {max_new_tokens} generated tokens..."


def compare_line(pc, prompt, cached, baseline, recompute: str) -> tuple[str, dict]:
    """The ``--compare`` explanation (one line) and its JSON fields: what differs and why.

    Why: the default persona prompt selects non-scaffold union members, so its cached answer is
    the Prompt Cache approximation; saying only "answers identical: False" left that unexplained.
    """
    from eval.numbers import first_token_kl
    from promptcache.explain import explain_prompt

    approx = explain_prompt(pc, prompt)
    kl = None
    if cached.first_token_logits is not None and baseline.first_token_logits is not None:
        kl = first_token_kl(baseline.first_token_logits, cached.first_token_logits)
    line = f"why: {approx.summary()}"
    if kl is not None:
        line += f"; first-token KL(baseline || cached) = {kl:.3g} nats"
    left = (f" (the {approx.gap_positions} unused positions remain)" if approx.gap_positions else "")
    if recompute != "none":
        line += f"; --recompute {recompute} recomputed {cached.recomputed_tokens} cached tokens"
        line += left if recompute == "full" else ""
    elif not approx.exact:
        line += ("; remedy: --recompute full recomputes every cached token in the prompt's own "
                 f"context{left}; boundary:K, deviation:R or auto:B (a TTFT budget) are cheaper and partial")
    fields = {"first_token_kl": kl, "why": line[len("why: "):], "recompute": recompute,
              "approximation": approx.as_dict()}
    return line, fields


def main(argv: list[str] | None = None, *, model=None, tokenizer=None) -> int:
    """Run the demo; ``model``/``tokenizer`` replace ``--model`` (tests pass a tiny model)."""
    args = parse_args(argv)
    from promptcache import ModelLoadError, PMLError, PromptCache, load_model
    from promptcache.loading import check_device, set_threads
    from promptcache.pml.parser import load_schema

    prompt: str | Path = args.prompt
    if not args.prompt.lstrip().startswith("<"):
        prompt = Path(args.prompt)  # passed as a path so that errors name the file
        if not prompt.is_file():
            print(f"error: prompt file {prompt} does not exist", file=sys.stderr)
            return 2
    if args.store is not None and not args.store.strip():  # "" would mean a store in the current folder
        print("error: --store is empty: give a directory or redis://host:port/db", file=sys.stderr)
        return 2
    progress = Progress()
    try:
        set_threads(args.threads)
        device = check_device(args.device)  # a missing CUDA is one line, before any loading
        schema = load_schema(args.schema)   # PML errors of the schema before the model loads
        if model is None:
            progress(f"loading model {args.model} on {device}...")
            t0 = time.perf_counter()
            model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
            print(f"model {args.model} on {model.device} ({model.dtype}) loaded in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        kwargs = {"encoding": args.encoding, "placement": args.placement, "recompute": args.recompute}
        if args.store:
            kwargs["store"] = args.store
        if args.compile:
            kwargs["compile"] = True
        pc = PromptCache(model, tokenizer, **kwargs)
        pc.check_prompt(prompt, schema)  # a prompt that does not fit fails now, not after encoding
        progress(f"encoding schema {schema.name!r} (every cacheable module, once)...")
        report = pc.add_schema(schema)
        print(f"schema {report.schema!r}: {report.stored_tokens} tokens cached in {report.segments} "
              f"segments, encoded in {report.encode_s * 1000:.0f} ms", flush=True)
        if args.compile:
            progress("compiling the fast path (first run compiles; later runs load the inductor cache)...")
            print(pc.warmup(prompts=[prompt], max_new_tokens=args.max_new_tokens), flush=True)
        modes = [True, False] if args.compare else [args.use_cache]
        results = {}
        for use_cache in modes:
            label = "with cache" if use_cache else "without cache (baseline)"
            print(f"\n--- {label} ---", flush=True)
            progress(_mode_message(use_cache, args.max_new_tokens))
            stream = None if args.no_stream or args.json else (lambda s: print(s, end="", flush=True))
            res = pc.generate(prompt, max_new_tokens=args.max_new_tokens, use_cache=use_cache,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, stop=args.stop,
                              seed=args.seed, stream=stream, recompute=args.recompute)
            if stream is None:
                print(res.text)
            else:
                print()
            progress(f"{label}: first token after {res.ttft_s * 1000:.0f} ms, "
                     f"{len(res.token_ids)} tokens in {res.total_s:.1f} s")
            print(f"TTFT {res.ttft_s * 1000:.1f} ms | prompt {res.prompt_tokens} tokens, "
                  f"{res.cached_tokens} from cache, {res.computed_tokens} computed"
                  + (f", {res.recomputed_tokens} recomputed" if res.recomputed_tokens else ""), flush=True)
            results[use_cache] = res
    except PMLError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ModelLoadError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    encode_ms = getattr(report, "encode_s", 0.0) * 1000
    store_stats = getattr(pc, "store_report", lambda: None)()
    if args.compare:
        speedup = results[False].ttft_s / results[True].ttft_s
        same = results[True].token_ids == results[False].token_ids
        print(f"\nspeedup: {speedup:.1f}x  (answers identical: {same})")
        line, fields = compare_line(pc, prompt, results[True], results[False], args.recompute)
        print(line, flush=True)
        if args.json:
            print(json.dumps({"cached": _result_json(results[True], encode_ms, store_stats),
                              "baseline": _result_json(results[False], encode_ms, store_stats),
                              "speedup": round(speedup, 3), "identical": same, **fields,
                              "threads": _torch_threads()}))
    elif args.json:
        print(json.dumps({**_result_json(results[args.use_cache], encode_ms, store_stats),
                          "threads": _torch_threads()}))
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())

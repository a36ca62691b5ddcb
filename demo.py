#!/usr/bin/env python
"""Prompt Cache demo: the same answer, with and without module caches, and how long each takes.

    python demo.py                      # default model, persona example, cache on
    python demo.py --compare            # both modes, both answers, the TTFT speedup
    python demo.py --no-use-cache       # the baseline: full prefill of the same tokens
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run one PML prompt against its schema with Prompt Cache (module KV caches encoded "
                    "once, spliced per request) and print the answer and the time to first token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="PML schema file")
    p.add_argument("--prompt", default=str(DEFAULT_PROMPT),
                   help="PML prompt: a file, or inline PML text starting with '<prompt'")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled default), 'gemma3-270m', a local folder or a Hugging Face id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--use-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="splice module caches (on) or run the full-prefill baseline (off)")
    p.add_argument("--compare", action="store_true", help="run both modes and print the speedup")
    p.add_argument("--encoding", choices=["scaffold", "independent"], default="scaffold",
                   help="how module caches are encoded (see docs/engine.md)")
    p.add_argument("--placement", choices=["device", "host"], default="device",
                   help="where module caches live between requests")
    p.add_argument("--recompute", default="none",
                   help="selective recompute policy: none, boundary:K, deviation:R, full")
    p.add_argument("--store", default=None,
                   help="persistent module-cache store: a directory or redis://host:port/db")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same sample)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true",
                   help="make the last line of output one JSON object with the measurements")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from promptcache import ModelLoadError, PMLError, PromptCache, load_model

    prompt: str | Path = args.prompt
    if not args.prompt.lstrip().startswith("<"):
        prompt = Path(args.prompt)  # passed as a path so that errors name the file
        if not prompt.is_file():
            print(f"error: prompt file {prompt} does not exist", file=sys.stderr)
            return 2
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        print(f"model {args.model} on {model.device} ({model.dtype}) loaded in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        kwargs = {"encoding": args.encoding, "placement": args.placement, "recompute": args.recompute}
        if args.store:
            kwargs["store"] = args.store
        pc = PromptCache(model, tokenizer, **kwargs)
        report = pc.add_schema(args.schema)
        print(f"schema {report.schema!r}: {report.stored_tokens} tokens cached in {report.segments} "
              f"segments, encoded in {report.encode_s * 1000:.0f} ms", flush=True)
        modes = [True, False] if args.compare else [args.use_cache]
        results = {}
        for use_cache in modes:
            label = "with cache" if use_cache else "without cache (baseline)"
            print(f"\n--- {label} ---", flush=True)
            stream = None if args.no_stream or args.json else (lambda s: print(s, end="", flush=True))
            res = pc.generate(prompt, max_new_tokens=args.max_new_tokens, use_cache=use_cache,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, stop=args.stop,
                              seed=args.seed, stream=stream)
            if stream is None:
                print(res.text)
            else:
                print()
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
        if args.json:
            print(json.dumps({"cached": _result_json(results[True], encode_ms, store_stats),
                              "baseline": _result_json(results[False], encode_ms, store_stats),
                              "speedup": round(speedup, 3), "identical": same}))
    elif args.json:
        print(json.dumps(_result_json(results[args.use_cache], encode_ms, store_stats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

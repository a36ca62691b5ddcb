#!/usr/bin/env python
"""Issue 17's engine-side measurements: cached TTFT of the persona case, fp32 eager vs bf16 eager
vs bf16 compiled, with and without prepacked linear weights (interleaved rounds, medians), and the
compiled path's warm-up time in a first and a second process (the inductor cache on disk).

    python benchmarks/fastpath.py --threads 1                  # TTFT table (warm-up in this process)
    python benchmarks/fastpath.py --threads 1 --warmup-processes  # + warm-up, fresh cache dir, 2 processes
    python benchmarks/fastpath.py --threads 1 --warmup-processes --no-ttft   # the warm-up only
    python benchmarks/fastpath.py --threads 1 --rounds 3 --profile            # + top ops per variant

The per-variant TTFT is ``generate(prompt, max_new_tokens=0).ttft_s``: parse, bind, splice,
suffix forward, logits. The compiled variant is warmed up first (reported apart, never inside a
TTFT); its ``compile_report()`` is printed so that a silent eager run would show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import persona_case, set_threads  # noqa: E402

#: name -> (dtype, compiled, prepacked linear weights). bf16-compiled is the fast path's default
#: (prepack on, q/k/v and gate/up packed as groups); the "-unpacked" variants show what prepacking
#: adds, "-ungrouped" what the groups add, "-wide" what attention over the written slots only adds,
#: "-unfolded" what runtime/attention.py adds (transformers' own SDPA: neither folded nor narrow),
#: "-onednn" what the AMX linear kernel adds (runtime/amx.py; oneDNN's packed linear instead), "-flash"
#: what the AMX attention kernel adds (runtime/amx_attention.py; torch's flash SDPA, folded, instead).
VARIANTS = {"fp32-eager": ("float32", False, False), "bf16-eager": ("bfloat16", False, False),
            "bf16-eager-packed": ("bfloat16", False, True),
            "bf16-compiled": ("bfloat16", True, True), "bf16-compiled-unpacked": ("bfloat16", True, False),
            "bf16-compiled-ungrouped": ("bfloat16", True, "ungrouped"),
            "bf16-compiled-unfolded": ("bfloat16", "unfolded", True),
            "bf16-compiled-ungrouped-unfolded": ("bfloat16", "unfolded", "ungrouped"),
            "bf16-compiled-wide": ("bfloat16", "wide", True),
            "bf16-compiled-onednn": ("bfloat16", True, "onednn"),
            "bf16-compiled-flash": ("bfloat16", "flash", True),
            "bf16-compiled-onednn-flash": ("bfloat16", "flash", "onednn"),  # the state before session 7
            "fp32-compiled": ("float32", True, False)}
DEFAULT_VARIANTS = ["fp32-eager", "bf16-eager", "bf16-compiled-unpacked", "bf16-compiled"]


def _engines(model_name: str, device: str | None, variants: list[str]) -> dict:
    """One engine per variant; variants of one dtype, prepacking and compiling share one model
    (prepacking switches the model's linears, compiling its norms and MLPs: runtime/fused.py)."""
    from promptcache.engine import PromptCache
    from promptcache.loading import load_model

    models, engines = {}, {}
    for name in variants:
        dtype, compiled, packed = VARIANTS[name]
        key = (dtype, packed, compiled)  # "ungrouped" and "unfolded" are models of their own
        if key not in models:
            models[key] = load_model(model_name, device=device, dtype=dtype)
        model, tok = models[key]
        if packed in ("ungrouped", "onednn"):  # packed before the engine, which then shares it
            from promptcache.runtime.prepack import PackedLinears
            PackedLinears.of(model, group=packed != "ungrouped", kernel="onednn" if packed == "onednn" else None)
        engines[name] = PromptCache(model, tok, progress=False, compile=bool(compiled), prepack=bool(packed))
        if compiled == "wide":  # attention over the whole buffer, as before narrow attention
            engines[name].fast.narrow_attention = False
        if compiled == "flash":  # torch's SDPA for the short blocks too, as before runtime/amx_attention.py
            from promptcache.runtime.attention import use_amx_attention
            engines[name].fast.amx_attention = use_amx_attention(model, on=False)
        if compiled == "unfolded":  # transformers' SDPA, as before runtime/attention.py
            from promptcache.runtime.attention import restore_sdpa
            restore_sdpa(model)
            engines[name].fast.folded_heads = engines[name].fast.narrow_attention = False
    return engines


def run_ttft(args: argparse.Namespace) -> dict:
    """Interleaved rounds over the variants; medians, ratios and first-token agreement."""
    engines = _engines(args.model, args.device, args.variants)
    tok = next(iter(engines.values())).tokenizer
    schema, prompt = persona_case(tok)
    warm = {}
    for name, pc in engines.items():
        pc.add_schema(schema)
        if pc.fast is not None:
            _, req = pc.request(prompt)
            warm[name] = pc.warmup(suffix_lengths=[1, len(req.computed_ids)],
                                   cache_lengths=[req.num_cached + len(req.computed_ids)])
            print(f"{name}: {warm[name]}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in engines}
    logits = {}
    for r in range(args.rounds + 1):  # round 0 is untimed
        for name, pc in engines.items():
            res = pc.generate(prompt, max_new_tokens=0)
            if r:
                times[name].append(res.ttft_s)
            logits[name] = res.first_token_logits
    ref_name = args.variants[0]
    rows, oracles = {}, {}
    for name, pc in engines.items():  # the same dtype's eager oracle: one forward, 4-D mask
        if pc.dtype not in oracles:
            oracles[pc.dtype] = pc.oracle_logits(prompt).float()
    for name in engines:
        med = statistics.median(times[name])
        diff = float((logits[name] - logits[ref_name]).abs().max())
        rows[name] = {"ttft_ms": med * 1000, "ratio": med / statistics.median(times[ref_name]),
                      "max_abs_logit_diff": diff,
                      "vs_own_dtype_oracle": float((logits[name].float() - oracles[engines[name].dtype]).abs().max()),
                      "top_token_same": int(logits[name].argmax()) == int(logits[ref_name].argmax())}
    if args.profile:
        from torch.profiler import profile

        for name, pc in engines.items():  # where a cached TTFT goes, per op (5 requests)
            with profile() as prof:
                for _ in range(5):
                    pc.generate(prompt, max_new_tokens=0)
            print(f"{name}: torch.profiler over 5 requests, top ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    if args.decode:
        for name, pc in engines.items():  # per-token decode time after the prefill (greedy)
            per = []
            for _ in range(3):
                res = pc.generate(prompt, max_new_tokens=args.decode)
                per.append((res.total_s - res.ttft_s) / max(1, len(res.token_ids) - 1))
            rows[name]["decode_ms_per_token"] = statistics.median(per) * 1000
    _, req = next(iter(engines.values())).request(prompt)
    out = {"case": f"persona, {req.num_cached} cached + {len(req.computed_ids)} computed tokens",
           "rounds": args.rounds, "threads": args.threads, "loadavg": os.getloadavg(), "rows": rows,
           "warmup_s": {n: w.total_s for n, w in warm.items()},
           "compile_report": {n: pc.compile_report() for n, pc in engines.items() if pc.fast is not None}}
    print(f"{out['case']}; medians of {args.rounds} interleaved rounds; load {out['loadavg']}")
    for name, row in rows.items():
        print(f"  {name:14s} {row['ttft_ms']:8.1f} ms  x{row['ratio']:.2f} of {ref_name}  "
              f"max|dlogit| {row['max_abs_logit_diff']:.3g}  top same: {row['top_token_same']}  "
              f"vs own-dtype oracle {row['vs_own_dtype_oracle']:.3g}"
              + (f"  decode {row['decode_ms_per_token']:.1f} ms/token" if args.decode else ""))
    for name, rep in out["compile_report"].items():
        print(f"  {name}: compiles {rep['compiles']}, recompiles {rep['recompiles']}, "
              f"fallbacks {rep['fallbacks']}, buckets {rep['buckets_used']}")
    return out


def run_warmup_only(args: argparse.Namespace) -> dict:
    """Load, encode and warm up the compiled bf16 engine; the process's timings as JSON."""
    t0 = time.perf_counter()
    pc = _engines(args.model, args.device, [args.variants[-1]])[args.variants[-1]]
    schema, prompt = persona_case(pc.tokenizer)
    pc.add_schema(schema)
    _, req = pc.request(prompt)
    t1 = time.perf_counter()
    report = pc.warmup(suffix_lengths=[1, len(req.computed_ids)],
                       cache_lengths=[req.num_cached + len(req.computed_ids)])
    res = pc.generate(prompt, max_new_tokens=0)
    out = {"setup_s": t1 - t0, "warmup_s": report.total_s, "buckets": report.buckets,
           "first_ttft_ms": res.ttft_s * 1000, "total_s": time.perf_counter() - t0,
           "inductor_cache_dir": pc.compile_report()["inductor_cache_dir"]}
    print(json.dumps(out))
    return out


def run_processes(args: argparse.Namespace) -> list[dict]:
    """The warm-up in two fresh processes sharing a new, empty inductor cache folder."""
    results = []
    with tempfile.TemporaryDirectory(prefix="pc-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for which in ("first", "second"):
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--warmup-only", "--model", args.model, "--variants", "bf16-compiled",
                   "--threads", str(args.threads or 0)] + (["--device", args.device] if args.device else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - t0
            results.append(row)
            print(f"{which} process: warm-up {row['warmup_s']:.1f} s ({row['buckets']}), "
                  f"whole process {row['process_s']:.1f} s, load {os.getloadavg()}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--variants", type=lambda s: s.split(","), default=DEFAULT_VARIANTS,
                   help=f"comma-separated from {', '.join(VARIANTS)}; the first is the reference "
                        f"(default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also time greedy decode of N tokens per variant (ms per token, median of 3)")
    p.add_argument("--profile", action="store_true", help="also print each variant's top ops (torch.profiler)")
    p.add_argument("--warmup-processes", action="store_true", help="also time warm-up in two fresh processes")
    p.add_argument("--no-ttft", action="store_true", help="skip the TTFT table (with --warmup-processes)")
    p.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.warmup_only:
        run_warmup_only(args)
        return 0
    out = {} if args.no_ttft else {"ttft": run_ttft(args)}
    if args.warmup_processes:
        out["warmup_processes"] = run_processes(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time to first token against prompt length, five ways side by side in ONE run.

(a) baseline: full prefill of the prompt's tokens;
(b) transformers prefix reuse: a DynamicCache of the document, computed once and deep-copied per
    request (what a user does without this toolkit), then the question's forward;
(c) promptcache, scaffold encoding; (d) promptcache, independent encoding;
(e) floor: the question's forward alone on an already-assembled cache (nothing else timed).

Each case is a cached document module of N tokens plus a ~30-token question in the same user turn,
and a persona-style case (six unions of three members, a ~1.1k-token prompt selecting a non-scaffold
member of each, a one-line question). Medians of --repeats runs;
prints a table of medians and ratios, writes CSV and a PNG plot.

    python benchmarks/ttft.py                                   # default model, CPU, float32
    python benchmarks/ttft.py --lengths 512,1024 --repeats 3
    python benchmarks/ttft.py --random-weights llama-7b --device cuda   # latency only, random weights
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import (ROOT, doc_case, persona_case, print_table, set_threads,  # noqa: E402
                               sync, write_csv)
from promptcache import PromptCache, load_model  # noqa: E402
RANDOM_CONFIGS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=16384),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=16384),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-weights", default=None,
                   help=f"a preset ({', '.join(RANDOM_CONFIGS)}) or a JSON file of LlamaConfig fields: random "
                        "weights of that shape with the --model tokenizer (latency does not depend on weights)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="document lengths in tokens")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--no-persona", action="store_true", help="skip the persona case")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--out", default=str(ROOT / "results" / "ttft"), help="output prefix for .csv/.png/.json")
    return p.parse_args(argv)


def build_model(args):
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = (RANDOM_CONFIGS[args.random_weights] if args.random_weights in RANDOM_CONFIGS
                  else json.loads(Path(args.random_weights).read_text()))
        config = LlamaConfig(vocab_size=len(tokenizer), **fields)
        dtype, device = model.dtype, model.device
        del model
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer


@torch.inference_mode()
def measure(pcs: dict[str, PromptCache], schema: str, prompt: str, repeats: int) -> dict:
    scaffold, independent = pcs["scaffold"], pcs["independent"]
    enc = {k: pc.add_schema(schema) for k, pc in pcs.items()}
    model, device = scaffold.model, scaffold.device
    name = enc["scaffold"].schema
    scaffold.generate(prompt, max_new_tokens=1)  # warm-up
    res = scaffold.generate(prompt, max_new_tokens=1)
    row = {"case": name, "prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens,
           "computed_tokens": res.computed_tokens,
           "encode_ms_scaffold": enc["scaffold"].encode_s * 1000,
           "encode_ms_independent": enc["independent"].encode_s * 1000}


    # (b) and (e) on the same tokens: prefix = everything before the computed suffix.
    state, request = scaffold.request(prompt)
    ids = scaffold.prompt_ids(state, request)
    n_suffix = len(request.computed_ids)
    prefix, suffix = ids[:-n_suffix], ids[-n_suffix:]
    from transformers import DynamicCache

    prefix_cache = DynamicCache()
    model(input_ids=torch.tensor([prefix], device=device), past_key_values=prefix_cache, use_cache=True,
          logits_to_keep=1)
    suffix_ids = torch.tensor([suffix], device=device)
    suffix_pos = torch.arange(len(prefix), len(ids), device=device)[None]
    mask = torch.ones(1, len(ids), dtype=torch.long, device=device)

    def prefix_reuse() -> float:
        sync(device)
        t0 = time.perf_counter()
        cache = copy.deepcopy(prefix_cache)
        model(input_ids=suffix_ids, position_ids=suffix_pos, attention_mask=mask, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        sync(device)
        return time.perf_counter() - t0

    layers = [(layer.keys, layer.values) for layer in prefix_cache.layers]

    def floor() -> float:
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=suffix_ids, position_ids=suffix_pos, attention_mask=mask, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        sync(device)
        return time.perf_counter() - t0

    # Interleaved: every repeat runs all five once, so machine noise hits them alike.
    timers = {"a_baseline_ms": lambda: scaffold.generate(prompt, 1, use_cache=False).ttft_s,
              "b_prefix_reuse_ms": prefix_reuse,
              "c_scaffold_ms": lambda: scaffold.generate(prompt, 1).ttft_s,
              "d_independent_ms": lambda: independent.generate(prompt, 1).ttft_s,
              "e_floor_ms": floor}
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for key, fn in timers.items():
            samples[key].append(fn() * 1000)
    row.update({k: statistics.median(v) for k, v in samples.items()})
    row["speedup_a_over_c"] = row["a_baseline_ms"] / row["c_scaffold_ms"]
    row["c_over_floor"] = row["c_scaffold_ms"] / row["e_floor_ms"]
    row["b_over_c"] = row["b_prefix_reuse_ms"] / row["c_scaffold_ms"]
    for pc in pcs.values():
        pc.remove_schema(name)
    return row


TTFT_COLUMNS = [("case", "case", "{}"), ("prompt", "prompt_tokens", "{}"), ("computed", "computed_tokens", "{}"),
                ("(a) base ms", "a_baseline_ms", "{:.1f}"), ("(b) prefix ms", "b_prefix_reuse_ms", "{:.1f}"),
                ("(c) scaffold ms", "c_scaffold_ms", "{:.1f}"), ("(d) indep ms", "d_independent_ms", "{:.1f}"),
                ("(e) floor ms", "e_floor_ms", "{:.1f}"), ("a/c", "speedup_a_over_c", "{:.1f}x"),
                ("c/e", "c_over_floor", "{:.2f}"), ("b/c", "b_over_c", "{:.2f}")]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [r for r in rows if r["case"].startswith("doc")]
    if not docs:  # only the persona case: nothing to plot against length
        return
    x = [r["prompt_tokens"] for r in docs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in [("a_baseline_ms", "(a) baseline prefill"), ("b_prefix_reuse_ms", "(b) DynamicCache copy"),
                       ("c_scaffold_ms", "(c) promptcache scaffold"), ("d_independent_ms", "(d) promptcache independent"),
                       ("e_floor_ms", "(e) floor: suffix forward")]:
        ax.plot(x, [r[key] for r in docs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_title("Time to first token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    model, tokenizer = build_model(args)
    pcs = {enc: PromptCache(model, tokenizer, encoding=enc, progress=False) for enc in ("scaffold", "independent")}
    print(f"model {args.model}{' (random weights: ' + args.random_weights + ')' if args.random_weights else ''} "
          f"on {model.device}, {model.dtype}, torch threads {torch.get_num_threads()}", flush=True)
    cases = [doc_case(tokenizer, int(n)) for n in args.lengths.split(",") if n]
    if not args.no_persona:
        cases.append(persona_case(tokenizer))
    rows = []
    for schema, prompt in cases:
        rows.append(measure(pcs, schema, prompt, args.repeats))
        r = rows[-1]
        print(f"  {r['case']}: a={r['a_baseline_ms']:.1f} c={r['c_scaffold_ms']:.1f} "
              f"e={r['e_floor_ms']:.1f} ms", flush=True)
    print()
    print_table(rows, TTFT_COLUMNS)
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.csv')} and (with document cases) {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

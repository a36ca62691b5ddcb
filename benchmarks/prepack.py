#!/usr/bin/env python
"""Issue 17's CPU forward measurements behind runtime/prepack.py and runtime/fused.py, side by side
in one process (bf16 bare model forwards, medians):

* eager forwards of 1 / 16 / 128 / N tokens with plain ``nn.Linear`` weights, with the weights
  prepacked for each oneDNN batch hint (the default hint is chosen from this table), and packed for
  the AMX kernel (runtime/amx.py; where this CPU has AMX);
* the memory one packed copy of the weights costs (RSS before and after packing);
* the model's linears alone (the packed kernel's calls, random inputs of 1 and 16 rows): each
  packed alone, and q/k/v and gate/up packed as one weight per group (``LINEAR_GROUPS``), with
  oneDNN's kernel and with AMX's, interleaved;
* the persona case's full prefill (``generate(use_cache=False)``) with the long eager forwards' norms
  and MLPs compiled or not, interleaved, and the largest first-token logit difference between them.

    OMP_NUM_THREADS=1 python benchmarks/prepack.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import persona_case, set_threads  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def _median_ms(fn, reps: int) -> float:
    fn()  # untimed
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def hints_table(model, sizes: list[int], hints: list[int], reps: int) -> dict:
    """ms per eager forward for each token count: plain weights, then each oneDNN batch hint, then AMX."""
    import torch

    from promptcache.runtime.prepack import PackedLinears

    ids = torch.randint(0, model.config.vocab_size, (1, max(sizes)))

    def forward(n: int):
        with torch.inference_mode():
            model(input_ids=ids[:, :n], logits_to_keep=1)

    rows = {"plain": {n: _median_ms(lambda: forward(n), reps) for n in sizes}}
    from promptcache.runtime.prepack import DEFAULT_BATCH_HINT, default_kernel

    packings = [(f"hint {hint}", hint, "onednn") for hint in hints]
    if default_kernel() == "amx":
        packings.append(("amx", DEFAULT_BATCH_HINT, "amx"))  # the hint is not used by the AMX kernel
    for name, hint, kernel in packings:
        before = _rss_mb()
        packed = PackedLinears(model, batch_hint=hint, kernel=kernel)
        rows[name] = {n: _median_ms(lambda: forward(n), reps) for n in sizes}
        rows[name]["rss_mb_added"] = _rss_mb() - before
        packed.remove()
    return rows


def grouped_linears(model, rows: list[int], rounds: int) -> dict:
    """ms for one pass over the model's linears (each weight once), separate vs grouped, with each
    packed kernel there is here (oneDNN's, AMX's), interleaved."""
    import torch

    from promptcache.runtime import prepack

    kernels = ["onednn"] + (["amx"] if prepack.default_kernel() == "amx" else [])
    variants: dict[str, list[tuple[int, object]]] = {}  # name -> (input width, packed weight) per call
    for kernel in kernels:
        seen: set[int] = set()
        grouped: list[tuple[int, object]] = []
        for members in prepack.linear_groups(model):
            seen.update(m.weight.data_ptr() for m in members)
            weight = torch.cat([m.weight.detach() for m in members])
            grouped.append((weight.shape[1], prepack._reorder(weight, prepack.DEFAULT_BATCH_HINT, kernel)))
        separate: list[tuple[int, object]] = []
        done: set[int] = set()
        for m in model.modules():
            if prepack._packable(m) and m.weight.data_ptr() not in done:
                done.add(m.weight.data_ptr())
                packed = prepack._reorder(m.weight, prepack.DEFAULT_BATCH_HINT, kernel)
                separate.append((m.in_features, packed))
                if m.weight.data_ptr() not in seen:
                    grouped.append((m.in_features, packed))
        variants[f"{kernel} separate"], variants[f"{kernel} grouped"] = separate, grouped
    out: dict = {"calls": {"separate": len(variants["onednn separate"]), "grouped": len(variants["onednn grouped"])}}
    for n in rows:
        xs = {w: torch.randn(n, w, dtype=torch.bfloat16) for w, _ in variants["onednn separate"]}

        def run(weights) -> float:
            t = time.perf_counter()
            for width, packed in weights:
                prepack._linear(xs[width], packed, None)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(rounds + 1):
            for name, weights in variants.items():
                dt = run(weights)
                if r:  # round 0 untimed
                    times[name].append(dt * 1000)
        out[n] = {name: statistics.median(v) for name, v in times.items()}
    return out


def fused_prefill(model_name: str, rounds: int) -> dict:
    """The persona full prefill, norms/MLPs compiled or not (interleaved), on a bf16 compiled engine."""
    from promptcache.engine import PromptCache
    from promptcache.loading import load_model
    from promptcache.runtime.fused import FusedLongForwards

    model, tok = load_model(model_name, dtype="bfloat16")
    pc = PromptCache(model, tok, progress=False, compile=True)
    schema, prompt = persona_case(tok)
    pc.add_schema(schema)
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    logits = {}
    for r in range(rounds + 1):  # round 0 untimed (the fused graphs compile there)
        for name in times:
            if name == "unfused":
                FusedLongForwards.of(model).remove()
            res = pc.generate(prompt, max_new_tokens=0, use_cache=False)
            FusedLongForwards.of(model)  # (back) on
            if r:
                times[name].append(res.ttft_s * 1000)
            logits[name] = res.first_token_logits.float()
    diff = float((logits["fused"] - logits["unfused"]).abs().max())
    same_top = int(logits["fused"].argmax()) == int(logits["unfused"].argmax())
    return {name: statistics.median(v) for name, v in times.items()} | {
        "max_abs_logit_diff": diff, "same_top_token": same_top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="1,16,128,1149", help="tokens per forward (comma list)")
    p.add_argument("--hints", default="1,16,128,1024", help="oneDNN batch hints to pack for (comma list)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the fused/unfused prefill")
    args = p.parse_args(argv)
    set_threads(args.threads)
    import os

    from promptcache.loading import load_model

    from promptcache.runtime.malloc import keep_freed_memory

    print(f"glibc malloc: {keep_freed_memory()}")  # as the fast path sets it; PROMPTCACHE_MALLOC=0: not
    sizes = [int(x) for x in args.sizes.split(",")]
    model, _ = load_model(args.model, dtype="bfloat16")
    model.eval()
    print(f"bf16 eager forwards, ms (median of {args.reps}); load {os.getloadavg()}")
    for name, row in hints_table(model, sizes, [int(x) for x in args.hints.split(",")], args.reps).items():
        cells = "  ".join(f"{n}: {row[n]:7.1f}" for n in sizes)
        extra = f"  (+{row['rss_mb_added']:.0f} MB RSS)" if "rss_mb_added" in row else ""
        print(f"  {name:9s} {cells}{extra}")
    lin = grouped_linears(model, [1, 16], max(args.rounds, 9))
    print(f"the model's linears alone, ms per pass (median of {max(args.rounds, 9)} interleaved rounds): "
          f"{lin['calls']['separate']} calls separate, {lin['calls']['grouped']} grouped; load {os.getloadavg()}")
    for n in (1, 16):
        print(f"  {n:3d} rows: " + "  ".join(f"{name} {ms:6.2f}" for name, ms in lin[n].items()))
    del model
    out = fused_prefill(args.model, args.rounds)
    print(f"persona full prefill (bf16 compiled engine, median of {args.rounds} interleaved rounds): "
          f"norms/MLPs compiled {out['fused']:.1f} ms, eager {out['unfused']:.1f} ms; first-token logits "
          f"differ by up to {out['max_abs_logit_diff']:.3g}, same top token: {out['same_top_token']}; "
          f"load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

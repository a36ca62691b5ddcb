#!/usr/bin/env python
"""LoRA adapters (issue 19, docs/lora.md): what they cost, side by side in ONE run, interleaved.

On SmolLM2-135M-Instruct with two seeded random rank-8 adapters on q/k/v/o (made in a temporary
folder; no download): ``generate`` (16 greedy tokens, prefix cache off) on the base model of an
engine without adapters, on the base model with two adapters loaded, and under an adapter; and
one decode step of three rows: no adapters loaded, all three under one adapter, base + a + b in
ONE mixed forward (PEFT ``adapter_names``), and the same grouped (one forward per adapter).
Prints the median of ``--repeats`` (each case in turn per repeat) in ms.

    python benchmarks/lora_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import set_threads  # noqa: E402
from promptcache import PromptCache, load_model  # noqa: E402
from promptcache.runtime.batch import DecodeBatch  # noqa: E402

PROMPT = "Summarise: the safety bicycle won because " * 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(folder: str, seed: int, r: int = 8) -> str:
    """A seeded random LoRA adapter (B non-zero) for SmolLM2, saved in ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(load_model("smollm2", device="cpu")[0], config).save_pretrained(folder)
    return folder


def generate_s(pc: PromptCache, adapter: str | None) -> float:
    t = time.perf_counter()
    pc.generate(PROMPT, max_new_tokens=16, adapter=adapter)
    return time.perf_counter() - t


@torch.inference_mode()
def step_s(pc: PromptCache, adapters: list, mixable: bool = True, steps: int = 8) -> float:
    """Median seconds of a decode step over one row per entry of ``adapters``."""
    lora = pc.runner.lora
    if not mixable:
        lora.mixable = lambda: False  # the grouped fallback (what DoRA adapters get)
    try:
        batch = DecodeBatch(pc.runner, max_rows=len(adapters))
        reqs = [pc.begin(PROMPT, adapter=a, insert_prefix=False) for a in adapters]
        inputs = [(batch.add(r.cache), int(r.logits.argmax()), r.next_pos) for r in reqs]
        times = []
        for k in range(steps):
            t = time.perf_counter()
            batch.step([(row, tok, pos + k) for row, tok, pos in inputs])
            times.append(time.perf_counter() - t)
        for r in reqs:
            r.abort()
        return statistics.median(times[2:])
    finally:
        if not mixable:
            del lora.mixable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    set_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="lora-bench-")
    folders = {name: make_adapter(os.path.join(tmp, name), seed) for name, seed in (("a", 1), ("b", 2))}
    plain = PromptCache(*load_model("smollm2", device="cpu"), progress=False, prefix_cache=False)
    lora = PromptCache(*load_model("smollm2", device="cpu"), progress=False, prefix_cache=False, adapters=folders)
    cases = {"generate 16, base, no adapters loaded": lambda: generate_s(plain, None),
             "generate 16, base, 2 adapters loaded": lambda: generate_s(lora, None),
             "generate 16, adapter a": lambda: generate_s(lora, "a"),
             "3-row step, no adapters loaded": lambda: step_s(plain, [None] * 3),
             "3-row step, all under a": lambda: step_s(lora, ["a"] * 3),
             "3-row step, base+a+b, one mixed forward": lambda: step_s(lora, [None, "a", "b"]),
             "3-row step, base+a+b, grouped (3 forwards)": lambda: step_s(lora, [None, "a", "b"], False)}
    results: dict[str, list[float]] = {k: [] for k in cases}
    generate_s(plain, None)  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            results[name].append(fn())
    print(f"load average: {os.getloadavg()}")
    for name, values in results.items():
        print(f"{name:44s} median {statistics.median(values) * 1000:8.1f} ms   "
              f"({', '.join(f'{v * 1000:.0f}' for v in values)})")


if __name__ == "__main__":
    main()

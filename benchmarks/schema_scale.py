"""How ``add_schema`` scales with the number of modules (issue 12, item 13).

A generated schema of N small root-level modules (``<module name="mK">text</module>``, ~5 tokens
each with the tiny character tokenizer) is added to a 2-layer tiny Llama on CPU; the script prints
the time of the planning steps (encoding contexts, content keys, forwards needed) and of the whole
``add_schema``, and the peak RSS. ``--profile`` prints the top cProfile entries of one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/schema_scale.py --modules 1000 2000 5000
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))  # the tiny models and tokenizer of the test suite

from promptcache.engine import PromptCache  # noqa: E402
from promptcache.modules.keys import module_keys  # noqa: E402
from promptcache.plan import encode_groups, encoding_contexts, forwards_needed, stored_segments  # noqa: E402
from promptcache.pml.layout import build_layout  # noqa: E402
from promptcache.pml.parser import parse_schema  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402


def make_schema(n: int, policy_unions: bool = False) -> str:
    """``n`` root-level modules of a few characters each (every 10th pair in a union with --unions)."""
    parts = ['<schema name="big">']
    k = 0
    while k < n:
        if policy_unions and k + 1 < n and k % 10 == 0:
            parts.append(f'<union><module name="m{k}">t{k % 97}</module><module name="m{k + 1}">u{k % 89}'
                         "</module></union>")
            k += 2
        else:
            parts.append(f'<module name="m{k}">t{k % 97}</module>')
            k += 1
    parts.append("</schema>")
    return "\n".join(parts)


def steps(pc: PromptCache, text: str) -> dict[str, float]:
    """Seconds of each planning step, then of a full ``add_schema``."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    layout = build_layout(parse_schema(text), pc.renderer)
    out["layout_s"] = time.perf_counter() - t
    t = time.perf_counter()
    contexts = encoding_contexts(layout, pc.encoding)
    out["contexts_s"] = time.perf_counter() - t
    keep = stored_segments(layout)
    t = time.perf_counter()
    module_keys(layout, contexts, keep, model="m", dtype="float32", policy=pc.encoding, relative=True,
                offset_sensitive=False)
    out["keys_s"] = time.perf_counter() - t
    t = time.perf_counter()
    forwards_needed(encode_groups(contexts), lambda i: False, keep)
    out["forwards_needed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pc.add_schema(text)
    out["add_schema_s"] = time.perf_counter() - t
    out["tokens"] = layout.length
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", type=int, nargs="+", default=[1000, 2000, 5000])
    ap.add_argument("--encoding", default="scaffold", choices=["scaffold", "independent"])
    ap.add_argument("--unions", action="store_true", help="every 10th pair of modules is a union")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model("llama", max_position_embeddings=1 << 20)
    for n in args.modules:
        pc = PromptCache(model, tiny_tokenizer(), encoding=args.encoding, progress=False)
        text = make_schema(n, args.unions)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        res = steps(pc, text)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"modules={n} tokens={res['tokens']} " + " ".join(
            f"{k}={v:.2f}" for k, v in res.items() if k.endswith("_s")) + f" peak_rss_mb={rss:.0f}",
            flush=True)


if __name__ == "__main__":
    main()

"""Prompt parsing cost against the number of attributes on one element (issue 12, item 11).

lxml's ``attrib.items()`` looks every value up by name, so reading N attributes took O(N^2); the
parser now reads them through XPath and refuses more than ``MAX_ATTRIBUTES`` per element before
reading any. Prints, for each N, the time to refuse (default limits) and to parse with the limit
lifted. Run it against another checkout with ``PYTHONPATH=<checkout>`` to compare (a checkout
without ``promptcache.pml.limits`` has no limit: only the parse column is measured there).

    python benchmarks/pml_parse.py --attributes 1000 10000 50000
"""

from __future__ import annotations

import argparse
import time


def prompt_with_attributes(n: int) -> str:
    attrs = " ".join(f'a{i}="v"' for i in range(n))
    return f'<prompt schema="s"><m {attrs}/> question</prompt>'


def timed_parse(text: str) -> tuple[float, str]:
    """Seconds to parse ``text`` and the outcome ("parsed" or the error type)."""
    from promptcache.pml.errors import PMLError
    from promptcache.pml.parser import parse_prompt

    t0 = time.perf_counter()
    try:
        parse_prompt(text)
        outcome = "parsed"
    except PMLError as err:
        outcome = type(err).__name__
    return time.perf_counter() - t0, outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attributes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = p.parse_args(argv)
    try:
        from promptcache.pml import limits
    except ImportError:
        limits = None
    print(f"{'attributes':>10}  {'default limits':>22}  {'limit lifted':>22}")
    for n in args.attributes:
        text = prompt_with_attributes(n)
        default = ""
        if limits is not None:
            s, outcome = timed_parse(text)
            default = f"{s:.3f} s {outcome}"
            saved = limits.MAX_ATTRIBUTES
            limits.MAX_ATTRIBUTES = n + 1
        try:
            s, outcome = timed_parse(text)
        finally:
            if limits is not None:
                limits.MAX_ATTRIBUTES = saved
        print(f"{n:>10}  {default:>22}  {f'{s:.3f} s {outcome}':>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

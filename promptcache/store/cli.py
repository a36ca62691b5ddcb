"""``promptcache store ls|stats|verify|rm|gc --store URL``: inspect and maintain a cache store.

Everything goes through the :class:`CacheStore` interface, so each command works on every
backend. Exit codes: 0 success, 2 failure (bad entries found by ``verify``, unknown key,
unreachable store, bad arguments, or any change ``rm``/``gc`` could not make, e.g. on a read-only
store). A failure is one ``error: ...`` line on stderr; store warnings are one ``warning: ...``
line each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from typing import Callable, Sequence

from . import open_store
from .base import CacheStore, EntryInfo, StoreError

ENV_STORE = "PROMPTCACHE_STORE"
OK, FAIL = 0, 2
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([A-Z]*)$")
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2,
          "MIB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3, "GIB": 1024 ** 3, "T": 1024 ** 4,
          "TB": 1024 ** 4, "TIB": 1024 ** 4}


def add_store_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``store`` and its sub-commands; each sets ``func(args) -> exit code``."""
    store = subparsers.add_parser("store", help="inspect and maintain a module-cache store",
                                  description="Inspect and maintain a module-cache store: "
                                              "promptcache store ls|stats|verify|rm|gc --store URL.")
    sub = store.add_subparsers(dest="store_command", metavar="COMMAND")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=os.environ.get(ENV_STORE),
                        help=f"store URL or directory (default: ${ENV_STORE}); "
                             "memory://, DIR, file:///DIR, redis://host:port/db")

    p = sub.add_parser("ls", parents=[common], help="list entries (most recently used first)")
    p.add_argument("--sort", choices=("used", "created", "size", "tokens"), default="used")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_wrap(cmd_ls))

    p = sub.add_parser("stats", parents=[common], help="entry count, bytes and backend details")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_wrap(cmd_stats))

    p = sub.add_parser("verify", parents=[common],
                       help="load and checksum every entry; exit 2 if any is bad (read only)")
    p.set_defaults(func=_wrap(cmd_verify))

    p = sub.add_parser("rm", parents=[common], help="delete entries by key (or unique key prefix)")
    p.add_argument("keys", nargs="*", metavar="KEY")
    p.add_argument("--all", action="store_true", help="delete every entry")
    p.set_defaults(func=_wrap(cmd_rm))

    p = sub.add_parser("gc", parents=[common],
                       help="remove bad entries and crashed-writer leftovers; evict LRU entries "
                            "until under --max-bytes")
    p.add_argument("--max-bytes", type=parse_bytes, default=None,
                   help="size budget for entry payloads, e.g. 20G, 512M")
    p.add_argument("--leftover-age", type=float, default=3600.0, metavar="SECONDS",
                   help="age after which temp/orphan data of crashed writers is removed")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.set_defaults(func=_wrap(cmd_gc))
    return store


def _wrap(fn: Callable[[CacheStore, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Open the store, run ``fn``; misuse, I/O failure and any store error counted while ``fn``
    ran (a delete that failed on a read-only store...) become one ``error:`` line and exit 2."""
    def run(args: argparse.Namespace) -> int:
        if not args.store:
            print(f"error: no store given (use --store URL or set ${ENV_STORE})", file=sys.stderr)
            return FAIL
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = _run_on_store(fn, args)
        if rc == OK:  # on failure the error line already says what went wrong
            for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
                print(f"warning: {message}", file=sys.stderr)
        return rc
    return run


def _run_on_store(fn: Callable[[CacheStore, argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Open the store and run ``fn``; exit 2 with one line if it failed or an error was counted."""
    try:
        with open_store(args.store, create=False) as store:
            if not store.ping():
                print(f"error: store {store.url} is unreachable", file=sys.stderr)
                return FAIL
            before = store.counters.get("errors", 0)
            rc = fn(store, args)
            failed = store.counters.get("errors", 0) - before
            if failed and rc == OK:
                print(f"error: {args.store_command}: {failed} operation{'s' if failed > 1 else ''} "
                      f"failed on {store.url} (read-only?); last: {store.last_error}", file=sys.stderr)
                return FAIL
            return rc
    except (StoreError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAIL


def cmd_ls(store: CacheStore, args: argparse.Namespace) -> int:
    infos = store.list()
    order = {"used": lambda i: -i.last_access, "created": lambda i: -i.created,
             "size": lambda i: -i.nbytes, "tokens": lambda i: -i.seq_len}[args.sort]
    infos.sort(key=order)
    if args.json:
        print(json.dumps([_info_dict(i) for i in infos], indent=1))
        return OK
    rows = [(i.key[:16], str(i.n_layers), str(i.seq_len), i.dtype or "?", format_bytes(i.nbytes),
             _ago(i.last_access), _describe(i)) for i in infos]
    print(format_table(("KEY", "LAYERS", "TOKENS", "DTYPE", "SIZE", "LAST USED", "MODULE"), rows))
    print(f"{len(infos)} entries, {format_bytes(sum(i.nbytes for i in infos))}")
    return OK


def cmd_stats(store: CacheStore, args: argparse.Namespace) -> int:
    st = store.stats()
    if args.json:
        print(json.dumps(st, indent=1))
        return OK
    for k in ("hits", "misses", "puts", "bad", "errors"):
        st.pop(k, None)  # per-process counters: meaningless for a fresh CLI process
    print(format_table(("FIELD", "VALUE"),
                       [(k, format_bytes(v) if "bytes" in k and isinstance(v, int) else str(v))
                        for k, v in st.items()]))
    return OK


def cmd_verify(store: CacheStore, args: argparse.Namespace) -> int:
    n = len(store.list())
    bad = store.verify(remove=False)
    if bad:
        print(format_table(("KEY", "PROBLEM"), [(b.key, b.reason) for b in bad]))
    print(f"{n} entries checked, {len(bad)} bad" + (" (run `promptcache store gc` to remove)" if bad else ""))
    return FAIL if bad else OK


def cmd_rm(store: CacheStore, args: argparse.Namespace) -> int:
    if args.all == bool(args.keys):
        print("error: give KEY... or --all (not both)", file=sys.stderr)
        return FAIL
    known = [i.key for i in store.list()]
    if args.all:
        targets = known
    else:
        targets = []
        for want in args.keys:
            match = [k for k in known if k == want] or [k for k in known if k.startswith(want)]
            if len(match) != 1 or (len(want) < 6 and match[0] != want):
                why = "ambiguous" if len(match) > 1 else ("too short a prefix" if match else "not found")
                print(f"error: key {want!r}: {why}", file=sys.stderr)
                return FAIL
            targets.append(match[0])
    removed = sum(store.delete(k) for k in targets)
    print(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")
    return OK


def cmd_gc(store: CacheStore, args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bad entries are listed below instead
        bad = store.verify(remove=not args.dry_run)
    for b in bad:
        verb = ("would remove" if args.dry_run else
                "could not remove" if store.contains(b.key) and store.counters["errors"] else "removed")
        print(f"{verb} bad entry {b.key}: {b.reason}")
    swept = 0 if args.dry_run else store.sweep(max_age_s=args.leftover_age)
    evicted, freed = [], 0
    if args.max_bytes is not None:
        bad_keys = {b.key for b in bad}
        infos = sorted((i for i in store.list() if i.key not in bad_keys), key=lambda i: i.last_access)
        total = sum(i.nbytes for i in infos)
        for info in infos:
            if total <= args.max_bytes:
                break
            if args.dry_run or store.delete(info.key):
                evicted.append(info)
                freed += info.nbytes
            total -= info.nbytes
    verb = "would evict" if args.dry_run else "evicted"
    for info in evicted:
        print(f"{verb} {info.key[:16]} ({format_bytes(info.nbytes)}, last used {_ago(info.last_access)})")
    print(f"{len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'}, {swept} leftovers removed, "
          f"{len(evicted)} evicted ({format_bytes(freed)})")
    return OK


# -- formatting helpers ----------------------------------------------------------------------

def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912; plain numbers are bytes; binary (1024-based) units.

    Only non-negative finite sizes: ``-5``, ``inf`` and ``nan`` are refused (argparse: exit 2).
    """
    m = _SIZE_RE.match(text.strip().upper().replace(" ", ""))
    if m is None or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a non-negative number of bytes "
                                         "with an optional unit, e.g. 512M, 20G)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (too large)")
    return int(value)


def _ago(t: float) -> str:
    d = max(0.0, time.time() - t)
    for unit, sec in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= sec:
            return f"{d / sec:.0f}{unit} ago"
    return f"{d:.0f}s ago"


def _describe(info: EntryInfo) -> str:
    for field in ("module", "name", "description"):
        v = info.meta.get(field)
        if v:
            s = str(v)
            return s if len(s) <= 40 else s[:37] + "..."
    return ""


def _info_dict(i: EntryInfo) -> dict:
    return {"key": i.key, "nbytes": i.nbytes, "n_layers": i.n_layers, "seq_len": i.seq_len,
            "dtype": i.dtype, "created": i.created, "last_access": i.last_access,
            "module": _describe(i)}


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m promptcache.store.cli store ls ...``) until the lead wires
    :func:`add_store_subcommands` into ``promptcache.cli``."""
    parser = argparse.ArgumentParser(prog="promptcache")
    add_store_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

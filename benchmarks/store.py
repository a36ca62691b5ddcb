#!/usr/bin/env python
"""Recompute a module, or load it from a store? Side by side in ONE run, through the engine.

For a document module of N tokens (the ttft benchmark's schema: one cached document in a user
turn) and the default model, each column is what ``PromptCache.add_schema`` spends to make the
schema's module caches available:

* ``encode``: a PromptCache without a store encodes them (``EncodeReport.encode_s``: the forwards);
* ``dir``: a fresh PromptCache on a directory store loads them (``EncodeReport.load_s``: read,
  verify every byte's checksum, hand over the tensors), files in the page cache (as on a machine
  that wrote or recently read them); ``dir cold``: the same after dropping the files' pages
  (``posix_fadvise``), so they come from disk. ``dir`` is the default, safe load (``pread``:
  the tensors are copied into the process's own memory, so no later change of the file can alter
  them); ``dir mmap`` the same files opened with the opt-in ``?load=mmap`` (no copy; the tensors
  keep reading the file's pages), and ``pread/mmap`` what the safe default costs;
* ``redis``: the same from a throw-away local redis-server (loopback, no persistence), skipped
  with a message when ``redis-server`` is not installed.

Every load is checked: zero encoding forwards, and the first-token logits of a request equal
(bit for bit) those of the engine that encoded the module. Writes (``put`` of every entry) are
timed too. Medians of ``--repeats`` loads; the encode is timed ``--encode-repeats`` times.

    python benchmarks/store.py                       # 512..8192 tokens, default model, CPU
    python benchmarks/store.py --lengths 512,2048 --repeats 3 --threads 1
    python benchmarks/store.py --lengths 512,2048 --repeats 5 --threads 1 --no-redis   # pread vs mmap
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ROOT, doc_case, print_table, set_threads, write_csv  # noqa: E402
from benchmarks.store_io import close_all, drop_page_cache, start_redis  # noqa: E402
from promptcache import PromptCache, load_model  # noqa: E402
from promptcache.store import CacheEntry, open_store  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192", help="module lengths in tokens")
    p.add_argument("--repeats", type=int, default=5, help="loads per store (median reported)")
    p.add_argument("--encode-repeats", type=int, default=1, help="encodes per length (median reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--redis", default=None, help="a Redis URL instead of a throw-away local redis-server")
    p.add_argument("--no-redis", action="store_true", help="directory stores only")
    p.add_argument("--out", default=str(ROOT / "results" / "store"), help="output prefix for .csv/.json")
    return p.parse_args(argv)


def module_entries(pc: PromptCache) -> list[tuple[str, CacheEntry]]:
    """The engine's held module caches as store entries (key, tensors, meta), to fill other stores."""
    return [(r.key.store_key, CacheEntry(r.kv, dict(r.meta)))
            for r in pc.module_cache.residents()]


def load_once(model, tokenizer, store, schema: str, prompt: str, expected: torch.Tensor,
              cold_files: list[Path] | None = None) -> float:
    if cold_files:
        for f in cold_files:
            drop_page_cache(f)
    pc = PromptCache(model, tokenizer, progress=False, store=store)
    rep = pc.add_schema(schema)
    assert rep.forwards == 0 and rep.store_hits == rep.segments, f"not a pure load: {rep}"
    assert torch.equal(pc.next_token_logits(prompt), expected), "loaded module gives other logits"
    return rep.load_s


def measure(model, tokenizer, n: int, args, stores: dict) -> dict:
    schema, prompt = doc_case(tokenizer, n)
    encodes, pc = [], None
    for _ in range(args.encode_repeats):
        pc = PromptCache(model, tokenizer, progress=False)
        rep = pc.add_schema(schema)
        encodes.append(rep.encode_s)
    expected = pc.next_token_logits(prompt)
    entries = module_entries(pc)
    row = {"tokens": n, "stored_tokens": rep.stored_tokens, "mb": rep.bytes / 1e6,
           "encode_ms": statistics.median(encodes) * 1000}
    for name, store in stores.items():
        t0 = time.perf_counter()
        for key, entry in entries:
            assert store.put(key, entry), f"{name}: put failed"
        row[f"{name}_write_ms"] = (time.perf_counter() - t0) * 1000
        row[f"{name}_ms"] = statistics.median(
            load_once(model, tokenizer, store, schema, prompt, expected) for _ in range(args.repeats)) * 1000
        if name == "dir":
            files = [store.entry_path(key) for key, _ in entries]
            row["dir_cold_ms"] = statistics.median(
                load_once(model, tokenizer, store, schema, prompt, expected, files)
                for _ in range(args.repeats)) * 1000
        for key, _ in entries:
            store.delete(key)
    row["encode_over_dir"] = row["encode_ms"] / row["dir_ms"]
    if "dir_mmap_ms" in row:
        row["pread_over_mmap"] = row["dir_ms"] / row["dir_mmap_ms"]
    row["encode_over_dir_cold"] = row["encode_ms"] / row["dir_cold_ms"]
    if "redis_ms" in row:
        row["encode_over_redis"] = row["encode_ms"] / row["redis_ms"]
        row["redis_over_dir"] = row["redis_ms"] / row["dir_ms"]
    return row


COLUMNS = [("tokens", "tokens", "{}"), ("MB", "mb", "{:.0f}"), ("encode ms", "encode_ms", "{:.0f}"),
           ("dir ms", "dir_ms", "{:.1f}"), ("dir mmap ms", "dir_mmap_ms", "{:.1f}"),
           ("pread/mmap", "pread_over_mmap", "{:.2f}"), ("dir cold ms", "dir_cold_ms", "{:.1f}"),
           ("redis ms", "redis_ms", "{:.1f}"), ("encode/dir", "encode_over_dir", "{:.0f}x"),
           ("encode/dir cold", "encode_over_dir_cold", "{:.0f}x"), ("encode/redis", "encode_over_redis", "{:.0f}x"),
           ("redis/dir", "redis_over_dir", "{:.2f}"), ("dir write ms", "dir_write_ms", "{:.0f}"),
           ("redis write ms", "redis_write_ms", "{:.0f}")]


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="pc-store-bench-"))
    server = None
    stores = {"dir": open_store(str(tmp / "dir")),  # the default load: pread (own memory)
              "dir_mmap": open_store(f"file://{tmp / 'dir_mmap'}?load=mmap")}
    assert stores["dir"].load == "pread" and stores["dir_mmap"].load == "mmap"
    redis_url = args.redis
    if args.no_redis:
        pass
    elif redis_url is None:
        server = start_redis(tmp)
        redis_url = server[1] if server else None
    if args.no_redis:
        print("redis: skipped (--no-redis)")
    elif redis_url:
        stores["redis"] = open_store(redis_url + "?prefix=bench-engine")
    else:
        print("redis: skipped (redis-server is not installed; pass --redis URL to use a running server)")
    load_before = os.getloadavg()
    print(f"model {args.model} on {model.device}, {model.dtype}, torch threads {torch.get_num_threads()}, "
          f"load average {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    rows = []
    try:
        for n in [int(x) for x in args.lengths.split(",") if x]:
            rows.append(measure(model, tokenizer, n, args, stores))
            r = rows[-1]
            print(f"  {n} tokens: encode {r['encode_ms']:.0f} ms, dir {r['dir_ms']:.1f} ms, "
                  f"dir mmap {r['dir_mmap_ms']:.1f} ms"
                  + (f", redis {r['redis_ms']:.1f} ms" if "redis_ms" in r else ""), flush=True)
    finally:
        close_all(stores, server, tmp)
    load_after = os.getloadavg()
    print()
    print_table(rows, [c for c in COLUMNS if c[1] in rows[0]])
    print(f"\nload average at the end: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}")
    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    meta = {"model": args.model, "device": str(model.device), "dtype": str(model.dtype),
            "threads": torch.get_num_threads(), "load_average_before": load_before,
            "load_average_after": load_after, "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Save/load throughput of the cache-store backends on synthetic KV caches.

Entries are shaped like the default model's module caches (30 layers, 3 KV heads, head_dim 64,
float32 by default) for several token counts. Each number is the median of ``--runs`` timed
operations through the public store API, i.e. including the checksum that every ``put``
computes and every ``get`` verifies (shown separately as "sha256"). Directory loads are measured
warm (file in the page cache, as right after writing) and cold (pages dropped with
posix_fadvise before each load); "dir" reads with pread into the process's own memory (the
default, immune to later changes of the file), "dir_mmap" keeps safetensors' mapping (the opt-in
``load="mmap"``; no copy, unsafe if the file is modified while in use). Redis runs
against ``--redis URL`` or, by default, a throw-away local redis-server (loopback, no
persistence) when the binary is installed.

    python benchmarks/store_io.py [--tokens 512,1024,2048,4096,8192] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root replaces benchmarks/ on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from promptcache.runtime.kv import ModuleKV  # noqa: E402
from promptcache.store import CacheEntry, open_store  # noqa: E402
from promptcache.store.base import entry_checksum  # noqa: E402


def synthetic_entry(tokens: int, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                    seed: int) -> CacheEntry:
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(heads, tokens, head_dim, generator=g).to(dtype),
              torch.randn(heads, tokens, head_dim, generator=g).to(dtype)) for _ in range(layers)]
    kv = ModuleKV([k for k, _ in pairs], [v for _, v in pairs])
    return CacheEntry(kv, {"module": f"synthetic-{tokens}", "seed": seed})


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_backend(name: str, store, entry: CacheEntry, runs: int, cold: bool = False) -> dict:
    saves, loads = [], []
    for r in range(runs):
        key = f"bench-{entry.seq_len}-{r}"
        saves.append(timed(lambda: store.put(key, entry)))
        if cold:
            drop_page_cache(store.entry_path(key))
        got = None

        def load():
            nonlocal got
            got = store.get(key)
        loads.append(timed(load))
        assert got is not None and torch.equal(got.kv.values[-1], entry.kv.values[-1]), name
        del got
        store.delete(key)
    return {"save_s": statistics.median(saves), "load_s": statistics.median(loads)}


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    for _ in range(200):
        try:
            if redis.Redis(port=port).ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    return None


def close_all(stores, server: tuple[subprocess.Popen, str] | None, tmp: Path) -> None:
    """Close the stores, stop the throw-away redis-server, remove the scratch folder."""
    for store in stores.values():
        store.close()
    if server:
        server[0].terminate()
        server[0].wait()
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="512,1024,2048,4096,8192")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--dir", help="directory for the directory store (default: a temp dir)")
    ap.add_argument("--redis", help="redis URL (default: start a local redis-server)")
    ap.add_argument("--no-fsync", action="store_true", help="directory store without fsync")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    tmp = Path(tempfile.mkdtemp(prefix="pc-store-bench-"))
    server = None
    redis_url = args.redis
    if redis_url is None:
        server = start_redis(tmp)
        redis_url = server[1] if server else None
    dir_root = args.dir or str(tmp / "dir")
    stores = {"memory": open_store("memory://"),
              "dir": open_store(dir_root, fsync=not args.no_fsync),
              "dir_mmap": open_store(dir_root, fsync=not args.no_fsync, load="mmap")}
    if redis_url:
        stores["redis"] = open_store(redis_url + "?prefix=bench")
    else:
        print("redis: skipped (no redis-server binary and no --redis URL)")

    print(f"entry: {args.layers} layers x (K,V) x [{args.kv_heads}, T, {args.head_dim}] {args.dtype}; "
          f"median of {args.runs}; torch threads {torch.get_num_threads()}; "
          f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; dir fsync={not args.no_fsync}")
    results = []
    try:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            entry = synthetic_entry(tokens, args.layers, args.kv_heads, args.head_dim, dtype, tokens)
            row = {"tokens": tokens, "mb": entry.nbytes / 1e6}
            row["sha256_s"] = statistics.median(
                timed(lambda: entry_checksum(entry.named_tensors(), entry.meta, "bench")) for _ in range(3))
            for name, store in stores.items():
                row[name] = bench_backend(name, store, entry, args.runs)
            row["dir_cold"] = bench_backend("dir-cold", stores["dir"], entry, args.runs, cold=True)
            results.append(row)
            print_row(row)
    finally:
        close_all(stores, server, tmp)
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _ms(s: float) -> str:
    return f"{s * 1000:8.1f}"


def print_row(row: dict) -> None:
    mb = row["mb"]
    print(f"\n{row['tokens']} tokens, {mb:.1f} MB "
          f"(sha256 of the payload alone: {_ms(row['sha256_s']).strip()} ms)")
    print(f"  {'backend':10} {'save ms':>8} {'load ms':>8} {'save MB/s':>10} {'load MB/s':>10}")
    for name in ("memory", "dir", "dir_mmap", "dir_cold", "redis"):
        if name in row:
            r = row[name]
            print(f"  {name:10} {_ms(r['save_s'])} {_ms(r['load_s'])} {mb / r['save_s']:10.0f} "
                  f"{mb / r['load_s']:10.0f}")


def print_summary(results: list[dict]) -> None:
    print("\nratios (time / time; >1 means the first is slower)")
    pairs = [("dir", "memory"), ("dir", "dir_mmap"), ("dir_cold", "dir"), ("redis", "memory"),
             ("redis", "dir")]
    pairs = [p for p in pairs if all(x in results[0] for x in p)]
    head = "  ".join(f"{a}/{b} save  {a}/{b} load" for a, b in pairs)
    print(f"  {'tokens':>6}  {head}")
    for row in results:
        cells = "  ".join(f"{row[a]['save_s'] / row[b]['save_s']:{len(a) + len(b) + 6}.2f}  "
                          f"{row[a]['load_s'] / row[b]['load_s']:{len(a) + len(b) + 6}.2f}"
                          for a, b in pairs)
        print(f"  {row['tokens']:>6}  {cells}")


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of promptcache (TTFT, module store, prefix caching, recompute, radix tree).

Each is a module of this package, run from the repository root either way:

    python -m benchmarks.ttft --repeats 3 --threads 1
    python benchmarks/ttft.py --repeats 3 --threads 1

Shared helpers (cases, tables, CSV, threads) are in :mod:`benchmarks.common`; benchmarks import
each other as ``benchmarks.<name>``.
"""

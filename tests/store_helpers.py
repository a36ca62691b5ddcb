"""Entry builders and subprocess workers shared by the store tests (importable by spawned children)."""

from __future__ import annotations

import torch

from promptcache.runtime.kv import ModuleKV
from promptcache.store import CacheEntry, open_store
from promptcache.store.base import tensor_bytes


def make_entry(n_layers: int = 3, seq: int = 7, heads: int = 2, head_dim: int = 8,
               dtype: torch.dtype = torch.float32, seed: int = 0, meta: dict | None = None) -> CacheEntry:
    g = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for _ in range(n_layers):
        keys.append(torch.randn(heads, seq, head_dim, generator=g).to(dtype))
        values.append(torch.randn(heads, seq, head_dim, generator=g).to(dtype))
    return CacheEntry(ModuleKV(keys, values), {"model": "fp-test", "dtype": str(dtype).removeprefix("torch."),
                                "seed": seed, **(meta or {})})


def same_bits(a: CacheEntry, b: CacheEntry) -> bool:
    """Bit-exact equality of all tensors (NaN payloads and -0.0 included) plus dtype and shape."""
    ta, tb = a.named_tensors(), b.named_tensors()
    if list(ta) != list(tb):
        return False
    for x, y in zip(ta.values(), tb.values()):
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if bytes(tensor_bytes(x.contiguous())) != bytes(tensor_bytes(y.contiguous())):
            return False
    return True


def write_many(url: str, writer: int, shared_keys: list[str], own: int, rounds: int, seq: int) -> None:
    """Worker for the concurrent-writers test: shared keys get this writer's version each round."""
    store = open_store(url)
    for r in range(rounds):
        for i, key in enumerate(shared_keys):
            store.put(key, make_entry(seq=seq, seed=1000 * writer + i, meta={"writer": writer}))
        for i in range(own):
            key = f"own-{writer}-{i}"
            store.put(key, make_entry(seq=seq, seed=100000 + 1000 * writer + i, meta={"writer": writer}))
    store.close()

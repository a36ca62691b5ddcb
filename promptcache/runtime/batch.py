"""Batched decode steps: the rows of concurrent sequences decoded together.

:class:`LoopDecodeBatch` is the reference: one :class:`SplicedCache` per row, each step loops
:meth:`ModelRunner.decode_step` (one forward per row). It defines the behaviour the batched
implementation must reproduce.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .kv import ModuleKV, SplicedCache
from .runner import DecodeSequence, ModelRunner


def cache_kv(cache: SplicedCache) -> ModuleKV:
    """The KV a request cache holds (all its tokens, with ``key_positions``), as views."""
    keys, values = [], []
    for layer in cache.layers:
        if getattr(layer, "_buf_k", None) is None and getattr(layer, "_pieces_k", None):
            keys.append(torch.cat(list(layer._pieces_k), dim=-2))  # never prefilled: pieces only
            values.append(torch.cat(list(layer._pieces_v), dim=-2))
        else:
            keys.append(layer.keys[0])
            values.append(layer.values[0])
    return ModuleKV(keys, values, cache.key_positions)


class _Rows:
    """Row-id bookkeeping shared by the implementations: ids are reused after ``remove``."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.used: set[int] = set()

    def take(self) -> int:
        for row in range(self.max_rows):
            if row not in self.used:
                self.used.add(row)
                return row
        raise RuntimeError(f"decode batch full: all {self.max_rows} rows in use")

    def check(self, row: int) -> None:
        if row not in self.used:
            raise KeyError(f"decode batch has no row {row} (rows in use: {sorted(self.used)})")

    def free(self, row: int) -> None:
        self.check(row)
        self.used.discard(row)


class LoopDecodeBatch:
    """Reference decode batch: one cache per row, one forward per row per step (module docstring)."""

    def __init__(self, runner: ModelRunner, max_rows: int = 8) -> None:
        self.runner = runner
        self._rows = _Rows(max_rows)
        self._caches: dict[int, SplicedCache] = {}

    def add(self, cache: SplicedCache) -> int:
        """Take over a prefilled request cache; returns its row id (the caller must not use it again)."""
        row = self._rows.take()
        self._caches[row] = cache
        return row

    def step(self, inputs: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """``(row, token, position)`` per input; each input's next-token logits, in input order."""
        seen: set[int] = set()
        for row, _, _ in inputs:
            self._rows.check(row)
            if row in seen:
                raise ValueError(f"row {row} appears twice in one decode step")
            seen.add(row)
        batch = [DecodeSequence(self._caches[row], int(tok), int(pos)) for row, tok, pos in inputs]
        return [logits.float() for logits in self.runner.decode_step(batch)]

    def remove(self, row: int) -> ModuleKV:
        """Free ``row``; returns all the KV it holds, with positions (views of the row's buffer)."""
        self._rows.free(row)
        return cache_kv(self._caches.pop(row))

    def __len__(self) -> int:
        return len(self._rows.used)


DecodeBatch = LoopDecodeBatch

"""The one KV value type, and the spliced request cache that holds its pieces.

:class:`ModuleKV` is every KV value in the package: a stored module (tiers, store entries), a
prefix-tree edge, a recompute check pass's fresh layers, a piece of a request's cache. Keys and
values are per layer ``[kv_heads, n, head_dim]`` tensors (on the device, or in pinned host memory);
``positions`` (a LongTensor ``[n]``, or ``None`` where a value is shared between offsets, as in the
module tiers) are the layout positions of its tokens. :func:`kv_nbytes` is the one byte count.

:class:`SplicedCache` is a transformers ``DynamicCache`` whose layers start as a *list* of pieces:
nothing is copied when a request is assembled; the first ``update`` (the prefill of the computed
tokens) copies the pieces and the new tokens once into a buffer with room for generation, so
assembly costs one memcpy, the same copy an ordinary ``DynamicCache`` makes when it concatenates
new tokens onto a cached prefix. Its ``key_positions`` field holds the layout positions of the keys
it holds; :class:`promptcache.runtime.runner.ModelRunner` sets it, ALiBi and sliding windows read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


def kv_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of these tensors (the one place KV sizes are computed)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ModuleKV:
    """KV of a run of tokens: ``keys[layer]``/``values[layer]`` of shape [kv_heads, n, head_dim].

    ``positions``: the layout positions of the ``n`` tokens (LongTensor ``[n]``), or ``None`` when
    the value is not tied to one placement (module tiers share entries between offsets).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor | None = None
    #: The value whose ``keys``/``values`` lists this one shares (made by :meth:`at`): one identity
    #: a static buffer can tell a piece by (runtime/compiled.py's ``LaidPiece``). Lists are never
    #: changed once made, like the tensors in them.
    origin: "ModuleKV | None" = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.keys + self.values)

    def to(self, device: torch.device | str, pin: bool = False) -> "ModuleKV":
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.pin_memory() if pin and t.device.type == "cpu" else t
        return ModuleKV([move(k) for k in self.keys], [move(v) for v in self.values], self.positions)

    def at(self, positions: torch.Tensor | None) -> "ModuleKV":
        """The same tensors placed at ``positions`` (no copy)."""
        return ModuleKV(self.keys, self.values, positions, self.origin if self.origin is not None else self)

    def slice(self, start: int, end: int | None = None) -> "ModuleKV":
        """Tokens ``start:end`` (or the first ``start`` tokens when ``end`` is omitted); views, no copy."""
        if end is None:
            start, end = 0, start
        pos = None if self.positions is None else self.positions[start:end]
        return ModuleKV([k[:, start:end] for k in self.keys], [v[:, start:end] for v in self.values], pos)

    def split(self, at: int) -> tuple["ModuleKV", "ModuleKV"]:
        """Tokens ``:at`` and ``at:`` (views): the prefix tree's edge cut."""
        return self.slice(0, at), self.slice(at, self.length)

    def clone(self) -> "ModuleKV":
        """A copy that owns its memory."""
        pos = None if self.positions is None else self.positions.clone()
        return ModuleKV([k.clone() for k in self.keys], [v.clone() for v in self.values], pos)

    def with_layers(self, first: "ModuleKV") -> "ModuleKV":
        """Layers ``0..len(first)-1`` from ``first``, the rest from this value (views)."""
        n = first.num_layers
        return ModuleKV(first.keys + self.keys[n:], first.values + self.values[n:], self.positions)

    @staticmethod
    def from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, end: int,
                    positions: torch.Tensor | None = None) -> "ModuleKV":
        """Cut tokens ``start:end`` out of per-layer [1, H, N, D] tensors (copies, so they own memory)."""
        return ModuleKV([k[0, :, start:end].clone() for k, _ in layers],
                        [v[0, :, start:end].clone() for _, v in layers], positions)

    @staticmethod
    def cat(parts: Sequence["ModuleKV"]) -> "ModuleKV":
        """Concatenate along tokens (copies); positions too when every part has them."""
        pos = None
        if parts and all(p.positions is not None for p in parts):
            pos = torch.cat([p.positions for p in parts])
        layers = parts[0].num_layers if parts else 0
        return ModuleKV([torch.cat([p.keys[i] for p in parts], dim=1) for i in range(layers)],
                        [torch.cat([p.values[i] for p in parts], dim=1) for i in range(layers)], pos)


class SplicedLayer(DynamicLayer):
    """A cache layer assembled from pieces; materialised into one buffer on first update."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], device: torch.device,
                 reserve: int = 0) -> None:
        super().__init__()
        self._pieces_k, self._pieces_v = keys, values
        self._target = torch.device(device)
        self._reserve = reserve
        self._len = sum(k.shape[-2] for k in keys)
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _materialise(self, extra: int, like: torch.Tensor) -> None:
        heads, dim = like.shape[1], like.shape[-1]
        cap = self._len + extra + self._reserve
        self._buf_k = torch.empty(1, heads, cap, dim, dtype=like.dtype, device=like.device)
        self._buf_v = torch.empty_like(self._buf_k)
        at = 0
        for k, v in zip(self._pieces_k, self._pieces_v):
            n = k.shape[-2]
            self._buf_k[0, :, at:at + n].copy_(k, non_blocking=True)
            self._buf_v[0, :, at:at + n].copy_(v, non_blocking=True)
            at += n
        self._pieces_k = self._pieces_v = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._buf_k is None:
            self._materialise(n, key_states)
        elif self._len + n > self._buf_k.shape[-2]:  # grow geometrically
            grow = max(n, self._buf_k.shape[-2])
            self._buf_k = torch.cat([self._buf_k[..., : self._len, :], self._buf_k.new_empty(
                1, self._buf_k.shape[1], grow + n, self._buf_k.shape[-1])], dim=-2)
            self._buf_v = torch.cat([self._buf_v[..., : self._len, :], self._buf_v.new_empty(
                1, self._buf_v.shape[1], grow + n, self._buf_v.shape[-1])], dim=-2)
        self._buf_k[..., self._len:self._len + n, :] = key_states
        self._buf_v[..., self._len:self._len + n, :] = value_states
        self._len += n
        self.keys = self._buf_k[..., : self._len, :]
        self.values = self._buf_v[..., : self._len, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    def settle(self, base: int, slots: torch.Tensor, fresh_rows: torch.Tensor, keep_rows: torch.Tensor) -> None:
        """Move fresh KV from the tail (rows after ``base``) into ``slots``; keep ``keep_rows`` as the tail."""
        for buf in (self._buf_k, self._buf_v):
            tail = buf[:, :, base:self._len]
            buf[:, :, slots] = tail[:, :, fresh_rows]
            buf[:, :, base:base + len(keep_rows)] = tail[:, :, keep_rows]  # advanced indexing copies first
        self._len = base + len(keep_rows)
        self.keys = self._buf_k[..., : self._len, :]
        self.values = self._buf_v[..., : self._len, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self._len + max_length
        if self._buf_k is None:
            raise NotImplementedError("crop before the first update is not supported")
        self._len = min(self._len, max_length)
        self.keys = self._buf_k[..., : self._len, :]
        self.values = self._buf_v[..., : self._len, :]


class SplicedCache(DynamicCache):
    """A ``DynamicCache`` whose layers are spliced from module pieces (see module docstring).

    ``key_positions``: LongTensor ``[n]``, the layout positions of the ``n`` keys held; set by
    the model runner after every forward (ALiBi and sliding windows read it during one).
    ``lora``: the LoRA adapter every forward over this cache runs under (``None``: the base
    model; stamped by :meth:`ModelRunner.new_cache`, see promptcache.lora).
    A cache with no pieces is an ordinary empty cache (the baseline prefill uses one).
    """

    def __init__(self, pieces: Sequence[ModuleKV], num_layers: int, device: torch.device | str,
                 reserve: int = 0, key_positions: torch.Tensor | None = None) -> None:
        layers = [SplicedLayer([p.keys[i] for p in pieces], [p.values[i] for p in pieces],
                               torch.device(device), reserve) for i in range(num_layers)]
        Cache.__init__(self, layers=layers)
        if key_positions is None:
            key_positions = torch.zeros(0, dtype=torch.long, device=device)
        self.key_positions: torch.Tensor = key_positions
        self.lora: str | None = None

    def settle(self, base: int, slots: torch.Tensor, fresh_rows: torch.Tensor, keep_rows: torch.Tensor) -> None:
        """After a fused recompute prefill: the tail's ``fresh_rows`` (recomputed tokens) overwrite
        the stale KV at ``slots``; the tail keeps only ``keep_rows`` (the uncached tokens), in order.
        Rows are counted from ``base``, the number of spliced tokens. Touches this cache's own
        buffers only, never the module pieces it was assembled from. The fresh rows sit at their
        slots' positions, so ``key_positions`` keeps the first ``base`` and the kept rows'."""
        for layer in self.layers:
            layer.settle(base, slots, fresh_rows, keep_rows)
        self.key_positions = torch.cat([self.key_positions[:base],
                                        self.key_positions[base:][keep_rows.to(self.key_positions.device)]])

"""Batched decode steps: the rows of concurrent sequences decoded together (the server's batch).

:class:`DecodeBatch` is what the scheduler uses: ``add`` a prefilled request cache, ``step`` one
token for some or all rows, ``remove`` a finished row and get its KV back. It runs

* :class:`BatchedDecodeBatch`: ONE model forward per step over every row. The rows' KV live in a
  :class:`BatchKVCache` (a transformers ``Cache``): per layer one ``[rows, kv_heads, capacity,
  head_dim]`` buffer for K and one for V, per-row lengths and per-row key positions ``[rows,
  capacity]``. A row's new key goes to that row's own length; the forward takes ``input_ids``
  ``[n, 1]``, ``position_ids`` ``[n, 1]`` (each row's own position) and the adapter's 4-D mask per
  row (:meth:`ModelAdapter.batch_attention_mask`): a row sees its valid slots and its new key,
  never another row's padding; sliding windows are by layout position, ALiBi (Falcon) reads the
  per-row key positions. Buffers grow geometrically (rows and capacity), are zero-filled (masked
  slots still enter the matmuls, so they must hold finite values) and are dropped when the
  batch empties. Removing a row moves the last row into its slot, so rows in use are always slots
  ``0..n-1`` and a step reads views, never a gather.
* :class:`LoopDecodeBatch`: the reference, one ``SplicedCache`` per row and one forward per row
  (:meth:`ModelRunner.decode_step`). It stays as the fallback for families whose attention
  cannot take per-row positions in one forward (``adapter.batch_decode_supported()``: MPT, whose
  ALiBi bias is one ``[heads, q, k]`` tensor shared by the batch in transformers 5.23), and as
  the baseline of ``benchmarks/batch_decode.py``.

The batched step calls the runner's ``forward_hooks`` once per forward (a ``ForwardCall`` whose
``ids`` are every row's token, ``q_pos`` their positions, ``visible`` the ``[rows, keys]`` slot
visibility); the loop runs through ``decode_step``, which calls them per row. Neither checks the
context window: the scheduler stops a row at ``runner.max_positions``. Every row's logits equal
the same sequence decoded alone within float rounding (``tests/test_batch.py``: <= 1e-5 on the
tiny float32 models, 8e-5 on SmolLM2-135M, identical greedy ids).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kv import ModuleKV, SplicedCache
from .runner import DecodeSequence, ForwardCall, ModelRunner


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


#: Keys of room a row buffer gets beyond what is needed when it grows (generated tokens).
CAPACITY_HEADROOM = 256
#: Capacities are rounded up to a multiple of this many keys.
CAPACITY_ROUND = 64

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


class _BatchState:
    """What every layer of a :class:`BatchKVCache` shares: per-slot lengths and the step's width."""

    def __init__(self) -> None:
        self.lengths: list[int] = []  # valid keys per slot (slots 0..n-1 are the rows in use)
        self.len_index: torch.Tensor | None = None  # [n] the slot each row's new key goes to (a step)
        self.past = 0  # during a step: max(lengths); the keys returned are [n, H, past + 1, D]


class BatchKVLayer(DynamicLayer):
    """One layer's K and V for all rows: ``[rows, kv_heads, capacity, head_dim]`` buffers.

    ``update`` (one decode step, one new token per row) writes row ``i``'s new key at slot
    ``lengths[i]`` (an index_put) and returns the first ``past + 1`` slots of the ``n`` rows in use;
    the mask hides each row's slots at and past its own length except its new key.
    """

    def __init__(self, state: _BatchState) -> None:
        super().__init__()
        self.state = state
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None

    def allocate(self, rows: int, capacity: int, like: torch.Tensor) -> None:
        """Buffers of ``rows`` x ``capacity`` (keeping what the old ones held)."""
        heads, dim = like.shape[-3], like.shape[-1]
        # zeros, not empty: a masked slot still enters the matmuls (weight 0 x NaN garbage = NaN)
        new_k = like.new_zeros(rows, heads, capacity, dim)
        new_v = torch.zeros_like(new_k)
        if self.buf_k is not None:
            r, c = self.buf_k.shape[0], self.buf_k.shape[2]
            new_k[:r, :, :c].copy_(self.buf_k)
            new_v[:r, :, :c].copy_(self.buf_v)
        self.buf_k, self.buf_v = new_k, new_v
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, past = len(self.state.lengths), self.state.past
        if key_states.shape[0] != n or key_states.shape[-2] != 1:
            raise ValueError(f"a batched decode step takes one token for each of the {n} rows, "
                             f"got keys of shape {tuple(key_states.shape)}")
        rows = torch.arange(n, device=key_states.device)
        self.buf_k[rows, :, self.state.len_index] = key_states[:, :, 0]
        self.buf_v[rows, :, self.state.len_index] = value_states[:, :, 0]
        self.keys = self.buf_k[:n, :, : past + 1]
        self.values = self.buf_v[:n, :, : past + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.state.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.past + query_length, 0


class BatchKVCache(Cache):
    """The KV of every row of a :class:`BatchedDecodeBatch`, as one transformers ``Cache``.

    ``key_positions`` (during a step) is ``[n, past]``: each row's layout positions of its keys,
    with the step's new position already written at the row's own length (so ALiBi, which
    appends ``position_ids`` as column ``past``, sees every row's new key at its right position).
    """

    def __init__(self, num_layers: int) -> None:
        self.state = _BatchState()
        Cache.__init__(self, layers=[BatchKVLayer(self.state) for _ in range(num_layers)])
        self.positions: torch.Tensor | None = None  # [rows, capacity]

    @property
    def key_positions(self) -> torch.Tensor:
        n = len(self.state.lengths)
        return self.positions[:n, : self.state.past]

    @property
    def rows(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def reserve(self, rows: int, capacity: int, like: torch.Tensor, max_rows: int) -> None:
        """Room for ``rows`` rows (at most ``max_rows``) of ``capacity`` keys; rows and capacity grow
        geometrically, so a growing batch copies its buffers O(log) times.

        Rows double; capacity grows to what is needed plus :data:`CAPACITY_HEADROOM` keys, and at
        least by a quarter: doubling it would, for eight rows of a 4k-token document that decode
        past 4,096 keys, allocate and copy gigabytes in one step (a pause of seconds, measured in
        the serving benchmark) where a few hundred keys of room suffice."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        rows = min(max(rows, 2 * self.rows), max_rows) if rows > self.rows else self.rows
        if capacity > self.capacity:
            capacity = max(capacity + CAPACITY_HEADROOM, -(-5 * self.capacity // 4))
            capacity = -(-capacity // CAPACITY_ROUND) * CAPACITY_ROUND
        else:
            capacity = self.capacity
        for layer in self.layers:
            layer.allocate(rows, capacity, like)
        pos = torch.zeros(rows, capacity, dtype=torch.long, device=like.device)
        if self.positions is not None:
            pos[: self.rows, : self.capacity] = self.positions
        self.positions = pos

    def put(self, slot: int, kv: ModuleKV) -> None:
        """Copy ``kv`` (``n`` tokens with positions) into ``slot``."""
        n = kv.length
        for layer, k, v in zip(self.layers, kv.keys, kv.values):
            layer.buf_k[slot, :, :n].copy_(k)
            layer.buf_v[slot, :, :n].copy_(v)
        self.positions[slot, :n] = kv.positions.to(self.positions.device)

    def get(self, slot: int) -> ModuleKV:
        """The ``slot``'s valid keys (views of the buffers)."""
        n = self.state.lengths[slot]
        return ModuleKV([l.buf_k[slot, :, :n] for l in self.layers],
                        [l.buf_v[slot, :, :n] for l in self.layers], self.positions[slot, :n])


class BatchedDecodeBatch:
    """Rows decoded together: each :meth:`step` is ONE forward over every row (module docstring)."""

    def __init__(self, runner: ModelRunner, max_rows: int = 8) -> None:
        self.runner = runner
        self._rows = _Rows(max_rows)
        self.cache = BatchKVCache(runner.num_layers)
        self._slot: dict[int, int] = {}  # row id -> slot
        self._row: list[int] = []  # slot -> row id
        self._lora: list[str | None] = []  # slot -> the LoRA adapter its row runs under (cache.lora)

    @torch.inference_mode()
    def add(self, cache: SplicedCache) -> int:
        """Copy a prefilled request cache's KV into a free row (once); returns the row id."""
        kv = cache_kv(cache)
        if kv.positions is None or len(kv.positions) != kv.length:
            raise ValueError(f"the cache holds {kv.length} keys but {0 if kv.positions is None else len(kv.positions)}"
                             " key positions")
        row = self._rows.take()
        slot = len(self._row)
        self.cache.reserve(slot + 1, kv.length + 1, kv.keys[0], self._rows.max_rows)
        self.cache.put(slot, kv)
        self.cache.state.lengths.append(kv.length)
        self._row.append(row)
        self._lora.append(getattr(cache, "lora", None))
        self._slot[row] = slot
        return row

    @torch.inference_mode()
    def step(self, inputs: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """``(row, token, position)`` per input; ONE forward over all rows; logits in input order.

        Rows in use that have no input this step ride along with a dummy token whose key is not
        kept (their length does not grow, the slot is overwritten by their next real step).
        """
        n = len(self._row)
        tokens, positions, active = [0] * n, [0] * n, [False] * n
        for row, token, position in inputs:
            slot = self._slot_of(row)
            if active[slot]:
                raise ValueError(f"row {row} appears twice in one decode step")
            tokens[slot], positions[slot], active[slot] = int(token), int(position), True
        if not inputs:
            return []
        state, dev = self.cache.state, self.runner.device
        state.past = max(state.lengths)
        self.cache.reserve(n, state.past + 1, self.cache.layers[0].buf_k, self._rows.max_rows)
        state.len_index = torch.tensor(state.lengths, dtype=torch.long, device=dev)
        slots = torch.arange(n, device=dev)
        q_pos = torch.tensor(positions, dtype=torch.long, device=dev)
        self.cache.positions[slots, state.len_index] = q_pos  # the new keys' positions (see BatchKVCache)
        k_pos = self.cache.positions[:n, : state.past + 1]
        visible = torch.arange(state.past + 1, device=dev)[None, :] <= state.len_index[:, None]
        mask = self.runner.adapter.batch_attention_mask(visible[:, None, :], q_pos[:, None], k_pos,
                                                        self.runner.dtype)
        for hook in self.runner.forward_hooks:  # one batched forward: one call, every row's token
            hook(ForwardCall(tokens, q_pos, visible, self.cache))
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]
        with self.runner.lora.for_rows(self._lora):  # one adapter in force, or PEFT's mixed batch
            out = self.runner.model(input_ids=ids, position_ids=q_pos[:, None], attention_mask=mask,
                                    past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        for slot in range(n):
            if active[slot]:
                state.lengths[slot] += 1
        logits = out.logits[:, -1].float()
        return [logits[self._slot[row]] for row, _, _ in inputs]

    @torch.inference_mode()
    def remove(self, row: int) -> ModuleKV:
        """Free ``row``; returns a clone of its KV (all its tokens, with positions).

        The last slot moves into the freed one so that the rows in use stay slots ``0..n-1``.
        """
        slot = self._slot_of(row)
        kv = self.cache.get(slot).clone()
        last = len(self._row) - 1
        if slot != last:
            self.cache.put(slot, self.cache.get(last))
            self.cache.state.lengths[slot] = self.cache.state.lengths[last]
            self._lora[slot] = self._lora[last]
            moved = self._row[last]
            self._row[slot], self._slot[moved] = moved, slot
        self.cache.state.lengths.pop()
        self._row.pop()
        self._lora.pop()
        del self._slot[row]
        self._rows.free(row)
        if not self._row:  # an empty batch gives its buffers back (capacity only grows otherwise)
            self.cache = BatchKVCache(self.runner.num_layers)
        return kv

    def _slot_of(self, row: int) -> int:
        self._rows.check(row)
        return self._slot[row]

    def __len__(self) -> int:
        return len(self._row)


class DecodeBatch:
    """The server's decode batch: :class:`BatchedDecodeBatch` where the family allows it
    (``adapter.batch_decode_supported()``), else :class:`LoopDecodeBatch` (MPT: its ALiBi bias is
    shared by the batch in transformers, so rows at different positions cannot share a forward).
    ``batched`` says which one runs.

    LoRA adapters (docs/lora.md): each row runs under the adapter its cache was made under
    (``cache.lora``). The batched step mixes them in ONE forward through PEFT's mixed-batch LoRA
    (``adapter_names``: each LoRA layer adds row ``i``'s adapter to row ``i`` only) when every
    loaded adapter allows it (:meth:`LoraRegistry.mixable`: not DoRA); otherwise rows are grouped
    by adapter, one forward per group present. Rows of the base model (and mixed rows) are
    :attr:`impl`; other groups come and go with their rows. The loop runs each row alone, under
    its own adapter."""

    def __init__(self, runner: ModelRunner, max_rows: int = 8, batched: bool | None = None) -> None:
        if batched is None:
            batched = runner.adapter.batch_decode_supported()
        self.batched = batched
        self.runner, self.max_rows = runner, max_rows
        self.impl = self._make()
        self._groups: dict[str | None, BatchedDecodeBatch | LoopDecodeBatch] = {None: self.impl}
        self._rows = _Rows(max_rows)
        self._where: dict[int, tuple[str | None, int]] = {}  # row id -> (adapter, row in its group)

    def _make(self) -> "BatchedDecodeBatch | LoopDecodeBatch":
        return (BatchedDecodeBatch if self.batched else LoopDecodeBatch)(self.runner, self.max_rows)

    def add(self, cache: SplicedCache) -> int:
        """Take over a prefilled request cache (not to be used by the caller afterwards); row id."""
        lora = getattr(cache, "lora", None)
        if lora is not None and (not self.batched or self.runner.lora.mixable()):
            lora = None  # the loop runs rows alone; the batched step mixes adapters in one forward
        group = self._groups.get(lora)
        if group is None:
            group = self._groups[lora] = self._make()
        row = self._rows.take()
        try:
            self._where[row] = (lora, group.add(cache))
        except BaseException:
            self._rows.free(row)
            raise
        return row

    def step(self, inputs: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """``(row, token, position)`` per input; each input's next-token logits (float32), in order."""
        by_group: dict[str | None, list[tuple[int, tuple[int, int, int]]]] = {}
        for k, (row, token, position) in enumerate(inputs):
            self._rows.check(row)
            lora, inner = self._where[row]
            by_group.setdefault(lora, []).append((k, (inner, token, position)))
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for lora, items in by_group.items():
            for (k, _), logits in zip(items, self._groups[lora].step([item for _, item in items])):
                out[k] = logits
        return out  # type: ignore[return-value]

    def remove(self, row: int) -> ModuleKV:
        """Free ``row``; returns its KV (all its tokens, with positions)."""
        self._rows.check(row)
        lora, inner = self._where.pop(row)
        self._rows.free(row)
        group = self._groups[lora]
        kv = group.remove(inner)
        if lora is not None and len(group) == 0:
            del self._groups[lora]
        return kv

    def __len__(self) -> int:
        return len(self._rows.used)

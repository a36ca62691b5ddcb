"""The module encoder: every stored segment's KV, from the tiers or the store, or encoded.

``add_schema`` keys every stored segment (:mod:`promptcache.modules.keys`), takes what the tiers
and the store hold (:mod:`promptcache.modules.tiers`) and encodes only the rest, in the forwards
:func:`promptcache.plan.forwards_needed` picks over the encode groups (chains of segments that
see the previous ones). A request later asks for its modules' KV the same way (:meth:`obtain`):
what was evicted and dropped is re-encoded with whatever of its context is missing. Every forward
runs through the :class:`~promptcache.runtime.runner.ModelRunner`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..plan import encode_groups, forwards_needed, stored_segments
from ..pml.errors import SchemaError
from ..pml.layout import Layout
from ..results import EncodeReport
from ..runtime.kv import ModuleKV
from ..runtime.runner import ModelRunner
from ..store import dtype_name
from .keys import ModuleKey, module_keys
from .relocate import Relocation
from .tiers import SchemaKV, TieredModuleCache


@dataclass
class SchemaState:
    """One added schema: its layout, encoding contexts, stored segments' keys and positions."""

    layout: Layout
    contexts: list[list[int]]
    kv: SchemaKV | dict[int, ModuleKV]        # stored segment -> KV (with positions), from the tiers
    positions: dict[int, torch.Tensor]        # stored segment -> layout positions
    report: EncodeReport
    keys: dict[int, ModuleKey] = field(default_factory=dict)  # stored segment -> content key
    expect: dict = field(default_factory=dict)   # what store entries of this schema must match
    meta: dict = field(default_factory=dict)     # meta common to this schema's store entries

    @property
    def name(self) -> str:
        return self.layout.schema.name


class ModuleEncoder:
    """Encodes and fetches module caches for one model (see the module docstring).

    ``cache``: the tiered module cache; ``encoding``: the policy name (part of every key).
    ``store_counts``: modules loaded from the store vs encoded in this process.
    """

    def __init__(self, runner: ModelRunner, cache: TieredModuleCache, relocation: Relocation, *,
                 encoding: str, family: str, progress: bool = True) -> None:
        self.runner = runner
        self.cache = cache
        self.relocation = relocation
        self.encoding = encoding
        self.family = family
        self.progress = progress
        self.store_counts = {"store_hits": 0, "store_misses": 0}

    def check_window(self, layout: Layout) -> None:
        """Refuse a layout whose positions run past the model's context window."""
        limit = self.runner.max_positions
        if limit is not None and layout.length > limit:
            schema = layout.schema
            raise SchemaError(f"schema {schema.name!r} lays out {layout.length} positions (0..{layout.length - 1}), "
                              f"more than this model's context window of {limit} positions "
                              f"({self.family}); shorten its modules or parameter lengths",
                              schema.file, schema.root.loc.line)

    @torch.inference_mode()
    def encode(self, layout: Layout, contexts: list[list[int]], replaces: SchemaState | None = None
               ) -> SchemaState:
        """Key every stored segment, take what the tiers/store hold, encode only the rest.

        ``replaces``: the state of a schema of the same name, whose entries are released.
        """
        self.check_window(layout)  # before any tensor of this schema exists
        runner = self.runner
        segs = layout.segments
        keep = stored_segments(layout)
        fp = runner.model_fingerprint()  # base or the adapter in scope; see promptcache.lora
        keys = module_keys(layout, contexts, keep, model=fp, dtype=dtype_name(runner.dtype),
                           policy=self.encoding, relative=self.relocation.relative,
                           offset_sensitive=self.relocation.offset_sensitive)
        expect = {"model": fp, "dtype": dtype_name(runner.dtype), "policy": self.encoding,
                  "positions": "relative" if self.relocation.relative else "absolute"}
        meta = {**expect, "schema": layout.schema.name, "family": self.family}
        positions = {i: runner.positions(segs[i].positions) for i in keep}
        state = SchemaState(layout, contexts, {}, positions, None, keys, expect, meta)  # type: ignore[arg-type]
        state.kv = SchemaKV(keys, lambda i: self.module_kv(state, i))
        try:
            kv, pinned, counts = self.obtain(state, keep, progress=True)
        except BaseException:  # e.g. interrupted: what was encoded stays in the store, not in memory
            self.cache.drop_unreferenced(k.tier_key for k in keys.values())
            raise
        nbytes = sum(kv[i].nbytes for i in keep)
        self.cache.release(pinned)
        self.cache.ref(k.tier_key for k in keys.values())
        if replaces is not None:
            self.cache.unref(k.tier_key for k in replaces.keys.values())
        self.cache.enforce()
        state.report = EncodeReport(layout.schema.name, self.encoding, len(keep),
                                    sum(len(segs[i].tokens) for i in keep), counts["tokens"],
                                    counts["forwards"], counts["encode_s"], nbytes, counts["load_s"],
                                    counts["store_hits"], counts["memory_hits"], counts["encoded"])
        return state

    def memory_report(self, schemas: dict[str, SchemaState], bpt: int, placement: str) -> dict:
        """``PromptCache.memory_report`` (see there); ``bpt``: bytes per token."""
        rows = []
        for name, state in schemas.items():
            by_module: dict[str, dict] = {}
            for i, key in state.keys.items():
                owner = "/".join(state.layout.segments[i].owner) or "(root)"
                row = by_module.setdefault(owner, {"schema": name, "module": owner, "tokens": 0, "bytes": 0,
                                                   "device_bytes": 0, "host_bytes": 0})
                row["tokens"] += key.length
                row["bytes"] += key.length * bpt
                tier = self.cache.where(key.tier_key)
                if tier is not None:
                    row[f"{tier}_bytes"] += key.length * bpt
            rows.extend(by_module.values())
        residents = list(self.cache.residents())
        total = sum(r.nbytes for r in residents)
        tokens = sum(r.key.length for r in residents)
        return {"placement": placement, "modules": rows, "total_bytes": total, "total_tokens": tokens,
                "bytes_per_token": bpt, "consistent": total == tokens * bpt,
                "tiers": self.cache.report(), "relocation": self.relocation.mode}

    def remove(self, state: SchemaState) -> None:
        """A schema is gone: entries no other schema needs leave memory (not the store)."""
        self.cache.unref(k.tier_key for k in state.keys.values())

    def module_kv(self, state: SchemaState, i: int) -> ModuleKV:
        """One stored segment's KV (not pinned): from the tiers or the store, else re-encoded."""
        kv, pinned, _ = self.obtain(state, [i])
        self.release(pinned)
        return kv[i]

    def release(self, pinned: list[str]) -> None:
        """Unpin what :meth:`obtain` pinned and bring the tiers back within their budgets."""
        self.cache.release(pinned)
        self.cache.enforce()

    def obtain(self, state: SchemaState, needed: list[int], progress: bool = False
               ) -> tuple[dict[int, ModuleKV], list[str], dict]:
        """The KV of the stored segments ``needed`` (with positions), pinned: from the tiers or
        the store, the rest encoded.

        Returns ``(kv by segment, tier keys to release, counts)``. A segment no tier holds is
        re-encoded with whatever of its context is missing (:func:`forwards_needed`); encoded
        segments go into the home tier and, write-through, into the store.
        """
        work: dict[int, ModuleKV] = {}
        pinned: list[str] = []
        counts = {"tokens": 0, "forwards": 0, "encode_s": 0.0, "load_s": 0.0, "store_hits": 0,
                  "memory_hits": 0, "encoded": 0}

        def available(i: int) -> bool:
            if i in work:
                return True
            key = state.keys.get(i)
            if key is None:
                return False  # parameter slots and cache="false" text are never stored
            t0 = time.perf_counter()
            kv, source = self.cache.fetch(key, state.expect, pin=True)
            counts["load_s"] += time.perf_counter() - t0
            if kv is None:
                return False
            work[i] = kv.at(state.positions[i])
            pinned.append(key.tier_key)
            counts["store_hits" if source == "store" else "memory_hits"] += 1
            return True

        try:
            missing = [i for i in needed if not available(i)]
            if missing:
                runs = forwards_needed(encode_groups(state.contexts), available, missing)
                self._encode_runs(state, runs, work, pinned, counts, progress)
        except BaseException:
            self.cache.release(pinned)
            raise
        self.store_counts["store_hits"] += counts["store_hits"]
        self.store_counts["store_misses"] += counts["encoded"]
        return {i: work[i] for i in needed}, pinned, counts

    def _encode_runs(self, state: SchemaState, runs: list, work: dict[int, ModuleKV], pinned: list[str],
                     counts: dict, progress: bool) -> None:
        """Run the encoding forwards ``runs`` (past + computed segments) into ``work`` and the tiers.

        Consecutive runs mostly share their past (a union's members, the text after a union): the
        previous forward's cache (a :class:`_Trunk`) supplies the shared prefix as one piece, so
        assembling a past of P segments is not P small copies per run (issue 12, item 13).
        """
        runner = self.runner
        segs = state.layout.segments
        bar = tqdm(runs, desc=f"encoding {state.layout.schema.name}", unit="fwd",
                   disable=not (progress and self.progress) or len(runs) < 4, leave=False)
        trunk: _Trunk | None = None
        for g in bar:
            t0 = time.perf_counter()
            ids = [t for i in g.segments for t in segs[i].tokens]
            q_pos = runner.positions(p for i in g.segments for p in segs[i].positions)
            shared, tokens = trunk.shared(g.context) if trunk is not None else (0, 0)
            pieces = [work[i] for i in g.context[shared:]]
            if tokens:
                pieces.insert(0, trunk.kv.slice(tokens))
            # visible=None: all of the past, causal among the run (no dense matrix unless needed)
            _, cache = runner.prefill(pieces, ids, q_pos, None, reserve=0, logits=False)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            past = len(cache.key_positions) - len(ids)
            at = past
            # The trunk may stand in for work[i] only up to the first segment already held (a loaded
            # copy, kept below, need not equal this recompute bit for bit).
            fresh = next((k for k, i in enumerate(g.segments) if i in work), len(g.segments))
            for i in g.segments:
                n = len(segs[i].tokens)
                if i not in work:  # a loaded segment recomputed inside a chain keeps its loaded copy
                    kv = ModuleKV.from_layers(layers, at, at + n)
                    key = state.keys.get(i)
                    if key is not None:
                        owner = "/".join(segs[i].owner) or "(root)"
                        meta = {**state.meta, "module": owner, "offset": key.base, "tokens": n}
                        kv = self.cache.put(key, kv, meta, pin=True)
                        pinned.append(key.tier_key)
                        counts["encoded"] += 1
                    work[i] = kv.at(q_pos[at - past:at - past + n])
                at += n
            trunk = _Trunk.after(g.context + g.segments[:fresh], segs, layers, cache.key_positions)
            runner.sync()
            counts["tokens"] += len(ids)
            counts["forwards"] += 1
            counts["encode_s"] += time.perf_counter() - t0


@dataclass
class _Trunk:
    """The last encoding forward's cache, kept to supply the next run's shared past in one piece.

    ``segments`` is a context chain (a context plus a run), so two chains agree on their first
    ``m`` segments exactly when their ``m``-th segments are equal: the shared prefix is found by
    bisection. ``ends[k]``: tokens in ``segments[:k + 1]``. ``kv`` holds the forward's whole cache
    (views) with its positions.
    """

    segments: list[int]
    ends: list[int]
    kv: ModuleKV

    @classmethod
    def after(cls, segments: list[int], segs, layers, positions: torch.Tensor) -> "_Trunk":
        ends = list(itertools.accumulate(len(segs[i].tokens) for i in segments))
        return cls(segments, ends, ModuleKV([k[0] for k, _ in layers], [v[0] for _, v in layers], positions))

    def shared(self, context: list[int]) -> tuple[int, int]:
        """``(segments, tokens)`` of the longest common prefix of ``context`` and the trunk."""
        lo, hi = 0, min(len(context), len(self.segments))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if context[mid - 1] == self.segments[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        return lo, self.ends[lo - 1] if lo else 0

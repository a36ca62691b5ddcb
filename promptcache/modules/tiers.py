"""The tiered module cache: device memory <- host memory <- persistent store.

Every stored segment's KV lives in exactly one memory tier (or only in the store, or nowhere):

* ``device`` -- where requests read it without a copy (``placement="device"``);
* ``host`` -- CPU memory (pinned on CUDA); with ``placement="host"`` this is the home tier and
  requests copy from it, otherwise it holds what the device tier evicted;
* the store (:mod:`promptcache.store`) -- shared between processes and machines.

Each memory tier has a byte budget (``None`` = unlimited) and evicts least-recently-used entries
when it is over budget: device entries fall to host, host entries fall to the store (written back
if the write-through at encode time did not succeed) or are dropped when there is no store. An
entry a running request has *pinned* is never evicted. Budgets are enforced between operations
(after each ``add_schema`` and each request), not inside one: a single request or schema whose
working set exceeds a budget runs, then the tier shrinks back.

A lookup that misses every tier returns ``None``; the engine then re-encodes (see
:func:`promptcache.plan.forwards_needed`). Entries are shared: two schemas that need the same content
key hold one copy (reference-counted per schema; dropped from memory when no schema needs it).
Entries loaded from the store, or found in memory at another offset, are relocated
(:mod:`promptcache.modules.relocate`) when their offset differs.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..runtime.kv import ModuleKV
from ..store import CacheEntry, CacheStore, StoreWarning
from .keys import ModuleKey
from .relocate import Relocation

TIERS = ("device", "host")


@dataclass
class Resident:
    """One module cache held in a memory tier."""

    key: ModuleKey
    kv: ModuleKV
    tier: str
    meta: dict          # what the store entry carries (for write-back)
    persisted: bool     # the store holds this content (at some offset)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class TieredModuleCache:
    """Module caches by key across device, host and store, with budgets and pins (module docstring).

    ``shape``: ``(num_layers, kv_heads, head_dim)`` every entry must have (a store entry that
    does not is ignored with a warning). ``dtype``: the model's dtype, entries are checked too.
    """

    def __init__(self, device: torch.device, placement: str, store: CacheStore | None,
                 relocation: Relocation, shape: tuple[int, int, int], dtype: torch.dtype,
                 max_device_bytes: int | None = None, max_host_bytes: int | None = None) -> None:
        for name, v in (("max_device_bytes", max_device_bytes), ("max_host_bytes", max_host_bytes)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, not {v!r}")
        self.device = torch.device(device)
        self.placement = placement
        self.home = "device" if placement == "device" else "host"
        self.store = store
        self.relocation = relocation
        self.shape = shape
        self.dtype = dtype
        self.budget = {"device": max_device_bytes if placement == "device" else 0, "host": max_host_bytes}
        self._pin_host = self.device.type == "cuda"
        self._tiers: dict[str, OrderedDict[str, Resident]] = {t: OrderedDict() for t in TIERS}
        self._bytes = {t: 0 for t in TIERS}
        self._by_content: dict[str, set[str]] = {}
        self.pins: Counter[str] = Counter()
        self.refs: Counter[str] = Counter()
        self.stats = {t: {"hits": 0, "misses": 0, "evictions": 0} for t in TIERS}
        self.stats["store"] = {"hits": 0, "misses": 0, "puts": 0, "failed_puts": 0, "write_backs": 0}
        self.relocations = 0
        self.dropped = 0
        self._warned_drop = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ lookups

    def where(self, tier_key: str) -> str | None:
        """The memory tier holding ``tier_key``, or ``None``."""
        for t in TIERS:
            if tier_key in self._tiers[t]:
                return t
        return None

    def get(self, key: ModuleKey, expect: Mapping | None = None, pin: bool = False) -> ModuleKV | None:
        """The module's KV in its home tier (promoted/loaded/relocated as needed), or ``None``.

        ``expect`` is passed to ``store.get`` (model fingerprint, dtype...). ``pin`` keeps the
        entry from eviction until :meth:`release`.
        """
        return self.fetch(key, expect, pin)[0]

    def fetch(self, key: ModuleKey, expect: Mapping | None = None, pin: bool = False
              ) -> tuple[ModuleKV | None, str | None]:
        """Like :meth:`get`, plus where it came from: ``"device"``, ``"host"``, ``"memory"`` (another
        offset's copy, relocated), ``"store"``, or ``None`` when it is nowhere."""
        with self._lock:
            res, source = self._lookup(key, expect)
            if res is None:
                return None, None
            if pin:
                self.pins[key.tier_key] += 1
            return res.kv, source

    def _lookup(self, key: ModuleKey, expect: Mapping | None) -> tuple[Resident | None, str | None]:
        tk = key.tier_key
        if self.home == "device":
            res = self._tiers["device"].get(tk)
            if res is not None:
                self._tiers["device"].move_to_end(tk)
                self.stats["device"]["hits"] += 1
                return res, "device"
            self.stats["device"]["misses"] += 1
        res = self._tiers["host"].get(tk)
        if res is not None:
            self.stats["host"]["hits"] += 1
            if self.home == "device":
                self._remove(tk)
                res = self._insert(Resident(key, res.kv.to(self.device), "device", res.meta, res.persisted))
            else:
                self._tiers["host"].move_to_end(tk)
            return res, "host"
        self.stats["host"]["misses"] += 1
        other = self._resident_copy(key)
        if other is not None:
            self.relocations += 1
            kv = self.relocation.shift(other.kv, key.base - other.key.base)
            kv = ModuleKV(kv.keys, [v.clone() for v in kv.values])  # own memory: tiers count bytes
            return self._insert(Resident(key, self._to_home(kv), self.home,
                                         {**other.meta, "offset": key.base}, other.persisted)), "memory"
        res = self._load(key, expect)
        return res, ("store" if res is not None else None)

    def _resident_copy(self, key: ModuleKey) -> Resident | None:
        """The same content held at another offset (only differs by tier key for rotated RoPE)."""
        for tk in self._by_content.get(key.store_key, ()):
            t = self.where(tk)
            if t is not None and tk != key.tier_key:
                return self._tiers[t][tk]
        return None

    def _load(self, key: ModuleKey, expect: Mapping | None) -> Resident | None:
        if self.store is None:
            return None
        entry = self.store.get(key.store_key, expect=expect)
        if entry is None:
            self.stats["store"]["misses"] += 1
            return None
        why = self._check_entry(entry, key)
        if why is not None:
            self.stats["store"]["misses"] += 1
            warnings.warn(f"promptcache: store entry {key.store_key[:16]} ignored ({why}); "
                          "it will be recomputed", StoreWarning, stacklevel=4)
            return None
        self.stats["store"]["hits"] += 1
        kv = entry.kv
        offset = int(entry.meta["offset"])
        if offset != key.base:
            self.relocations += 1
            kv = self.relocation.shift(kv, key.base - offset)
        return self._insert(Resident(key, self._to_home(kv), self.home, {**entry.meta, "offset": key.base},
                                     True))

    def _check_entry(self, entry: CacheEntry, key: ModuleKey) -> str | None:
        layers, heads, dim = self.shape
        want = (heads, key.length, dim)
        if entry.n_layers != layers:
            return f"{entry.n_layers} layers, the model has {layers}"
        for k, v in zip(entry.kv.keys, entry.kv.values):
            if tuple(k.shape) != want or tuple(v.shape) != want:
                return f"tensor shape {tuple(k.shape)} != {want}"
            if k.dtype != self.dtype or v.dtype != self.dtype:
                return f"dtype {k.dtype} != {self.dtype}"
        offset = entry.meta.get("offset")
        if not isinstance(offset, int) or isinstance(offset, bool):
            return f"meta offset {offset!r} is not an int"
        if offset != key.base and not self.relocation.relative:
            return f"stored at offset {offset}, needed at {key.base}, and this model cannot relocate"
        return None

    # ------------------------------------------------------------------ inserts, pins, refs

    def put(self, key: ModuleKey, kv: ModuleKV, meta: dict, pin: bool = False,
            persist: bool = True) -> ModuleKV:
        """Hold a freshly encoded module in its home tier; write it through to the store.

        Returns the held copy (on the home tier's device).
        """
        with self._lock:
            persisted = False
            if persist and self.store is not None:
                persisted = self._store_put(key, kv, meta)
            old = self.where(key.tier_key)
            if old is not None:
                self._remove(key.tier_key)
            res = self._insert(Resident(key, self._to_home(kv), self.home, dict(meta), persisted))
            if pin:
                self.pins[key.tier_key] += 1
            return res.kv

    def _store_put(self, key: ModuleKey, kv: ModuleKV, meta: dict) -> bool:
        ok = self.store.put(key.store_key, CacheEntry(kv, dict(meta)))
        self.stats["store"]["puts" if ok else "failed_puts"] += 1
        return ok

    def release(self, tier_keys: Iterable[str]) -> None:
        """Undo one pin per key (see :meth:`get`/:meth:`put`)."""
        with self._lock:
            for tk in tier_keys:
                if self.pins[tk] <= 1:
                    self.pins.pop(tk, None)
                else:
                    self.pins[tk] -= 1

    def ref(self, tier_keys: Iterable[str]) -> None:
        """A schema needs these entries (keeps them in memory tiers while budgets allow)."""
        with self._lock:
            self.refs.update(tier_keys)

    def unref(self, tier_keys: Iterable[str]) -> None:
        """A schema no longer needs these; entries no schema needs leave memory (not the store)."""
        with self._lock:
            for tk in tier_keys:
                self.refs[tk] -= 1
                if self.refs[tk] <= 0:
                    del self.refs[tk]
                    if self.where(tk) is not None:
                        self._remove(tk)

    def drop(self, tier_key: str) -> bool:
        """Forget the memory copy of ``tier_key`` (as if evicted with no store); False if none held."""
        with self._lock:
            if self.where(tier_key) is None:
                return False
            self._remove(tier_key)
            return True

    def drop_unreferenced(self, tier_keys: Iterable[str]) -> None:
        """Forget entries of these keys that no schema references (an ``add_schema`` that failed)."""
        with self._lock:
            for tk in tier_keys:
                if self.refs[tk] <= 0 and self.pins[tk] <= 0 and self.where(tk) is not None:
                    self._remove(tk)

    # ------------------------------------------------------------------ budgets

    def enforce(self) -> None:
        """Evict LRU unpinned entries until each tier is within its budget."""
        with self._lock:
            budget = self.budget["device"]
            if budget is not None:
                for tk in list(self._tiers["device"]):
                    if self._bytes["device"] <= budget:
                        break
                    if self.pins[tk] <= 0:
                        res = self._remove(tk)
                        self.stats["device"]["evictions"] += 1
                        self._insert(Resident(res.key, res.kv.to("cpu", pin=self._pin_host), "host",
                                              res.meta, res.persisted))
            budget = self.budget["host"]
            if budget is not None:
                for tk in list(self._tiers["host"]):
                    if self._bytes["host"] <= budget:
                        break
                    if self.pins[tk] <= 0:
                        self._spill(self._remove(tk))

    def _spill(self, res: Resident) -> None:
        """A host entry leaves memory: to the store if it is not there yet, else it is gone."""
        self.stats["host"]["evictions"] += 1
        if res.persisted or self.store is None:
            if not res.persisted:
                self.dropped += 1
            return
        self.stats["store"]["write_backs"] += 1
        if self._store_put(res.key, res.kv, res.meta):
            self._warned_drop = False
            return
        self.dropped += 1
        if not self._warned_drop:  # once per failure streak, not once per module
            self._warned_drop = True
            warnings.warn(f"promptcache: evicted module {res.meta.get('module', '?')} could not be written "
                          "to the store; such modules are dropped and re-encoded when needed",
                          StoreWarning, stacklevel=3)

    # ------------------------------------------------------------------ report

    def report(self) -> dict:
        """Bytes, entries, budget and counters per tier (and the store's counters)."""
        with self._lock:
            out = {}
            for t in TIERS:
                out[t] = {"bytes": self._bytes[t], "entries": len(self._tiers[t]), "budget": self.budget[t],
                          "pinned": sum(1 for tk in self._tiers[t] if self.pins[tk] > 0), **self.stats[t]}
            store = {"url": getattr(self.store, "url", None), **self.stats["store"]} if self.store else None
            out["store"] = store
            out["relocations"] = self.relocations
            out["dropped"] = self.dropped
            return out

    def residents(self) -> Iterator[Resident]:
        for t in TIERS:
            yield from list(self._tiers[t].values())

    def nbytes(self, tier: str) -> int:
        return self._bytes[tier]

    # ------------------------------------------------------------------ internals

    def _to_home(self, kv: ModuleKV) -> ModuleKV:
        if self.home == "device":
            return kv.to(self.device)
        return kv.to("cpu", pin=self._pin_host)

    def _insert(self, res: Resident) -> Resident:
        tk = res.key.tier_key
        self._tiers[res.tier][tk] = res
        self._bytes[res.tier] += res.nbytes
        self._by_content.setdefault(res.key.store_key, set()).add(tk)
        return res

    def _remove(self, tk: str) -> Resident:
        t = self.where(tk)
        res = self._tiers[t].pop(tk)
        self._bytes[t] -= res.nbytes
        keys = self._by_content.get(res.key.store_key)
        if keys is not None:
            keys.discard(tk)
            if not keys:
                del self._by_content[res.key.store_key]
        return res


class SchemaKV(Mapping[int, ModuleKV]):
    """``state.kv[i]``: a stored segment's KV, fetched from the tiers on access (never pinned)."""

    def __init__(self, keys: Mapping[int, ModuleKey], fetch: Callable[[int], ModuleKV]) -> None:
        self._keys = keys
        self._fetch = fetch

    def __getitem__(self, i: int) -> ModuleKV:
        if i not in self._keys:
            raise KeyError(i)
        return self._fetch(i)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


"""In-process store: a dict. For tests and single-process runs that want the store API.

It still copies on put and get and verifies checksums, so it behaves exactly like the
persistent backends (a caller mutating a returned tensor cannot poison the store).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from .base import (BadEntry, BadEntryError, CacheEntry, CacheStore, EntryInfo, check_checksum, check_expect,
                   check_key, copy_tensor, entry_checksum, normalize_entry, now)


@dataclass
class _Slot:
    entry: CacheEntry
    checksum: str
    created: float
    last_access: float


class MemoryStore(CacheStore):
    """A dict of verified copies; ``memory://NAME`` URLs share one instance per process."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.url = f"memory://{name}"
        self._data: dict[str, _Slot] = {}
        self._lock = threading.RLock()

    def held(self, key: str) -> CacheEntry | None:
        """The entry as held, not a copy and not checked: for fault-injection tests (a change to
        it is what a memory fault would be; ``get`` must then find the entry bad)."""
        slot = self._data.get(key)
        return None if slot is None else slot.entry

    def get(self, key: str, expect: Mapping[str, Any] | None = None) -> CacheEntry | None:
        check_key(key)
        with self._lock:
            slot = self._data.get(key)
            if slot is None:
                return self._count(None)
            reason = check_checksum(slot.entry.named_tensors(), slot.entry.meta, key, slot.checksum)
            if reason is None:
                reason = check_expect(slot.entry, expect)
            if reason is not None:
                del self._data[key]
                self._report_bad(key, reason)
                return self._count(None)
            slot.last_access = now()
            out = CacheEntry(slot.entry.map(copy_tensor).kv, copy.deepcopy(slot.entry.meta))
        return self._count(out)

    def put(self, key: str, entry: CacheEntry) -> bool:
        check_key(key)
        stored = normalize_entry(entry)
        # normalize_entry may return the caller's own tensors when already compact: copy.
        stored = stored.map(copy_tensor)
        checksum = entry_checksum(stored.named_tensors(), stored.meta, key)
        t = now()
        with self._lock:
            self._data[key] = _Slot(stored, checksum, t, t)
            self.counters["puts"] += 1
        return True

    def contains(self, key: str) -> bool:
        check_key(key)
        return key in self._data

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._data.pop(key, None) is not None

    def list(self) -> list[EntryInfo]:
        with self._lock:
            return [EntryInfo(k, s.entry.nbytes, s.entry.n_layers, s.entry.seq_len, s.entry.dtype,
                              s.created, s.last_access, s.entry.meta)
                    for k, s in self._data.items()]

    def stats(self) -> dict:
        return self._base_stats(self.list())

    def verify(self, remove: bool = False) -> list[BadEntry]:
        with self._lock:
            return self._verify_each(list(self._data.items()), _check_slot,
                                     lambda key, _slot, _exc: self._data.pop(key, None), remove)


def _check_slot(key: str, slot: _Slot) -> None:
    reason = check_checksum(slot.entry.named_tensors(), slot.entry.meta, key, slot.checksum)
    if reason is not None:
        raise BadEntryError(reason)

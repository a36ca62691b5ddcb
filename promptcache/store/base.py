"""The store interface, the entry format and the integrity rules every backend shares.

An entry is one prompt module's KV cache: a :class:`promptcache.runtime.kv.ModuleKV` (per layer a
key and a value tensor shaped ``[kv_heads, seq_len, head_dim]``; stored as ``L{i}.k``/``L{i}.v``,
the same files and manifests as before it carried a ModuleKV) plus a JSON-able ``meta`` dict.
Backends differ only in where the bytes live; what they must promise is the same and is enforced
here:

* ``get`` returns bit-exact tensors or ``None`` -- never a truncated, corrupted or foreign entry.
  A bad entry is reported once (a :class:`StoreWarning` naming the key and the cause) and removed
  or quarantined, so the caller simply recomputes it.
* Every stored entry carries a checksum over its key, its meta and every tensor (name, dtype,
  shape, bytes), so an entry's file or manifest copied under another key is refused even if its
  recorded key was rewritten (issue 12 item 5). Entries written before the key was bound (format
  1) are treated as stale: removed and recomputed, with one warning per store instance.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np
import torch

from ..runtime.kv import ModuleKV

FORMAT_VERSION = 2  # 2: the checksum binds the entry key (1 did not)
CHECKSUM_ALGO = "sha256"
_KEY_RE = re.compile(r"^[a-z0-9_][a-z0-9_.\-]{0,127}$")
_pool: tuple[int, ThreadPoolExecutor] | None = None
T = TypeVar("T")


def _hash_pool() -> ThreadPoolExecutor:
    """hashlib releases the GIL on large buffers, so per-tensor digests hash in parallel.

    One pool per process: a pool inherited through ``fork`` has no threads and would hang.
    """
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                 thread_name_prefix="pc-store-hash"))
    return _pool[1]


class StoreWarning(UserWarning):
    """A store problem that the caller survives: a bad entry (miss) or an unreachable backend."""


class StoreError(Exception):
    """Misuse of the store API (malformed key, entry or URL); never raised for I/O trouble."""


class BadEntryError(Exception):
    """Inside a backend: stored data that must not be returned; the message is the cause."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"torch.bfloat16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def canonical_json(obj: Any) -> str:
    """One exact text per value: sorted keys, no whitespace, no NaN, only JSON types.

    Tensors/arrays become lists, tuples become lists, dtypes their names. Anything else (sets,
    arbitrary objects) is rejected instead of being stringified: a key or checksum built from
    ``repr`` of an object could silently change meaning between versions.
    """
    return json.dumps(_to_jsonable(obj), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def _to_jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise StoreError(f"non-finite float {obj!r} cannot be part of a key or entry meta")
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise StoreError(f"meta/key dict keys must be strings, got {k!r}")
            out[k] = _to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return _to_jsonable(obj.tolist())
    raise StoreError(f"{type(obj).__name__} is not JSON-able; convert it explicitly: {obj!r:.80}")


def check_key(key: str) -> str:
    """Keys become file names and Redis key parts, so they are restricted to a safe alphabet."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise StoreError(f"invalid store key {key!r}: use make_key() (1-128 chars of [a-z0-9_.-]; "
                         "lowercase, so keys are safe file names on case-insensitive disks too)")
    return key


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor (works for bfloat16, which numpy lacks)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_tensor(t: torch.Tensor) -> torch.Tensor:
    """A private, contiguous copy of a CPU tensor (any strides), made by numpy.

    ``Tensor.clone``/``contiguous`` fan out to torch's intra-op threads; on a busy machine
    (the engine's own threads, other processes) the hand-offs cost milliseconds per tensor
    (measured: 15 ms to clone 400 KB with 2 threads on a loaded 2-core box, 7 us with one).
    A plain single-threaded copy is memory-bound and predictable.
    """
    iv = _SAME_SIZE_INT.get(t.element_size())
    if iv is None or t.is_complex() or t.device.type != "cpu":
        return t.detach().to("cpu").contiguous().clone()
    src = t.detach().view(iv).numpy()  # a strided view; bfloat16 goes through int16
    return torch.from_numpy(np.array(src, copy=True, order="C")).view(t.dtype)


@dataclass
class CacheEntry:
    """One module's KV cache (a :class:`ModuleKV`, each tensor ``[kv_heads, seq, head_dim]``) and
    its meta.

    The store keeps no layout positions (a module is shared between offsets; ``meta["offset"]``
    records where it was encoded): entries read back carry ``positions=None``.
    """

    kv: ModuleKV
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    @property
    def n_layers(self) -> int:
        return self.kv.num_layers

    @property
    def seq_len(self) -> int:
        k = self.kv.keys[0] if self.kv.keys else None
        return int(k.shape[-2]) if k is not None and k.dim() >= 2 else 0

    @property
    def dtype(self) -> str | None:
        return dtype_name(self.kv.keys[0].dtype) if self.kv.keys else None

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"L0.k": ..., "L0.v": ...}`` view, the on-disk/on-wire naming."""
        out: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(zip(self.kv.keys, self.kv.values)):
            out[f"L{i}.k"] = k
            out[f"L{i}.v"] = v
        return out

    @classmethod
    def from_named(cls, named: Mapping[str, torch.Tensor], n_layers: int, meta: dict) -> "CacheEntry":
        """Inverse of :meth:`named_tensors`; a missing or extra tensor raises ``KeyError``/``ValueError``."""
        if len(named) != 2 * n_layers:
            raise ValueError(f"expected {2 * n_layers} tensors, found {len(named)}")
        return cls(ModuleKV([named[f"L{i}.k"] for i in range(n_layers)],
                            [named[f"L{i}.v"] for i in range(n_layers)]), meta)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "CacheEntry":
        """The same entry with ``fn`` applied to every tensor (e.g. a private copy); meta shared."""
        return CacheEntry(ModuleKV([fn(k) for k in self.kv.keys], [fn(v) for v in self.kv.values]),
                          self.meta)


@dataclass
class EntryInfo:
    """What ``list()`` reports about one entry without loading its tensors."""

    key: str
    nbytes: int
    n_layers: int
    seq_len: int
    dtype: str | None
    created: float
    last_access: float
    meta: dict = field(default_factory=dict)


@dataclass
class BadEntry:
    """An entry ``verify()`` found unusable, and why."""

    key: str
    reason: str


def normalize_entry(entry: CacheEntry) -> CacheEntry:
    """The exact form that is stored: detached, CPU, contiguous, own storage; meta canonical.

    Own storage matters because layers sliced out of one big cache tensor share memory, which
    safetensors refuses and which would make a stored copy alias the caller's buffer.
    """
    if not isinstance(entry, CacheEntry):
        raise StoreError(f"expected CacheEntry, got {type(entry).__name__}")
    if not isinstance(entry.meta, dict):
        raise StoreError("CacheEntry.meta must be a dict")
    kv = entry.kv
    if not isinstance(kv, ModuleKV):
        raise StoreError(f"CacheEntry.kv must be a ModuleKV, got {type(kv).__name__}")
    if len(kv.keys) != len(kv.values):
        raise StoreError(f"{len(kv.keys)} key tensors but {len(kv.values)} value tensors")
    for i, pair in enumerate(zip(kv.keys, kv.values)):
        if not all(isinstance(t, torch.Tensor) for t in pair):
            raise StoreError(f"layer {i}: expected a (key, value) pair of tensors")
    meta = json.loads(canonical_json(entry.meta))
    return CacheEntry(entry.map(_own).kv, meta)


def _own(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = copy_tensor(t)
    return t


def entry_checksum(named: Mapping[str, torch.Tensor], meta: dict, key: str,
                   algo: str = CHECKSUM_ALGO) -> str:
    """``algo:hex`` over the entry key, the meta and every tensor's name, dtype, shape and bytes.

    The key is bound so that a valid entry cannot be served under another key (its recorded key
    rewritten). Per-tensor digests are computed in parallel and then combined in name order, so
    the result does not depend on how a backend lays the tensors out.
    """
    names = sorted(named)

    def one(name: str) -> bytes:
        t = named[name]
        h = hashlib.new(algo)
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(tensor_bytes(t.contiguous()))
        return h.digest()

    digests = list(_hash_pool().map(one, names))
    top = hashlib.new(algo)
    top.update(f"promptcache-entry-v{FORMAT_VERSION}|".encode())
    top.update(canonical_json([key, meta]).encode())  # one JSON array: unambiguous boundaries
    for d in digests:
        top.update(d)
    return f"{algo}:{top.hexdigest()}"


def check_checksum(named: Mapping[str, torch.Tensor], meta: dict, key: str,
                   recorded: str) -> str | None:
    """Return a reason string when the recorded checksum does not match, else ``None``."""
    algo, _, _ = str(recorded).partition(":")
    if algo not in hashlib.algorithms_available:
        return f"unknown checksum algorithm {algo!r}"
    if entry_checksum(named, meta, key, algo) != recorded:
        return "checksum mismatch (corrupted data)"
    return None


def check_summary(entry: CacheEntry, recorded: Mapping[str, Any]) -> str | None:
    """Reason why a backend's recorded summary (what ``list()`` shows) disagrees with the data."""
    actual = {"n_layers": entry.n_layers, "seq_len": entry.seq_len, "dtype": entry.dtype or "",
              "nbytes": entry.nbytes}
    for k, v in actual.items():
        if str(recorded.get(k)) != str(v):
            return f"recorded {k}={recorded.get(k)!r:.40} but the data has {v!r}"
    return None


def check_expect(entry: CacheEntry, expect: Mapping[str, Any] | None) -> str | None:
    """Reason why ``entry`` is not what the caller expects (e.g. other model or dtype), or ``None``.

    ``expect["dtype"]`` is compared with the tensors' actual dtype as well as ``meta["dtype"]``.
    """
    if not expect:
        return None
    for k, want in expect.items():
        if k == "dtype":
            want_s = dtype_name(want)
            if entry.dtype is not None and entry.dtype != want_s:
                return f"dtype mismatch (tensors are {entry.dtype}, expected {want_s})"
            if "dtype" in entry.meta and dtype_name(entry.meta["dtype"]) != want_s:
                return f"dtype mismatch (meta says {entry.meta['dtype']}, expected {want_s})"
            continue
        have = entry.meta.get(k, _MISSING)
        if have is _MISSING:
            return f"meta field {k!r} missing (expected {want!r:.60})"
        if canonical_json(have) != canonical_json(want):
            return f"meta field {k!r} mismatch ({have!r:.60} != expected {want!r:.60})"
    return None


_MISSING = object()


class CacheStore(abc.ABC):
    """The interface the engine uses. All methods are safe to call concurrently from processes.

    I/O trouble never raises out of ``get``/``put``/``contains``/``delete``: a broken backend
    behaves like an empty one that drops writes, and says so once via :class:`StoreWarning`.
    """

    url: str = "?"

    def __init__(self) -> None:
        self.counters = {"hits": 0, "misses": 0, "puts": 0, "bad": 0, "stale": 0, "errors": 0}
        self.last_error: str | None = None  # the cause of the latest counted error (CLI reports it)
        self._stale_warned = False

    @abc.abstractmethod
    def get(self, key: str, expect: Mapping[str, Any] | None = None) -> CacheEntry | None:
        """The verified entry, or ``None`` (missing, bad, foreign per ``expect``, or unreachable)."""

    @abc.abstractmethod
    def put(self, key: str, entry: CacheEntry) -> bool:
        """Store atomically (readers see the old entry or the new one); ``False`` if skipped."""

    @abc.abstractmethod
    def contains(self, key: str) -> bool:
        """Whether a published entry exists (not verified: ``get`` may still find it bad)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove an entry; ``True`` if something was removed."""

    @abc.abstractmethod
    def list(self) -> list[EntryInfo]:
        """All published entries (no tensor loading)."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Entry count, bytes, this instance's hit/miss/put counters and backend details."""

    @abc.abstractmethod
    def verify(self, remove: bool = False) -> list[BadEntry]:
        """Load and check every entry; with ``remove`` also delete/quarantine the bad ones."""

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Drop leftovers of crashed writers older than ``max_age_s``; returns how many."""
        return 0

    def ping(self) -> bool:
        """Whether the backend is reachable right now."""
        return True

    def close(self) -> None:
        """Release connections/handles."""

    def __enter__(self) -> "CacheStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for backends -------------------------------------------------------------

    def _base_stats(self, infos: Iterable[EntryInfo]) -> dict:
        infos = list(infos)
        return {"backend": type(self).__name__, "url": self.url, "entries": len(infos),
                "bytes": sum(i.nbytes for i in infos), **self.counters}

    def _report_bad(self, key: str, reason: str, action: str = "removed") -> None:
        self.counters["bad"] += 1
        warnings.warn(f"promptcache store {self.url}: entry {key} is bad ({reason}); "
                      f"{action}, it will be recomputed", StoreWarning, stacklevel=3)

    def _report_stale(self, key: str, found: Any, action: str = "removed") -> None:
        """An entry in an older format: counted as bad and stale, warned about once per instance."""
        self.counters["bad"] += 1
        self.counters["stale"] += 1
        if not self._stale_warned:
            self._stale_warned = True
            warnings.warn(f"promptcache store {self.url}: entry {key} has format {found!r}, this "
                          f"version reads format {FORMAT_VERSION}; {action}, it will be recomputed "
                          "(further old entries are handled alike without a warning; see "
                          "stats()['stale'])", StoreWarning, stacklevel=3)

    def _note_error(self, message: str) -> None:
        """Count an I/O failure and remember its cause, so a maintenance command can fail on it."""
        self.counters["errors"] += 1
        self.last_error = message

    def _verify_each(self, items: Iterable[tuple[str, T]], check: Callable[[str, T], object],
                     discard: Callable[[str, T, Exception], object], remove: bool,
                     bad: tuple[type[Exception], ...] = (), gone: tuple[type[Exception], ...] = ()
                     ) -> list[BadEntry]:
        """The one ``verify()`` loop: ``check(key, item)`` every entry in key order.

        A malformed key (:class:`StoreError`), a :class:`BadEntryError` or one of ``bad`` lists the
        entry (and with ``remove`` calls ``discard(key, item, error)``); one of ``gone`` (the entry
        vanished or changed while read) skips it.
        """
        found = []
        for key, item in sorted(items, key=lambda pair: pair[0]):
            try:
                check_key(key)
                check(key, item)
            except gone:
                continue
            except (BadEntryError, StoreError, *bad) as exc:
                found.append(BadEntry(key, str(exc)))
                if remove:
                    discard(key, item, exc)
        return found

    def _count(self, entry: CacheEntry | None) -> CacheEntry | None:
        self.counters["hits" if entry is not None else "misses"] += 1
        return entry


def now() -> float:
    return time.time()

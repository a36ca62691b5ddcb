"""Directory store: one safetensors file per entry, an SQLite index, safe for many processes.

Layout under the root directory::

    promptcache-store.json          format marker
    entries/<k[:2]>/<key>.safetensors
    index.sqlite (+ -wal, -shm)     sizes / shapes / access times for ls, stats and LRU
    locks/<k[:2]>.lock              filelock stripes serialising publish/delete per key group
    quarantine/                     bad entries moved aside for inspection (``gc`` empties it)

Atomicity: an entry is written to a temp file in its final directory, fsynced, then published
with ``os.replace`` (atomic on POSIX), so a reader sees the old file, the new file or none --
never a partial one -- and a writer killed mid-write leaves only an invisible ``.tmp`` file that
``sweep()`` removes. Tensors are named ``L{i}.k``/``L{i}.v``; the entry meta, key, layer count
and checksum live in the safetensors header's string metadata, so one file is self-describing.

Loading uses safetensors' mmap (zero copy, private mapping: an in-place edit of a returned
tensor never reaches the file), then verifies the checksum. Because the mapping is kept, a
file must never be truncated in place while in use; this store only ever replaces, renames or
unlinks files. Pass ``load="pread"`` to copy into memory instead.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import filelock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .base import (FORMAT_VERSION, BadEntry, CacheEntry, CacheStore, EntryInfo, StoreError,
                   StoreWarning, canonical_json, check_checksum, check_expect, check_key,
                   check_summary, entry_checksum, normalize_entry, now)
from .sqlite_index import SqliteIndex

_SUFFIX = ".safetensors"
_H = "promptcache."  # prefix of our header metadata fields
_HEADER_FIELDS = {_H + f for f in ("format", "key", "layers", "seq_len", "dtype", "nbytes", "created",
                                   "meta", "checksum")}
# What list() shows is checked against the tensors too, so a flipped digit there is caught.
_SUMMARY_FIELDS = {"n_layers": "layers", "seq_len": "seq_len", "dtype": "dtype", "nbytes": "nbytes"}
LOCK_TIMEOUT_S = 120.0


class _Bad(Exception):
    """An entry file that must not be returned; the message is the cause, ``st`` the file."""

    def __init__(self, reason: str, st: os.stat_result) -> None:
        super().__init__(reason)
        self.st = st


class LocalStore(CacheStore):
    """Entries as files under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True, load: str = "mmap",
                 create: bool = True) -> None:
        super().__init__()
        if load not in ("mmap", "pread"):
            raise StoreError(f"load must be 'mmap' or 'pread', not {load!r}")
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        self.fsync = fsync
        self.load = load
        marker = self.root / "promptcache-store.json"
        if not create and not marker.exists():
            raise StoreError(f"no promptcache store at {self.root}")
        for sub in ("entries", "locks", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            _atomic_write_text(marker, json.dumps({"format": FORMAT_VERSION, "kind": "promptcache-store"}))
        self._index = SqliteIndex(self.root / "index.sqlite")

    # -- paths and locks -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / (key + _SUFFIX)

    def _lock(self, key: str) -> filelock.FileLock:
        return filelock.FileLock(str(self.root / "locks" / f"{key[:2]}.lock"), timeout=LOCK_TIMEOUT_S)

    def _entry_files(self) -> dict[str, Path]:
        out = {}
        for sub in (self.root / "entries").iterdir():
            if sub.is_dir():
                for p in sub.iterdir():
                    if p.name.endswith(_SUFFIX) and not p.name.startswith("."):
                        out[p.name[: -len(_SUFFIX)]] = p
        return out

    # -- interface -------------------------------------------------------------------------

    def get(self, key: str, expect: Mapping[str, Any] | None = None) -> CacheEntry | None:
        check_key(key)
        path = self._path(key)
        try:
            entry, st = self._load(path, key)
        except FileNotFoundError:
            return self._count(None)
        except _Bad as bad:
            self._quarantine(key, bad.st, str(bad))
            return self._count(None)
        except OSError as exc:  # permissions, I/O error: a miss, not a crash
            self.counters["errors"] += 1
            warnings.warn(f"promptcache store {self.url}: cannot read entry {key}: {exc}", StoreWarning)
            return self._count(None)
        reason = check_expect(entry, expect)
        if reason is not None:
            self._quarantine(key, st, reason)
            return self._count(None)
        self._index.touch(key, now())
        return self._count(entry)

    def put(self, key: str, entry: CacheEntry) -> bool:
        check_key(key)
        e = normalize_entry(entry)
        named = e.named_tensors()
        created = now()
        header = {
            _H + "format": str(FORMAT_VERSION),
            _H + "key": key,
            _H + "layers": str(e.n_layers),
            _H + "seq_len": str(e.seq_len),
            _H + "dtype": e.dtype or "",
            _H + "nbytes": str(e.nbytes),
            _H + "created": repr(created),
            _H + "meta": canonical_json(e.meta),
            _H + "checksum": entry_checksum(named, e.meta),
        }
        path = self._path(key)
        tmp = path.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(named, str(tmp), metadata=header)
            if self.fsync:
                _fsync_path(tmp)
            with self._lock(key):
                os.replace(tmp, path)
                if self.fsync:
                    _fsync_path(path.parent)
                self._index.upsert(EntryInfo(key, e.nbytes, e.n_layers, e.seq_len, e.dtype,
                                             created, created, e.meta))
        except (OSError, filelock.Timeout, SafetensorError) as exc:  # disk full, lock stuck...
            self.counters["errors"] += 1
            warnings.warn(f"promptcache store {self.url}: write of {key} skipped: {exc}", StoreWarning)
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.counters["puts"] += 1
        return True

    def contains(self, key: str) -> bool:
        check_key(key)
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        check_key(key)
        try:
            with self._lock(key):
                try:
                    self._path(key).unlink()
                    removed = True
                except FileNotFoundError:
                    removed = False
                self._index.remove([key])
        except (OSError, filelock.Timeout) as exc:
            self.counters["errors"] += 1
            warnings.warn(f"promptcache store {self.url}: cannot delete {key}: {exc}", StoreWarning)
            return False
        return removed

    def list(self) -> list[EntryInfo]:
        rows = self._index.all()  # read rows before files: see _reconcile
        files = self._entry_files()
        return self._reconcile(rows, files)

    def stats(self) -> dict:
        infos = self.list()
        out = self._base_stats(infos)
        out["root"] = str(self.root)
        out["quarantined"] = sum(1 for _ in (self.root / "quarantine").iterdir())
        out["disk_bytes"] = sum(p.stat().st_size for p in self._entry_files().values() if p.exists())
        return out

    def verify(self, remove: bool = False) -> list[BadEntry]:
        bad = []
        for key, path in sorted(self._entry_files().items()):
            try:
                check_key(key)
                self._load(path, key)
            except FileNotFoundError:
                continue
            except _Bad as exc:
                bad.append(BadEntry(key, str(exc)))
                if remove:
                    self._quarantine(key, exc.st, str(exc), report=False)
            except (StoreError, OSError) as exc:  # a stray file name, an unreadable file
                bad.append(BadEntry(key, str(exc)))
                if remove:
                    self._quarantine(key, os.stat(path), str(exc), report=False)
        return bad

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Remove crashed writers' temp files and quarantined files older than ``max_age_s``."""
        cutoff = time.time() - max_age_s
        victims = [p for sub in (self.root / "entries").iterdir() if sub.is_dir()
                   for p in sub.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        victims += list((self.root / "quarantine").iterdir())
        n = 0
        for p in victims:
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n

    def close(self) -> None:
        self._index.close()

    # -- internals -------------------------------------------------------------------------

    def _load(self, path: Path, key: str) -> tuple[CacheEntry, os.stat_result]:
        """Read and fully verify one entry file; raises ``_Bad`` (carrying the file's stat).

        safe_open opens its path more than once (header, then data), so with a writer
        replacing the file in between it could pair one version's header with another's
        tensors. Opening the file once and handing safe_open that descriptor's /proc (or
        /dev/fd) alias makes every read hit the same inode: a consistent snapshot.
        """
        fd = os.open(path, os.O_RDONLY)  # FileNotFoundError: a plain miss
        try:
            st = os.fstat(fd)
            try:
                with safe_open(_fd_alias(fd) or str(path), framework="pt", device="cpu",
                               backend=self.load) as f:
                    header = f.metadata() or {}
                    named = {name: f.get_tensor(name) for name in f.keys()}
            except Exception as exc:  # SafetensorError for truncated/garbled files, OSError
                raise _Bad(f"unreadable file: {exc}", st) from None
        finally:
            os.close(fd)
        return self._check(header, named, key, st), st

    @staticmethod
    def _check(header: dict, named: dict, key: str, st: os.stat_result) -> CacheEntry:
        try:
            if header.get(_H + "format") != str(FORMAT_VERSION):
                raise _Bad(f"unknown format {header.get(_H + 'format')!r}", st)
            if set(header) != _HEADER_FIELDS:
                raise _Bad(f"header fields {sorted(set(header) ^ _HEADER_FIELDS)} unexpected", st)
            if header[_H + "key"] != key:
                raise _Bad(f"stored under key {header[_H + 'key']!r}", st)
            meta = json.loads(header[_H + "meta"])
            reason = check_checksum(named, meta, header[_H + "checksum"])
            if reason is not None:
                raise _Bad(reason, st)
            entry = CacheEntry.from_named(named, int(header[_H + "layers"]), meta)
            reason = check_summary(entry, {k: header[_H + f] for k, f in _SUMMARY_FIELDS.items()})
            if reason is not None:
                raise _Bad(reason, st)
            if not 0 < float(header[_H + "created"]) < 1e11:
                raise _Bad(f"bad creation time {header[_H + 'created']!r}", st)
            return entry
        except (KeyError, ValueError) as exc:
            raise _Bad(f"malformed header or tensor set: {exc!r}", st) from None

    def _quarantine(self, key: str, st: os.stat_result, reason: str, report: bool = True) -> None:
        """Move the bad file aside, unless a writer replaced it since we looked (then it's new)."""
        path = self._path(key)
        action = "quarantined"
        try:
            with self._lock(key):
                cur = os.stat(path)
                if (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                    dest = self.root / "quarantine" / f"{key}.{int(time.time())}.{uuid.uuid4().hex[:6]}{_SUFFIX}"
                    os.replace(path, dest)
                    self._index.remove([key])
                    action = f"moved to {dest}"
                else:
                    action = "skipped (a writer replaced it meanwhile)"
        except FileNotFoundError:
            action = "already gone"
        except (OSError, filelock.Timeout) as exc:
            action = f"could not be quarantined ({exc})"
        if report:
            self._report_bad(key, reason, action)

    def _reconcile(self, rows: dict[str, EntryInfo], files: dict[str, Path]) -> list[EntryInfo]:
        """Index rows for existing files; rows for vanished files dropped; missing rows rebuilt.

        Rows were read before the directory scan, so an entry published in between shows up as
        a file without a row (rebuilt from its header) rather than as a row wrongly dropped.
        """
        out, fresh = [], []
        for key, path in files.items():
            if key in rows:
                out.append(rows[key])
                continue
            info = _info_from_header(key, path)
            if info is not None:
                fresh.append(info)
                out.append(info)
        stale = [k for k in rows if k not in files and not self._path(k).exists()]
        self._index.remove(stale)
        self._index.upsert_many(fresh)
        return out


def _info_from_header(key: str, path: Path) -> EntryInfo | None:
    """Index data from a file's header only (no tensor bytes); ``None`` if unreadable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            h = f.metadata() or {}
        mtime = path.stat().st_mtime
        return EntryInfo(key, int(h[_H + "nbytes"]), int(h[_H + "layers"]), int(h[_H + "seq_len"]),
                         h.get(_H + "dtype") or None, float(h[_H + "created"]), mtime,
                         json.loads(h[_H + "meta"]))
    except Exception:  # verify() reports unreadable files; listing stays best effort
        return None


def _fd_alias(fd: int) -> str | None:
    """A path that opens exactly the file behind ``fd`` (Linux /proc, BSD/macOS /dev/fd)."""
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    return None  # elsewhere a racing replace can only cause a false "bad" (checksum), never wrong data


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

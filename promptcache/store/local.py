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

Loading (``load=``): by default (``"pread"``) the tensors are read into the process's own memory
and then verified, so no later change to the file (bytes flipped in place, truncation) can alter
what the engine holds. ``load="mmap"`` (``file:///dir?load=mmap``) keeps safetensors' private
mapping instead: no copy, but the returned tensors still read the file's pages, so an in-place
edit of the file after the checksum was verified changes them silently and truncating the file
kills the process with SIGBUS. Use it only when nothing but this store's own writers (which only
replace, rename or unlink files) can touch the directory. Measured cost of the safe default:
``benchmarks/store.py`` (``dir`` vs ``dir mmap`` columns, docs/store.md).

Entry files are opened with ``O_NONBLOCK`` and must be regular files (a FIFO, device or socket at
an entry path is a bad entry, never a blocking or unbounded read), no larger than their declared
tensor bytes plus :data:`MAX_HEADER_BYTES`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import filelock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..fsutil import write_atomic, write_text_atomic
from .base import (FORMAT_VERSION, BadEntry, BadEntryError, CacheEntry, CacheStore, EntryInfo, StoreError,
                   StoreWarning, canonical_json, check_checksum, check_expect, check_key,
                   check_summary, entry_checksum, normalize_entry, now)

LOAD_MODES = ("pread", "mmap")  # the first is the default: see the module docstring
DEFAULT_LOAD = LOAD_MODES[0]
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a file may exceed its declared tensor bytes by this much
_STALE_FORMATS = {"1"}  # older formats this version recognises and replaces (not "corrupt")
from .sqlite_index import SqliteIndex

_SUFFIX = ".safetensors"
_H = "promptcache."  # prefix of our header metadata fields
_HEADER_FIELDS = {_H + f for f in ("format", "key", "layers", "seq_len", "dtype", "nbytes", "created",
                                   "meta", "checksum")}
# What list() shows is checked against the tensors too, so a flipped digit there is caught.
_SUMMARY_FIELDS = {"n_layers": "layers", "seq_len": "seq_len", "dtype": "dtype", "nbytes": "nbytes"}
LOCK_TIMEOUT_S = 120.0


class _Bad(BadEntryError):
    """An entry file that must not be returned; the message is the cause, ``st`` the file."""

    def __init__(self, reason: str, st: os.stat_result) -> None:
        super().__init__(reason)
        self.st = st


class _Stale(_Bad):
    """An intact-looking entry in an older format: removed and recomputed, not quarantined."""

    def __init__(self, found: str, st: os.stat_result) -> None:
        super().__init__(f"old format {found!r} (this version writes {FORMAT_VERSION}; re-encode)", st)
        self.found = found


class LocalStore(CacheStore):
    """Entries as files under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True, load: str = DEFAULT_LOAD,
                 create: bool = True) -> None:
        super().__init__()
        if load not in LOAD_MODES:
            raise StoreError(f"load must be one of {', '.join(map(repr, LOAD_MODES))}, not {load!r}")
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
            write_text_atomic(marker, json.dumps({"format": FORMAT_VERSION, "kind": "promptcache-store"}),
                              fsync=fsync)
        self._index = SqliteIndex(self.root / "index.sqlite")

    # -- paths and locks -------------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        """Where entry ``key`` lives (its file may be absent; tests and tools read it)."""
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
        path = self.entry_path(key)
        try:
            entry, st = self._load(path, key)
        except FileNotFoundError:
            return self._count(None)
        except _Stale as old:
            self._report_stale(key, old.found, self._quarantine(key, old.st, str(old), report=False,
                                                                 remove=True))
            return self._count(None)
        except _Bad as bad:
            self._quarantine(key, bad.st, str(bad))
            return self._count(None)
        except OSError as exc:  # permissions, I/O error: a miss, not a crash
            self._note_error(f"cannot read entry {key}: {exc}")
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
            _H + "checksum": entry_checksum(named, e.meta, key),
        }
        info = EntryInfo(key, e.nbytes, e.n_layers, e.seq_len, e.dtype, created, created, e.meta)

        def publish(tmp: Path, path: Path) -> None:  # under the key's lock, with its index row
            with self._lock(key):
                os.replace(tmp, path)
                self._index.upsert(info)

        try:
            write_atomic(self.entry_path(key), lambda tmp: save_file(named, str(tmp), metadata=header),
                         fsync=self.fsync, replace=publish)
        except (OSError, filelock.Timeout, SafetensorError) as exc:  # disk full, lock stuck...
            self._note_error(f"write of {key} skipped: {exc}")
            warnings.warn(f"promptcache store {self.url}: write of {key} skipped: {exc}", StoreWarning)
            return False
        self.counters["puts"] += 1
        return True

    def contains(self, key: str) -> bool:
        check_key(key)
        return self.entry_path(key).is_file()

    def delete(self, key: str) -> bool:
        check_key(key)
        try:
            with self._lock(key):
                try:
                    self.entry_path(key).unlink()
                    removed = True
                except FileNotFoundError:
                    removed = False
                self._index.remove([key])
        except (OSError, filelock.Timeout) as exc:
            self._note_error(f"cannot delete {key}: {exc}")
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
        # OSError: an unreadable file; FileNotFoundError: deleted since the scan (a subclass, so
        # ``gone`` is tried first).
        return self._verify_each(self._entry_files().items(), lambda key, path: self._load(path, key),
                                 self._discard, remove, bad=(OSError,), gone=(FileNotFoundError,))

    def _discard(self, key: str, path: Path, exc: Exception) -> None:
        """``verify(remove=True)``: quarantine a bad file, delete an old-format one."""
        if isinstance(exc, _Bad):
            self._quarantine(key, exc.st, str(exc), report=False, remove=isinstance(exc, _Stale))
            return
        try:  # a stray file name, an unreadable file
            self._quarantine(key, os.stat(path), str(exc), report=False)
        except OSError as gone:
            self._note_error(f"cannot quarantine {path}: {gone}")

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Remove crashed writers' temp files and quarantined files older than ``max_age_s``."""
        cutoff = time.time() - max_age_s
        victims = [p for sub in (self.root / "entries").iterdir() if sub.is_dir()
                   for p in sub.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        victims += list((self.root / "quarantine").iterdir())
        n = 0
        for p in victims:
            try:
                if p.lstat().st_mtime <= cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # read-only store, permissions: the caller must hear of it
                self._note_error(f"cannot remove {p}: {exc}")
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
        fd, st = _open_regular(path)  # FileNotFoundError: a plain miss
        try:
            try:
                with safe_open(_fd_alias(fd) or str(path), framework="pt", device="cpu",
                               backend=self.load) as f:
                    header = f.metadata() or {}
                    _check_size(header, st)
                    named = {name: f.get_tensor(name) for name in f.keys()}
            except _Bad:
                raise
            except Exception as exc:  # SafetensorError for truncated/garbled files, OSError
                raise _Bad(f"unreadable file: {exc}", st) from None
        finally:
            os.close(fd)
        return self._check(header, named, key, st), st

    @staticmethod
    def _check(header: dict, named: dict, key: str, st: os.stat_result) -> CacheEntry:
        try:
            found = header.get(_H + "format")
            if found in _STALE_FORMATS:
                raise _Stale(found, st)
            if found != str(FORMAT_VERSION):
                raise _Bad(f"unknown format {found!r}", st)
            if set(header) != _HEADER_FIELDS:
                raise _Bad(f"header fields {sorted(set(header) ^ _HEADER_FIELDS)} unexpected", st)
            if header[_H + "key"] != key:
                raise _Bad(f"stored under key {header[_H + 'key']!r}", st)
            meta = json.loads(header[_H + "meta"])
            reason = check_checksum(named, meta, key, header[_H + "checksum"])
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

    def _quarantine(self, key: str, st: os.stat_result, reason: str, report: bool = True,
                    remove: bool = False) -> str:
        """Move the bad file aside (``remove``: delete it), unless a writer replaced it since we
        looked (then it is new). Returns what was done; a failure is counted as an error."""
        path = self.entry_path(key)
        action = "removed" if remove else "quarantined"
        try:
            with self._lock(key):
                cur = os.stat(path)
                if (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
                    action = "skipped (a writer replaced it meanwhile)"
                elif remove:
                    os.unlink(path)
                    self._index.remove([key])
                else:
                    dest = self.root / "quarantine" / f"{key}.{int(time.time())}.{uuid.uuid4().hex[:6]}{_SUFFIX}"
                    os.replace(path, dest)
                    self._index.remove([key])
                    action = f"moved to {dest}"
        except FileNotFoundError:
            action = "already gone"
        except (OSError, filelock.Timeout) as exc:
            action = f"could not be {'removed' if remove else 'quarantined'} ({exc})"
            self._note_error(f"bad entry {key} {action}")
        if report:
            self._report_bad(key, reason, action)
        return action

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
        stale = [k for k in rows if k not in files and not self.entry_path(k).exists()]
        self._index.remove(stale)
        self._index.upsert_many(fresh)
        return out


def _info_from_header(key: str, path: Path) -> EntryInfo | None:
    """Index data from a file's header only (no tensor bytes); ``None`` if unreadable."""
    try:
        fd, st = _open_regular(path)
        try:
            with safe_open(_fd_alias(fd) or str(path), framework="pt", device="cpu") as f:
                h = f.metadata() or {}
        finally:
            os.close(fd)
        return EntryInfo(key, int(h[_H + "nbytes"]), int(h[_H + "layers"]), int(h[_H + "seq_len"]),
                         h.get(_H + "dtype") or None, float(h[_H + "created"]), st.st_mtime,
                         json.loads(h[_H + "meta"]))
    except Exception:  # verify() reports unreadable files; listing stays best effort
        return None


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its stat, for a regular file only.

    ``O_NONBLOCK``: opening a FIFO for reading would otherwise wait for a writer forever; opening
    a socket fails (``ENXIO``). Anything but a regular file is a bad entry (``_Bad``), so every
    read is bounded by the file's size. ``FileNotFoundError`` passes through (a plain miss).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):
            raise _Bad(f"not a regular file ({exc.strerror})", os.stat(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad(f"not a regular file (mode {stat.filemode(st.st_mode)})", st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _check_size(header: dict, st: os.stat_result) -> None:
    """Refuse a file larger than its declared tensor bytes plus a header (before reading tensors)."""
    declared = str(header.get(_H + "nbytes", ""))
    if not declared.isdigit():
        raise _Bad(f"declared size {declared!r:.40} is not a byte count", st)
    if st.st_size > int(declared) + MAX_HEADER_BYTES:
        raise _Bad(f"file has {st.st_size} bytes, more than its declared {declared} tensor bytes "
                   f"plus a {MAX_HEADER_BYTES}-byte header", st)


def _fd_alias(fd: int) -> str | None:
    """A path that opens exactly the file behind ``fd`` (Linux /proc, BSD/macOS /dev/fd)."""
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    return None  # elsewhere a racing replace can only cause a false "bad" (checksum), never wrong data


"""The directory store's index: entry sizes, shapes and access times in SQLite (WAL mode).

The entry files are the truth; this index only makes ``ls``/``stats``/LRU eviction cheap without
opening every file. It is reconciled against the files on ``list()``, so an index row lost to a
crash (entry published, row not yet written) or a damaged index file costs nothing but a rebuild.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import warnings
from pathlib import Path

from .base import EntryInfo, StoreWarning

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    nbytes INTEGER NOT NULL,
    n_layers INTEGER NOT NULL,
    seq_len INTEGER NOT NULL,
    dtype TEXT,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    meta TEXT NOT NULL
)
"""


class SqliteIndex:
    """One connection per process (SQLite handles must not cross ``fork``), shared by threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.RLock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
            except sqlite3.DatabaseError:
                conn.close()
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _run(self, sql: str, args: tuple = (), many: list | None = None) -> list[tuple]:
        """Execute; a damaged index file is moved aside and rebuilt rather than failing the store."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    db = self._db()
                    cur = db.executemany(sql, many) if many is not None else db.execute(sql, args)
                    return cur.fetchall()
                except sqlite3.OperationalError as exc:  # locked too long, I/O error, read-only
                    warnings.warn(f"promptcache store index {self.path}: {exc}", StoreWarning)
                    return []
                except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
                    if attempt:
                        warnings.warn(f"promptcache store index {self.path}: {exc}", StoreWarning)
                        return []
                    self._rebuild(exc)
        return []

    def _rebuild(self, exc: Exception) -> None:
        warnings.warn(f"promptcache store index {self.path} is unusable ({exc}); rebuilding it "
                      "from the entry files", StoreWarning)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, str(p) + ".broken")

    def upsert(self, info: EntryInfo) -> None:
        self.upsert_many([info])

    def upsert_many(self, infos: list[EntryInfo]) -> None:
        if infos:
            self._run("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)",
                      many=[(i.key, i.nbytes, i.n_layers, i.seq_len, i.dtype, i.created,
                             i.last_access, json.dumps(i.meta)) for i in infos])

    def touch(self, key: str, t: float) -> None:
        self._run("UPDATE entries SET last_access=? WHERE key=?", (t, key))

    def remove(self, keys: list[str]) -> None:
        if keys:
            self._run("DELETE FROM entries WHERE key=?", many=[(k,) for k in keys])

    def all(self) -> dict[str, EntryInfo]:
        rows = self._run("SELECT key, nbytes, n_layers, seq_len, dtype, created, last_access, meta "
                         "FROM entries")
        return {r[0]: EntryInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]))
                for r in rows}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

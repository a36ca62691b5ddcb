"""Persistent, shareable store of prompt-module KV caches.

``open_store(url)`` picks a backend:

* ``memory://`` (or ``memory://NAME``, one shared instance per name in this process)
* a directory path or ``file:///abs/dir`` -- safetensors files + SQLite index, multi-process safe
  (``file:///dir?fsync=0`` skips fsync; loads read into private memory, ``?load=mmap`` maps the
  files instead: faster, but unsafe if a file is modified while its tensors are in use)
* ``redis://host:port/db?prefix=...&ttl=SECONDS&chunk_mb=4&timeout=5`` -- shared by several machines

Entries are keyed by :func:`make_key` over everything that determines the cached values, and
every ``get`` verifies a checksum, so a store can only ever return the right tensors or ``None``.
"""

from __future__ import annotations

import threading
from urllib.parse import parse_qsl, unquote, urlsplit

from .base import (BadEntry, CacheEntry, CacheStore, EntryInfo, StoreError, StoreWarning,
                   canonical_json, dtype_name)
from .keys import make_key, model_fingerprint
from .local import LocalStore
from .memory import MemoryStore

__all__ = [
    "BadEntry", "CacheEntry", "CacheStore", "EntryInfo", "LocalStore", "MemoryStore",
    "StoreError", "StoreWarning", "canonical_json", "dtype_name", "make_key",
    "model_fingerprint", "open_store",
]

_named_memory: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()
_FALSE = ("0", "false", "no", "off")


def open_store(url_or_path: str, *, create: bool = True, **kwargs) -> CacheStore:
    """Open the store named by a URL or a directory path.

    ``create=False`` refuses a directory that is not already a store (the CLI uses it, so a
    mistyped path is an error rather than a new empty store). Other keyword arguments go to
    the backend's constructor.
    """
    if isinstance(url_or_path, CacheStore):
        return url_or_path
    target = str(url_or_path)
    scheme = urlsplit(target).scheme.lower() if "://" in target else ""
    if scheme == "memory":
        name = target.split("://", 1)[1]
        if not name:
            return MemoryStore()
        with _named_lock:
            return _named_memory.setdefault(name, MemoryStore(name))
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore  # redis-py is an optional extra
        return RedisStore(target, **kwargs)
    if scheme == "file":
        parts = urlsplit(target)
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"file:// URLs must be local, got host {parts.netloc!r}")
        opts = dict(parse_qsl(parts.query))
        if "fsync" in opts:
            kwargs.setdefault("fsync", opts["fsync"].lower() not in _FALSE)
        if "load" in opts:
            kwargs.setdefault("load", opts["load"])
        return LocalStore(unquote(parts.path), create=create, **kwargs)
    if scheme:
        raise StoreError(f"unknown store scheme {scheme!r} in {target!r} "
                         "(use memory://, file://, redis:// or a directory path)")
    return LocalStore(target, create=create, **kwargs)

"""Redis store: one store shared by several machines.

Key layout (``P`` = prefix, ``K`` = entry key; the ``{K}`` hash tag keeps one entry's keys in
one cluster slot)::

    P:{K}:m          manifest JSON: meta, checksum, tensor layout, version, chunk count
    P:{K}:c:VER:i    the tensor bytes, concatenated and cut into ``chunk_bytes`` pieces
    P:{K}:a          last access time (for LRU eviction)

Redis caps a value at 512 MB, so payloads are chunked. The default chunk is 4 MiB, far below
the cap on purpose: with redis-py one GET of a 64 MiB value read at ~300 MB/s here while 4 MiB
values read at ~450-550 MB/s, and a huge value blocks the single-threaded server for every other
client while it is copied (``chunk_mb`` changes it; 90 round trips for an 8k-token float32
entry cost little even over a network). Chunks hold whole tensors where an entry's tensors are all
the same size (every K and V of a module are): the chunk is the largest multiple of the tensor size
up to ``chunk_mb``, or one tensor if it is larger, so a read wraps each tensor in the bytes it
received instead of assembling a copy (the manifest records each entry's chunk size, so entries
written with other sizes read the same way). Publishing is
all-or-nothing: chunks are first written under a fresh version id with a *pending* TTL, then one
MULTI/EXEC (guarded by WATCH on the manifest) sets the manifest, makes the chunks permanent (or
gives them the entry TTL) and deletes the previous version's chunks. A reader therefore sees the
old entry or the new one; a writer that dies before publishing leaves only chunks that expire.
Readers verify the checksum, so even a torn read (an overwrite racing a read) is a miss, never
wrong data.

Connection problems never raise: the first failure warns once, then calls behave like misses /
skipped writes, and the server is retried after ``retry_after`` seconds.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import time
import uuid
import warnings
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from .base import (FORMAT_VERSION, BadEntry, CacheEntry, CacheStore, EntryInfo, StoreError,
                   StoreWarning, check_checksum, check_expect, check_key, check_summary,
                   dtype_name, entry_checksum, normalize_entry, now, tensor_bytes)

log = logging.getLogger(__name__)
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
TTL_GRACE_S = 60  # chunks outlive their manifest a little, so a TTL expiry is a miss, not "bad"
_MAX_PUBLISH_TRIES = 50  # WATCH retries when other writers keep publishing the same key
_OUR_PARAMS = ("prefix", "ttl", "chunk_mb", "chunk_bytes", "pending_ttl", "retry_after")


class _Bad(Exception):
    """The entry's stored data is unusable; message is the cause."""


class _Raced(Exception):
    """The manifest changed while reading; try again."""


class RedisStore(CacheStore):
    """``redis://[:password@]host:port/db?prefix=promptcache&ttl=SECONDS&chunk_mb=4``."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str | None = None,
                 ttl: float | None = None, chunk_bytes: int | None = None,
                 pending_ttl: float = 3600.0, retry_after: float = 5.0, **redis_kwargs: Any) -> None:
        super().__init__()
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # redis is an optional extra
            raise StoreError("the Redis store needs redis-py: pip install 'promptcache[redis]'") from exc
        self._redis = redis
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        ours = {k: query.pop(k) for k in _OUR_PARAMS if k in query}
        self.prefix = prefix if prefix is not None else ours.get("prefix", "promptcache")
        ttl = ttl if ttl is not None else _opt_float(ours.get("ttl"))
        self.ttl = int(ttl) if ttl else None
        if chunk_bytes is None:
            chunk_bytes = (int(ours["chunk_bytes"]) if "chunk_bytes" in ours
                           else int(float(ours["chunk_mb"]) * 1024 * 1024) if "chunk_mb" in ours
                           else DEFAULT_CHUNK_BYTES)
        if not 1 <= chunk_bytes <= 512 * 1024 * 1024:
            raise StoreError(f"chunk size must be 1 byte .. 512 MiB, not {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.pending_ttl = float(ours.get("pending_ttl", pending_ttl))
        self.retry_after = float(ours.get("retry_after", retry_after))
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        # Shown in warnings and `store stats`: never the password.
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit(parts._replace(netloc=netloc, query=""))
        if self.prefix != "promptcache":
            self.url += f"?prefix={self.prefix}"
        kwargs = {"socket_connect_timeout": 2.0, "socket_timeout": 60.0,
                  "retry": Retry(NoBackoff(), 1), **redis_kwargs}
        self._r = redis.Redis.from_url(clean, **kwargs)
        self._down_until = 0.0
        self._warned = False

    # -- key names -------------------------------------------------------------------------

    def _m(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:m"

    def _a(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}:a"

    def _c(self, key: str, version: str, i: int) -> str:
        return f"{self.prefix}:{{{key}}}:c:{version}:{i}"

    def _chunk_keys(self, key: str, man: dict) -> list[str]:
        return [self._c(key, man["version"], i) for i in range(int(man["n_chunks"]))]

    # -- connection guard ------------------------------------------------------------------

    def _call(self, fn, default):
        """Run ``fn()``; on Redis trouble warn (once per outage) and return ``default``."""
        if time.monotonic() < self._down_until:
            return default
        redis = self._redis
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self.counters["errors"] += 1
            self._down_until = time.monotonic() + self.retry_after
            if not self._warned:
                self._warned = True
                warnings.warn(f"promptcache store {self.url}: Redis unreachable ({exc}); "
                              "serving misses and skipping writes until it is back", StoreWarning)
            return default
        except redis.RedisError as exc:  # e.g. OOM on write, wrong type: this call only
            self.counters["errors"] += 1
            warnings.warn(f"promptcache store {self.url}: Redis error: {exc}", StoreWarning)
            return default
        if self._warned:
            self._warned = False
            log.info("promptcache store %s: Redis reachable again", self.url)
        return result

    # -- interface -------------------------------------------------------------------------

    def get(self, key: str, expect: Mapping[str, Any] | None = None) -> CacheEntry | None:
        check_key(key)
        return self._count(self._call(lambda: self._get(key, expect), None))

    def _get(self, key: str, expect: Mapping[str, Any] | None) -> CacheEntry | None:
        for _ in range(3):
            raw = self._r.get(self._m(key))
            if raw is None:
                return None
            try:
                entry = self._read(key, raw)
                reason = check_expect(entry, expect)
                if reason is not None:
                    raise _Bad(reason)
            except _Raced:
                continue
            except _Bad as bad:
                removed = self._delete_if(key, raw)
                self._report_bad(key, str(bad), "removed" if removed else "left (it changed meanwhile)")
                return None
            self._r.set(self._a(key), repr(now()), xx=True, keepttl=True)
            return entry
        return None  # overwritten three times while we read: just a miss

    def _read(self, key: str, raw: bytes) -> CacheEntry:
        """Fetch the chunks of manifest ``raw`` and rebuild a verified entry."""
        try:
            man = json.loads(raw)
            if man.get("format") != FORMAT_VERSION:
                raise _Bad(f"unknown format {man.get('format')!r}")
            if man.get("key") != key:
                raise _Bad(f"manifest names key {man.get('key')!r}")
            total = int(man["nbytes"])
            chunks, size = [], 0
            for ck in self._chunk_keys(key, man):
                chunk = self._r.get(ck)
                if chunk is None:
                    if self._r.get(self._m(key)) != raw:
                        raise _Raced()
                    raise _Bad(f"chunk {ck} missing")
                size += len(chunk)
                if size > total:
                    raise _Bad("chunks longer than the manifest says")
                chunks.append(chunk)
            if size != total:
                raise _Bad(f"truncated data ({size} of {total} bytes)")
            data = _ChunkedBytes(chunks)
            named = {name: data.tensor(dtype, shape, int(offset), int(nbytes))
                     for name, dtype, shape, offset, nbytes in man["tensors"]}
            reason = check_checksum(named, man["meta"], man["checksum"])
            if reason is not None:
                raise _Bad(reason)
            entry = CacheEntry.from_named(named, int(man["n_layers"]), man["meta"])
            reason = check_summary(entry, {**man, "dtype": man["dtype"] or ""})
            if reason is not None:
                raise _Bad(reason)
            return entry
        except (_Bad, _Raced):
            raise
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise _Bad(f"malformed manifest: {exc!r}") from None

    def put(self, key: str, entry: CacheEntry) -> bool:
        check_key(key)
        e = normalize_entry(entry)
        named = e.named_tensors()
        layout, offset = [], 0
        for name, t in named.items():
            n = t.numel() * t.element_size()
            layout.append([name, dtype_name(t.dtype), list(t.shape), offset, n])
            offset += n
        version = uuid.uuid4().hex
        chunk = aligned_chunk_bytes([n for *_, n in layout], self.chunk_bytes)
        n_chunks = -(-offset // chunk)
        man = {"format": FORMAT_VERSION, "key": key, "version": version, "created": now(),
               "meta": e.meta, "checksum": entry_checksum(named, e.meta), "n_layers": e.n_layers,
               "seq_len": e.seq_len, "dtype": e.dtype, "nbytes": offset,
               "chunk_bytes": chunk, "n_chunks": n_chunks, "tensors": layout}
        ok = self._call(lambda: self._put(key, man, named), False)
        if ok:
            self.counters["puts"] += 1
        return ok

    def _put(self, key: str, man: dict, named: dict[str, torch.Tensor]) -> bool:
        pending_ms = int(self.pending_ttl * 1000)
        chunk_keys = self._chunk_keys(key, man)
        for ck, data in zip(chunk_keys, _chunks(named.values(), man["chunk_bytes"])):
            self._r.set(ck, data, px=pending_ms)
        payload = json.dumps(man, separators=(",", ":"))
        watch = self._redis.WatchError
        with self._r.pipeline() as p:
            for _ in range(_MAX_PUBLISH_TRIES):
                try:
                    p.watch(self._m(key))
                    old = p.get(self._m(key))
                    stale = self._chunk_keys_of(key, old)
                    p.multi()
                    p.set(self._m(key), payload, ex=self.ttl)
                    for ck in chunk_keys:
                        if self.ttl:
                            p.expire(ck, self.ttl + TTL_GRACE_S)
                        else:
                            p.persist(ck)
                    stale = [ck for ck in stale if ck not in chunk_keys]
                    if stale:
                        p.delete(*stale)
                    p.set(self._a(key), repr(man["created"]), ex=self.ttl)
                    results = p.execute()
                    break
                except watch:
                    continue  # another writer published first: supersede it
            else:
                warnings.warn(f"promptcache store {self.url}: write of {key} skipped: "
                              "too many concurrent writers", StoreWarning)
                return False
        # persist/expire answer 0 for a chunk that already expired (a writer stalled longer
        # than pending_ttl): the entry just published is incomplete, so take it back.
        if not all(results[1:1 + len(chunk_keys)]):
            self._delete_if(key, payload.encode())
            warnings.warn(f"promptcache store {self.url}: write of {key} skipped: chunks expired "
                          "before publishing (raise pending_ttl)", StoreWarning)
            return False
        return True

    def _chunk_keys_of(self, key: str, raw: bytes | None) -> list[str]:
        if raw is None:
            return []
        try:
            return self._chunk_keys(key, json.loads(raw))
        except (ValueError, KeyError, TypeError):
            return []  # unparsable manifest: its chunks expire or sweep() finds them

    def _delete_if(self, key: str, expected_raw: bytes | None) -> bool:
        """Delete the entry atomically, only if its manifest is still ``expected_raw``
        (``None``: whatever it is)."""
        watch = self._redis.WatchError
        with self._r.pipeline() as p:
            for _ in range(5):
                try:
                    p.watch(self._m(key))
                    raw = p.get(self._m(key))
                    if raw is None or (expected_raw is not None and raw != expected_raw):
                        p.unwatch()
                        return False
                    p.multi()
                    p.delete(self._m(key), self._a(key), *self._chunk_keys_of(key, raw))
                    p.execute()
                    return True
                except watch:
                    continue
        return False

    def contains(self, key: str) -> bool:
        check_key(key)
        return bool(self._call(lambda: self._r.exists(self._m(key)), False))

    def delete(self, key: str) -> bool:
        check_key(key)
        return bool(self._call(lambda: self._delete_if(key, None), False))

    def _manifests(self) -> dict[str, bytes]:
        """All manifests under this prefix: ``{entry key: raw manifest}``."""
        pattern = _glob_escape(self.prefix) + ":{*}:m"
        names = list(self._r.scan_iter(match=pattern, count=1000))
        out = {}
        for i in range(0, len(names), 500):
            batch = names[i:i + 500]
            for name, raw in zip(batch, self._r.mget(batch)):
                if raw is not None:
                    name = name.decode()
                    out[name[len(self.prefix) + 2:-3]] = raw
        return out

    def list(self) -> list[EntryInfo]:
        return self._call(self._list, [])

    def _list(self) -> list[EntryInfo]:
        mans = self._manifests()
        keys = list(mans)
        atimes = self._r.mget([self._a(k) for k in keys]) if keys else []
        out = []
        for key, at in zip(keys, atimes):
            try:
                m = json.loads(mans[key])
                out.append(EntryInfo(key, int(m["nbytes"]), int(m["n_layers"]), int(m["seq_len"]),
                                     m.get("dtype"), float(m["created"]),
                                     float(at) if at is not None else float(m["created"]), m["meta"]))
            except (ValueError, KeyError, TypeError):
                continue  # verify() reports it
        return out

    def stats(self) -> dict:
        out = self._base_stats(self.list())
        info = self._call(lambda: self._r.info("memory"), None)
        out["reachable"] = info is not None
        out["prefix"] = self.prefix
        out["ttl"] = self.ttl
        if info:
            out["redis_used_memory"] = info.get("used_memory")
        return out

    def verify(self, remove: bool = False) -> list[BadEntry]:
        return self._call(lambda: self._verify(remove), [])

    def _verify(self, remove: bool) -> list[BadEntry]:
        bad = []
        for key, raw in sorted(self._manifests().items()):
            try:
                check_key(key)
                self._read(key, raw)
            except _Raced:
                continue
            except (_Bad, StoreError) as exc:
                bad.append(BadEntry(key, str(exc)))
                if remove:
                    self._delete_if(key, raw)
        return bad

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Delete chunks no manifest references (crashed writers) once older than ``max_age_s``."""
        return self._call(lambda: self._sweep(max_age_s), 0)

    def _sweep(self, max_age_s: float) -> int:
        live = set()
        for key, raw in self._manifests().items():
            live.update(self._chunk_keys_of(key, raw))
        n = 0
        for name in self._r.scan_iter(match=_glob_escape(self.prefix) + ":{*}:c:*", count=1000):
            name = name.decode()
            if name in live:
                continue
            pttl = self._r.pttl(name)
            age = self.pending_ttl - pttl / 1000 if pttl >= 0 else float("inf")
            if pttl == -2 or age < max_age_s:
                continue
            n += self._r.delete(name)
        return n

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except self._redis.RedisError:
            return False

    def close(self) -> None:
        try:
            self._r.close()
        except Exception:  # closing a dead connection must not raise
            pass


def _chunks(tensors, size: int) -> Iterator[bytes | memoryview]:
    """The tensors' bytes back to back, cut into ``size`` pieces (zero copy inside one tensor)."""
    parts, have = [], 0
    for t in tensors:
        mv = tensor_bytes(t)
        while len(mv):
            take = min(size - have, len(mv))
            parts.append(mv[:take])
            have += take
            mv = mv[take:]
            if have == size:
                yield parts[0] if len(parts) == 1 else b"".join(parts)
                parts, have = [], 0
    if have:
        yield parts[0] if len(parts) == 1 else b"".join(parts)


def aligned_chunk_bytes(sizes: list[int], target: int) -> int:
    """A chunk size for tensors of byte ``sizes``: a whole number of them when they are all alike.

    Then no tensor straddles two chunks and a read can wrap every tensor in place (no assembly
    copy). A tensor larger than ``target`` gets a chunk of its own; mixed sizes keep ``target``.
    """
    if not sizes or len(set(sizes)) != 1 or sizes[0] == 0:
        return target
    return sizes[0] * max(1, target // sizes[0])


class _ChunkedBytes:
    """The payload as its chunks; tensors inside one chunk are wrapped without copying."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.starts = [0, *itertools.accumulate(len(c) for c in chunks)][:-1]
        self.total = sum(len(c) for c in chunks)

    def tensor(self, dtype: str, shape: list[int], offset: int, nbytes: int) -> torch.Tensor:
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise _Bad(f"unknown dtype {dtype!r}")
        count = math.prod(int(s) for s in shape)
        if count * torch.empty((), dtype=dt).element_size() != nbytes or offset < 0 or offset + nbytes > self.total:
            raise _Bad("tensor layout does not fit the data")
        if count == 0:
            return torch.empty(shape, dtype=dt)
        i = bisect.bisect_right(self.starts, offset) - 1
        if offset + nbytes <= self.starts[i] + len(self.chunks[i]):
            buf, at = self.chunks[i], offset - self.starts[i]
        else:  # straddles chunks (entries written with mixed tensor sizes): assemble this tensor only
            buf, at = bytearray(nbytes), 0
            filled = 0
            while filled < nbytes:
                piece = memoryview(self.chunks[i])[offset + filled - self.starts[i]:][: nbytes - filled]
                buf[filled:filled + len(piece)] = piece
                filled += len(piece)
                i += 1
        with warnings.catch_warnings():  # a bytes chunk is read-only; module caches are never written
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(buf, dtype=dt, count=count, offset=at).reshape(shape)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _opt_float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None

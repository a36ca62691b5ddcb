"""Redis store: one store shared by several machines.

Size: one class, whose reads, WATCH/MULTI publishes and deletes share the key scheme and the
connection guard; the entry format (manifest validation, chunking) is :mod:`.redis_format`.

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
skipped writes, and the server is retried after ``retry_after`` seconds. Every socket operation
(connect, each reply) is bounded by ``timeout`` seconds (``?timeout=SECONDS``, default
:data:`DEFAULT_TIMEOUT_S`), and a timeout is not retried, so a hung server costs one timeout and
then ``retry_after`` seconds of immediate misses, never minutes.

Manifests are validated before anything is fetched (:func:`.redis_format.parse_manifest`: a JSON object with
the right types, a tensor layout that adds up to the declared size, a chunk count that matches
it and at most :data:`MAX_CHUNKS` chunks), so a damaged manifest is a bad entry (removed,
recomputed, reported once), never a crash or a long stall. A manifest key holding another Redis
type (a list, a hash) is treated the same way and overwritten by the next ``put``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
import warnings
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import torch

from ..runtime.kv import kv_nbytes
from .base import (FORMAT_VERSION, BadEntry, CacheEntry, CacheStore, EntryInfo, StoreError, StoreWarning,
                   check_checksum, check_expect, check_key, check_summary, dtype_name, entry_checksum,
                   normalize_entry, now)
from .redis_format import BadData as _Bad
from .redis_format import (MAX_CHUNK_BYTES, MAX_CHUNKS, ChunkedBytes, aligned_chunk_bytes, parse_manifest,
                           payload_chunks)
from .redis_format import StaleFormat as _Stale

log = logging.getLogger(__name__)
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 5.0  # connect and per-reply socket timeout (``?timeout=``)
TTL_GRACE_S = 60  # chunks outlive their manifest a little, so a TTL expiry is a miss, not "bad"
_MAX_PUBLISH_TRIES = 50  # WATCH retries when other writers keep publishing the same key
_OUR_PARAMS = ("prefix", "ttl", "chunk_mb", "chunk_bytes", "pending_ttl", "retry_after", "timeout")


class _Raced(Exception):
    """The manifest changed while reading; try again."""


class RedisStore(CacheStore):
    """``redis://[:password@]host:port/db?prefix=promptcache&ttl=SECONDS&chunk_mb=4&timeout=5``."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str | None = None,
                 ttl: float | None = None, chunk_bytes: int | None = None,
                 pending_ttl: float = 3600.0, retry_after: float = 5.0,
                 timeout: float | None = None, **redis_kwargs: Any) -> None:
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
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise StoreError(f"chunk size must be 1 byte .. 512 MiB, not {chunk_bytes}")
        self.timeout = _timeout(timeout if timeout is not None else ours.get("timeout"))
        self.chunk_bytes = chunk_bytes
        self.pending_ttl = float(ours.get("pending_ttl", pending_ttl))
        self.retry_after = float(ours.get("retry_after", retry_after))
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        # Shown in warnings and `store stats`: never the password.
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        self.url = urlunsplit(parts._replace(netloc=netloc, query=""))
        if self.prefix != "promptcache":
            self.url += f"?prefix={self.prefix}"
        # One retry for a dropped connection (a restarted server, a stale pooled socket), none for
        # a timeout: a hung server must cost one ``timeout``, not two.
        kwargs = {"socket_connect_timeout": self.timeout, "socket_timeout": self.timeout,
                  "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                  **redis_kwargs}
        self.client = redis.Redis.from_url(clean, **kwargs)  # public: tools and tests reach Redis
        self._down_until = 0.0
        self._warned = False

    # -- key names (public: maintenance tools and fault-injection tests address Redis directly) ----

    def manifest_key(self, key: str) -> str:
        """The Redis key of entry ``key``'s manifest."""
        return f"{self.prefix}:{{{key}}}:m"

    def access_key(self, key: str) -> str:
        """The Redis key of entry ``key``'s last-access time."""
        return f"{self.prefix}:{{{key}}}:a"

    def chunk_key(self, key: str, version: str, i: int) -> str:
        """The Redis key of chunk ``i`` of version ``version`` of entry ``key``."""
        return f"{self.prefix}:{{{key}}}:c:{version}:{i}"

    def chunk_keys(self, key: str, man: dict) -> list[str]:
        """Chunk key names of a manifest validated by :func:`parse_manifest` (bounded count)."""
        return [self.chunk_key(key, man["version"], i) for i in range(int(man["n_chunks"]))]

    def _get_manifest(self, client: Any, key: str) -> bytes | None:
        """The raw manifest, ``None`` if absent; a key of another Redis type raises ``_Bad``."""
        try:
            return client.get(self.manifest_key(key))
        except self._redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise _Bad(f"manifest key holds another Redis type ({exc})") from None
            raise

    # -- connection guard ------------------------------------------------------------------

    def _call(self, fn, default):
        """Run ``fn()``; on Redis trouble warn (once per outage) and return ``default``."""
        if time.monotonic() < self._down_until:
            return default
        redis = self._redis
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._note_error(f"Redis unreachable ({exc})")
            self._down_until = time.monotonic() + self.retry_after
            if not self._warned:
                self._warned = True
                warnings.warn(f"promptcache store {self.url}: Redis unreachable ({exc}); "
                              "serving misses and skipping writes until it is back", StoreWarning)
            return default
        except redis.RedisError as exc:  # e.g. OOM on write, a read-only replica: this call only
            self._note_error(f"Redis error: {exc}")
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
            try:
                raw = self._get_manifest(self.client, key)
            except _Bad as bad:  # another Redis type under the manifest's name: heal it
                removed = self._delete_wrong_type(key)
                self._report_bad(key, str(bad), "removed" if removed else "left (it changed meanwhile)")
                return None
            if raw is None:
                return None
            try:
                entry = self._read(key, raw)
                reason = check_expect(entry, expect)
                if reason is not None:
                    raise _Bad(reason)
            except _Raced:
                continue
            except _Stale as old:
                removed = self._delete_if(key, raw)
                self._report_stale(key, old.found, "removed" if removed else "left (it changed meanwhile)")
                return None
            except _Bad as bad:
                removed = self._delete_if(key, raw)
                self._report_bad(key, str(bad), "removed" if removed else "left (it changed meanwhile)")
                return None
            self.client.set(self.access_key(key), repr(now()), xx=True, keepttl=True)
            return entry
        return None  # overwritten three times while we read: just a miss

    def _read(self, key: str, raw: bytes) -> CacheEntry:
        """Fetch the chunks of manifest ``raw`` and rebuild a verified entry."""
        man = parse_manifest(key, raw)
        try:
            total = man["nbytes"]
            chunks, size = [], 0
            for ck in self.chunk_keys(key, man):
                try:
                    chunk = self.client.get(ck)
                except self._redis.ResponseError as exc:  # WRONGTYPE: not our chunk
                    raise _Bad(f"chunk {ck}: {exc}") from None
                if chunk is None:
                    if self.client.get(self.manifest_key(key)) != raw:
                        raise _Raced()
                    raise _Bad(f"chunk {ck} missing")
                size += len(chunk)
                if size > total:
                    raise _Bad("chunks longer than the manifest says")
                chunks.append(chunk)
            if size != total:
                raise _Bad(f"truncated data ({size} of {total} bytes)")
            data = ChunkedBytes(chunks)
            named = {name: data.tensor(dtype, shape, int(offset), int(nbytes))
                     for name, dtype, shape, offset, nbytes in man["tensors"]}
            reason = check_checksum(named, man["meta"], key, man["checksum"])
            if reason is not None:
                raise _Bad(reason)
            entry = CacheEntry.from_named(named, int(man["n_layers"]), man["meta"])
            reason = check_summary(entry, {**man, "dtype": man["dtype"] or ""})
            if reason is not None:
                raise _Bad(reason)
            return entry
        except (_Bad, _Raced):
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
            raise _Bad(f"malformed manifest: {exc!r}") from None

    def put(self, key: str, entry: CacheEntry) -> bool:
        check_key(key)
        e = normalize_entry(entry)
        named = e.named_tensors()
        layout, offset = [], 0
        for name, t in named.items():
            n = kv_nbytes([t])
            layout.append([name, dtype_name(t.dtype), list(t.shape), offset, n])
            offset += n
        version = uuid.uuid4().hex
        chunk = aligned_chunk_bytes([n for *_, n in layout], self.chunk_bytes)
        n_chunks = -(-offset // chunk)
        if n_chunks > MAX_CHUNKS:
            self._note_error(f"write of {key} skipped: {n_chunks} chunks")
            warnings.warn(f"promptcache store {self.url}: write of {key} skipped: {offset} bytes need "
                          f"{n_chunks} chunks of {chunk} bytes, more than {MAX_CHUNKS} (raise chunk_mb)",
                          StoreWarning)
            return False
        man = {"format": FORMAT_VERSION, "key": key, "version": version, "created": now(),
               "meta": e.meta, "checksum": entry_checksum(named, e.meta, key), "n_layers": e.n_layers,
               "seq_len": e.seq_len, "dtype": e.dtype, "nbytes": offset,
               "chunk_bytes": chunk, "n_chunks": n_chunks, "tensors": layout}
        ok = self._call(lambda: self._put(key, man, named), False)
        if ok:
            self.counters["puts"] += 1
        return ok

    def _put(self, key: str, man: dict, named: dict[str, torch.Tensor]) -> bool:
        pending_ms = int(self.pending_ttl * 1000)
        chunk_keys = self.chunk_keys(key, man)
        for ck, data in zip(chunk_keys, payload_chunks(named.values(), man["chunk_bytes"])):
            self.client.set(ck, data, px=pending_ms)
        payload = json.dumps(man, separators=(",", ":"))
        watch = self._redis.WatchError
        with self.client.pipeline() as p:
            for _ in range(_MAX_PUBLISH_TRIES):
                try:
                    p.watch(self.manifest_key(key))
                    try:
                        old = self._get_manifest(p, key)
                    except _Bad:  # another Redis type: SET below replaces it (healing)
                        old = None
                    stale = self._chunk_keys_of(key, old)
                    p.multi()
                    p.set(self.manifest_key(key), payload, ex=self.ttl)
                    for ck in chunk_keys:
                        if self.ttl:
                            p.expire(ck, self.ttl + TTL_GRACE_S)
                        else:
                            p.persist(ck)
                    stale = [ck for ck in stale if ck not in chunk_keys]
                    if stale:
                        p.delete(*stale)
                    p.set(self.access_key(key), repr(man["created"]), ex=self.ttl)
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
        """The chunks a raw manifest names; none if it is not a valid manifest (bounded)."""
        if raw is None:
            return []
        try:
            return self.chunk_keys(key, parse_manifest(key, raw, for_delete=True))
        except _Bad:
            return []  # unusable manifest: its chunks expire or sweep() finds them

    def _delete_wrong_type(self, key: str) -> bool:
        """Delete a manifest key that holds another Redis type (and the access key); atomic."""
        watch = self._redis.WatchError
        with self.client.pipeline() as p:
            for _ in range(5):
                try:
                    p.watch(self.manifest_key(key))
                    if p.type(self.manifest_key(key)) in (b"string", b"none"):
                        p.unwatch()
                        return False  # healed meanwhile, by a writer
                    p.multi()
                    p.delete(self.manifest_key(key), self.access_key(key))
                    p.execute()
                    return True
                except watch:
                    continue
        return False

    def _delete_if(self, key: str, expected_raw: bytes | None) -> bool:
        """Delete the entry atomically, only if its manifest is still ``expected_raw``
        (``None``: whatever it is)."""
        watch = self._redis.WatchError
        with self.client.pipeline() as p:
            for _ in range(5):
                try:
                    p.watch(self.manifest_key(key))
                    try:
                        raw = self._get_manifest(p, key)
                    except _Bad:
                        p.unwatch()
                        return self._delete_wrong_type(key)
                    if raw is None or (expected_raw is not None and raw != expected_raw):
                        p.unwatch()
                        return False
                    p.multi()
                    p.delete(self.manifest_key(key), self.access_key(key), *self._chunk_keys_of(key, raw))
                    p.execute()
                    return True
                except watch:
                    continue
        return False

    def contains(self, key: str) -> bool:
        check_key(key)
        return bool(self._call(lambda: self.client.exists(self.manifest_key(key)), False))

    def delete(self, key: str) -> bool:
        check_key(key)
        return bool(self._call(lambda: self._delete_if(key, None), False))

    def _manifests(self) -> dict[str, bytes]:
        """All manifests under this prefix: ``{entry key: raw manifest}``."""
        pattern = _glob_escape(self.prefix) + ":{*}:m"
        names = list(self.client.scan_iter(match=pattern, count=1000))
        out = {}
        for i in range(0, len(names), 500):
            batch = names[i:i + 500]
            for name, raw in zip(batch, self.client.mget(batch)):
                if raw is not None:
                    name = name.decode()
                    out[name[len(self.prefix) + 2:-3]] = raw
        return out

    def list(self) -> list[EntryInfo]:
        return self._call(self._list, [])

    def _list(self) -> list[EntryInfo]:
        mans = self._manifests()
        keys = list(mans)
        atimes = self.client.mget([self.access_key(k) for k in keys]) if keys else []
        out = []
        for key, at in zip(keys, atimes):
            try:
                m = parse_manifest(key, mans[key])
                out.append(EntryInfo(key, m["nbytes"], m["n_layers"], m["seq_len"], m["dtype"],
                                     float(m["created"]),
                                     float(at) if at is not None else float(m["created"]), m["meta"]))
            except (_Bad, ValueError):
                continue  # verify() reports it
        return out

    def stats(self) -> dict:
        out = self._base_stats(self.list())
        info = self._call(lambda: self.client.info("memory"), None)
        out["reachable"] = info is not None
        out["prefix"] = self.prefix
        out["ttl"] = self.ttl
        if info:
            out["redis_used_memory"] = info.get("used_memory")
        return out

    def verify(self, remove: bool = False) -> list[BadEntry]:
        return self._call(lambda: self._verify(remove), [])

    def _verify(self, remove: bool) -> list[BadEntry]:
        # _Stale included: listed, and removed with ``remove``; _Raced: overwritten while read.
        return self._verify_each(self._manifests().items(), self._read,
                                 lambda key, raw, _exc: self._delete_if(key, raw), remove, gone=(_Raced,))

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Delete chunks no manifest references (crashed writers) once older than ``max_age_s``."""
        return self._call(lambda: self._sweep(max_age_s), 0)

    def _sweep(self, max_age_s: float) -> int:
        live = set()
        for key, raw in self._manifests().items():
            live.update(self._chunk_keys_of(key, raw))
        n = 0
        for name in self.client.scan_iter(match=_glob_escape(self.prefix) + ":{*}:c:*", count=1000):
            name = name.decode()
            if name in live:
                continue
            pttl = self.client.pttl(name)
            age = self.pending_ttl - pttl / 1000 if pttl >= 0 else float("inf")
            if pttl == -2 or age < max_age_s:
                continue
            n += self.client.delete(name)
        return n

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except self._redis.RedisError:
            return False

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection must not raise
            pass


def _timeout(value: Any) -> float:
    """``?timeout=`` seconds: a positive finite number (connect and each reply)."""
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise StoreError(f"Redis timeout must be a positive number of seconds, not {value!r}")
    return t


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def _opt_float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None

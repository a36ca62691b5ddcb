"""The Redis entry format: the manifest (validated before anything is fetched) and the payload's
chunks (cut on write, wrapped without copies on read). One job: what bytes an entry is in Redis;
:mod:`.redis_store` does the connections and transactions. Unchanged from before the split.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
import warnings
from typing import Any, Iterator

import torch

from .base import FORMAT_VERSION, BadEntryError, tensor_bytes

MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis' cap on one value
MAX_CHUNKS = 65536  # per entry; with 4 MiB chunks 256 GiB. A manifest asking for more is bad.
_VERSION_RE = re.compile(r"^[0-9a-f]{1,64}$")
_STALE_FORMATS = {1}  # older manifest formats: removed and recomputed, reported as stale


class BadData(BadEntryError):
    """The entry's stored data is unusable; message is the cause."""


class StaleFormat(BadData):
    """A manifest in an older format (its checksum does not bind the key): replace it."""

    def __init__(self, found: Any) -> None:
        super().__init__(f"old format {found!r} (this version writes {FORMAT_VERSION}; re-encode)")
        self.found = found


def payload_chunks(tensors, size: int) -> Iterator[bytes | memoryview]:
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


class ChunkedBytes:
    """The payload as its chunks; tensors inside one chunk are wrapped without copying."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.starts = [0, *itertools.accumulate(len(c) for c in chunks)][:-1]
        self.total = sum(len(c) for c in chunks)

    def tensor(self, dtype: str, shape: list[int], offset: int, nbytes: int) -> torch.Tensor:
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise BadData(f"unknown dtype {dtype!r}")
        count = math.prod(int(s) for s in shape)
        if count * torch.empty((), dtype=dt).element_size() != nbytes or offset < 0 or offset + nbytes > self.total:
            raise BadData("tensor layout does not fit the data")
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


def parse_manifest(key: str, raw: bytes | str, for_delete: bool = False) -> dict:
    """The manifest ``raw`` of entry ``key`` as a dict, checked before anything is fetched.

    Types and bounds: a JSON object of this format naming ``key``; a hex ``version``; sizes
    that are non-negative ints; ``chunk_bytes`` within Redis' value cap; ``n_chunks`` exactly
    what ``nbytes`` needs and at most :data:`MAX_CHUNKS`; ``2 * n_layers`` tensors whose byte
    counts match their dtype and shape and tile ``nbytes`` without gaps. Raises ``BadData`` (or
    ``StaleFormat`` for an older format) with the reason. ``for_delete`` stops after what deleting
    the entry needs (version and a bounded chunk count), so an old or half-valid manifest's
    chunks are still removed with it.
    """
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadData(f"manifest is not JSON ({exc})") from None
    if not isinstance(man, dict):
        raise BadData(f"manifest is a JSON {type(man).__name__}, not an object")
    if not isinstance(man.get("version"), str) or not _VERSION_RE.match(man["version"]):
        raise BadData(f"manifest version {man.get('version')!r:.40} is not a hex id")
    nbytes, chunk, n_chunks = (_int_field(man, f) for f in ("nbytes", "chunk_bytes", "n_chunks"))
    if not 1 <= chunk <= MAX_CHUNK_BYTES:
        raise BadData(f"manifest chunk_bytes {chunk} outside 1..{MAX_CHUNK_BYTES}")
    if n_chunks != -(-nbytes // chunk) or n_chunks > MAX_CHUNKS:
        raise BadData(f"manifest n_chunks {n_chunks} does not fit nbytes {nbytes} in chunks of {chunk} "
                   f"bytes (at most {MAX_CHUNKS})")
    if for_delete:
        return man
    fmt = man.get("format")
    if fmt in _STALE_FORMATS:
        raise StaleFormat(fmt)
    if fmt != FORMAT_VERSION:
        raise BadData(f"unknown format {fmt!r:.40}")
    if man.get("key") != key:
        raise BadData(f"manifest names key {man.get('key')!r:.80}")
    n_layers = _int_field(man, "n_layers")
    _int_field(man, "seq_len")  # compared with the data by check_summary
    if not isinstance(man.get("meta"), dict) or not isinstance(man.get("checksum"), str):
        raise BadData("manifest meta must be an object and checksum a string")
    if man.get("dtype") is not None and not isinstance(man["dtype"], str):
        raise BadData(f"manifest dtype {man['dtype']!r:.40} is not a string")
    created = man.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not 0 < created < 1e11:
        raise BadData(f"manifest creation time {created!r:.40} is not a plausible timestamp")
    _check_layout(man.get("tensors"), n_layers, nbytes)
    return man


def _int_field(man: dict, name: str) -> int:
    v = man.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadData(f"manifest {name} {v!r:.40} is not a non-negative integer")
    return v


def _check_layout(tensors: Any, n_layers: int, nbytes: int) -> None:
    """The tensor list must name ``2 * n_layers`` tensors tiling ``[0, nbytes)`` in order."""
    if not isinstance(tensors, list) or len(tensors) != 2 * n_layers:
        raise BadData(f"manifest tensors must be a list of {2 * n_layers} entries")
    at = 0
    for t in tensors:
        if not (isinstance(t, list) and len(t) == 5 and isinstance(t[0], str) and isinstance(t[1], str)
                and isinstance(t[2], list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                   and d >= 0 for d in t[2])
                and all(isinstance(x, int) and not isinstance(x, bool) for x in t[3:])):
            raise BadData(f"manifest tensor entry {t!r:.80} is malformed")
        name, dtype, shape, offset, size = t
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise BadData(f"manifest tensor {name!r:.40}: unknown dtype {dtype!r:.40}")
        if offset != at or size != math.prod(shape) * dt.itemsize:
            raise BadData(f"manifest tensor {name!r:.40}: offset/size do not match its dtype and shape")
        at += size
    if at != nbytes:
        raise BadData(f"manifest tensors hold {at} bytes, nbytes says {nbytes}")

"""Content keys of module caches: a hash of everything that determines a segment's KV.

A stored segment's keys and values are a function of the model (weights and config: its
fingerprint), the dtype, the encoding policy, the segment's own token ids and position ids, and
what it attended to when encoded: the ordered list of its context segments
(:func:`promptcache.plan.encoding_contexts`), each with its token ids and position ids. Parameter
slots in a context carry their scaffold/pad tokens, so they are covered too. A context segment's
own context is always a prefix of that list, so the list determines everything upstream.

The key hashes the segment and every context segment as ``sha256(token ids, position ids)``;
two schemas that contain the same module with the same context therefore share one entry, and a
different context (other text, other positions, another policy) gives another key. Nothing else
is trusted: no module names, no schema names.

Positions: for models whose modules can be relocated (:mod:`promptcache.modules.relocate`), positions
are made relative to ``base``, the first position of the context plus the segment, so the same
content at another offset has the same key; the absolute offset at which the stored tensors were
encoded goes into the entry's meta (``offset``), and the engine relocates on load. Otherwise
positions are absolute (``base = 0``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..pml.layout import Layout, Segment
from ..store import make_key

KEY_SCHEME = "promptcache-module-v1"


@dataclass(frozen=True)
class ModuleKey:
    """The identity of one stored segment's cache.

    ``store_key``: the content key (shared by every schema and offset with the same content);
    ``tier_key``: the in-memory identity (``store_key``, plus ``@base`` when the cached tensors
    depend on the absolute offset, i.e. rotated RoPE keys); ``base``: the absolute position that
    relative positions count from.
    """

    store_key: str
    tier_key: str
    base: int
    length: int


def segment_digest(tokens: Sequence[int], positions: Sequence[int], base: int = 0) -> str:
    """sha256 over the token ids and the position ids (minus ``base``) as little-endian int64."""
    h = hashlib.sha256()
    ids = np.asarray(tokens, dtype="<i8")
    pos = np.asarray(positions, dtype="<i8") - base
    h.update(f"{len(ids)}|".encode())
    h.update(ids.tobytes())
    h.update(b"|")
    h.update(pos.tobytes())
    return h.hexdigest()


def _base(segs: list[Segment], members: list[int]) -> int:
    return min(segs[i].start for i in members)


def module_keys(layout: Layout, contexts: list[list[int]], stored: Sequence[int], *, model: str,
                dtype: str, policy: str, relative: bool, offset_sensitive: bool) -> dict[int, ModuleKey]:
    """Keys of the ``stored`` segments of ``layout`` encoded with ``contexts`` under ``policy``.

    ``model``: :func:`promptcache.store.model_fingerprint`; ``relative``: positions relative to the
    first position of context+segment (only for relocatable models); ``offset_sensitive``: the
    in-memory copy depends on the absolute offset (tier key gets ``@base``).
    """
    segs = layout.segments
    memo: dict[tuple[int, int], str] = {}

    def digest(j: int, base: int) -> str:
        d = memo.get((j, base))
        if d is None:
            d = memo[(j, base)] = segment_digest(segs[j].tokens, segs[j].positions, base)
        return d

    out: dict[int, ModuleKey] = {}
    for i in stored:
        members = contexts[i] + [i]
        base = _base(segs, members) if relative else 0
        parts = {
            "scheme": KEY_SCHEME,
            "model": model,
            "dtype": dtype,
            "policy": policy,
            "positions": "relative" if relative else "absolute",
            "segment": digest(i, base),
            "context": [digest(c, base) for c in contexts[i]],
        }
        key = make_key(parts)
        tier = f"{key}@{base}" if offset_sensitive else key
        out[i] = ModuleKey(key, tier, base, len(segs[i].tokens))
    return out

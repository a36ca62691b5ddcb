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
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..plan import as_contexts
from ..pml.layout import Layout, Segment
from ..store.base import canonical_json
from ..store.keys import KEY_VERSION

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


def module_keys(layout: Layout, contexts: Sequence[Sequence[int]], stored: Sequence[int], *, model: str,
                dtype: str, policy: str, relative: bool, offset_sensitive: bool) -> dict[int, ModuleKey]:
    """Keys of the ``stored`` segments of ``layout`` encoded with ``contexts`` under ``policy``.

    ``model``: :func:`promptcache.store.model_fingerprint`; ``relative``: positions relative to the
    first position of context+segment (only for relocatable models); ``offset_sensitive``: the
    in-memory copy depends on the absolute offset (tier key gets ``@base``).

    Each key is ``make_key(parts)`` with ``parts["context"]`` the digests of the segment's whole
    context; hashing that list afresh per segment is quadratic (issue 12, item 13), so the sha256
    state after each context prefix is kept and extended along the context tree
    (:class:`ChainHasher`): linear in the segments, the same keys.
    """
    segs = layout.segments
    ctx = as_contexts(contexts)
    fixed = {"scheme": KEY_SCHEME, "model": model, "dtype": dtype, "policy": policy,
             "positions": "relative" if relative else "absolute"}
    hasher = ChainHasher(segs, ctx.parent, fixed)
    low = _lowest_starts(segs, ctx.parent) if relative else None
    out: dict[int, ModuleKey] = {}
    for i in stored:
        base = min(low[i], segs[i].start) if low is not None else 0
        key = hasher.key(i, base)
        tier = f"{key}@{base}" if offset_sensitive else key
        out[i] = ModuleKey(key, tier, base, len(segs[i].tokens))
    return out


def _lowest_starts(segs: list[Segment], parent: list[int]) -> list[float]:
    """Per segment, the lowest start position among its context segments (inf when none)."""
    low: list[float] = []
    for i, p in enumerate(parent):
        low.append(min(low[p], segs[p].start) if p >= 0 else math.inf)
    return low


class ChainHasher:
    """``make_key`` of a segment's parts, sharing the hash of common context prefixes.

    ``make_key`` hashes ``KEY_VERSION + "\\n" + canonical_json(parts)``; with sorted keys the
    text starts ``{"context":["d1","d2",...`` (``"context"`` sorts first), so the sha256 state after
    the digests of a context is the state after its parent's context, extended by one digest.
    States are kept per (segment, base).
    """

    def __init__(self, segs: list[Segment], parent: list[int], fixed: dict) -> None:
        if min(fixed) <= "context":
            raise ValueError("the context list must come first in the key's canonical JSON")
        self.segs, self.parent, self.fixed = segs, parent, fixed
        self._digests: dict[tuple[int, int], str] = {}
        self._states: dict[tuple[int, int], Any] = {}
        self._head = hashlib.sha256((KEY_VERSION + '\n{"context":[').encode("utf-8"))

    def digest(self, j: int, base: int) -> str:
        d = self._digests.get((j, base))
        if d is None:
            seg = self.segs[j]
            d = self._digests[(j, base)] = segment_digest(seg.tokens, seg.positions, base)
        return d

    def _state(self, last: int, base: int):
        """sha256 state after the digests of ``last``'s context and ``last`` itself (-1: none)."""
        path: list[int] = []
        j = last
        while j >= 0 and (j, base) not in self._states:
            path.append(j)
            j = self.parent[j]
        state = self._states[(j, base)] if j >= 0 else self._head
        for j in reversed(path):
            sep = "," if self.parent[j] >= 0 else ""
            state = state.copy()
            state.update(f'{sep}"{self.digest(j, base)}"'.encode("utf-8"))
            self._states[(j, base)] = state
        return state

    def key(self, i: int, base: int) -> str:
        """The key of segment ``i`` with positions relative to ``base``: ``make_key`` of its parts."""
        tail = canonical_json({**self.fixed, "segment": self.digest(i, base)})
        h = self._state(self.parent[i], base).copy()
        h.update(("]," + tail[1:]).encode("utf-8"))
        return h.hexdigest()

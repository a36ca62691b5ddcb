"""Which forwards must run to (re)compute some segments when others are already available.

``add_schema`` with a store, or a request whose module was evicted and dropped, needs some
segments' KV that no tier holds. A segment is computed in a forward whose past is its encoding
context, so every context segment must be available too: loaded (from a memory tier or the
store) or computed first. Parameter slots and ``cache="false"`` modules are never stored, so a
segment that has them in its context forces their forward to run again.

:func:`forwards_needed` answers this on the encode groups of :func:`promptcache.plan.encode_groups`
(chains of segments where each sees the previous ones plus the group's context). For a group it
computes only the run from the first segment that must be computed to the last one, with the
group's context plus the chain's earlier segments as past; a past segment that is not available
is required in turn (moving a run's start back, or adding its own group's run). With nothing
available this reproduces the full encode (minus trailing segments nobody needs).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

from .plan import EncodeGroup


def forwards_needed(groups: list[EncodeGroup], available: Callable[[int], bool],
                    need: Iterable[int]) -> list[EncodeGroup]:
    """The forwards (past, computed segments) that produce every segment of ``need``, in order.

    ``available(i)`` says whether segment ``i``'s KV can be had without a forward (it may load it,
    and is called at most once per segment); segments in ``need`` are computed regardless.
    """
    where = {s: (gi, k) for gi, g in enumerate(groups) for k, s in enumerate(g.segments)}
    known: dict[int, bool] = {}

    def have(i: int) -> bool:
        if i not in known:
            known[i] = available(i)
        return known[i]

    lo: dict[int, int] = {}   # group -> first chain index computed
    hi: dict[int, int] = {}   # group -> last chain index computed
    pending = list(need)
    checked: set[int] = set()  # segments whose whole chain (context + itself) has been checked

    def require(chain: Iterable[int]) -> None:
        """Queue what a chain (walked from its end) lacks; stop where an earlier walk went.

        A context is a chain of the context tree, so once a segment is checked, so is everything
        before it on its chain: each segment is visited once over all groups (linear)."""
        for c in chain:
            if c in checked:
                return
            checked.add(c)
            if not have(c):
                pending.append(c)

    while pending:
        s = pending.pop()
        gi, k = where[s]
        hi[gi] = max(hi.get(gi, k), k)
        if gi in lo and lo[gi] <= k:
            continue
        first = gi not in lo
        lo[gi] = k
        if first:
            # The run starts at k: its past is the group context plus the chain below k; whatever
            # of it cannot be had must be computed too. A later, lower start k' only shrinks that
            # past (already checked), so it is checked once per group.
            g = groups[gi]
            require(itertools.chain(reversed(g.segments[:k]), reversed(g.context)))
    out = []
    for gi in sorted(lo):
        g = groups[gi]
        out.append(EncodeGroup(g.context + g.segments[:lo[gi]], g.segments[lo[gi]:hi[gi] + 1]))
    return out

"""Encoding contexts and request plans: who attends to whom, as data.

Two questions decide everything the engine does, and both are answered here without a model:

1. *Encoding*: when a segment's KV is computed once by ``add_schema``, which other segments does it
   attend to? (:func:`encoding_contexts`, per policy.)
2. *Request*: for a bound prompt, which tokens come from the cache, which are computed, at which
   positions, and what did each one see? (:func:`make_plan`.)

and a third, for caches that must be rebuilt: which encoding forwards produce some segments when
others are already available? (:func:`forwards_needed`, at the end of this file.)

The :class:`Plan` is the correctness oracle made inspectable: one ordinary forward over
``plan.token_ids`` at ``plan.position_ids`` with a 4-D mask built from ``plan.visible`` reproduces
the cached path's logits. Cached tokens may have seen context that the prompt does not contain
(a union's scaffold member, a parameter's scaffold, the encode-time copy of a ``cache="false"``
module); such *ghost* tokens are included in the plan with ``in_prompt=False`` (invisible to the
computed tokens) so that the oracle holds for every prompt. ``plan.complete`` is True when there is
no ghost, i.e. the prompt's own tokens explain every cached value.

Size: the three questions share the layout and context data (the context tree, the scaffold
path); split this file only if a fourth question appears.
"""

from __future__ import annotations

import itertools

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .pml.binding import BoundPrompt
from .pml.layout import Layout, ModulePath, Segment

POLICIES = ("scaffold", "independent")


def is_ancestor(a: ModulePath, b: ModulePath) -> bool:
    """Is module ``a`` ``b`` or one of its ancestors? (The ``independent`` policy's context rule.)"""
    return b[: len(a)] == a


def on_scaffold_path(t: Segment, choices: dict[int, int], layout: Layout) -> bool:
    """Is segment ``t`` present on the path that selects ``choices`` and scaffolds elsewhere?

    The ``scaffold`` policy's context rule, stated directly: :class:`Contexts` computes the same
    contexts as a tree, and tests compare the two.
    """
    for union, member in t.union_choices.items():
        wanted = choices.get(union, layout.unions[union].scaffold)
        if wanted != member:
            return False
    return True


class Contexts(Sequence[list[int]]):
    """Every segment's encoding context, held as a tree in O(segments) memory.

    A context is always the context of its own last segment plus that segment (both policies
    only drop whole blocks: a union member or a module subtree), so ``parent[i]``, the last
    segment of ``i``'s context (-1 when empty), determines every context. Indexing materializes
    one context in O(its length); code that walks all contexts should follow ``parent`` instead
    (materializing them all is quadratic in the number of segments: issue 12, item 13).
    """

    def __init__(self, parent: list[int]) -> None:
        self.parent = parent
        self.size: list[int] = []
        for i, p in enumerate(parent):
            if not -1 <= p < i:
                raise ValueError(f"segment {i}: context parent {p} is not an earlier segment")
            self.size.append(self.size[p] + 1 if p >= 0 else 0)

    @classmethod
    def from_lists(cls, contexts: Sequence[Sequence[int]]) -> Contexts:
        """From explicit lists, checking that each is its last segment's context plus that segment."""
        parent = [ctx[-1] if ctx else -1 for ctx in contexts]
        for i, ctx in enumerate(contexts):
            if ctx and list(ctx[:-1]) != list(contexts[ctx[-1]]):
                raise ValueError(f"context of segment {i} is not the context of {ctx[-1]} plus {ctx[-1]}")
        return cls(parent)

    def __len__(self) -> int:
        return len(self.parent)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        out: list[int] = []
        p = self.parent[i]
        while p >= 0:
            out.append(p)
            p = self.parent[p]
        out.reverse()
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Contexts):
            return self.parent == other.parent
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(list(o) == self[i] for i, o in enumerate(other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Contexts(parent={self.parent!r})"


def as_contexts(contexts: Sequence[Sequence[int]]) -> Contexts:
    """``contexts`` as :class:`Contexts` (lists are checked and converted)."""
    return contexts if isinstance(contexts, Contexts) else Contexts.from_lists(contexts)


def encoding_contexts(layout: Layout, policy: str) -> Contexts:
    """For every segment (by index), the indices of the segments it attends to when encoded.

    - ``scaffold``: everything before it on its own path: its enclosing unions set to the members
      it lies in, every other union to its scaffold member (the first member unless the schema
      names another; nothing for ``scaffold=""``), every non-union module present, parameters
      holding their scaffolds.
    - ``independent``: only root-level segments and its enclosing modules' segments before it, so
      any subset of modules can be combined in any order.

    Linear in the number of segments (times nesting depth): each segment's parent is found by
    walking back from the segment before it, skipping a whole union member or module subtree at a
    time (see :class:`Contexts`).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown encoding policy {policy!r}; choose one of {', '.join(POLICIES)}")
    segs = layout.segments
    if policy == "scaffold":
        skip = _scaffold_skipper(layout)
    else:
        skip = _independent_skipper(layout)
    parent = []
    for s in segs:
        t = s.index - 1
        while t >= 0:
            jump = skip(segs[t], s)
            if jump is None:
                break
            t = jump
        parent.append(t)
    return Contexts(parent)


def _scaffold_skipper(layout: Layout):
    """``skip(t, s)``: None if ``t`` is on ``s``'s scaffold path, else the segment to look at next."""
    first: dict[int, int] = {}                    # union -> its first segment
    last_of: dict[tuple[int, int], int] = {}      # (union, member) -> the member's last segment
    for seg in layout.segments:
        for u, m in seg.union_choices.items():
            first.setdefault(u, seg.index)
            last_of[(u, m)] = seg.index
    unions = layout.unions

    def skip(t: Segment, s: Segment) -> int | None:
        for u, member in t.union_choices.items():  # outermost union first
            wanted = s.union_choices.get(u, unions[u].scaffold)
            if wanted == member:
                continue
            # Every segment of union u between the wanted member and t is off the path.
            end = last_of.get((u, wanted)) if wanted is not None else None
            return end if end is not None and end < t.index else first[u] - 1
        return None

    return skip


def _independent_skipper(layout: Layout):
    """``skip(t, s)``: None if ``t``'s module encloses ``s``, else the segment to look at next."""
    first: dict[ModulePath, int] = {}             # module -> first segment of its subtree
    for seg in layout.segments:
        for k in range(1, len(seg.owner) + 1):
            first.setdefault(seg.owner[:k], seg.index)

    def skip(t: Segment, s: Segment) -> int | None:
        if is_ancestor(t.owner, s.owner):
            return None
        k = 0
        while k < len(s.owner) and t.owner[k] == s.owner[k]:
            k += 1
        return first[t.owner[:k + 1]] - 1  # t's whole subtree below the common ancestor is off

    return skip


@dataclass
class EncodeGroup:
    """Consecutive segments computed by one forward over a shared context."""

    context: list[int]    # segment indices forming the past (already encoded)
    segments: list[int]   # segment indices computed in this forward, in order


def encode_groups(contexts: Sequence[Sequence[int]]) -> list[EncodeGroup]:
    """Merge segment ``i+1`` into ``i``'s forward when it sees exactly ``i``'s context plus ``i``.

    A group's context list is copied from the group holding its last segment (context + chain
    prefix), so building it costs a list copy, not a walk of the context tree per group.
    """
    ctx = as_contexts(contexts)
    groups: list[EncodeGroup] = []
    where: list[tuple[int, int]] = []  # segment -> (group, index in its chain)
    for i, p in enumerate(ctx.parent):
        if groups and p == i - 1:  # i's context is (i-1)'s context plus i-1: same forward
            where.append((len(groups) - 1, len(groups[-1].segments)))
            groups[-1].segments.append(i)
            continue
        if p < 0:
            context: list[int] = []
        else:
            g, k = where[p]
            context = groups[g].context + groups[g].segments[:k + 1]
        where.append((len(groups), 0))
        groups.append(EncodeGroup(context, [i]))
    return groups


def stored_segments(layout: Layout) -> list[int]:
    """Segments whose KV is kept after encoding: text of cacheable modules (not parameter slots)."""
    return [s.index for s in layout.segments
            if s.kind == "text" and layout.modules[s.owner].cache]


@dataclass
class Request:
    """What a bound prompt needs from the engine: spliced spans, computed tokens, ghost context.

    Cheap to build (no dense matrices), so the engine makes one per call; :func:`build_plan`
    expands it into the dense, inspectable :class:`Plan`.
    """

    cached_spans: list[tuple[int, int]]   # (segment index, tokens used from its start), by position
    computed_ids: list[int]               # computed tokens, sorted by position
    computed_pos: list[int]
    ghosts: list[int]                     # segments cached tokens saw that the prompt lacks

    @property
    def num_cached(self) -> int:
        return sum(n for _, n in self.cached_spans)


def make_request(bound: BoundPrompt, contexts: Sequence[Sequence[int]]) -> Request:
    """Decide, for a bound prompt, what is spliced from the cache and what is computed."""
    layout = bound.layout
    segs = layout.segments
    cached_segs: list[int] = []
    computed: list[tuple[int, int]] = []   # (position, token id)
    suffix_start = 0
    for s in segs:
        if s.owner not in bound.selected:
            continue
        suffix_start = max(suffix_start, s.end)
        if s.kind == "parameter":
            arg = bound.arguments[s.owner][s.parameter]
            computed += [(s.start + k, t) for k, t in enumerate(arg)]
        elif layout.modules[s.owner].cache:
            cached_segs.append(s.index)
        else:
            computed += [(p, t) for p, t in zip(s.positions, s.tokens)]
    computed += [(suffix_start + k, t) for k, t in enumerate(bound.suffix_tokens)]

    spans = [(i, len(segs[i].tokens)) for i in sorted(cached_segs, key=lambda i: segs[i].start)]
    # The last prompt token must be computed: its logits give the answer's first token.
    last_computed = max((p for p, _ in computed), default=-1)
    if spans and segs[spans[-1][0]].end - 1 > last_computed:
        i, n = spans[-1]
        computed.append((segs[i].end - 1, segs[i].tokens[-1]))
        spans[-1] = (i, n - 1)
        if n == 1:
            spans.pop()
    computed.sort()

    # Ghosts: every context segment of a cached one that the prompt lacks; walking up the context
    # tree stops at a segment already seen, so this is linear in the segments.
    parent = as_contexts(contexts).parent
    real = set(cached_segs)
    seen: set[int] = set()
    ghosts: set[int] = set()
    for i in cached_segs:
        t = parent[i]
        while t >= 0 and t not in seen:
            seen.add(t)
            if t not in real:
                ghosts.add(t)
            t = parent[t]
    return Request(spans, [t for _, t in computed], [p for p, _ in computed], sorted(ghosts))


@dataclass
class Plan:
    """Every token of a request (plus ghost context) with its position, origin and visibility.

    Tokens are ordered by position. ``cached[i]``: value comes from a stored module cache (or, for
    a ghost, was computed at encode time); ``in_prompt[i]``: part of the request (False for ghost
    context of cached tokens); ``visible[i, j]``: token i attended to token j when its KV was made
    (computed tokens: every prompt token at an earlier position, and themselves).
    ``segment[i]``: the layout segment of a cached or ghost token (-1 for computed tokens).
    """

    token_ids: torch.Tensor
    position_ids: torch.Tensor
    cached: torch.Tensor
    in_prompt: torch.Tensor
    visible: torch.Tensor
    segment: torch.Tensor
    policy: str
    schema: str

    @property
    def complete(self) -> bool:
        return bool(self.in_prompt.all())

    @property
    def prompt_token_ids(self) -> torch.Tensor:
        return self.token_ids[self.in_prompt]

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.in_prompt.sum())

    @property
    def num_cached(self) -> int:
        return int((self.cached & self.in_prompt).sum())

    @property
    def num_computed(self) -> int:
        return int((~self.cached).sum())

    def describe(self) -> str:
        ghosts = int((~self.in_prompt).sum())
        return (f"plan for {self.schema!r} ({self.policy}): {self.num_prompt_tokens} prompt tokens, "
                f"{self.num_cached} cached, {self.num_computed} computed, "
                f"{ghosts} ghost context tokens, complete={self.complete}")


def build_plan(request: Request, layout: Layout, contexts: Sequence[Sequence[int]], policy: str) -> Plan:
    """Expand a :class:`Request` into the dense :class:`Plan` (the oracle's inputs)."""
    segs = layout.segments
    used = dict(request.cached_spans)
    # Rows: (position, order, token, segment, offset, cached, in_prompt)
    rows: list[tuple[int, int, int, int, int, bool, bool]] = []
    for i in sorted(set(used) | set(request.ghosts)):
        s = segs[i]
        is_real = i in used
        n = used[i] if is_real else len(s.tokens)
        for k in range(n):
            rows.append((s.start + k, 0 if is_real else 1, s.tokens[k], i, k, True, is_real))
    for p, t in zip(request.computed_pos, request.computed_ids):
        rows.append((p, 2, t, -1, 0, False, True))
    rows.sort(key=lambda r: (r[0], r[1], r[3], r[4]))

    pos = torch.tensor([r[0] for r in rows], dtype=torch.long)
    seg = torch.tensor([r[3] for r in rows], dtype=torch.long)
    off = torch.tensor([r[4] for r in rows], dtype=torch.long)
    cached = torch.tensor([r[5] for r in rows], dtype=torch.bool)
    in_prompt = torch.tensor([r[6] for r in rows], dtype=torch.bool)

    # Cached and ghost rows: their encoding context, plus their own segment up to themselves.
    ctx_member = torch.zeros(len(segs) + 1, len(segs) + 1, dtype=torch.bool)
    for i in set(used) | set(request.ghosts):
        if contexts[i]:
            ctx_member[i, contexts[i]] = True
    seg_c = torch.where(seg < 0, len(segs), seg)
    both = cached[:, None] & cached[None, :]
    visible = ctx_member[seg_c][:, seg_c] & both
    visible |= (seg[:, None] == seg[None, :]) & (off[None, :] <= off[:, None]) & both
    # Computed rows: every prompt token at an earlier position, computed ones up to themselves.
    comp = ~cached
    visible |= comp[:, None] & in_prompt[None, :] & cached[None, :] & (pos[None, :] < pos[:, None])
    visible |= comp[:, None] & comp[None, :] & (pos[None, :] <= pos[:, None])

    token_ids = torch.tensor([r[2] for r in rows], dtype=torch.long)
    return Plan(token_ids, pos, cached, in_prompt, visible, seg, policy, layout.schema.name)


# ------------------------------------------------------------------ partial encodes
# Which forwards must run to (re)compute some segments when others are already available.
#
# ``add_schema`` with a store, or a request whose module was evicted and dropped, needs some
# segments' KV that no tier holds. A segment is computed in a forward whose past is its encoding
# context, so every context segment must be available too: loaded (from a memory tier or the
# store) or computed first. Parameter slots and ``cache="false"`` modules are never stored, so a
# segment that has them in its context forces their forward to run again.
#
# :func:`forwards_needed` answers this on the encode groups of :func:`promptcache.plan.encode_groups`
# (chains of segments where each sees the previous ones plus the group's context). For a group it
# computes only the run from the first segment that must be computed to the last one, with the
# group's context plus the chain's earlier segments as past; a past segment that is not available
# is required in turn (moving a run's start back, or adding its own group's run). With nothing
# available this reproduces the full encode (minus trailing segments nobody needs).

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

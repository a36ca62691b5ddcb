"""Why a cached answer can differ from the no-cache baseline, in words (issue 18, the demo).

The cached path reproduces the baseline only when every cached token was encoded after exactly
the text the prompt puts before it, at the prompt's own positions. Otherwise it is the Prompt
Cache approximation, and this module names where the request departs from that:

- *non-scaffold members*: the prompt selects a union member other than the union's scaffold, so
  cached text after the union was encoded after the scaffold, not after the selected member;
- *text the prompt lacks*: other context the cached tokens saw (unselected modules, parameter
  scaffolds, the encode-time copy of a ``cache="false"`` module): the request's ghost segments;
- *prompt text not seen*: prompt text before a cached token that its encoding context lacked
  (under ``independent`` encoding, every module encoded apart);
- *unused positions*: gaps in the layout (a shorter union member, a short argument), while the
  baseline numbers its tokens contiguously.

Everything is read off the bound prompt, its request and the encoding contexts; no model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .plan import Request, as_contexts, encoding_contexts, make_request
from .pml.binding import BoundPrompt, bind
from .pml.layout import ModulePath, Segment

LISTED = 3  # names shown per reason before "+N more"


@dataclass
class Approximation:
    """Where a cached request departs from the baseline; empty lists and 0 gaps mean exact."""

    policy: str
    non_scaffold: list[tuple[str, str]] = field(default_factory=list)  # (selected member, its union's scaffold)
    lacks: list[str] = field(default_factory=list)     # context cached tokens saw, absent from the prompt
    unseen: list[str] = field(default_factory=list)    # prompt text before cached tokens, absent from their context
    gap_positions: int = 0

    @property
    def exact(self) -> bool:
        return not (self.non_scaffold or self.lacks or self.unseen or self.gap_positions)

    def summary(self) -> str:
        """One line: what differs from the baseline and why (no trailing period)."""
        if self.exact:
            return ("no approximation: every cached token was encoded after exactly the prompt's "
                    "text before it, at the prompt's positions")
        parts = []
        if self.non_scaffold:
            pairs = [f"{m} instead of {s}" for m, s in self.non_scaffold]
            parts.append(f"the prompt selects non-scaffold union members ({_listed(pairs)}), so the "
                         "cached text after them was encoded after the scaffolds, not after the text "
                         "the prompt puts before it")
        if self.lacks:
            parts.append(f"cached tokens saw text the prompt lacks ({_listed(self.lacks)})")
        if self.unseen:
            why = " (modules encoded independently)" if self.policy == "independent" else ""
            parts.append(f"cached tokens did not see prompt text before them{why} "
                         f"({_listed(self.unseen)})")
        if self.gap_positions:
            parts.append(f"{self.gap_positions} unused layout positions (the baseline's are contiguous)")
        return "Prompt Cache approximation: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"exact": self.exact, "non_scaffold": [list(p) for p in self.non_scaffold],
                "lacks": self.lacks, "unseen": self.unseen, "gap_positions": self.gap_positions}


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f", +{len(names) - LISTED} more" if len(names) > LISTED else "")


def _label(s: Segment) -> str:
    """A segment's owner as ``validate`` names it: ``a/b``, ``a/b:param``, ``(schema text)``."""
    name = "/".join(s.owner) or "(schema text)"
    return f"{name}:{s.parameter}" if s.kind == "parameter" else name


def _under(path: ModulePath, owners: set[ModulePath]) -> bool:
    return any(o[: len(path)] == path for o in owners)


def explain_request(bound: BoundPrompt, request: Request, contexts: Sequence[Sequence[int]],
                    policy: str) -> Approximation:
    """Name the departures of ``request`` (made from ``bound`` with ``contexts``) from the baseline.

    Quadratic in the prompt's segments (each cached segment's context is compared with the prompt
    text before it): a diagnostic for one request, not for the serving path.
    """
    layout = bound.layout
    segs = layout.segments
    ctx = as_contexts(contexts)
    prompt_segs = [s for s in segs if s.owner in bound.selected]
    unseen: set[int] = set()
    for i, _ in request.cached_spans:
        seen = set(ctx[i])
        unseen.update(s.index for s in prompt_segs
                      if s.start < segs[i].start and s.index != i and s.index not in seen)
    ghost_owners = {segs[g].owner for g in request.ghosts}
    unseen_owners = {segs[j].owner for j in unseen}

    pairs: list[tuple[ModulePath, ModulePath]] = []
    for u in layout.unions:
        chosen = [m for m in u.members if m in bound.selected]
        if policy != "scaffold" or u.parent not in bound.selected or not chosen or u.scaffold is None:
            continue  # under "independent" no cached text saw a scaffold member: "unseen" says it
        scaffold = u.members[u.scaffold]
        if chosen[0] != scaffold and (_under(chosen[0], unseen_owners) or _under(scaffold, ghost_owners)):
            pairs.append((chosen[0], scaffold))
    covered = [p for pair in pairs for p in pair]

    def rest(indices) -> list[str]:
        labels = [_label(segs[j]) for j in sorted(indices)
                  if not any(segs[j].owner[: len(p)] == p for p in covered)]
        return list(dict.fromkeys(labels))

    positions = sorted([segs[i].start + k for i, n in request.cached_spans for k in range(n)]
                       + list(request.computed_pos))
    gaps = positions[-1] + 1 - len(positions) if positions else 0
    return Approximation(policy, [("/".join(m), s[-1]) for m, s in pairs], rest(request.ghosts),
                         rest(unseen), gaps)


def explain_prompt(pc, prompt) -> Approximation:
    """:func:`explain_request` for ``prompt`` on a :class:`~promptcache.engine.PromptCache` that
    has its schema added (the same layout, contexts and request the engine uses)."""
    parsed = pc.check_prompt(prompt)
    layout = pc.layout(parsed.schema)
    bound = bind(parsed, layout, pc.renderer)
    contexts = encoding_contexts(layout, pc.encoding)
    return explain_request(bound, make_request(bound, contexts), contexts, pc.encoding)

"""Selective recompute: buy back some of the accuracy that independent module caches give up.

Modules encoded apart never attend to each other. Per request, the engine can recompute the KV of
some cached tokens with the request's full context (every prompt token at an earlier layout
position), keep the spliced KV of the others, and only then run the uncached tokens.

Policies (strings, see :func:`parse_policy`):

* ``none``: splice only.
* ``boundary:K``: the first ``K`` cached tokens of every selected module except the first. Spans
  are grouped by owner module path (a module's several spans are one module, a nested module is a
  module of its own) and a module's first ``K`` tokens are counted across its spans in position
  order. Root-level text (owner ``()``: BOS, system turn, role markers, separators) counts as the
  first module and is never recomputed; if the prompt's cached tokens start with a module instead
  of root text, that module is the first one and is skipped.
* ``deviation:R`` (``0 < R <= 1``): CacheBlend's selection (Yao et al., 2024). A *check pass* runs
  the first ``c + 1`` layers (``c = CHECK_LAYER``, 1 as in CacheBlend/LMCache, clamped to the last
  layer) for ALL cached tokens with the full context and stops; each token's deviation is the mean
  squared difference between its fresh and its spliced VALUES at layer ``c``; the top
  ``ceil(R * N)`` tokens (ties: lower position first) are recomputed through every layer in one
  forward. As in CacheBlend, the fresh KV of layers ``0..c`` is kept for every cached token (it was
  paid for by the check pass); above ``c`` the unselected tokens keep their spliced KV. CacheBlend's
  gradual narrowing over several check layers is reduced to this single check layer (what LMCache's
  implementation does too).
* ``full``: every cached token; equals one causal forward over the prompt at its layout positions.

Everything here runs through a :class:`~promptcache.runtime.runner.ModelRunner` and takes the
request's cached pieces (:class:`~promptcache.runtime.kv.ModuleKV` with positions); nothing here
knows the engine. The recompute is fused into the prefill (:func:`prefill_with_recompute`): ONE forward whose queries
are the chosen cached tokens and the uncached prompt tokens, in position order, over the spliced
cache with the chosen tokens' stale KV masked out. A recomputed token sees every prompt token at an
earlier position (uncached ones included: parameter arguments, ``cache="false"`` modules), an
uncached token sees the recomputed KV; the result equals a separate recompute forward followed by
the usual prefill, at the price of one forward. The fresh KV then overwrites the stale slots of
this request's cache copy (stored module caches are never modified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .pml.layout import ModulePath
from . import recompute_auto
from .runtime.kv import ModuleKV, SplicedCache
from .runtime.runner import ModelRunner

CHECK_LAYER = 1  # CacheBlend's layer for the KV-deviation check (LMCache: ``layer_id == 1``)


@dataclass(frozen=True)
class CachedSpan:
    """One spliced span: its owner module, where it sits in the cached sequence, and its tokens."""

    owner: ModulePath
    offset: int
    length: int
    token_ids: Sequence[int]


def cached_spans(segments: Sequence, spans: Sequence[tuple[int, int]]) -> list[CachedSpan]:
    """The request's cached spans ``(segment index, tokens used)`` laid end to end, with owners."""
    out, at = [], 0
    for i, n in spans:
        out.append(CachedSpan(segments[i].owner, at, n, segments[i].tokens[:n]))
        at += n
    return out


@dataclass(frozen=True)
class RecomputePolicy:
    """A parsed policy string."""

    kind: str
    k: int = 0            # boundary:K
    ratio: float = 0.0    # deviation:R; boundary:P% (ratio = P / 100, k = 0)
    budget: float = 0.0   # auto:B

    def __str__(self) -> str:
        if self.kind == "boundary":
            return f"boundary:{self.ratio * 100:g}%" if self.ratio else f"boundary:{self.k}"
        if self.kind == "deviation":
            return f"deviation:{self.ratio:g}"
        if self.kind == "auto":
            return f"auto:{self.budget:g}"
        return self.kind


@dataclass
class Selection:
    """Which cached tokens a policy recomputes (indices into the cached sequence, ascending).

    ``scores``: per-token KV deviation (``deviation`` only). ``fresh``: the check pass's full-context
    KV of layers ``0..c`` for every cached token (a ``ModuleKV`` of ``c + 1`` layers).
    """

    indices: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor | None = None
    fresh: ModuleKV | None = None
    policy: str = ""  # the policy that chose them (``auto:B``: the one it picked for this request)

    def __len__(self) -> int:
        return int(self.indices.numel())


USAGE = ("use 'none', 'boundary:K' (K >= 0 tokens), 'boundary:P%' (0 < P <= 100), 'deviation:R' "
         "(0 < R <= 1), 'full' or 'auto:B' (B >= 1: at most B x the TTFT of 'none' by the cost model)")


def _count(spec: str, name: str, arg: str) -> int:
    """A non-negative integer argument (``boundary:K``)."""
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"recompute policy {spec!r}: {name} must be an integer; {USAGE}") from None
    if k < 0:
        raise ValueError(f"recompute policy {spec!r}: {name} must be >= 0, got {k}; {USAGE}")
    return k


def _number(spec: str, name: str, arg: str, low: float, high: float, closed_low: bool = False) -> float:
    """A float argument in ``(low, high]`` (``[low, high]`` with ``closed_low``); rejects nan."""
    try:
        x = float(arg)
    except ValueError:
        raise ValueError(f"recompute policy {spec!r}: {name} must be a number; {USAGE}") from None
    ok = (low <= x if closed_low else low < x) and x <= high  # nan fails both
    if not ok:
        span = f"{'[' if closed_low else '('}{low:g}, {high:g}]"
        raise ValueError(f"recompute policy {spec!r}: {name} must be in {span}, got {arg}; {USAGE}")
    return x


def parse_policy(spec: str | RecomputePolicy) -> RecomputePolicy:
    """Parse a policy string (forms in :data:`USAGE`); ``ValueError`` names the accepted forms."""
    if isinstance(spec, RecomputePolicy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"recompute policy must be a string, got {type(spec).__name__}; {USAGE}")
    kind, sep, arg = spec.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind in ("none", "full"):
        if sep:
            raise ValueError(f"recompute policy {spec!r}: {kind!r} takes no argument; {USAGE}")
        return RecomputePolicy(kind)
    if kind == "boundary" and arg.endswith("%"):
        return RecomputePolicy("boundary", ratio=_number(spec, "P", arg[:-1], 0.0, 100.0) / 100)
    if kind == "boundary":
        return RecomputePolicy("boundary", k=_count(spec, "K", arg))
    if kind == "deviation":
        return RecomputePolicy("deviation", ratio=_number(spec, "R", arg, 0.0, 1.0))
    if kind == "auto":
        return RecomputePolicy("auto", budget=_number(spec, "B", arg, 1.0, 1e6, closed_low=True))
    raise ValueError(f"unknown recompute policy {spec!r}; {USAGE}")


# ------------------------------------------------------------------ selection

def _exact(span: CachedSpan, before: Sequence[CachedSpan], clean: int) -> bool:
    """Did ``span`` see every prompt token before it when encoded (so its KV is already exact)?

    True when only root text and its enclosing modules precede it (every encoding shows a module
    those) and no uncached token does (``clean``: cached tokens before the first uncached one).
    """
    return (span.offset + span.length <= clean
            and all(o.owner == () or span.owner[:len(o.owner)] == o.owner for o in before))


def module_tokens(spans: Sequence[CachedSpan], clean: int | None = None) -> list[list[int]]:
    """Cached-token indices of every module, each in position order, stale spans only.

    Spans are grouped by owner; root text (owner ``()``) is never recomputed, and a span that saw
    every prompt token before it (:func:`_exact`: e.g. the first module after the root prefix, or a
    nested module right after its parent's opening text) is left out: its KV is already exact.
    ``clean`` defaults to every cached token (no uncached token before any of them).
    """
    clean = sum(s.length for s in spans) if clean is None else clean
    by_owner: dict[ModulePath, list[int]] = {}
    for i, span in enumerate(spans):  # spans are in position order, so each owner's list is too
        if span.owner != () and not _exact(span, spans[:i], clean):
            by_owner.setdefault(span.owner, []).extend(range(span.offset, span.offset + span.length))
    return list(by_owner.values())


def boundary_indices(spans: Sequence[CachedSpan], k: int, share: float = 0.0,
                     clean: int | None = None) -> list[int]:
    """The first ``k`` stale tokens (``share`` > 0: ``ceil(share x stale length)``) of every module."""
    chosen: list[int] = []
    for tokens in module_tokens(spans, clean):
        n = math.ceil(round(share * len(tokens), 9)) if share else k
        chosen += tokens[:n]
    return sorted(chosen)


def rule_indices(spans: Sequence[CachedSpan], pol: RecomputePolicy, clean: int | None = None) -> list[int]:
    """The tokens of a token-rule policy (``boundary:K`` or ``boundary:P%``)."""
    return boundary_indices(spans, pol.k, pol.ratio, clean)


def resolve_auto(budget: float, spans: Sequence[CachedSpan], computed: int, clean: int | None = None
                 ) -> RecomputePolicy:
    """The policy ``auto:budget`` runs for this request's shape (:mod:`promptcache.recompute_auto`).

    ``full`` if the cost model says it fits, else the largest level of ``family_policy`` that fits
    (``none`` when not even one token does, or nothing is stale). Deterministic: a function of the
    spans and the counts.
    """
    model = recompute_auto.COST_MODEL
    cached = sum(s.length for s in spans)
    if model.full_ratio(computed, cached) <= budget:
        return RecomputePolicy("full")
    family = recompute_auto.family_policy

    def count(level: int) -> int:
        return len(rule_indices(spans, parse_policy(family(level)), clean)) if level else 0

    level = recompute_auto.pick_level(budget, computed, cached, count, model)
    return parse_policy(family(level)) if count(level) else RecomputePolicy("none")


def top_k_by_score(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index (position)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return order[:k].sort().values


def _interleaved(past_pos: torch.Tensor, computed: tuple[Sequence[int], Sequence[int]] | None,
                 before: int) -> tuple[list[int], list[int]]:
    """Uncached prompt tokens (ids, positions) at positions below ``before``."""
    if computed is None:
        return [], []
    ids, pos = computed
    keep = [(p, t) for t, p in zip(ids, pos) if p < before]
    return [t for _, t in keep], [p for p, _ in keep]


def _merge(cached_ids: list[int], cached_pos: list[int], other_ids: list[int], other_pos: list[int]):
    """Merge two token lists by position; returns ids, positions and where the cached ones went."""
    rows = sorted([(p, 0, i, t) for i, (t, p) in enumerate(zip(cached_ids, cached_pos))]
                  + [(p, 1, i, t) for i, (t, p) in enumerate(zip(other_ids, other_pos))])
    where = [0] * len(cached_ids)
    for at, (_, src, i, _) in enumerate(rows):
        if src == 0:
            where[i] = at
    return [r[3] for r in rows], [r[0] for r in rows], where


def past_positions(pieces: Sequence[ModuleKV], device: torch.device) -> torch.Tensor:
    """The cached tokens' layout positions, laid end to end."""
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([p.positions.to(device) for p in pieces])


def check_pass(runner: ModelRunner, spans: Sequence[CachedSpan], past_pos: torch.Tensor,
               computed: tuple[Sequence[int], Sequence[int]] | None, last_layer: int) -> ModuleKV:
    """Full-context KV of layers ``0..last_layer`` for every cached token (forward stops there).

    Runs the cached tokens (and the uncached ones interleaved with them) causally by position
    over an empty cache; costs about ``(last_layer + 1) / num_layers`` of a prefill.
    """
    ids = [t for s in spans for t in s.token_ids]
    pos = past_pos.tolist()
    other_ids, other_pos = _interleaved(past_pos, computed, max(pos) + 1)
    q_ids, q_list, where = _merge(ids, pos, other_ids, other_pos)
    q_pos = runner.positions(q_list)
    _, cache = runner.prefill([], q_ids, q_pos, q_pos[None, :] <= q_pos[:, None], reserve=0,
                              logits=False, last_layer=last_layer)
    idx = torch.tensor(where, dtype=torch.long, device=runner.device)
    return ModuleKV([cache.layers[i].keys[0].index_select(1, idx) for i in range(last_layer + 1)],
                    [cache.layers[i].values[0].index_select(1, idx) for i in range(last_layer + 1)],
                    past_pos)


def choose(runner: ModelRunner, pieces: Sequence[ModuleKV], spans: Sequence[CachedSpan],
           policy: str | RecomputePolicy, computed: tuple[Sequence[int], Sequence[int]] | None = None
           ) -> Selection:
    """The cached tokens ``policy`` recomputes, for the request's cached pieces (deterministic)."""
    pol = parse_policy(policy)
    past_pos = past_positions(pieces, runner.device)
    n = int(past_pos.numel())
    clean = int((past_pos < min(computed[1])).sum()) if computed and len(computed[1]) else n
    if pol.kind == "auto":
        pol = resolve_auto(pol.budget, spans, len(computed[0]) if computed else 1, clean)
    scores, fresh = None, None
    if pol.kind == "none" or n == 0:
        idx: list[int] | torch.Tensor = []
    elif pol.kind == "full":
        idx = list(range(n))
    elif pol.kind == "boundary":
        idx = rule_indices(spans, pol, clean)
    else:
        c = min(CHECK_LAYER, runner.num_layers - 1)
        fresh = check_pass(runner, spans, past_pos, computed, c)
        old_v = torch.cat([p.values[c].to(runner.device) for p in pieces], dim=1)
        scores = ((fresh.values[c].float() - old_v.float()) ** 2).mean(dim=(0, 2))
        k = min(n, max(1, math.ceil(round(pol.ratio * n, 9))))
        idx = top_k_by_score(scores, k)
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    return Selection(idx, past_pos.cpu()[idx], scores, fresh, str(pol))


# ------------------------------------------------------------------ recompute

def with_fresh_layers(pieces: Sequence[ModuleKV], spans: Sequence[CachedSpan], fresh: ModuleKV
                      ) -> list[ModuleKV]:
    """The pieces with layers ``0..fresh.num_layers-1`` taken from the check pass (views, no copy)."""
    return [piece.with_layers(fresh.slice(span.offset, span.offset + span.length))
            for piece, span in zip(pieces, spans)]


def prepare(runner: ModelRunner, pieces: list[ModuleKV], spans: list[CachedSpan],
            policy: str | RecomputePolicy, computed: tuple[Sequence[int], Sequence[int]] | None = None
            ) -> tuple[list[ModuleKV], Selection]:
    """Choose the tokens to recompute; returns the pieces to splice (check layers fresh) and them.

    Stored caches are never modified: fresh layers are new tensors, the rest are the same views.
    """
    n = sum(p.length for p in pieces)
    if len(spans) != len(pieces) or sum(s.length for s in spans) != n:
        raise ValueError(f"recompute: {len(pieces)} pieces of {n} tokens and {len(spans)} spans do not "
                         "describe the same cached tokens")
    selection = choose(runner, pieces, spans, policy, computed)
    if selection.fresh is not None:
        pieces = with_fresh_layers(pieces, spans, selection.fresh)
    return list(pieces), selection


def prefill_with_recompute(runner: ModelRunner, pieces: Sequence[ModuleKV], spans: Sequence[CachedSpan],
                           selection: Selection, computed_ids: Sequence[int], computed_pos: Sequence[int]
                           ) -> tuple[torch.Tensor, SplicedCache]:
    """ONE forward that recomputes the selected cached tokens and prefills the uncached ones.

    Queries: the selected tokens and every uncached token, in position order. Past: the spliced
    cache with the selected tokens' stale KV masked out. A query sees unselected past tokens at
    strictly earlier positions and queries at earlier-or-equal positions, so a recomputed token sees
    the full context before it and an uncached token sees the recomputed KV, exactly as a separate
    recompute forward followed by the usual prefill would give, for the price of one forward. The
    cache is then settled: the fresh KV overwrites the stale slots (this request's copy only) and the
    uncached tokens stay appended in position order. When every cached token is selected (``full``)
    nothing is spliced: the forward is a plain prefill of the whole prompt (the model's fast causal
    path where the layout has no gaps). Returns the last uncached token's logits and the cache.
    """
    if not computed_ids:
        raise ValueError("recompute needs at least one uncached prompt token to predict from")
    dev = runner.device
    all_pos = past_positions(pieces, dev)
    n = int(all_pos.numel())
    everything = len(selection) == n
    sel = selection.indices.to(dev)
    flat_ids = [t for s in spans for t in s.token_ids]
    q_ids, q_list, where = _merge([flat_ids[i] for i in selection.indices.tolist()],
                                  all_pos.cpu()[selection.indices].tolist(), list(computed_ids), list(computed_pos))
    q_pos = runner.positions(q_list)
    past_pos = all_pos[:0] if everything else all_pos
    stale = torch.zeros(len(past_pos), dtype=torch.bool, device=dev)
    if not everything:
        stale[sel] = True
    visible = torch.cat([(past_pos[None, :] < q_pos[:, None]) & ~stale[None, :],
                         q_pos[None, :] <= q_pos[:, None]], dim=1)
    sel_rows = torch.tensor(where, dtype=torch.long, device=dev)
    is_sel = torch.zeros(len(q_ids), dtype=torch.bool, device=dev)
    is_sel[sel_rows] = True
    comp_rows = (~is_sel).nonzero().flatten()
    last = int(comp_rows[-1])
    logits, cache = runner.prefill([] if everything else list(pieces), q_ids, q_pos, visible,
                                   keep=len(q_ids) - last)
    if not everything:  # ``everything``: the cache already holds every token once, positions recorded
        cache.settle(n, sel, sel_rows, comp_rows)
    return logits, cache

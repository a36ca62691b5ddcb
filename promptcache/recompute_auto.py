"""The cost model behind ``recompute="auto:B"``: predict a prefill's TTFT from the prompt's shape.

Why a model and not a timer: the policy must be picked before the forward runs, per request, and
the same prompt must always get the same policy (so results stay reproducible and testable).

The fused recompute forward (:func:`promptcache.recompute.prefill_with_recompute`) has the
uncached tokens and the recomputed tokens as its queries, over the whole spliced cache as past.
A forward of ``q`` queries over ``p`` past keys costs, in units of one query's weight work::

    cost(q, p) = OVERHEAD + COPY * p + q * (1 + (p + q) / ATTENTION)

``OVERHEAD``: the fixed cost of a forward (per-layer calls, the last token's LM head), in query
units; ``COPY``: per cached token, the request's one copy of the spliced cache (every layer's K and
V); ``ATTENTION``: the number of keys at which a query's attention costs as much as its weights
(SDPA with a mask computes every column, masked or not). Then, for ``c`` uncached tokens,
``N`` cached tokens and ``r`` recomputed ones:

* ``none``: ``cost(c, N)``;  a token-rule policy: ``cost(c + r, N)``;  ``full``: ``cost(N + c, 0)``
  (nothing is spliced, no copy).

``auto:B`` takes ``full`` when ``cost(N + c, 0) <= B x cost(c, N)``; otherwise the largest level of
:func:`family_policy` (``boundary:P%``) whose recomputed tokens fit ``cost(c + r, N) <= B x cost(c, N)`` (levels are
searched by bisection; the token count grows with the level). ``deviation`` is never picked: its
check pass alone (all cached tokens through two layers) costs about ``2 / layers x cost(N, 0)``,
close to one ``none`` prefill at these shapes, and per recomputed token it did no better than the
token rules (docs/recompute.md). Calibration: ``benchmarks/recompute.py --calibrate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Fitted by benchmarks/recompute.py --calibrate on SmolLM2-135M, float32, one CPU thread, CPU time
# (docs/recompute.md, "auto"): least squares of TTFT = a + e p + b q + g q (p + q) over p in
# {256, 1024, 2048}, q in {4, 16, 64, 256}; every shape within 7% of the fit above q = 4.
OVERHEAD_TOKENS = 59.7
COPY_PER_TOKEN = 0.022
ATTENTION_TOKENS = 2160.0
# The token rule auto scales: level k (1..MAX_LEVEL) -> boundary:(k/10)%, the first k per mille of
# every stale module (chosen on the TUNE split: proportional K did at least as well as a fixed K
# for the same number of tokens; docs/recompute.md).
MAX_LEVEL = 1000


def family_policy(level: int) -> str:
    """The policy string of ``level`` (>= 1): ``boundary:P%`` with P = level / 10."""
    return f"boundary:{level / 10:g}%"


@dataclass(frozen=True)
class CostModel:
    """Predicted prefill cost of a request shape, in query units (see the module docstring)."""

    overhead: float = OVERHEAD_TOKENS
    copy: float = COPY_PER_TOKEN
    attention: float = ATTENTION_TOKENS

    def forward(self, queries: int, past: int) -> float:
        return self.overhead + self.copy * past + queries * (1.0 + (past + queries) / self.attention)

    def ratio(self, recomputed: int, computed: int, cached: int) -> float:
        """Predicted TTFT of recomputing ``recomputed`` tokens over that of ``none``."""
        return self.forward(computed + recomputed, cached) / self.forward(computed, cached)

    def full_ratio(self, computed: int, cached: int) -> float:
        """Predicted TTFT of ``full`` (one plain prefill of the prompt) over that of ``none``."""
        return self.forward(cached + computed, 0) / self.forward(computed, cached)


COST_MODEL = CostModel()


def pick_level(budget: float, computed: int, cached: int, count: Callable[[int], int],
               model: CostModel = COST_MODEL) -> int:
    """The largest level ``k`` whose ``count(k)`` recomputed tokens fit ``budget`` (0 if none does).

    ``count`` must not decrease with ``k``; bisection over ``0..MAX_LEVEL``.
    """
    lo, hi = 0, MAX_LEVEL
    if model.ratio(count(hi), computed, cached) <= budget:
        return hi
    while hi - lo > 1:  # invariant: lo fits (count(0) is 0 tokens), hi does not
        mid = (lo + hi) // 2
        if model.ratio(count(mid), computed, cached) <= budget:
            lo = mid
        else:
            hi = mid
    return lo

"""Numbers the eval scripts compute besides LongBench's task scores (:mod:`eval.metrics`): one job,
the cache's fidelity (first-token KL divergence from the baseline) and the median used in summaries.
"""

from __future__ import annotations

import math
from typing import Sequence


def first_token_kl(baseline_logits, cached_logits) -> float:
    """KL(P_baseline || P_cached) in nats over the first generated token, computed in float64.

    Direction: the baseline is the reference distribution; the value is the expected extra
    log-loss of predicting the baseline's next token with the cached model's distribution.
    """
    import torch  # noqa: PLC0415

    log_p = torch.log_softmax(baseline_logits.double().flatten(), dim=-1)
    log_q = torch.log_softmax(cached_logits.double().flatten(), dim=-1)
    value = float(torch.sum(log_p.exp() * (log_p - log_q)))
    return max(value, 0.0)  # rounding can leave -1e-17 for identical inputs


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

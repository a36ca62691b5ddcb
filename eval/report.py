"""Summaries, tables and plots computed from the per-sample records the eval scripts write.

Why separate from the runs: every number in a table is recomputed from the saved JSONL (task
scores from the saved predictions with :mod:`eval.metrics`), so a resumed run, a partial run or a
file copied from another machine are summarised the same way, and a table can be rebuilt later.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

from .metrics import task_score
from .numbers import median

ALL_ROW = "all"

Row = dict[str, Any]


# ---------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """Render ``rows`` (dicts) as a fixed-width text table or a Markdown table.

    ``columns``: (key, header) pairs. Numbers are right-aligned, floats shown with 2 decimals, 3
    below 1 and scientific notation below 0.01 (so a small KL keeps its digits).
    """
    headers = [header for _, header in columns]
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    numeric = [all(_is_number(row.get(key)) for row in rows) for key, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if num else ":---" for num in numeric) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _by_task(records: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for record in records:
        groups[record["dataset"]].append(record)
    return dict(groups)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den and not math.isnan(num) and not math.isnan(den) else math.nan


# ---------------------------------------------------------------- latency (eval.py)

LATENCY_COLUMNS = [
    ("task", "task"), ("n", "n"), ("prompt_tokens", "prompt tok (med)"),
    ("cached_tokens", "cached tok (med)"), ("encode_ms", "encode ms (med)"),
    ("ttft_ms_baseline", "TTFT base ms (med)"), ("ttft_ms_cached", "TTFT cached ms (med)"),
    ("speedup", "speedup"), ("speedup_per_sample", "speedup/sample (med)"),
    ("same_first_token_pct", "same 1st token %"),
]


def _latency_row(task: str, records: Sequence[Row]) -> Row:
    base = median([r["ttft_ms_baseline"] for r in records])
    cached = median([r["ttft_ms_cached"] for r in records])
    return {
        "task": task, "n": len(records),
        "prompt_tokens": median([r["prompt_tokens"] for r in records]),
        "cached_tokens": median([r["cached_tokens"] for r in records]),
        "encode_ms": median([r["encode_ms"] for r in records]),
        "ttft_ms_baseline": base, "ttft_ms_cached": cached,
        "speedup": _ratio(base, cached),
        "speedup_per_sample": median([r["ttft_ms_baseline"] / r["ttft_ms_cached"] for r in records]),
        "same_first_token_pct": 100 * _mean([float(r["same_first_token"]) for r in records]),
    }


def latency_summary(records: Sequence[Row]) -> list[Row]:
    """Per task (file order of first appearance), then all samples pooled: medians and speedups.

    ``speedup`` is median baseline TTFT / median cached TTFT; ``speedup_per_sample`` the median of
    the per-sample ratios.
    """
    rows = [_latency_row(task, recs) for task, recs in _by_task(records).items()]
    if len(rows) > 1:
        rows.append(_latency_row(ALL_ROW, records))
    return rows


# ---------------------------------------------------------------- accuracy (eval_acc.py)

ACCURACY_COLUMNS = [
    ("task", "task"), ("n", "n"), ("score_baseline", "score base"), ("score_cached", "score cached"),
    ("delta", "delta"), ("identical_pct", "identical %"), ("mean_first_token_kl", "mean 1st-token KL"),
    ("ttft_ms_baseline", "TTFT base ms (med)"), ("ttft_ms_cached", "TTFT cached ms (med)"),
]


def _pooled_columns(records: Sequence[Row]) -> Row:
    """The sample-level accuracy columns, pooled over ``records``."""
    return {
        "identical_pct": 100 * _mean([float(r["identical"]) for r in records]),
        "mean_first_token_kl": _mean([r["first_token_kl"] for r in records]),
        "ttft_ms_baseline": median([r["ttft_ms_baseline"] for r in records]),
        "ttft_ms_cached": median([r["ttft_ms_cached"] for r in records]),
        **({"ttft_cpu_ms_cached": median([r["ttft_cpu_ms_cached"] for r in records]),
            "ttft_cpu_ms_baseline": median([r["ttft_cpu_ms_baseline"] for r in records])}
           if all("ttft_cpu_ms_cached" in r for r in records) else {}),  # eval_acc.py --cpu-ttft
        "recompute_ratio": _ratio(sum(r.get("recomputed_tokens", 0) for r in records),
                                  sum(r["cached_tokens"] for r in records)),
    }


def _accuracy_row(task: str, records: Sequence[Row]) -> Row:
    answers = [r["answers"] for r in records]
    classes = [r.get("all_classes") for r in records]
    base = task_score(task, [r["pred_baseline"] for r in records], answers, classes)
    cached = task_score(task, [r["pred_cached"] for r in records], answers, classes)
    return {
        "task": task, "n": len(records), "score_baseline": base, "score_cached": cached,
        "delta": round(cached - base, 2),
        **_pooled_columns(records),
    }


def _average_row(rows: Sequence[Row], records: Sequence[Row]) -> Row:
    """LongBench averages task scores; the sample-level columns pool every sample."""
    base = _mean([r["score_baseline"] for r in rows])
    cached = _mean([r["score_cached"] for r in rows])
    return {
        "task": ALL_ROW, "n": len(records), "score_baseline": round(base, 2), "score_cached": round(cached, 2),
        "delta": round(cached - base, 2),
        **_pooled_columns(records),
    }


def accuracy_summary(records: Sequence[Row]) -> list[Row]:
    """Per task: task scores (recomputed from the predictions), delta, identical %, mean KL, TTFT.

    The last row (``all``, when there are several tasks) averages the task scores as LongBench
    does and pools the per-sample columns.
    """
    rows = [_accuracy_row(task, recs) for task, recs in _by_task(records).items()]
    if len(rows) > 1:
        rows.append(_average_row(rows, records))
    return rows


# Each policy against ``none`` on the same samples: the selective-recompute issue's three targets.
VS_NONE_COLUMNS = [
    ("kl_gap_recovered_pct", "KL gap recovered %"), ("ttft_vs_none", "TTFT / none"),
    ("baseline_vs_ttft", "TTFT base / cached"),
    ("cpu_ttft_vs_none", "CPU TTFT / none"), ("cpu_baseline_vs_ttft", "CPU base / cached"),  # --cpu-ttft
]

SWEEP_COLUMNS = [
    ("policy", "policy"), ("n", "n"), ("recompute_ratio", "recomputed/cached"),
    ("score_baseline", "score base"), ("score_cached", "score cached"), ("delta", "delta"),
    ("identical_pct", "identical %"), ("mean_first_token_kl", "mean 1st-token KL"),
    ("ttft_ms_baseline", "TTFT base ms (med)"), ("ttft_ms_cached", "TTFT cached ms (med)"),
] + VS_NONE_COLUMNS


def split_by_policy(records: Sequence[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for record in records:
        groups[record.get("recompute", "none")].append(record)
    return dict(groups)


def sweep_summary(records: Sequence[Row], policies: Sequence[str]) -> tuple[list[Row], dict[str, list[Row]]]:
    """Per policy (in ``policies`` order): the ``all`` row of its accuracy summary, plus per-task rows.

    Returns ``(one row per policy, {policy: its per-task accuracy rows})``.
    """
    groups = split_by_policy(records)
    overall: list[Row] = []
    per_task: dict[str, list[Row]] = {}
    for policy in policies:
        recs = groups.get(policy)
        if not recs:
            continue
        per_task[policy] = accuracy_summary(recs)
    none = {r["task"]: r for r in per_task.get("none", [])}
    for policy, rows in per_task.items():
        for row in rows:
            _compare_with_none(row, none.get(row["task"]))
        overall.append({"policy": policy, **{k: v for k, v in rows[-1].items() if k != "task"}})  # the "all" row
    return overall, per_task


def _compare_with_none(row: Row, none: Row | None) -> None:
    """Add the share of ``none``'s mean-KL gap to the baseline that ``row`` closes, and TTFT ratios."""
    row["baseline_vs_ttft"] = _ratio(row["ttft_ms_baseline"], row["ttft_ms_cached"])
    if "ttft_cpu_ms_cached" in row:
        row["cpu_baseline_vs_ttft"] = _ratio(row["ttft_cpu_ms_baseline"], row["ttft_cpu_ms_cached"])
    if none is None:
        return
    if "ttft_cpu_ms_cached" in row and "ttft_cpu_ms_cached" in none:
        row["cpu_ttft_vs_none"] = _ratio(row["ttft_cpu_ms_cached"], none["ttft_cpu_ms_cached"])
    gap = none["mean_first_token_kl"]
    row["kl_gap_recovered_pct"] = 100 * (1 - row["mean_first_token_kl"] / gap) if gap > 0 else float("nan")
    row["ttft_vs_none"] = _ratio(row["ttft_ms_cached"], none["ttft_ms_cached"])


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def latency_figure(records: Sequence[Row], title: str):
    """Left: TTFT vs prompt length, both modes. Right: cached TTFT vs uncached (computed) tokens.

    Colour = mode, marker = task. The right panel explains the speedups: with the context cached,
    the first token's cost follows the tokens still computed (question, template tail), not the
    prompt length.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    tasks = list(_by_task(records))
    markers = "os^vD<>phX*P"
    for i, task in enumerate(tasks):
        recs = [r for r in records if r["dataset"] == task]
        m = markers[i % len(markers)]
        x = [r["prompt_tokens"] for r in recs]
        left.scatter(x, [r["ttft_ms_baseline"] for r in recs], marker=m, color="tab:red", alpha=0.6)
        left.scatter(x, [r["ttft_ms_cached"] for r in recs], marker=m, color="tab:blue", alpha=0.6)
        right.scatter([r["computed_tokens"] for r in recs], [r["ttft_ms_cached"] for r in recs], marker=m,
                      color="tab:blue", alpha=0.6)
    left.set_xlabel("prompt tokens")
    right.set_xlabel("computed (uncached) prompt tokens")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_title("TTFT vs prompt length")
    right.set_title("Prompt Cache TTFT vs computed tokens")
    handles = [Line2D([], [], color="tab:red", marker="o", linestyle="", label="baseline (no cache)"),
               Line2D([], [], color="tab:blue", marker="o", linestyle="", label="Prompt Cache")]
    handles += [Line2D([], [], color="black", marker=markers[i % len(markers)], linestyle="", label=task)
                for i, task in enumerate(tasks)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 6 else 0.06, 1, 1))
    return fig


def sweep_figure(overall: Sequence[Row], title: str):
    """Quality vs cached TTFT per recompute policy: identical answers, first-token KL, score delta."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    x = [r["ttft_ms_cached"] for r in overall]
    panels = [("identical_pct", "identical greedy answers (%)", False),
              ("mean_first_token_kl", "mean first-token KL (nats, log)", True),
              ("delta", "score delta vs baseline (points)", False)]
    base = median([r["ttft_ms_baseline"] for r in overall])
    for ax, (key, label, log) in zip(axes, panels):
        y = [r[key] for r in overall]
        if log:
            y = [max(v, 1e-12) for v in y]
            ax.set_yscale("log")
        ax.plot(x, y, "o-", color="tab:blue")
        for xi, yi, row in zip(x, y, overall):
            ax.annotate(row["policy"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if not math.isnan(base):
            ax.axvline(base, color="tab:red", linestyle="--", linewidth=1, label="baseline TTFT (median)")
            ax.legend(fontsize=7)
        ax.set_xscale("log")  # cheap policies bunch up near ``none`` on a linear axis
        ax.set_xlabel("median cached TTFT (ms, log)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

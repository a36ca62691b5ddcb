"""Synthetic multi-passage tasks built from longbench-mini, and the TUNE / HELD-OUT sample split.

Why: longbench-mini has two multi-passage tasks with 13 and 15 samples, too few to tune a recompute
policy on some and still judge it on others. The synthetic tasks reuse their real text, questions
and answers in a shape Prompt Cache meets in earnest: one passage that answers the question shuffled
among passages of OTHER samples, each passage its own independently encoded module.

* ``synthetic_qa`` (from hotpotqa): the source sample's passages that carry the answer (the text
  around the answer's first occurrence) or whose title the question names (at most 2), plus
  distractor passages of other samples, shuffled and renumbered ``Passage 1:``...; hotpotqa's
  template and QA F1 against the source answers. Sources without such a passage are skipped.
* ``synthetic_retrieval`` (from passage_retrieval_en): the paragraph the abstract was written from
  (the source's answer ``Paragraph k``) among paragraphs of other samples, shuffled and renumbered;
  the answer is the gold paragraph's new number, scored with LongBench's retrieval metric.

Every passage is cut to its first :data:`PASSAGE_WORDS` words (a QA passage: a window of that many
words around the answer), so that :data:`~eval.tasks.SYNTHETIC_PASSAGES` passages fit a 2k prompt.
Deterministic: one ``random.Random`` per (task, source id, variant), seeded by that string.

Splits (:data:`SPLITS`, fixed here by sample id): ``tune`` and ``heldout``. A synthetic sample
belongs to its source's split and draws its distractors from the same split only, so a held-out
synthetic sample contains no tune text. Recompute policies and the ``auto`` cost model were chosen
on ``tune``; ``heldout`` is only measured.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

from .data import Sample, load_task, split_passages
from .tasks import SYNTHETIC_PASSAGES, SYNTHETIC_TASKS, EvalDataError

SOURCES = {"synthetic_qa": "hotpotqa", "synthetic_retrieval": "passage_retrieval_en"}
VARIANTS = 2          # synthetic samples per source sample (different distractors and order)
PASSAGE_WORDS = 150   # words kept per passage
MAX_RELEVANT = 2      # source passages kept per synthetic_qa sample

_RANGE = lambda task, ids: [f"{task}-{i}" for i in ids]  # noqa: E731
SPLITS: dict[str, dict[str, list[str]]] = {
    "hotpotqa": {"tune": _RANGE("hotpotqa", range(0, 6)), "heldout": _RANGE("hotpotqa", range(6, 13))},
    "passage_retrieval_en": {"tune": _RANGE("passage_retrieval_en", range(0, 7)),
                             "heldout": _RANGE("passage_retrieval_en", range(7, 15))},
}
SPLIT_NAMES = ("all", "tune", "heldout")


def source_task(task: str) -> str:
    """The longbench-mini task a synthetic task is built from."""
    try:
        return SOURCES[task]
    except KeyError:
        raise EvalDataError(f"{task!r} is not a synthetic task ({', '.join(SOURCES)})") from None


def split_of(task: str, sample: Sample) -> str | None:
    """``tune``/``heldout`` for a sample (a synthetic one: its source's), None when not in SPLITS."""
    sid = sample.extra.get("source_id", sample.id) if task in SOURCES else sample.id
    for name, ids in SPLITS.get(SOURCES.get(task, task), {}).items():
        if sid in ids:
            return name
    return None


def in_split(task: str, samples: Sequence[Sample], split: str) -> list[Sample]:
    """The samples of ``split`` (``all``: every sample, listed or not)."""
    if split not in SPLIT_NAMES:
        raise EvalDataError(f"unknown split {split!r}; use one of {', '.join(SPLIT_NAMES)}")
    return list(samples) if split == "all" else [s for s in samples if split_of(task, s) == split]


def _words(text: str, start: int = 0, count: int = PASSAGE_WORDS) -> str:
    return " ".join(text.split()[start:start + count])


def _qa_parts(passage: str) -> tuple[str, str]:
    """(title, text) of a hotpotqa passage ``Passage N:\\n<title>\\n<text>``."""
    lines = re.sub(r"^Passage \d+:\n?", "", passage).split("\n", 1)
    return lines[0].strip(), (lines[1] if len(lines) > 1 else "")


def _answer_window(text: str, answers: Sequence[str]) -> str | None:
    """PASSAGE_WORDS words around the first occurrence of an answer (not yes/no), or None."""
    low = text.lower()
    for answer in answers:
        a = answer.strip().lower()
        if a in ("yes", "no") or len(a) < 2:
            continue
        at = low.find(a)
        if at >= 0:
            word = len(text[:at].split())
            return _words(text, max(0, word - PASSAGE_WORDS // 2))
    return None


def _qa_relevant(sample: Sample) -> list[tuple[str, str]]:
    """(title, text) of the source passages that answer or are named by the question."""
    picked: list[tuple[str, str]] = []
    named: list[tuple[str, str]] = []
    for passage in split_passages("hotpotqa", sample.context):
        title, text = _qa_parts(passage)
        window = _answer_window(text, sample.answers)
        if window is not None:
            picked.append((title, window))
        elif title and title.lower() in sample.input.lower():
            named.append((title, _words(text)))
    return (picked + named)[:MAX_RELEVANT]


def _retrieval_gold(sample: Sample) -> str:
    """The text of the paragraph named by the source answer ``Paragraph k``."""
    found = re.findall(r"Paragraph (\d+)", sample.answers[0])
    passages = split_passages("passage_retrieval_en", sample.context)
    k = int(found[0]) if found else 0
    head = f"Paragraph {k}:"
    match = [p for p in passages if p.startswith(head)]
    if not match:
        raise EvalDataError(f"passage_retrieval_en/{sample.id}: answer {sample.answers[0]!r} names no paragraph")
    return match[0][len(head):]


def _distractors(task: str, pool: Sequence[Sample], rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` (title, text) passages drawn from the samples in ``pool`` (other samples)."""
    candidates = []
    for other in pool:
        for passage in split_passages(task, other.context):
            if task == "hotpotqa":
                title, text = _qa_parts(passage)
            else:
                title, text = "", re.sub(r"^Paragraph \d+:", "", passage)
            if len(text.split()) >= PASSAGE_WORDS // 2:
                candidates.append((title, _words(text)))
    if len(candidates) < count:
        raise EvalDataError(f"synthetic {task}: only {len(candidates)} distractor passages, need {count}")
    return rng.sample(candidates, count)


def _render(task: str, passages: Sequence[tuple[str, str]]) -> str:
    """Numbered passages in the source task's layout (so eval.data.split_passages splits them)."""
    if task == "synthetic_qa":
        return "\n".join(f"Passage {i}:\n{title}\n{text}" for i, (title, text) in enumerate(passages, 1))
    return "\n\n".join(f"Paragraph {i}: {text}" for i, (_, text) in enumerate(passages, 1))


def build_sample(task: str, source: Sample, pool: Sequence[Sample], variant: int) -> Sample | None:
    """One synthetic sample from ``source`` with distractors from ``pool`` (None: no usable passage)."""
    rng = random.Random(f"{task}:{source.id}:{variant}")
    others = [s for s in pool if s.id != source.id]
    if task == "synthetic_qa":
        relevant = _qa_relevant(source)
        if not relevant:
            return None
    else:
        relevant = [("", _words(_retrieval_gold(source)))]
    passages = relevant + _distractors(SOURCES[task], others, rng, SYNTHETIC_PASSAGES - len(relevant))
    order = list(range(len(passages)))
    rng.shuffle(order)
    shuffled = [passages[i] for i in order]
    answers = (list(source.answers) if task == "synthetic_qa"
               else [f"Paragraph {order.index(0) + 1}"])
    context = _render(task, shuffled)
    return Sample(id=f"{source.id}-syn{variant}", dataset=task, input=source.input, context=context,
                  answers=answers, length=len(context.split()),
                  extra={"source_id": source.id, "source_task": SOURCES[task]})


def build_task(task: str, data_dir: str | Path, from_hub: bool = False, limit: int | None = None
               ) -> list[Sample]:
    """Every synthetic sample of ``task`` (VARIANTS per usable source sample), source order.

    Distractors come from the source's own split (samples outside SPLITS form one group of their own).
    """
    if task not in SYNTHETIC_TASKS:
        raise EvalDataError(f"{task!r} is not a synthetic task ({', '.join(SYNTHETIC_TASKS)})")
    src = SOURCES[task]
    sources = load_task(src, data_dir, from_hub=from_hub)
    groups: dict[str | None, list[Sample]] = {}
    for s in sources:
        groups.setdefault(split_of(src, s), []).append(s)
    out: list[Sample] = []
    for source in sources:
        for variant in range(VARIANTS):
            if limit is not None and len(out) >= limit:
                return out
            built = build_sample(task, source, groups[split_of(src, source)], variant)
            if built is not None:
                out.append(built)
    return out

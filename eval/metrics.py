"""LongBench's per-task metrics, reproduced so cached-vs-baseline scores compare with published ones.

Every rule follows LongBench's ``metrics.py``/``eval.py`` (v1), quirks included, because a "fixed"
metric would no longer be LongBench's. Known differences, all due to swapping libraries so that
nothing needs the network, ``jieba``, ``fuzzywuzzy``, ``rouge`` or ``evaluate``:

* Rouge-L: LongBench uses the ``rouge`` package (pltrdy) ``rouge-l`` F: texts split into sentences
  at ".", whitespace tokens, case and punctuation kept, *summary-level* union LCS. Here it is
  ``rouge_score``'s ``RougeScorer(["rougeL"])`` F-measure: lower-cased alphanumeric tokens, one
  LCS over the whole text, no stemming. Scores are close but not identical (the gap was not
  measured here: the ``rouge`` package is not a dependency), so Rouge tasks (gov_report, qmsum,
  multi_news, samsum) compare cached vs baseline fairly but not digit-for-digit with papers.
  A prediction or reference with no tokens scores 0, as LongBench's ``except: return 0.0`` does.
* Code similarity: LongBench uses ``fuzzywuzzy``'s ``fuzz.ratio``, an integer
  ``round(100 * ratio)`` that is 0 if either string is empty. ``rapidfuzz``'s ``fuzz.ratio`` is
  the same Indel ratio (as fuzzywuzzy with python-Levenshtein) but as a float, so it is rounded
  the same way and empty strings give 0. (fuzzywuzzy *without* python-Levenshtein uses difflib,
  which can differ by a point.)
* Classification (trec): LongBench removes sub-string matches from the list it is iterating,
  which skips the element after each removal; reproduced deliberately. Its difflib fallback is
  dead code (``em_match_list != 0`` is always true), so no match scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

from rapidfuzz import fuzz

from .tasks import CLASSIFICATION, CODE_SIM, COUNT, QA_F1, RETRIEVAL, ROUGE, get_task

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower, drop ASCII punctuation, drop a/an/the, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Token F1 between the normalised prediction and the normalised reference."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


@lru_cache(maxsize=1)
def _rouge_scorer():  # building a scorer is cheap, but there is no reason to repeat it
    from rouge_score import rouge_scorer  # noqa: PLC0415 - only the Rouge tasks need it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Rouge-L F-measure (rouge_score package; see the module docstring for the difference)."""
    try:
        return float(_rouge_scorer().score(ground_truth, prediction)["rougeL"].fmeasure)
    except Exception:  # LongBench: any failure of the scorer (e.g. empty text) scores 0
        return 0.0


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None,
                         **_: object) -> float:
    """trec: 1/k if the reference is among the k class names found in the prediction, else 0.

    Class names that are strict sub-strings of the reference are dropped first (so "Date" does not
    dilute a correct "Dates"), with LongBench's skip-after-removal iteration reproduced.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the task's class names)")
    matches = [name for name in all_classes if name in prediction]
    i = 0  # emulate `for term in matches: ... matches.remove(term)` (list iterator index)
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _numbers_matching(prediction: str, target: str) -> float:
    """Share of the integers in ``prediction`` that equal ``target`` (0 if it has none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for number in numbers if number == target) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """passage_retrieval_en: reference "Paragraph N"; share of numbers in the prediction equal to N."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval reference {ground_truth!r} has no 'Paragraph N'")
    return _numbers_matching(prediction, found[0])


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """passage_count: share of the numbers in the prediction equal to the reference count."""
    return _numbers_matching(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """lcc/repobench-p: edit similarity (0..1) of the first code-looking line to the reference.

    LongBench takes the first line of the prediction (after leading newlines) that contains none
    of "`", "#", "//" (anywhere in the line, not only at its start), or "" if there is none.
    """
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    if not line or not ground_truth:
        return 0.0  # fuzzywuzzy's ratio is 0 when either string is empty
    return int(round(fuzz.ratio(line, ground_truth))) / 100


METRICS: dict[str, Callable[..., float]] = {
    QA_F1: qa_f1_score,
    ROUGE: rouge_score,
    CLASSIFICATION: classification_score,
    RETRIEVAL: retrieval_score,
    COUNT: count_score,
    CODE_SIM: code_sim_score,
}


def metric_for(task: str) -> Callable[..., float]:
    """The metric function LongBench uses for ``task``."""
    return METRICS[get_task(task).metric]


def score_sample(task: str, prediction: str, answers: Sequence[str] | str,
                 all_classes: Sequence[str] | None = None) -> float:
    """LongBench's per-sample score in [0, 1]: best metric value over the reference answers.

    For trec, triviaqa and samsum only the first line of the prediction counts
    (``prediction.lstrip("\\n").split("\\n")[0]``), as LongBench's eval.py does.
    """
    spec = get_task(task)
    if isinstance(answers, str):
        answers = [answers]
    if spec.first_line_only:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[spec.metric]
    score = 0.0
    for answer in answers:
        score = max(score, float(metric(prediction, answer, all_classes=all_classes)))
    return score


def task_score(task: str, predictions: Sequence[str], answers_list: Sequence[Sequence[str]],
               all_classes_list: Sequence[Sequence[str] | None] | None = None) -> float:
    """LongBench's task score: ``round(100 * mean(per-sample scores), 2)``."""
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
    if all_classes_list is None:
        all_classes_list = [None] * len(predictions)
    if len(all_classes_list) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(all_classes_list)} all_classes")
    if not predictions:
        raise ValueError(f"task {task!r}: no predictions to score")
    total = sum(score_sample(task, pred, answers, classes)
                for pred, answers, classes in zip(predictions, answers_list, all_classes_list))
    return round(100 * total / len(predictions), 2)

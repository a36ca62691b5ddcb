"""Loading LongBench samples, splitting multi-document contexts, and LongBench's truncation.

Why here and not in the eval scripts: the cached engine and the baseline must see identical
samples, passages and truncation, and every data problem should surface as one exception type
(:class:`EvalDataError`) whose message names the task, file and line.

Data sources: ``<data_dir>/<task>.jsonl`` in LongBench's own format (one JSON object a line), or,
only when asked (``from_hub=True``), the Hugging Face dataset ``THUDM/LongBench``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from promptcache.fsutil import json_lines

from .tasks import SYNTHETIC_TASKS, TASK_NAMES, EvalDataError, get_task

HUB_DATASET = "THUDM/LongBench"
DATA_DIR_ENV = "PROMPTCACHE_LONGBENCH_DIR"
_REPO_ROOT = Path(__file__).resolve().parent.parent
# <repo>/shared/longbench-mini (device checkouts) or the sibling ../shared/longbench-mini.
_DEFAULT_DIRS = (_REPO_ROOT / "shared" / "longbench-mini", _REPO_ROOT.parent / "shared" / "longbench-mini")

REQUIRED_FIELDS = ("_id", "input", "context", "answers")

__all__ = ["EvalDataError", "Sample", "load_task", "read_jsonl", "available_tasks", "default_data_dir",
           "split_passages", "task_data_file", "truncate_middle", "HUB_DATASET", "REQUIRED_FIELDS"]


@dataclass
class Sample:
    """One LongBench example. ``length`` is LongBench's word count of the context."""

    id: str
    dataset: str
    input: str
    context: str
    answers: list[str]
    all_classes: list[str] | None = None
    length: int = 0
    language: str = "en"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def default_data_dir() -> Path:
    """``$PROMPTCACHE_LONGBENCH_DIR`` if set, else the first existing longbench-mini folder."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    for candidate in _DEFAULT_DIRS:
        if candidate.is_dir():
            return candidate
    return _DEFAULT_DIRS[-1]


def _sample_from_row(task: str, row: Any, where: str) -> Sample:
    """Validate one LongBench row (dict) and turn it into a Sample; ``where`` prefixes errors."""
    if not isinstance(row, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in row]
    if task == "trec" and row.get("all_classes") is None:
        missing.append("all_classes")  # the classification metric cannot work without it
    if missing:
        raise EvalDataError(f"{where}: task {task!r}: missing required field(s) {', '.join(missing)}")
    for key in ("input", "context"):
        if not isinstance(row[key], str):
            raise EvalDataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise EvalDataError(f"{where}: field 'answers' must be a non-empty list of strings")
    classes = row.get("all_classes")
    if classes is not None and (not isinstance(classes, list)
                                or not all(isinstance(c, str) for c in classes)):
        raise EvalDataError(f"{where}: field 'all_classes' must be null or a list of strings")
    length = row.get("length")
    if length is None:
        length = len(row["context"].split())
    known = {"_id", "input", "context", "answers", "all_classes", "length", "dataset", "language"}
    return Sample(
        id=str(row["_id"]), dataset=str(row.get("dataset") or task), input=row["input"],
        context=row["context"], answers=list(answers), all_classes=classes, length=int(length),
        language=str(row.get("language") or "en"),
        extra={k: v for k, v in row.items() if k not in known},
    )


def read_jsonl(task: str, path: Path, limit: int | None = None) -> list[Sample]:
    """Parse a LongBench JSONL file; blank lines are skipped, errors name ``file:line``."""
    samples: list[Sample] = []
    try:
        lines = json_lines(path, EvalDataError)
    except FileNotFoundError:
        raise EvalDataError(f"task {task!r}: data file not found: {path}") from None
    except OSError as err:
        raise EvalDataError(f"task {task!r}: cannot read {path}: {err.strerror}") from None
    with lines:
        while limit is None or len(samples) < limit:  # lines past the limit are never parsed
            item = next(lines, None)
            if item is None:
                break
            where, row = item
            samples.append(_sample_from_row(task, row, where))
    return samples


def _load_from_hub(task: str, limit: int | None) -> list[Sample]:
    """Fetch ``THUDM/LongBench`` via ``datasets`` (optional dependency, network needed)."""
    try:
        import datasets  # noqa: PLC0415 - optional, only for --from-hub
    except ImportError:
        raise EvalDataError(
            f"task {task!r}: loading from the hub needs the 'datasets' package "
            "(pip install datasets), or use local JSONL files via data_dir") from None
    try:
        rows: Iterable[Any] = datasets.load_dataset(HUB_DATASET, task, split="test")
    except Exception as err:  # offline, missing config, script loading refused...
        raise EvalDataError(
            f"task {task!r}: could not load {HUB_DATASET} from the hub "
            f"({type(err).__name__}: {err}); offline? use local JSONL files via data_dir") from None
    samples = []
    for index, row in enumerate(rows):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(_sample_from_row(task, dict(row), f"{HUB_DATASET}/{task}[{index}]"))
    return samples


def load_task(name: str, data_dir: str | os.PathLike[str] | None = None, from_hub: bool = False,
              limit: int | None = None) -> list[Sample]:
    """Load the samples of one LongBench task, in file order, at most ``limit`` of them.

    Reads ``<data_dir>/<name>.jsonl`` (``data_dir`` defaults to :func:`default_data_dir`), or the
    hub dataset when ``from_hub`` is true. Raises :class:`EvalDataError` on any problem.
    """
    task = get_task(name).name
    if limit is not None and limit < 0:
        raise EvalDataError(f"task {task!r}: limit must be >= 0, got {limit}")
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if task in SYNTHETIC_TASKS:  # built from the source task's samples (local or hub)
        from .synthetic import build_task  # noqa: PLC0415 - synthetic imports this module

        return build_task(task, directory, from_hub=from_hub, limit=limit)
    if from_hub:
        return _load_from_hub(task, limit)
    return read_jsonl(task, directory / f"{task}.jsonl", limit)


def task_data_file(task: str, data_dir: str | os.PathLike[str]) -> Path:
    """The JSONL file a task reads: its own, or for a synthetic task its source task's."""
    from .synthetic import source_task  # noqa: PLC0415

    name = get_task(task).name
    return Path(data_dir) / f"{source_task(name) if name in SYNTHETIC_TASKS else name}.jsonl"


def available_tasks(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Known task names that have a ``<task>.jsonl`` file in ``data_dir``."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    return [name for name in TASK_NAMES if (directory / f"{name}.jsonl").is_file()]


# ---------------------------------------------------------------- passages

# LongBench's multi-document layouts: each passage starts with a numbered header at the start of
# the context or right after a newline. hotpotqa/2wikimqa/musique: "Passage 1:\n<title>\n<text>",
# joined by "\n"; passage_retrieval_en/passage_count: "Paragraph 1: <text>", joined by "\n\n".
_HEADERS = {
    "hotpotqa": "Passage", "2wikimqa": "Passage", "musique": "Passage",
    "passage_retrieval_en": "Paragraph", "passage_count": "Paragraph",
    "synthetic_qa": "Passage", "synthetic_retrieval": "Paragraph",  # eval/synthetic.py
}


def split_passages(task: str, context: str) -> list[str]:
    """Split a multi-document context into passages, losslessly: ``"".join(result) == context``.

    A passage starts at its header (``Passage N:``/``Paragraph N:`` at the start of a line) and
    runs up to the next header, so the separator (``"\\n"`` or ``"\\n\\n"``) stays at the end of
    the passage it follows. Headers are matched in LongBench's numbering order (1, 2, 3, ...), so
    a later number quoted inside a passage cannot start a spurious one; once the next expected
    number is absent (e.g. cut out by middle truncation) the search resumes at any number greater
    than the last one. Text before the first header (a truncation remnant) is its own passage.
    Non-multi-document tasks, and contexts without headers, give ``[context]``.
    """
    spec = get_task(task)
    word = _HEADERS.get(spec.name)
    if word is None or not context:
        return [context]
    header = re.compile(rf"(?:^|(?<=\n)){word} (\d+):")
    found = [(m.start(), int(m.group(1))) for m in header.finditer(context)]
    starts: list[int] = []
    last, i = 0, 0
    while i < len(found):
        rest = range(i, len(found))
        j = next((k for k in rest if found[k][1] == last + 1), None)
        if j is None:
            j = next((k for k in rest if found[k][1] > last), None)
        if j is None:
            break
        starts.append(found[j][0])
        last, i = found[j][1], j + 1
    if not starts:
        return [context]
    if starts[0] != 0:
        starts.insert(0, 0)
    bounds = starts + [len(context)]
    return [context[a:b] for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------- truncation


def truncate_middle(token_ids: Sequence[int], max_tokens: int) -> list[int]:
    """LongBench's truncation: over ``max_tokens``, keep the first and the last ``max_tokens//2``.

    As in LongBench's pred.py (``half = int(max_length/2); ids[:half] + ids[-half:]``), so an odd
    ``max_tokens`` keeps ``max_tokens - 1`` tokens. ``max_tokens`` below 2 is rejected because
    LongBench's slicing would then keep *everything* (``ids[-0:]`` is the whole list).
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = list(token_ids)
    if len(ids) <= max_tokens:
        return ids
    half = int(max_tokens / 2)
    return ids[:half] + ids[-half:]

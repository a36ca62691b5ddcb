"""Flags of ``eval.py`` and ``eval_acc.py`` and their checks: one job, turning a command line into
validated values. User errors are :class:`UserError` (``error: ...``, exit 2, via :func:`run_main`);
tasks and data folders are resolved here too, so a bad flag or a missing file fails before the model
loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from promptcache.loading import DEFAULT_THREADS, THREADS_HELP  # light (no torch); same rule as demo.py

from .data import (DATA_DIR_ENV, REQUIRED_FIELDS, EvalDataError, Sample, available_tasks, default_data_dir,
                   load_task, task_data_file)
from .tasks import TASK_NAMES, get_task

DEFAULT_MODEL = "smollm2"
WINDOW_CAP = 8192                  # LongBench-style cap on the prompt window, whatever the model allows
MULTI_DOC_TASKS = tuple(n for n in TASK_NAMES if get_task(n).multi_doc)
DATA_DIR_FALLBACK = "shared/longbench-mini inside the repository if it exists, else ../shared/longbench-mini"
DATA_DIR_HELP = f"${DATA_DIR_ENV}, else {DATA_DIR_FALLBACK}"
DATA_LAYOUT = (f"Expected layout: one LongBench JSONL file per task, named <task>.jsonl (e.g. hotpotqa.jsonl, "
               f"lcc.jsonl; the 16 English LongBench tasks), one JSON object a line with the fields "
               f"{', '.join(REQUIRED_FIELDS)} (all_classes too for trec), as in THUDM/LongBench's data")



class UserError(Exception):
    """A problem the user can fix (flags, files, data); printed as ``error: ...``, exit status 2."""


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main`` and turn user errors into one ``error:`` line and exit status 2.

    Only known, user-caused exception types are caught; a bug still shows its traceback.
    """
    from promptcache.loading import ModelLoadError  # noqa: PLC0415 - keeps `--help` fast

    try:
        return main(argv)
    except (UserError, EvalDataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_policy(text: str) -> str:
    """Validate and canonicalise one recompute policy with the engine's own parser.

    So the script accepts exactly what the engine does, and ``deviation:0.50`` and ``deviation:0.5``
    are one policy when resuming.
    """
    from promptcache.recompute import parse_policy  # noqa: PLC0415

    try:
        return str(parse_policy(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def policy_list(text: str) -> list[str]:
    policies = [check_policy(p) for p in text.split(",") if p.strip()]
    if not policies:
        raise argparse.ArgumentTypeError("expected a comma-separated list of recompute policies")
    if len(set(policies)) != len(policies):
        raise argparse.ArgumentTypeError(f"repeated policy in {text!r}")
    return policies


def add_common_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """Flags both scripts share (the issue's "same flags")."""
    parser.add_argument("--dataset", "--tasks", dest="tasks", default="all", metavar="TASKS",
                        help="one task, a comma list, or 'all' (= every task with a file in --data-dir; "
                             "default). With explicit names a missing file is an error.")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder of LongBench JSONL files (<task>.jsonl); default: {DATA_DIR_HELP}")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="at most this many samples per task (file order)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"bundled alias, local folder or HF id available offline (default {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="compiled cached prefill/decode over a static KV buffer (docs/fastpath.md)")
    parser.add_argument("--encoding", default="scaffold", choices=["scaffold", "independent"],
                        help="how module caches are encoded (see promptcache.plan)")
    parser.add_argument("--split-passages", action="store_true",
                        help="multi-document tasks (" + ", ".join(MULTI_DOC_TASKS) + "): one cached "
                             "module per passage instead of one for the whole context")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="max prompt tokens; the context is truncated LongBench's way (first and last "
                             "halves of its tokens) so the prompt fits. Default: min(model window, "
                             f"{WINDOW_CAP}) minus the generation length")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="generation length (default: the task's LongBench maxlen)")
    parser.add_argument("--output", default=default_output, help=f"JSONL file (default {default_output})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=non_negative_int, default=DEFAULT_THREADS, metavar="N",
                        help=THREADS_HELP + ". With 1, timings also stay proportional to the work on a "
                             "busy machine")
    # --store: persistent module-cache store (promptcache.store URL or folder). Wired to the engine
    # by engine_kwargs() once PromptCache accepts `store=`; until then using it is a clean error.
    parser.add_argument("--store", default=None, help="module-cache store URL or folder (if the engine supports it)")


def non_negative_int(text: str) -> int:
    """``--threads``: 0 (torch's choice) or a positive count."""
    return 0 if text.strip() == "0" else positive_int(text)


def split_commas(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_data_dir(arg: str | None) -> Path:
    """The LongBench folder to read; a missing one is an error that says how to provide it."""
    directory = Path(arg) if arg else default_data_dir()
    if not directory.exists():
        given = "--data-dir" if arg else (f"${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV) else "the default")
        raise UserError(f"data directory not found: {directory} (from {given}). Pass --data-dir DIR or set "
                        f"{DATA_DIR_ENV}=DIR (without either: {DATA_DIR_FALLBACK}). {DATA_LAYOUT}")
    if not directory.is_dir():
        raise UserError(f"data directory is not a folder: {directory}")
    return directory


def resolve_tasks(spec: str, data_dir: Path) -> list[str]:
    """``all`` -> the tasks with a file in ``data_dir``; names -> validated, files must exist."""
    names = split_commas(spec)
    if not names:
        raise UserError("--dataset/--tasks is empty")
    if names == ["all"]:
        found = available_tasks(data_dir)
        if not found:
            raise UserError(f"no LongBench task files (<task>.jsonl) in {data_dir}")
        return found
    if "all" in names:
        raise UserError("'all' cannot be combined with task names")
    tasks: list[str] = []
    for name in names:
        task = get_task(name).name  # UnknownTaskError (an EvalDataError) lists the known tasks
        if task in tasks:
            continue
        if not task_data_file(task, data_dir).is_file():  # a synthetic task reads its source's file
            raise UserError(f"task {task!r}: data file not found: {task_data_file(task, data_dir)}")
        tasks.append(task)
    return tasks


def load_samples(tasks: Sequence[str], data_dir: Path, limit: int | None) -> dict[str, list[Sample]]:
    """All samples to evaluate, loaded before the model so that bad data fails fast."""
    loaded = {task: load_task(task, data_dir, limit=limit) for task in tasks}
    if not any(loaded.values()):
        raise UserError("no samples to evaluate (empty task files?)")
    return loaded

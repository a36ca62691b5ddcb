"""Shared machinery of ``eval.py`` (latency) and ``eval_acc.py`` (accuracy).

Why one module: both scripts must pick the same tasks, build *the same* prompt per sample
(truncation included) and treat their files the same way, so that a latency number and an
accuracy number always describe the same tokens. What lives here:

* command-line flags and their validation (user errors become ``error: ...`` and exit 2);
* per-sample preparation: LongBench truncation of the context by tokens so the whole prompt fits
  ``--max-length``, then the PML schema/prompt of :mod:`eval.schemas`;
* output files: refusing to overwrite, atomic whole-file writes (temp file + ``os.replace``),
  a crash-safe JSONL appender (flush + fsync per line) and its tolerant reader for resuming.

The engine's baseline (``use_cache=False``) computes exactly the prompt's token ids at contiguous
positions, so "cache vs no cache" differ only in how the KV of the context was obtained.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from promptcache.loading import DEFAULT_THREADS, THREADS_HELP  # light (no torch); same rule as demo.py

from .data import (DATA_DIR_ENV, REQUIRED_FIELDS, EvalDataError, Sample, available_tasks, default_data_dir,
                   load_task, truncate_middle)
from .schemas import module_texts, sample_to_pml, schema_name
from .tasks import TASK_NAMES, TaskSpec, get_task

DEFAULT_MODEL = "smollm2"
WINDOW_CAP = 8192                  # LongBench-style cap on the prompt window, whatever the model allows
MULTI_DOC_TASKS = tuple(n for n in TASK_NAMES if get_task(n).multi_doc)
_TRUNCATION_TRIES = 6              # re-tokenizing a decoded cut can add a token or two; retry tighter
MIN_CONTEXT_TOKENS = 32            # below this a truncated context is no test of the task or the cache
DATA_DIR_FALLBACK = "shared/longbench-mini inside the repository if it exists, else ../shared/longbench-mini"
DATA_DIR_HELP = f"${DATA_DIR_ENV}, else {DATA_DIR_FALLBACK}"
DATA_LAYOUT = (f"Expected layout: one LongBench JSONL file per task, named <task>.jsonl (e.g. hotpotqa.jsonl, "
               f"lcc.jsonl; the 16 English LongBench tasks), one JSON object a line with the fields "
               f"{', '.join(REQUIRED_FIELDS)} (all_classes too for trec), as in THUDM/LongBench's data")


class UserError(Exception):
    """A problem the user can fix (flags, files, data); printed as ``error: ...``, exit status 2."""


class PromptTooLong(UserError):
    """One sample's prompt cannot fit ``--max-length`` with a useful context; the scripts skip it.

    Happens when the uncached part is long (triviaqa puts the question's own passage in ``input``,
    up to ~1100 tokens): cutting the context to nothing would test neither the task nor the cache.
    Both scripts skip the same samples for the same flags and list them in their summaries.
    """


# ---------------------------------------------------------------- entry point guard


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


# ---------------------------------------------------------------- flags


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


# ---------------------------------------------------------------- tasks and data


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
        if not (data_dir / f"{task}.jsonl").is_file():
            raise UserError(f"task {task!r}: data file not found: {data_dir / (task + '.jsonl')}")
        tasks.append(task)
    return tasks


def load_samples(tasks: Sequence[str], data_dir: Path, limit: int | None) -> dict[str, list[Sample]]:
    """All samples to evaluate, loaded before the model so that bad data fails fast."""
    loaded = {task: load_task(task, data_dir, limit=limit) for task in tasks}
    if not any(loaded.values()):
        raise UserError("no samples to evaluate (empty task files?)")
    return loaded


# ---------------------------------------------------------------- output files


def derived_path(output: Path, suffix: str) -> Path:
    """``results/x.jsonl`` + ``.summary.json`` -> ``results/x.summary.json``."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + suffix)



def output_paths(output: str | os.PathLike, plot: Path | None = None) -> dict[str, Path]:
    """The files a run writes: its JSONL, JSON and Markdown summaries, and an optional plot."""
    out = Path(output)
    paths = {"jsonl": out, "summary_json": derived_path(out, ".summary.json"),
             "summary_md": derived_path(out, ".summary.md")}
    if plot is not None:
        paths["plot"] = plot
    if len(set(paths.values())) != len(paths):
        raise UserError("output paths collide; choose another --output or --plot")
    return paths

def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse to replace existing files unless ``--overwrite`` was given (checked before any work)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"output exists: {', '.join(existing)} (use --overwrite to replace, or another --output)")
    for path in paths:
        if path.exists() and path.is_dir():
            raise UserError(f"output path is a folder: {path}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened/synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` into a temp file next to ``path``, fsync it, then ``os.replace``.

    A reader (or a crash) never sees a half-written file: either the old one or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_figure_atomic(fig, path: Path) -> None:
    """Save a matplotlib figure atomically (format from ``path``'s extension, PNG by default)."""
    fmt = path.suffix.lstrip(".").lower() or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))


class JsonlAppender:
    """Appends one JSON record per line, flushed and fsynced, so a crash loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl_records(path: Path, repair: bool = False) -> tuple[list[dict], bool]:
    """Read a results JSONL; returns ``(records, dropped_partial_last_line)``.

    Every record is written with its newline in one write, so only the text after the last newline
    can be a torn line (a run killed mid-write). That tail is dropped if it does not parse (and,
    with ``repair``, cut from the file so appending can go on); if it parses, it is kept and gets
    its newline. A bad line anywhere else means the file is damaged or not ours: :class:`UserError`.
    """
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    body, tail = data[:cut], data[cut:]
    records: list[dict] = []
    for lineno, raw in enumerate(body.split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        record = _parse_record(raw)
        if record is None:
            raise UserError(f"{path}:{lineno}: not a results line; use --overwrite to start over "
                            "or another --output")
        records.append(record)
    dropped = False
    if tail.strip():
        record = _parse_record(tail)
        if record is None:
            dropped = True
        else:
            records.append(record)
        if repair:
            with open(path, "rb+") as handle:
                handle.truncate(cut)
                if record is not None:
                    handle.seek(cut)
                    handle.write(tail.rstrip() + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
    return records, dropped


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------- engine


def engine_kwargs(args: argparse.Namespace, max_new_tokens: int) -> dict[str, Any]:
    """Keyword arguments for PromptCache; includes ``store`` only where the engine accepts it."""
    from promptcache.engine import PromptCache  # noqa: PLC0415

    kwargs: dict[str, Any] = {"encoding": args.encoding, "progress": False,
                              "reserve_tokens": max_new_tokens + 1}
    if getattr(args, "store", None):
        if "store" not in inspect.signature(PromptCache).parameters:
            raise UserError("--store is not supported by this version of the engine (PromptCache has no store=)")
        kwargs["store"] = args.store
    return kwargs


def set_threads(threads: int | None) -> None:
    """``--threads``: the same rule as demo.py and the CLI (:func:`promptcache.loading.set_threads`)."""
    from promptcache.loading import set_threads as set_torch_threads  # noqa: PLC0415

    set_torch_threads(threads)


def check_device(device: str | None) -> str:
    import torch  # noqa: PLC0415

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"bad --device {device!r} (expected cpu, cuda, cuda:N, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def model_window(name_or_path: str) -> int:
    """Prompt+generation window: the model's max positions, capped at :data:`WINDOW_CAP`.

    Read from the model's config alone, so flag values are checked before the weights load.
    """
    from transformers import AutoConfig  # noqa: PLC0415

    from promptcache.loading import ModelLoadError, resolve  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(resolve(name_or_path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from err
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or WINDOW_CAP
    return min(int(limit), WINDOW_CAP)


def task_budgets(tasks: Sequence[str], window: int, max_length: int | None,
                 max_new_tokens: int | None) -> dict[str, tuple[int, int]]:
    """Per task: (max prompt tokens, generation length); every task checked before the run starts."""
    budgets = {}
    for task in tasks:
        gen_len = generation_length(get_task(task), max_new_tokens)
        budgets[task] = (prompt_budget(window, max_length, gen_len), gen_len)
    return budgets


def generation_length(spec: TaskSpec, override: int | None) -> int:
    return override if override is not None else spec.max_new_tokens


def prompt_budget(window: int, max_length: int | None, max_new_tokens: int) -> int:
    """Max prompt tokens: ``--max-length`` or, by default, the window minus the generation length."""
    if max_length is None:
        budget = window - max_new_tokens
        if budget < 16:
            raise UserError(f"generation length {max_new_tokens} leaves no room for a prompt in the "
                            f"model's window of {window} tokens")
        return budget
    if max_length + max_new_tokens > window:
        raise UserError(f"--max-length {max_length} plus the generation length {max_new_tokens} exceeds the "
                        f"model's window of {window} tokens")
    return max_length


# ---------------------------------------------------------------- per-sample preparation


@dataclass
class PreparedSample:
    """One sample ready for the engine: its PML documents and how its context was cut."""

    task: str
    sample: Sample
    schema_xml: str
    prompt_xml: str
    schema: str                 # schema name (for remove_schema)
    modules: int                # cached context modules (1, or the passages with --split-passages)
    prompt_tokens: int          # as laid out by the engine's renderer
    context_tokens: int         # the full context, tokenized whole
    kept_context_tokens: int    # context tokens in the prompt (after truncation, as laid out)
    truncated: bool
    max_length: int
    max_new_tokens: int


def layout_prompt_tokens(renderer, schema_xml: str, prompt_xml: str) -> tuple[int, int]:
    """(prompt tokens, context-module tokens) as the engine will lay them out; no model needed."""
    from promptcache.pml.binding import bind  # noqa: PLC0415
    from promptcache.pml.layout import build_layout  # noqa: PLC0415
    from promptcache.pml.parser import parse_prompt, parse_schema  # noqa: PLC0415

    layout = build_layout(parse_schema(schema_xml), renderer)
    bound = bind(parse_prompt(prompt_xml), layout, renderer)
    context = sum(len(s.tokens) for s in layout.segments if s.owner != ())
    return layout.length + len(bound.suffix_tokens), context


def _cut_context(tokenizer, ids: list[int], budget: int) -> str:
    """LongBench's cut: keep the first and last halves of the token ids, decoding each half."""
    kept = truncate_middle(ids, budget)
    half = len(kept) // 2
    return (tokenizer.decode(kept[:half], skip_special_tokens=True)
            + tokenizer.decode(kept[half:], skip_special_tokens=True))


def prepare_sample(task: str, sample: Sample, tokenizer, renderer, max_length: int,
                   max_new_tokens: int, split: bool = False) -> PreparedSample:
    """Truncate the context so the whole prompt fits ``max_length`` tokens, then build its PML.

    The context alone is cut (LongBench cuts the whole prompt; here the template is kept intact
    and its tokens are subtracted from the budget). The cut is computed on the context tokenized
    whole; re-tokenizing the decoded text (or splitting it into passages) can change the count by a
    few tokens, so the budget is tightened until the laid-out prompt fits.
    """
    spec = get_task(task)
    schema_xml, prompt_xml = sample_to_pml(spec, sample, split=split)
    total, ctx_tokens = layout_prompt_tokens(renderer, schema_xml, prompt_xml)
    full_ids = list(tokenizer(sample.context, add_special_tokens=False)["input_ids"])
    context = sample.context
    truncated = total > max_length
    if truncated:
        overhead = total - ctx_tokens
        budget = max_length - overhead
        for _ in range(_TRUNCATION_TRIES):
            if budget < MIN_CONTEXT_TOKENS:
                raise PromptTooLong(f"{task}/{sample.id}: the prompt without its context takes {overhead} tokens, "
                                    f"leaving {max(budget, 0)} of --max-length {max_length} for the context "
                                    f"(< {MIN_CONTEXT_TOKENS})")
            context = _cut_context(tokenizer, full_ids, budget)
            schema_xml, prompt_xml = sample_to_pml(spec, sample, context=context, split=split)
            total, ctx_tokens = layout_prompt_tokens(renderer, schema_xml, prompt_xml)
            if total <= max_length:
                break
            budget -= total - max_length
        else:
            raise PromptTooLong(f"{task}/{sample.id}: could not fit the prompt into {max_length} tokens")
    return PreparedSample(
        task=spec.name, sample=sample, schema_xml=schema_xml, prompt_xml=prompt_xml,
        schema=schema_name(spec, sample.id), modules=len(module_texts(spec, context, split)),
        prompt_tokens=total, context_tokens=len(full_ids), kept_context_tokens=ctx_tokens,
        truncated=truncated, max_length=max_length, max_new_tokens=max_new_tokens)


@contextlib.contextmanager
def schema_added(pc, prepared: PreparedSample) -> Iterator[Any]:
    """Add the sample's schema, yield its EncodeReport, always remove it (flat memory)."""
    report = pc.add_schema(prepared.schema_xml)
    try:
        yield report
    finally:
        pc.remove_schema(prepared.schema)


def warm_up(pc, task: str, sample: Sample, split: bool) -> None:
    """A small cached and uncached run so the first timed sample pays no one-off costs.

    Uses the first sample cut to a few hundred tokens; if its template alone is too long for
    that, a longer cut; warming up is best effort and never fails the run.
    """
    for length in (320, 1024):
        try:
            prepared = prepare_sample(task, sample, pc.tokenizer, pc.renderer, length, 1, split)
        except UserError:
            continue
        with schema_added(pc, prepared):
            for use_cache in (True, False, True, False):
                pc.generate(prepared.prompt_xml, max_new_tokens=2, use_cache=use_cache)
        return


# ---------------------------------------------------------------- numbers


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


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers came from (timings on a loaded machine are not comparable)."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    info: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info

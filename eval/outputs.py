"""Output files of the eval scripts: one job, writing results so that no crash leaves a torn file.

Whole files (summaries, plots) are written atomically through :mod:`promptcache.fsutil` (temp file
beside the target, fsync, ``os.replace``); the per-sample JSONL is appended line by line (flush +
fsync per line) and read back tolerantly for resuming (a torn last line is dropped or repaired).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from promptcache.fsutil import write_atomic, write_json_atomic, write_text_atomic

from .cli_args import UserError

__all__ = ["JsonlAppender", "derived_path", "output_paths", "read_jsonl_records", "refuse_existing",
           "save_figure_atomic", "write_atomic", "write_json_atomic", "write_jsonl_atomic",
           "write_text_atomic"]


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

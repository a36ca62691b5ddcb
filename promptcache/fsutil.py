"""Atomic file and folder writes, and a JSONL reader that names file and line: the one copy of each.

Why one module: the store, the model converter (:mod:`promptcache.loading`), ``promptcache
analyze`` and the eval scripts all publish files that a crash must never leave half-written, and
all read JSON-lines files whose errors must say where. Light on purpose (standard library only),
so importing it costs nothing.

A write goes to a temp file *beside* the target (same folder, so the same filesystem), named
``.<name>.<pid>.<random>.tmp`` (a dot file: invisible to listings, and what
:meth:`promptcache.store.local.LocalStore.sweep` removes after a crash), is fsynced, then
published with ``os.replace`` (atomic on POSIX): a reader sees the old file or the new one, never
part of one. The folder is fsynced after the rename so the new name survives a power loss too.
The temp file is created by the writer (not ``mkstemp``), so it gets the usual umask permissions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path`` (see the module docstring for the pattern)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (raises ``OSError`` like any write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort (some filesystems refuse folder fsync)."""
    with contextlib.suppress(OSError):
        fsync_file(directory)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True,
                 replace: Callable[[Path, Path], None] = os.replace) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temp file beside it, which is fsynced and
    moved over ``path`` by ``replace(tmp, path)`` (``os.replace``; the store passes one that also
    takes its lock and updates its index). Any failure removes the temp file and raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        if fsync:
            fsync_file(tmp)
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """:func:`write_atomic` of UTF-8 text."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """:func:`write_atomic` of ``obj`` as indented JSON (one trailing newline)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """A temp folder beside ``target`` to fill; on a clean exit it is renamed to ``target``.

    When the rename fails because another process published ``target`` first, that folder wins
    if ``complete(target)`` says it is whole; otherwise the error propagates. The temp folder is
    always removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not complete(target):
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class json_lines:  # noqa: N801 - used like a function, as open() is
    """``(where, value)`` for each non-blank line of a JSON-lines file; ``where`` is ``path:line``.

    The file is opened at the call (``OSError`` raises there, so callers can name a missing file
    their way); lines are parsed one at a time as they are iterated, so a caller with a limit
    stops early and never parses the rest. A line that is not JSON raises
    ``error("path:line: not valid JSON (cause at column N)")``. Line numbers count blank lines,
    as an editor shows them. Use it in a ``with`` block (or exhaust it) to close the file.
    """

    def __init__(self, path: str | os.PathLike, error: Callable[[str], Exception]) -> None:
        self.path, self.error = str(path), error
        self._handle = open(path, encoding="utf-8")
        self._lines = enumerate(self._handle, start=1)

    def __iter__(self) -> "json_lines":
        return self

    def __next__(self) -> tuple[str, Any]:
        for lineno, line in self._lines:
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                return where, json.loads(line)
            except json.JSONDecodeError as err:
                self.close()
                raise self.error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "json_lines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

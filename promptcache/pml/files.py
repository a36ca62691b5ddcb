"""The one way the PML layer reads a file: regular files only, never more than a byte cap.

Every PML file read (a schema, a prompt, a module's ``src=``) goes through :func:`read_bounded`,
so that naming ``/dev/zero`` cannot exhaust memory, a FIFO cannot block the reader, and a file
under ``/proc`` or ``/sys`` (pseudo-files that claim to be regular and empty) is refused. The
file is checked before it is opened (``os.stat``: nothing is opened that is not a regular file,
since opening some devices has side effects), opened with ``O_NONBLOCK`` (a FIFO swapped in
between cannot block the open), checked again on the open descriptor (``fstat``), then read in
chunks up to the cap plus one byte, so a file that grows while it is read is still refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["FileRefused", "read_bounded", "PSEUDO_FILESYSTEMS"]

#: Mount points of kernel pseudo-filesystems whose "regular" files are generated on read.
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")
_CHUNK = 1 << 20


class FileRefused(Exception):
    """A file could not or must not be read; ``reason`` says why (``"it is a FIFO, ..."``, or
    the OS error) without quoting its content."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _pseudo_devices() -> set[int]:
    """Device ids of the pseudo-filesystems that exist here (their files are not real files)."""
    try:
        root = os.stat("/").st_dev
    except OSError:  # pragma: no cover - no root directory (not POSIX)
        return set()
    devices = set()
    for mount in PSEUDO_FILESYSTEMS:
        try:
            dev = os.stat(mount).st_dev
        except OSError:
            continue
        if dev != root:  # a plain folder on the root filesystem (no mount): nothing to refuse
            devices.add(dev)
    return devices


def _check_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise FileRefused(f"it is {kind}, not a regular file")
    if st.st_dev in _pseudo_devices():
        raise FileRefused("it is a kernel pseudo-file (/proc, /sys, /dev), not a regular file")


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def read_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """All bytes of the regular file ``path``; :class:`FileRefused` if it is anything else,
    larger than ``max_bytes``, or unreadable. Symlinks are followed (callers that confine paths
    resolve and check them first)."""
    path = Path(path)
    try:
        _check_regular(os.stat(path))
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
            getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError as e:
        raise FileRefused(_os_reason(e)) from None
    except ValueError as e:  # e.g. an embedded NUL character in the path
        raise FileRefused(str(e)) from None
    try:
        st = os.fstat(fd)
        _check_regular(st)  # what was opened, not what the name pointed to a moment ago
        if st.st_size > max_bytes:
            raise FileRefused(f"it is {st.st_size} bytes, larger than the limit of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise FileRefused(f"it is larger than the limit of {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise FileRefused(_os_reason(e)) from None
    finally:
        os.close(fd)

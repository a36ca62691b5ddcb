"""glibc's malloc kept from handing activation memory back to the kernel between layers (CPU fast path).

Why: a long eager forward (a full prefill, a module being encoded) allocates and frees megabytes
of activations layer after layer. By default glibc serves big blocks from fresh ``mmap``s and
trims its heap whenever enough of its top is free, so the next layer page-faults the same memory
in again; whether that happens depends on the order blocks were freed in. On SmolLM2 in bf16, one
thread, a 1,149-token eager forward with prepacked linears took 530-590 ms with each linear packed
alone and 657-719 ms with q/k/v and gate/up grouped (about 117,000 minor page faults and 0.13 s of
system time per forward); with the two settings below, 513-557 ms both ways and no page faults
(one-off experiment, two rounds of six forwards each way; ``benchmarks/prepack.py`` prints the
eager forwards with the setting on, and off under ``PROMPTCACHE_MALLOC=0``).

How: ``mallopt(M_MMAP_THRESHOLD, 64 MiB)`` (blocks under 64 MiB come from the heap) and
``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` (up to 1 GiB of freed heap is kept for reuse instead of being
returned). Like jemalloc's or tcmalloc's caches, the process keeps what it freed: its RSS does not
shrink after a burst. Process-wide, glibc only; set once by the fast path
(``PromptCache(compile=True)`` on CPU); ``PROMPTCACHE_MALLOC=0`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: Environment switch: "0" leaves glibc's malloc as it is.
MALLOC_ENV = "PROMPTCACHE_MALLOC"
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers

_state: str | None = None


def keep_freed_memory() -> str:
    """Apply the settings once per process; returns what is in force ("kept: ..." or why not)."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get(MALLOC_ENV) == "0":
        return f"off ({MALLOC_ENV}=0)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "off (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "off (mallopt refused)"
    return f"kept: heap blocks under {MMAP_THRESHOLD >> 20} MiB, up to {TRIM_THRESHOLD >> 20} MiB of freed heap"

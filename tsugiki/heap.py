"""Keep a model load's temporaries from staying resident (glibc malloc; elsewhere a no-op).

glibc serves an allocation from its heap below the *mmap threshold* and with a
private ``mmap`` above it. Memory freed to the heap stays with the process for
reuse; an ``mmap`` block goes back to the system when freed. By default the
threshold is dynamic: it starts at 128 KiB and rises to the size of every
mmap-served block that is freed (up to 32 MiB on 64-bit), so after the first
few tensor-sized temporaries most later ones land in the heap.

Loading a model makes and frees many such temporaries (bf16 copies read from the
checkpoint, quantization scratch). Which of them end up in the heap depends on
their order, and how much of the heap stays resident after the load varied by
up to ~450 MB between identical 4-bit loads of SmolLM2-135M (``benchmarks/README.md``).
:func:`loading` removes that variance:

* during the load the threshold is held at 128 KiB, so each large temporary is
  its own ``mmap`` and returns to the system as soon as it is freed;
* after it, the thresholds are fixed at the most the dynamic rule reaches
  (mmap 32 MiB, trim 64 MiB), so training allocates as a warmed-up process
  would (serving every large tensor by ``mmap`` halves the speed of a CPU
  training step), and ``malloc_trim(0)`` hands back what the heap holds free.

The first :func:`loading` call turns glibc's dynamic threshold off for the rest of
the process. Nothing is changed when the user set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (their choice wins) or when the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from functools import lru_cache
from typing import Iterator, Optional

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

LOAD_MMAP_THRESHOLD = 128 << 10  # glibc's initial value: every large temporary is its own mmap
STEADY_MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where the dynamic rule stops
STEADY_TRIM_THRESHOLD = 64 << 20  # the dynamic rule keeps trim = 2 x mmap threshold

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_depth = [0]  # open loading() contexts (threads loading at once share one setting, as malloc does)


@lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc, or None (another C library, or not Linux)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def tunable() -> bool:
    """Whether :func:`loading` changes anything here: glibc, and no ``MALLOC_*_THRESHOLD_`` set by the user."""
    return _glibc() is not None and not any(name in os.environ for name in _USER_SETTINGS)


def release_free_memory() -> bool:
    """``malloc_trim(0)``: return the heap's free pages to the system. True if any were returned."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Run a model load with large temporaries served by ``mmap``; fix the thresholds and trim after.

    Nested uses act as one (the outermost exit restores the steady thresholds).
    A no-op where :func:`tunable` is False.
    """
    libc = _glibc() if tunable() else None
    if libc is None:
        yield
        return
    if _depth[0] == 0:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
            libc.malloc_trim(0)

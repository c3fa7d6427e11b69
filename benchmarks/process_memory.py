"""What the memory benchmarks read about their own process on Linux.

``status_bytes("VmHWM")`` is the resident high-water mark, ``reset_peak()``
sets it back to the current RSS (``/proc/self/clear_refs``), and
``release_freed_memory()`` collects garbage and hands the heap's free pages
back to the system, so that a measurement starts from what is really in use.
"""

from __future__ import annotations

import gc


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field given in kB (``VmRSS``, ``VmHWM``, ...), in bytes."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak() -> None:
    """Set ``VmHWM`` to the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
        refs.write("5")


def release_freed_memory() -> None:
    from tsugiki.heap import release_free_memory

    gc.collect()
    release_free_memory()  # malloc_trim(0) where the C library is glibc

"""Helpers shared by the kernel benchmarks (``attention_cpu.py``, ``output_layer.py``)."""

from __future__ import annotations

import argparse
import statistics
import time

from tsugiki import heap


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def relative_errors(got, ref) -> str:
    """``|a - b| / |b|`` (Frobenius norms) of each pair, as ``"e1 / e2 / ..."``."""
    return " / ".join(f"{float((a - b).norm() / b.norm()):.1e}" for a, b in zip(got, ref))


def trained_heap() -> None:
    """Set glibc's thresholds as after ``tsugiki.load_model``: with the defaults every large
    temporary is a fresh ``mmap``, and its page faults, not the arithmetic, dominate."""
    with heap.loading():
        pass


def positive_ints(text: str) -> list[int]:
    """argparse type: ``"128,512"`` -> ``[128, 512]``; anything else is a usage error naming the bad part."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas, e.g. 128,512")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1")
    return values

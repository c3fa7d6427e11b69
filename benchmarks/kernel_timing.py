"""Helpers shared by the kernel benchmarks (``attention_cpu.py``, ``output_layer.py``)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1; anything else is a usage error naming it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, e.g. 128")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: ``"128,512"`` -> ``[128, 512]``, each checked by :func:`positive_int`."""
    return [positive_int(part) for part in text.split(",")]


def parse_args(description: str, argv, sizes: tuple[str, str, str], repeats: int) -> argparse.Namespace:
    """The kernel benchmarks' command line: one list of sizes (``(flag, default, help)``) and
    ``--repeats`` (timed calls per measurement, at least 1). Bad values are usage errors."""
    parser = argparse.ArgumentParser(description=description)
    flag, default, help_text = sizes
    parser.add_argument(flag, type=positive_ints, default=default, help=help_text + ", comma-separated")
    parser.add_argument("--repeats", type=positive_int, default=repeats,
                        help=f"timed calls per measurement, median taken (default {repeats})")
    return parser.parse_args(argv)


def start_table(setup: str, columns: list[str]) -> None:
    """Set the heap up as in training (:func:`trained_heap`), then print a ``#`` line naming torch,
    its threads and ``setup``, and the header of a Markdown table with ``columns``."""
    trained_heap()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {setup}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))

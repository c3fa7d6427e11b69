"""Learning-rate schedules as plain functions of the step.

Each function returns the *multiplier* m(step) applied to the peak learning
rate, where ``step`` is the number of optimizer steps already taken (0 for the
first update). With ``W = warmup_steps`` and ``N = total_steps``:

    warm-up (step < W):  m = (step + 1) / (W + 1)       -- never 0, reaches 1 at step W
    constant:            m = 1
    linear:              m = max(0, (N - step) / (N - W))
    cosine:              m = 0.5 * (1 + cos(pi * p)),   p = (step - W) / (N - W) clipped to [0, 1]

Warm-up uses ``(step + 1) / (W + 1)`` rather than ``step / W`` so the first
update is not wasted at lr = 0. Linear and cosine decay towards 0 at step N
(the last update, step N - 1, still has a small positive rate).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

from .config import SCHEDULERS


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up multiplier: (step + 1) / (W + 1) for step < W, else 1."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return 1.0


def constant(step: int, warmup_steps: int = 0, total_steps: int = 0) -> float:
    """Warm-up, then a flat 1."""
    return warmup(step, warmup_steps)


def linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warm-up, then a straight line from 1 at step W to 0 at step N."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    return max(0.0, (total_steps - step) / span)


def cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warm-up, then half a cosine from 1 at step W to 0 at step N."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULE_FUNCTIONS: dict[str, Callable[[int, int, int], float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
}
assert set(SCHEDULE_FUNCTIONS) == set(SCHEDULERS)


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """m(step) for the schedule called ``name`` (one of cosine, linear, constant)."""
    if name not in SCHEDULE_FUNCTIONS:
        raise ValueError(f"lr_scheduler={name!r}: must be one of {', '.join(SCHEDULE_FUNCTIONS)}")
    return SCHEDULE_FUNCTIONS[name](step, warmup_steps, total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that sets lr = peak * m(step); its state_dict round-trips through checkpoints."""
    if name not in SCHEDULE_FUNCTIONS:
        raise ValueError(f"lr_scheduler={name!r}: must be one of {', '.join(SCHEDULE_FUNCTIONS)}")
    fn = partial(SCHEDULE_FUNCTIONS[name], warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

"""NEFTune: noisy embeddings during instruction fine-tuning (Jain et al., 2023).

While the model is in training mode, the output of the input-embedding layer
gets uniform noise

    e' = e + alpha / sqrt(L * d) * U(-1, 1)

with L the sequence length (dimension 1 of the embeddings; for packed rows the
whole packed length) and d the hidden size. Each noise element then has mean
absolute value alpha / sqrt(L * d) / 2. In eval mode the hook does nothing, so
evaluation and generation see clean embeddings. The noise comes from the
global torch RNG, whose state checkpoints save, so resumed runs stay exact.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn


def neftune_scale(alpha: float, seq_len: int, hidden: int) -> float:
    """The half-width of the noise: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * hidden)


def _make_hook(alpha: float):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = neftune_scale(alpha, output.size(1), output.size(2))
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale

    return hook


def attach_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Register the NEFTune forward hook on ``model.get_input_embeddings()``; call ``.remove()`` to undo."""
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"NEFTune needs model.get_input_embeddings(); {type(model).__name__} has none")
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() returned None; NEFTune cannot attach")
    return embeddings.register_forward_hook(_make_hook(float(alpha)))


@contextlib.contextmanager
def neftune(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """Context manager: NEFTune on inside the block (no-op when alpha is None or 0), removed after."""
    if not alpha:
        yield
        return
    handle = attach_neftune(model, alpha)
    try:
        yield
    finally:
        handle.remove()

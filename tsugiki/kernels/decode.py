"""Linear layers on one row of bf16 activations on a CPU, as a matrix-vector product.

Generating for one prompt multiplies every weight by a single row per token.
torch sends a bf16 ``(1, in) x (in, out)`` product on a CPU through oneDNN's
matrix-matrix kernel, which at one row is slow: on a 2-core Xeon with AMX,
576 x 1536 takes 54 us where ``torch.mv`` on the same operands takes 32 us,
and 2048 x 8192 0.99 ms against 0.69 ms (``benchmarks/decode_linear.py``;
``benchmarks/inference_overhead.py`` times whole generations). Both
accumulate in fp32 and round once to bf16, with the same errors against an
fp64 product. From two rows on the two kernels take the same time, and
fp16's matrix-vector kernel is 3x slower than its matrix-matrix one, so only
one bf16 row takes the other path:

    linear(x, W, b) = addmv(b, W, x)   (x one bf16 row on a CPU, no autograd)
                    = F.linear(x, W, b) otherwise

:func:`single_row_decoding` routes a model's plain ``nn.Linear`` layers through
:func:`linear` for the duration of a ``with`` block; tsugiki's generation
(``PeftModel.generate``, ``tsugiki generate``, ``chat`` and ``eval``) runs
inside it. LoRA layers do the same for their base product
(``LoraLinear._inference_forward``), so a bare base and an adapted model
compute their base products alike.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


def is_single_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the matrix-vector path for ``x`` and ``weight``."""
    return (x.numel() == x.shape[-1] and x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16
            and x.device.type == "cpu" and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one bf16 CPU row without autograd goes through ``torch.mv``."""
    if not is_single_row(x, weight):
        return F.linear(x, weight, bias)
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def routed(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` currently routed through :func:`linear`."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _linear_forward


@contextmanager
def single_row_decoding(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s plain bf16 CPU ``nn.Linear`` layers compute through :func:`linear`.

    Yields how many layers were routed. Layers on another device or in another
    dtype (nothing to gain there), layers whose ``forward`` is already replaced
    (accelerate's offload hooks, an enclosing block) and subclasses of
    ``nn.Linear`` (bitsandbytes' k-bit layers among them) are left alone; on
    exit each routed layer gets its class's ``forward`` back.
    """
    routed_layers = []
    if enabled:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is nn.Linear and "forward" not in module.__dict__ and weight is not None
                    and weight.dtype is torch.bfloat16 and weight.device.type == "cpu"):
                module.forward = types.MethodType(_linear_forward, module)
                routed_layers.append(module)
    try:
        yield len(routed_layers)
    finally:
        for module in routed_layers:
            if routed(module):
                del module.forward

"""RMSNorm and the SiLU gate of Llama-style blocks as autograd functions that save less.

Both compute exactly what the model's own module computes; only what is kept for
the backward pass changes.

RMSNorm (Llama, Mistral, Qwen2, Qwen3), for input ``x`` of width ``D`` and weight ``w``:

    r = 1 / sqrt(mean(x32^2) + eps),   n = x32 * r,   y = w * n.to(x.dtype)

The module's own autograd keeps an fp32 copy of ``x`` and the normalised ``n``;
:class:`FusedRMSNorm` keeps ``x`` as it came (bf16 in mixed precision: a third of
the bytes) and ``r`` (one float per token), and recomputes ``n`` in backward:

    dn = (dy * w).to(x.dtype).to(fp32),   dx = r * (dn - n * mean(dn * n))   (per token),
    dw = sum over tokens of dy * n.to(x.dtype)

SiLU gate (``down(silu(gate(x)) * up(x))``): the module's autograd keeps ``gate``,
``silu(gate)`` and ``up``; :class:`FusedSiluMul` keeps ``gate`` and ``up`` and
recomputes ``silu(gate)`` in backward, with the same operations autograd would run,
each product written in place over a temporary it just made (so its gradients are
bit-identical where ``gate``, ``up`` and ``dy`` share a dtype):

    d_up = dy * silu(gate),   d_gate = silu_backward(dy * up, gate)

:func:`fused_blocks` swaps these in for the modules of a model for the duration of
a ``with`` block (training), and puts the modules' own forwards back after.

One deliberate difference: under autocast, a norm whose output only enters linear
layers and would be fp32 (an fp32 weight, as k-bit bases keep their norms) returns
the autocast dtype, as the norm of a 16-bit model does. Plain linear layers cast
to it anyway (same values, half the bytes saved for backward). bitsandbytes' k-bit
layers instead return their input's dtype, so without the cast an fp32 norm turns
the residual stream and the MLP activations after it fp32 (twice the bytes); with
it a k-bit base computes like a 16-bit one (the norm itself still runs in fp32).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Classes whose forward is exactly the formulas above (Gemma's RMSNorm scales by 1 + w: not listed).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# The norms whose output only ever enters linear layers (the attention and MLP inputs, the final norm).
LINEAR_INPUT_NORMS = frozenset({"input_layernorm", "post_attention_layernorm", "norm"})
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama RMSNorm forward as the modules write it (no grad: nothing is saved)."""
    x32 = x.to(torch.float32)
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(x.dtype)


class FusedRMSNorm(torch.autograd.Function):
    """``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, saving ``x`` and ``r`` only; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out if out_dtype is None else out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(torch.float32) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            product = grad_out * n.to(x.dtype)
            grad_w = product.reshape(-1, product.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = (grad_out * weight).to(x.dtype).to(torch.float32)
            grad_x = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None, None


class FusedSiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only; see the module docstring."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        out = F.silu(gate)
        return out.mul_(up) if out.dtype == up.dtype else out * up  # in place: one buffer, not two

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            act = F.silu(gate)
            grad_up = (act.mul_(grad_out) if act.dtype == grad_out.dtype else grad_out * act).to(up.dtype)
        if ctx.needs_input_grad[0]:
            product = grad_out * up  # silu's derivative is written over the product it scales
            grad_gate = torch.ops.aten.silu_backward.grad_input(product, gate, grad_input=product).to(gate.dtype)
        return grad_gate, grad_up


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if _needs_graph(hidden_states, self.weight):
        return FusedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, _autocast_output(self, hidden_states))
    return reference_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _autocast_output(norm: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for a norm that feeds only linear layers and would return fp32, else None
    (see the module docstring)."""
    device = x.device.type
    if getattr(norm, "_tsugiki_feeds_linears", False) and torch.is_autocast_enabled(device) and (
            torch.promote_types(norm.weight.dtype, x.dtype) == torch.float32):
        return torch.get_autocast_dtype(device)
    return None


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    hidden = FusedSiluMul.apply(gate, up) if _needs_graph(gate, up) else F.silu(gate) * up
    return self.down_proj(hidden)


def _fusable(module: nn.Module):
    """The fused forward for ``module``, or None when it is not one of the known shapes."""
    name = type(module).__name__
    if name in RMS_NORMS and hasattr(module, "variance_epsilon") and isinstance(
            getattr(module, "weight", None), torch.Tensor):
        return _rms_norm_forward
    if name in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation") and all(
            isinstance(getattr(module, part, None), nn.Module) for part in ("gate_proj", "up_proj", "down_proj")):
        return _gated_mlp_forward
    return None


@contextmanager
def fused_blocks(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, known RMSNorm and gated-MLP modules of ``model`` run the fused forwards.

    Yields how many modules were switched; the modules' own forwards are back on exit.
    """
    switched = []
    if enabled:
        for name, module in model.named_modules():
            forward = _fusable(module)
            if forward is not None and "forward" not in module.__dict__:
                module.forward = types.MethodType(forward, module)
                module._tsugiki_feeds_linears = name.rsplit(".", 1)[-1] in LINEAR_INPUT_NORMS
                switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
            del module._tsugiki_feeds_linears

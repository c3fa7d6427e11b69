"""The LoRA update of a linear layer as one autograd function, added in place to the base output.

For a linear layer with LoRA factors ``A`` (r x in) and ``B`` (out x r), scale
``s = alpha / r`` and input dropout ``p``:

    y = base(x) + s * B (A drop(x)),      drop(x) = x * keep / (1 - p)

The reference (:func:`reference_lora_add`, what ``nn.Dropout`` + two
``nn.Linear`` + a multiply + an add do) keeps three extra activations per layer
for the backward pass: the dropout mask, the dropped-out copy of ``x`` and the
scaled product, and draws the mask one random number per element.
:class:`FusedLoraAdd` instead

* draws the mask from a per-call seed, 16 bits per element (four elements per
  64-bit draw), and draws it again in the backward pass instead of storing it;
* saves only ``x`` (which q/k/v or gate/up projections share, so it is stored
  once) and the rank-r product ``a = A drop(x)``;
* adds ``s * B a`` into the base output in place, and with ``p == 0`` makes no
  dropout copy at all.

Gradients, with ``g`` the output gradient and ``m = keep / (1 - p)``:

    dB = s * g^T a,   da = s * g B,   dA = da^T (x * m),   dx = da A * m   (+ the base layer's own dx)

The mask keeps an element when a uniform 16-bit integer is at or above a
threshold, so the dropout rate is ``p`` rounded to a multiple of 1/65536
(``p = 0.05`` -> 0.0500030518) and the keep scale uses that same rate: the
expectation of ``drop(x)`` is exactly ``x``. Products run in the autocast dtype
when autocast is on (as the reference's linear layers do), else in the
adapter's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

_LANES = 4  # 16-bit lanes per 64-bit random draw


def dropout_rate(p: float) -> float:
    """The rate actually used for a requested rate ``p``: ``round(p * 65536) / 65536``."""
    return round(p * 65536) / 65536


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """One generator per device, re-seeded for every mask (making one per call costs more than the draw)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    return gen


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Boolean mask of ``shape``, True with probability ``1 - dropout_rate(p)``; a pure function of ``seed``."""
    n = 1
    for size in shape:
        n *= size
    gen = _generator(device)
    gen.manual_seed(seed)
    words = torch.empty((n + _LANES - 1) // _LANES, dtype=torch.int64, device=device)
    words.random_(-2**63, None, generator=gen)  # the full 64-bit range: every 16-bit lane uniform
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= round(p * 65536) - 32768


def _dropped(x: torch.Tensor, p: float, seed: int, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * keep / (1 - p)`` (``x`` itself when ``p == 0``); ``keep`` defaults to the mask of ``seed``."""
    if p == 0.0:
        return x
    if keep is None:
        keep = keep_mask(x.shape, p, seed, x.device)
    return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - dropout_rate(p)))


def compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for ``x``'s device, else ``fallback``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return fallback


def _masked(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return x if keep is None else torch.where(keep, x, 0.0)


class FusedLoraAdd(torch.autograd.Function):
    """``base_out += s * B (A drop(x))`` with the mask re-drawn in backward; see the module docstring.

    The keep scale ``c = 1 / (1 - p)`` multiplies the r-wide products, not the
    input-sized tensors: ``A drop(x) = c * A (x * keep)``.
    """

    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, p: float, seed: int) -> torch.Tensor:
        dtype = compute_dtype(x, A.dtype)
        keep_scale = 1.0 / (1.0 - dropout_rate(p))
        with torch.autocast(x.device.type, enabled=False):
            keep = keep_mask(x.shape, p, seed, x.device) if p else None
            a = _masked(x.to(dtype), keep) @ A.to(dtype).t()  # (..., r)
            if p:
                a.mul_(keep_scale)
            base_out.add_(a @ B.to(dtype).t(), alpha=scale)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, A, B, a)
        ctx.scale, ctx.p, ctx.seed, ctx.dtype, ctx.keep_scale = scale, p, seed, dtype, keep_scale
        return base_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, A, B, a = ctx.saved_tensors
        s, p, dtype = ctx.scale, ctx.p, ctx.dtype
        g = grad_out.to(dtype)
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        grad_B = grad_A = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_B = (g2.t() @ a2).mul_(s).to(B.dtype)
        da = (g @ B.to(dtype)).mul_(s * ctx.keep_scale)  # (..., r), with the keep scale folded in
        keep = keep_mask(x.shape, p, ctx.seed, x.device) if p else None  # the forward's mask
        if ctx.needs_input_grad[2]:
            kept = _masked(x.to(dtype), keep)
            grad_A = (da.reshape(-1, da.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])).to(A.dtype)
            del kept
        if ctx.needs_input_grad[1]:
            grad_x = _masked(da @ A.to(dtype), keep).to(x.dtype)
        return grad_out, grad_x, grad_A, grad_B, None, None, None


def lora_add(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
             p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``base_out + scale * B (A drop(x))``, written into ``base_out``; dropout only when ``training``.

    Without autograd (inference, or nothing requires grad) it is the same sum without
    saving anything, on the shortest path: generation calls it once per adapted layer
    per token, where a few microseconds of Python per call add up.
    """
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or base_out.requires_grad):
        p = p if training else 0.0
        seed = int(torch.randint(0, 2**62, (1,))) if p else 0  # from torch's seeded generator
        if base_out._is_view():  # e.g. Conv1D's reshaped addmm: write into a copy, not the view
            base_out = base_out.clone()
        return FusedLoraAdd.apply(base_out, x, A, B, scale, p, seed)
    if training and p:
        seed = int(torch.randint(0, 2**62, (1,)))
        x = _dropped(x, p, seed)
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        return base_out.add_(torch.matmul(torch.matmul(x, A.t()), B.t()), alpha=scale)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        a = x.to(dtype) @ A.to(dtype).t()
        return base_out.add_(a @ B.to(dtype).t(), alpha=scale)


def reference_lora_add(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                       keep: Optional[torch.Tensor] = None, p: float = 0.0) -> torch.Tensor:
    """The plain composition ``base_out + scale * B (A (x * keep / (1 - p)))``, for tests."""
    dtype = compute_dtype(x, A.dtype)
    xc = x.to(dtype)
    if keep is not None:
        xc = xc * keep / (1.0 - dropout_rate(p))
    return base_out + ((xc @ A.to(dtype).t()) @ B.to(dtype).t() * scale).to(base_out.dtype)

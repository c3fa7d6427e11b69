"""The LoRA update of a linear layer as one autograd function, added in place to the base output.

For a linear layer with LoRA factors ``A`` (r x in) and ``B`` (out x r), scale
``s = alpha / r`` and input dropout ``p``:

    y = base(x) + s * B (A drop(x)),      drop(x) = x * keep / (1 - p)

The reference (:func:`reference_lora_add`, what ``nn.Dropout`` + two
``nn.Linear`` + a multiply + an add do) keeps three extra activations per layer
for the backward pass: the dropout mask, the dropped-out copy of ``x`` and the
scaled product, and draws the mask one random number per element.
:class:`FusedLoraAdd` instead

* draws the mask from a per-call seed and draws it again in the backward pass
  instead of storing it (:class:`DropoutMask`);
* saves only ``x`` (which q/k/v or gate/up projections share, so it is stored
  once) and the rank-r product ``a = A drop(x)``;
* adds ``s * B a`` into the base output in place, and with ``p == 0`` makes no
  dropout copy at all.

Gradients, with ``g`` the output gradient and ``m = keep / (1 - p)``:

    dB = s * g^T a,   da = s * g B,   dA = da^T (x * m),   dx = da A * m   (+ the base layer's own dx)

Two ways to draw the mask, both a pure function of (shape, p, seed, device):

* **dropped positions** (CPU, ``p <= 0.25``, 16384 elements or more): the gaps between dropped elements
  of an i.i.d. Bernoulli(p) sequence are geometric, ``gap = 1 + floor(log(v) /
  log(1 - p))`` with ``v`` uniform in (0, 1], so about ``n * p`` uniform draws
  place every dropped element of ``n``, and zeroing them is an ``index_fill``.
  The rate is ``p`` itself. (``v`` is a float32 uniform, so a gap is capped near
  ``-17 / log(1 - p)``, a tail of probability below 1e-7.)
* **dense mask** (GPU, larger ``p`` or small inputs): one 16-bit lane of a 64-bit draw per
  element, kept when at or above a threshold; the rate is ``p`` rounded to a
  multiple of 1/65536 (``p = 0.05`` -> 0.0500030518).

Either way the keep scale uses the rate actually drawn, so the expectation of
``drop(x)`` is exactly ``x``. Products run in the autocast dtype when autocast
is on (as the reference's linear layers do), else in the adapter's dtype.
"""

from __future__ import annotations

import math
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


# Dropped positions pay off on a CPU for p up to SPARSE_MAX_P and from SPARSE_MIN_NUMEL elements
# (2-core measurement: 37K elements 37 vs 52 us, 590K 181 vs 729 us; 9K 27 vs 23 us).
SPARSE_MAX_P = 0.25
SPARSE_MIN_NUMEL = 16384


def dropped_positions(numel: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted flat indices of the elements an i.i.d. Bernoulli(``p``) dropout zeroes among ``numel``.

    Draws the geometric gaps between them (see the module docstring): about
    ``numel * p`` uniform numbers, drawn in chunks until the positions pass ``numel``.
    """
    gen = _generator(device)
    gen.manual_seed(seed)
    log_q = math.log1p(-p)
    mean = numel * p
    chunk = int(mean + 8.0 * math.sqrt(mean * (1.0 - p)) + 64)  # almost always one chunk
    parts, start = [], 0
    while start < numel:
        v = torch.empty(chunk, dtype=torch.float32, device=device).uniform_(generator=gen)
        gaps = torch.log(v.neg_().add_(1.0)).div_(log_q).floor_().to(torch.int64).add_(1)  # 1 - u: in (0, 1]
        positions = torch.cumsum(gaps, 0).add_(start - 1)
        parts.append(positions)
        start = int(positions[-1]) + 1
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    end = int(torch.searchsorted(positions, numel))
    return positions[:end]


class DropoutMask:
    """Which elements of a ``shape`` tensor dropout zeroes, for ``seed``; drawn the same way every time.

    ``rate`` is the dropout rate actually drawn and ``keep_scale`` is ``1 / (1 - rate)``.
    """

    def __init__(self, shape: torch.Size, p: float, seed: int, device: torch.device):
        device = torch.device(device)
        self.shape = torch.Size(shape)
        if device.type == "cpu" and p <= SPARSE_MAX_P and self.shape.numel() >= SPARSE_MIN_NUMEL:
            self.dropped: Optional[torch.Tensor] = dropped_positions(self.shape.numel(), p, seed, device)
            self.keep: Optional[torch.Tensor] = None
            self.rate = p
        else:
            self.dropped, self.keep = None, keep_mask(self.shape, p, seed, device)
            self.rate = dropout_rate(p)
        self.keep_scale = 1.0 / (1.0 - self.rate)

    def zeroed(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None, in_place: bool = False) -> torch.Tensor:
        """``t`` (cast to ``dtype``) with the dropped elements set to 0: a new tensor unless ``in_place``."""
        if self.keep is not None:
            t = t if dtype is None else t.to(dtype)
            return torch.where(self.keep, t, 0.0)
        if not in_place:
            t = t.to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)
        t.view(-1).index_fill_(0, self.dropped, 0)
        return t

    def keep_tensor(self) -> torch.Tensor:
        """The mask as a boolean tensor of ``shape`` (True = kept), for references and tests."""
        if self.keep is not None:
            return self.keep
        keep = torch.ones(self.shape.numel(), dtype=torch.bool, device=self.dropped.device)
        keep[self.dropped] = False
        return keep.view(self.shape)


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / (1 - rate)`` (``x`` itself when ``p == 0``) with the mask of ``seed``."""
    if p == 0.0:
        return x
    mask = DropoutMask(x.shape, p, seed, x.device)
    return mask.zeroed(x).mul_(mask.keep_scale)


def compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for ``x``'s device, else ``fallback``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return fallback


class FusedLoraAdd(torch.autograd.Function):
    """``base_out += s * B (A drop(x))`` with the mask re-drawn in backward; see the module docstring.

    The keep scale ``c = 1 / (1 - p)`` multiplies the r-wide products, not the
    input-sized tensors: ``A drop(x) = c * A (x * keep)``.
    """

    @staticmethod
    def forward(ctx, base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, p: float, seed: int) -> torch.Tensor:
        dtype = compute_dtype(x, A.dtype)
        with torch.autocast(x.device.type, enabled=False):
            if p:
                mask = DropoutMask(x.shape, p, seed, x.device)
                a = mask.zeroed(x, dtype) @ A.to(dtype).t()  # (..., r)
                a.mul_(mask.keep_scale)
            else:
                a = x.to(dtype) @ A.to(dtype).t()
            base_out.add_(a @ B.to(dtype).t(), alpha=scale)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, A, B, a)
        ctx.scale, ctx.p, ctx.seed, ctx.dtype = scale, p, seed, dtype
        return base_out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, A, B, a = ctx.saved_tensors
        s, p, dtype = ctx.scale, ctx.p, ctx.dtype
        mask = DropoutMask(x.shape, p, ctx.seed, x.device) if p else None  # the forward's mask
        keep_scale = mask.keep_scale if mask is not None else 1.0
        g = grad_out.to(dtype)
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        grad_B = grad_A = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_B = (g2.t() @ a2).mul_(s).to(B.dtype)
        da = (g @ B.to(dtype)).mul_(s * keep_scale)  # (..., r), with the keep scale folded in
        if ctx.needs_input_grad[2]:
            kept = mask.zeroed(x, dtype) if mask is not None else x.to(dtype)
            grad_A = (da.reshape(-1, da.shape[-1]).t() @ kept.reshape(-1, kept.shape[-1])).to(A.dtype)
            del kept
        if ctx.needs_input_grad[1]:
            grad_x = da @ A.to(dtype)
            if mask is not None:
                grad_x = mask.zeroed(grad_x, in_place=grad_x.is_contiguous())
            grad_x = grad_x.to(x.dtype)
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
                       mask: Optional[DropoutMask] = None) -> torch.Tensor:
    """The plain composition ``base_out + scale * B (A (x * keep / (1 - rate)))``, for tests."""
    dtype = compute_dtype(x, A.dtype)
    xc = x.to(dtype)
    if mask is not None:
        xc = xc * mask.keep_tensor() / (1.0 - mask.rate)
    return base_out + ((xc @ A.to(dtype).t()) @ B.to(dtype).t() * scale).to(base_out.dtype)

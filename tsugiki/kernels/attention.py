"""Attention for bf16 training on a CPU, as batched bf16 matrix products.

torch's CPU flash-attention kernel runs bf16 attention no faster than fp32
(about 80 GFLOP/s here, forward and backward), while the same CPU multiplies
bf16 matrices at about 800. At training lengths (up to ~1k tokens a row) the
whole score matrix of a few heads fits in a few MiB, so :class:`GroupedAttention`
computes it with plain batched products:

    S = scale * Q K^T + bias       (bf16; bias is 0 where a query may attend, -inf elsewhere)
    P = softmax(S)                 (accumulated in fp32, rounded to bf16)
    O = P V

and in backward recomputes ``P`` (nothing but ``Q``, ``K`` and ``V`` is kept,
fewer bytes than the flash kernel keeps) and runs

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(P * dP)),
    dQ = scale * dS K,   dK = scale * dS^T Q.

Grouped-query attention needs no repeated keys: the ``g = heads / kv_heads``
query heads that share a key head are stacked as rows of one product, which
also sums their ``dK`` and ``dV``.

The precision is that of transformers' eager attention in bf16 (scores and
probabilities rounded to bf16, the softmax itself in fp32), with one rounding
of the scaled scores where eager has two; the flash kernel keeps both in fp32.
Relative errors against an fp32 reference are 5e-3 to 8e-3, as eager's are
(flash: 2e-3 to 7e-3); ``benchmarks/attention_cpu.py`` prints them, and
``tests/test_attention.py`` holds the path to eager's precision.

:func:`fast_attention` makes a model whose attention is transformers' ``"sdpa"``
use :func:`attention_forward` for the duration of a ``with`` block (training).
Calls it does not cover run transformers' own SDPA function unchanged: another
device or dtype, attention dropout, a float mask, position bias, soft-capping,
a key length other than the query length without a mask, or a row whose score
matrix exceeds :data:`MAX_ROW_SCORES` (the ``g`` heads of one key head), where
the flash kernel's blocking pays off (``benchmarks/attention_cpu.py``). Where
that happens depends on the CPU: without AMX (an AMD EPYC with AVX512-BF16)
the flash kernel caught up above ~1.2k tokens at ``g = 3`` and 1k at ``g = 4``;
with AMX (a Xeon) its forward is 2x faster than there, and fwd + bwd caught
up at 1k tokens (``g = 3``: 0.96x, ``g = 4``: 0.74x), so rows stop at 1 Mi
scores (~590 tokens at ``g = 3``, 512 at ``g = 4``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .cpu import has_amx

KEY = "tsugiki_sdpa"
# Score-matrix elements computed at once: rows (batch x key head) are grouped up to 4 MiB of bf16, which
# measured faster than 8 or 16 MiB (the softmax passes stay in cache); backward holds about four such.
CHUNK_SCORES = 1 << 21


def _row_limit() -> int:
    """Scores of the longest row computed here: beyond it the flash kernel measured as fast or faster
    (2 MiB of bf16 on a CPU with AMX, 8 MiB without; see the module docstring)."""
    return 1 << 20 if has_amx() else 1 << 22


MAX_ROW_SCORES = _row_limit()  # a single row above this many scores goes to SDPA

_bias_cache: dict = {}


def _causal_bias(g: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(1, g * length, length)``: 0 on and below the diagonal of each of the ``g`` stacked blocks, -inf above."""
    key = (g, length, dtype, device)
    bias = _bias_cache.get(key)
    if bias is None:
        block = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
        bias = block.repeat(g, 1).unsqueeze(0)
        if len(_bias_cache) >= 2:  # a forward and its backward share a length; others must not pile up
            _bias_cache.pop(next(iter(_bias_cache)))
        _bias_cache[key] = bias
    return bias


def _mask_bias(allowed: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` ``(Tq, Tk)`` bool -> ``(1, g * Tq, Tk)`` additive bias."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias.repeat(g, 1).unsqueeze(0)


class GroupedAttention(torch.autograd.Function):
    """``softmax(scale * Q K^T + bias) V`` for ``Q (B, H, Tq, D)``, ``K (B, Hk, Tk, D)``, ``V (B, Hk, Tk, Dv)``.

    ``mask``: None with ``causal`` (Tq == Tk) or without (every key), or a bool
    ``(B or 1, 1, Tq, Tk)``, True where a query may attend. A query that may
    attend nowhere gets zeros, as SDPA gives. See the module docstring.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                causal: bool, scale: float) -> torch.Tensor:
        B, H, Tq, D = q.shape
        Hk, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        g = H // Hk
        qg, kg, vg = q.reshape(B * Hk, g * Tq, D), k.reshape(B * Hk, Tk, D), v.reshape(B * Hk, Tk, Dv)
        out = q.new_empty(B * Hk, g * Tq, Dv)
        for rows, bias, dead in _chunks(B, Hk, g, Tq, Tk, mask, causal, q.dtype, q.device):
            p = _probabilities(qg[rows], kg[rows], bias, dead, scale, g)
            torch.bmm(p, vg[rows], out=out[rows])
        ctx.save_for_backward(qg, kg, vg, mask)
        ctx.causal, ctx.scale, ctx.shape = causal, scale, (B, H, Tq, Hk, Tk)
        return out.view(B, H, Tq, Dv)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qg, kg, vg, mask = ctx.saved_tensors
        B, H, Tq, Hk, Tk = ctx.shape
        g, scale = H // Hk, ctx.scale
        do = grad_out.reshape(B * Hk, g * Tq, vg.shape[-1]).to(qg.dtype)
        dq, dk, dv = torch.empty_like(qg), torch.empty_like(kg), torch.empty_like(vg)
        for rows, bias, dead in _chunks(B, Hk, g, Tq, Tk, mask, ctx.causal, qg.dtype, qg.device):
            p = _probabilities(qg[rows], kg[rows], bias, dead, scale, g)
            torch.bmm(p.transpose(1, 2), do[rows], out=dv[rows])
            dp = torch.bmm(do[rows], vg[rows].transpose(1, 2))
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - rowsum(p * dp)), in fp32 inside
            torch.bmm(ds, kg[rows], out=dq[rows])
            torch.bmm(ds.transpose(1, 2), qg[rows], out=dk[rows])
        dq.mul_(scale)
        dk.mul_(scale)
        return (dq.view(B, H, Tq, -1), dk.view(B, Hk, Tk, -1), dv.view(B, Hk, Tk, -1), None, None, None)


def _probabilities(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], dead: Optional[torch.Tensor],
                   scale: float, g: int) -> torch.Tensor:
    """``softmax(scale * q k^T + bias)`` for one chunk of rows; rows of ``dead`` queries are zero."""
    if bias is None:
        scores = torch.baddbmm(q.new_empty(1, 1, 1), q, k.transpose(1, 2), beta=0, alpha=scale)
    else:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    p = torch.softmax(scores, -1)
    if dead is not None:
        p.view(p.shape[0], g, -1, p.shape[-1]).masked_fill_(dead, 0)
    return p


def _chunks(B: int, Hk: int, g: int, Tq: int, Tk: int, mask: Optional[torch.Tensor], causal: bool,
            dtype: torch.dtype, device: torch.device):
    """Yield (row slice of the ``B * Hk`` stacked rows, bias, dead queries) covering every row once.

    A chunk's score matrix holds at most :data:`CHUNK_SCORES` elements (at
    least one row); with a per-example mask a chunk stays inside one example,
    so its bias broadcasts over the chunk.
    """
    per_row = max(1, CHUNK_SCORES // (g * Tq * Tk))
    if mask is None or mask.shape[0] == 1:
        bias = dead = None
        if mask is not None:
            bias, dead = _mask_bias(mask[0, 0], g, dtype), _dead_queries(mask[0, 0])
        elif causal:
            bias = _causal_bias(g, Tq, dtype, device)
        for start in range(0, B * Hk, per_row):
            yield slice(start, min(start + per_row, B * Hk)), bias, dead
        return
    for b in range(B):
        bias, dead = _mask_bias(mask[b, 0], g, dtype), _dead_queries(mask[b, 0])
        for start in range(0, Hk, per_row):
            yield slice(b * Hk + start, b * Hk + min(start + per_row, Hk)), bias, dead


def _dead_queries(allowed: torch.Tensor) -> Optional[torch.Tensor]:
    """``(1, 1, Tq, 1)`` True for queries that may attend nowhere, or None when there are none."""
    dead = ~allowed.any(-1)
    return dead.view(1, 1, -1, 1) if bool(dead.any()) else None


def covers(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
           dropout: float, causal: bool, **kwargs) -> bool:
    """Whether :class:`GroupedAttention` computes this call (what SDPA would) at the shapes it is fast for."""
    if not (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16):
        return False
    if dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    B, H, Tq, _ = query.shape
    if key.shape[0] != B or value.shape[0] != B or key.shape[1] != value.shape[1] or H % key.shape[1]:
        return False
    Tk = key.shape[2]
    if attention_mask is None:
        if causal and Tq > 1 and Tk != Tq:
            return False  # SDPA crops the keys in this case (prefill into a static cache); leave it to SDPA
    elif not (attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
              and attention_mask.shape[0] in (1, B) and tuple(attention_mask.shape[2:]) == (Tq, Tk)):
        return False
    return (H // key.shape[1]) * Tq * Tk <= MAX_ROW_SCORES


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function interface: :class:`GroupedAttention` where :func:`covers` says so,
    else transformers' ``sdpa_attention_forward`` with the same arguments.

    Causality follows SDPA's rule: causal only without a mask and with more than one query.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    if not covers(query, key, value, attention_mask, dropout, causal, **kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = GroupedAttention.apply(query, key, value, attention_mask, causal, scale)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make :data:`KEY` a valid attention implementation, with SDPA's masks."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(KEY, attention_forward)
    AttentionMaskInterface.register(KEY, sdpa_mask)


@contextmanager
def fast_attention(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, the model's configs that select ``"sdpa"`` select :func:`attention_forward`.

    Yields how many configs were switched (0 when disabled, or when no config
    uses SDPA); each is back to ``"sdpa"`` on exit. Only the configs' own
    setting changes: nothing is set on their sub-configs.
    """
    switched = []
    if enabled:
        configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
        candidates = [c for c in configs.values()
                      if getattr(c, "_attn_implementation_internal", None) == "sdpa"]
        if candidates:
            _register()
        for config in candidates:
            config._attn_implementation_internal = KEY
            switched.append(config)
    try:
        yield len(switched)
    finally:
        for config in switched:
            config._attn_implementation_internal = "sdpa"
        _bias_cache.clear()

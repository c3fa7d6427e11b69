"""Next-token loss with the output layer applied only where a token is scored.

In instruction tuning most positions carry no loss (the prompt is masked), yet
the usual path computes logits for every position: a (batch, length, vocab)
tensor, kept for the backward pass, that often dominates a small model's
memory and a good part of its time. The loss only needs the rows whose next
token is a target, so

    loss_sum = sum over targets t of  -log softmax(head(h_t))[y_{t+1}]

is computed from ``head(hidden[selected])`` alone: the same value and the same
gradients as the reference :func:`full_logits_loss_sum`, with
``N_targets x vocab`` logits instead of ``B x T x vocab``.

The split into a decoder body and an output head holds for architectures whose
logits are exactly ``head(last hidden state)``; :func:`split_causal_lm` names
them and returns ``None`` for the rest (logit soft-capping, logit scaling), which
then use the reference path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lora_fused import compute_dtype

IGNORE_INDEX = -100

# model_type values whose CausalLM forward is logits = lm_head(body(...)[0]), nothing else.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "phi3",
    "olmo", "olmo2", "smollm3", "stablelm", "starcoder2", "gpt_neox", "gptj",
})


def split_causal_lm(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """``(body, head)`` of a causal LM (or a PeftModel around one) with plain logits, else None."""
    from ..tuner import BaseTuner

    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, BaseTuner) and type(tuner).forward is not BaseTuner.forward:
        return None  # the method rewrites the inputs (prompt learning): only its own forward is right
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
        return None
    return body, head


def shifted_targets(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per position t, the label of token t+1 (-100 where nothing is scored), shape (B, T).

    In a packed row a sequence's first token cannot be predicted from the previous
    sequence, so it is never a target.
    """
    if position_ids is not None:
        labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def full_logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                         position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: summed next-token cross-entropy from full (B, T, V) logits, in fp32."""
    targets = shifted_targets(labels, position_ids)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def scored_positions(labels: torch.Tensor, position_ids: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into ``B * T``) of the scored positions, and the token each must predict.

    Computed where ``labels`` live; the trainer does it on the CPU copy of a batch, so
    the GPU never waits for a data-dependent shape (a boolean mask would make it sync).
    """
    targets = shifted_targets(labels, position_ids).reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return index, targets.index_select(0, index)


def target_logits_loss_sum(body: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor],
                           labels: torch.Tensor,
                           scored: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Summed next-token cross-entropy computing ``head`` only at scored positions (fp32 loss).

    ``scored``: :func:`scored_positions` of ``labels``, already on the model's device
    (default: computed here from ``labels``).

    A frozen, bias-free ``nn.Linear`` head goes through :class:`ChunkedLinearCrossEntropy`
    (no ``N x vocab`` tensor kept for backward); any other head through ``head()`` +
    ``F.cross_entropy``.
    """
    hidden = body(**inputs)[0]  # (B, T, H)
    index, wanted = scored if scored is not None else scored_positions(labels, inputs.get("position_ids"))
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # N scored positions only
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return ChunkedLinearCrossEntropy.apply(rows, head.weight, wanted, compute_dtype(rows, rows.dtype))
    return F.cross_entropy(head(rows).float(), wanted, reduction="sum")


CHUNK_ELEMENTS = 1 << 22  # logits per chunk (4M: 16 MiB in fp32)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_n -log softmax(h_n W^T)[y_n]`` for a frozen ``W``, ``CHUNK_ELEMENTS`` logits at a time.

    The loss is a scalar at the end of the graph, so its gradient is the
    output gradient ``g`` times ``dL/dh = (softmax(z) - onehot(y)) W``, and that
    factor is computed in the forward pass, chunk by chunk, while the chunk's
    logits ``z`` are at hand; backward only scales it by ``g``. Nothing of size
    ``N x vocab`` is kept and nothing recomputed: two products with ``W`` per
    chunk instead of three (forward, recompute, gradient). Per chunk, with
    ``m = max z`` and ``e = exp(z - m)``: ``loss = m + log(sum e) - z[y]`` and
    ``softmax(z) = e / sum e``. When ``h`` needs no gradient (evaluation) the
    forward computes the loss alone. Logits are computed in ``dtype`` (the
    autocast dtype, as ``head()`` under autocast would) and reduced in fp32,
    like the reference.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        step = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], step):
                rows = slice(start, start + step)
                wanted = targets[rows]
                z = (hidden[rows].to(dtype) @ w.t()).float()
                picked = z.gather(1, wanted[:, None]).squeeze(1)
                peak = z.amax(1, keepdim=True)
                e = z.sub_(peak).exp_()  # exp(z - m), in place of the logits
                sums = e.sum(1)
                total += (peak.squeeze(1) + sums.log() - picked).sum()
                if grad is not None:
                    probs = e.div_(sums[:, None])  # softmax
                    probs[torch.arange(probs.shape[0], device=probs.device), wanted] -= 1.0
                    grad[rows] = (probs.to(dtype) @ w).to(hidden.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None

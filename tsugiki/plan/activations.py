"""What one training forward keeps for backward, per token and per block, and how many
tokens the trainer puts in one forward (``max_forward_tokens``)."""

from __future__ import annotations

import functools
from typing import Sequence

from .shapes import Linear, Shape

ATTENTION_DROPOUT_BYTES = 12  # per head, query and key: fp32 probabilities and dropout's output (GPT-2, measured)


# Sites: one tensor fed to one or more linears, (input width, linear names, already saved by another op).
# The attention output is saved by SDPA (``kept``), not by tsugiki's CPU attention.
def _input_sites(shape: Shape, attention_keeps_output: bool = True) -> list[tuple[int, tuple[str, ...], bool]]:
    names = [lin.name for lin in shape.linears]
    q_dim = shape.heads * shape.head_dim
    kept = attention_keeps_output
    if shape.family == "llama":
        return [(shape.hidden, tuple(names[0:3]), False), (q_dim, (names[3],), kept),
                (shape.hidden, tuple(names[4:6]), False), (shape.intermediate, (names[6],), False)]
    if shape.family == "gpt2":
        return [(shape.hidden, (names[0],), False), (shape.hidden, (names[1],), kept),
                (shape.hidden, (names[2],), False), (shape.intermediate, (names[3],), False)]
    if shape.family == "generic":
        return [(width, site, kept_by == "activation" or (kept and kept_by == "attention"))
                for width, site, kept_by in shape.sites]
    return [(shape.hidden, tuple(names[0:3]), False), (shape.hidden, (names[3],), kept),
            (shape.hidden, (names[4],), False), (shape.intermediate, (names[5],), False)]


def uses_fast_attention(shape: Shape, config, dtype: str, device: str, max_length: int) -> bool:
    """Whether the trainer's attention (``fast_attention``, :mod:`tsugiki.kernels.attention`) takes rows of
    ``max_length``: a CPU, bf16, no attention dropout, a score matrix within its chunk limit."""
    from ..kernels.attention import MAX_ROW_SCORES

    dropout = next((getattr(config, name) for name in ("attention_dropout", "attn_pdrop",
                                                       "attention_probs_dropout_prob") if hasattr(config, name)), 0.0)
    group = shape.heads // shape.kv_heads
    return device == "cpu" and dtype == "bf16" and not dropout and group * max_length ** 2 <= MAX_ROW_SCORES


@functools.lru_cache(maxsize=32)
def activation_bytes(name: str, s: int) -> float:
    """Bytes an MLP activation (transformers' ``ACT2FN[name]``) keeps for backward per element of
    its input, at the compute dtype of ``s`` bytes: measured on a small tensor (GELU 1 value,
    GPT-2's ``gelu_new`` 4, ``gelu_fast`` 7). ``s`` when ``name`` is empty or unknown."""
    import torch

    try:
        from transformers.activations import ACT2FN

        act = ACT2FN[name]
    except (KeyError, ImportError):
        return float(s)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.ones(256, dtype=torch.bfloat16 if s == 2 else torch.float32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x * 1.0)  # a non-leaf input, as a linear layer's output is
    return sum(kept.values()) / 256


def block_activation_bytes(shape: Shape, s: int, *, full: bool, adapted: set[str], lora_r: int,
                           lora_dropout: float, device: str, fused_blocks: bool = True,
                           fast_attention: bool = False, dora: bool = False, seq_len: int = 0) -> float:
    """Bytes autograd saves per token in one block (of rows ``seq_len`` long).

    Llama block, compute dtype of ``s`` bytes, as the trainer runs it
    (``fused_blocks``, :mod:`tsugiki.kernels.block_fused`): both RMSNorms keep
    their input and an fp32 scale per token (2 (s h + 4)); SDPA keeps q and k
    after RoPE, v and its output (s * (2 q_dim + 2 kv_dim)) plus an fp32
    logsumexp per head (4 H), tsugiki's CPU attention (``fast_attention``,
    :mod:`tsugiki.kernels.attention`) only q, k and v (s * (q_dim + 2 kv_dim));
    the gated MLP keeps gate and up (2 s I). The
    model's own modules (``fused_blocks=False``) keep an fp32 copy of each norm
    input (2 * 4h) and act(gate) as well (3 s I). GPT-2/BERT: LayerNorm inputs
    (2 s h) and the GELU input (s I). A frozen linear keeps nothing (its input
    gradient needs only the weight). LoRA linears take the fused path
    (:mod:`tsugiki.kernels.lora_fused`): each keeps its input at the compute
    dtype, one copy per input site (q/k/v share one; none when another op keeps
    it already), and its r-wide ``A`` product; dropout keeps nothing (the mask
    is re-drawn in backward). DoRA (``dora``) adds, per adapted module, ``z``
    (``s * out``, for the magnitude's gradient); with dropout each module keeps
    its own dropped input and dropout's mask instead of the shared input:
    ``2 s * in`` on a CPU, where torch's dropout keeps its scaled noise at the
    input's dtype, ``(s + 1) * in`` on CUDA (a boolean mask). Full fine-tuning
    keeps every linear input at ``s``. A model that drops out each sub-layer's
    output (GPT-2's ``resid_pdrop``, BERT's ``hidden_dropout_prob``) keeps the
    noise of two of them, ``2 s h`` (a one-byte mask each on CUDA); one that drops
    out attention probabilities sends SDPA down its math path on a CPU, which
    keeps ``ATTENTION_DROPOUT_BYTES`` (12, measured) per head and key position.
    """
    h, i = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attn = s * (q_dim + 2 * kv_dim) if fast_attention else s * (2 * q_dim + 2 * kv_dim) + 4 * shape.heads
    if shape.family == "llama" and fused_blocks:
        base = 2 * (s * h + 4) + attn + 2 * s * i
    elif shape.family == "llama":
        base = 2 * 4 * h + attn + 3 * s * i
    elif shape.family == "generic":
        base = (2 * 4 * h if shape.rms_norm else 2 * (s * h + 8)) + attn + activation_bytes(shape.activation, s) \
            * shape.mlp_kept
    else:
        base = 2 * (s * h + 8) + attn + activation_bytes(shape.activation, s) * i
    if shape.residual_dropout:  # after attention and after the MLP, each its noise (CPU) or mask (CUDA)
        base += 2 * (s if device == "cpu" else 1) * h
    if shape.attention_dropout and device == "cpu":  # SDPA's math path: probabilities and noise kept
        base += ATTENTION_DROPOUT_BYTES * shape.heads * seq_len
    extra = 0.0
    out_features = {lin.name: lin.out_features for lin in shape.linears}
    for width, names, saved in _input_sites(shape, attention_keeps_output=not fast_attention):
        mods = [n for n in names if n in adapted]
        if dora and lora_dropout > 0 and mods:
            extra += len(mods) * (s + (s if device == "cpu" else 1)) * width
        elif full or mods:
            extra += 0 if saved else s * width
        extra += len(mods) * s * lora_r
        if dora:
            extra += sum(s * out_features[n] for n in mods)
    return base + extra


# Methods whose layers keep more than their inputs for backward (see method_activation_bytes).
LAYER_METHODS = ("loha", "lokr", "adalora", "ia3")


def method_activation_bytes(shape: Shape, s: int, method: str, chosen: Sequence[Linear], rank: int,
                            dropout: float = 0.0, device: str = "cpu") -> tuple[float, float]:
    """What a method's adapted linears of one block keep for backward besides the frozen block,
    under the trainer's autocast: ``(bytes per token, bytes per forward)``.

    LoHa / LoKr: the full-size update at the compute dtype, ``s * in * out`` per adapted
    linear and forward (their fp32 factors and intermediates are remade in backward); the
    inputs they keep are counted as LoRA's (:func:`block_activation_bytes` with r = 0).
    AdaLoRA, per adapted linear: its own compute-dtype copy of the input and the r-wide product,
    ``s (in + r)`` per token, with dropout also dropout's noise on the fp32 input (``4 * in`` on
    a CPU, a one-byte mask on CUDA); per forward the factors' copies, ``(s + 4) r (in + out)``.
    IA3: an fp32 copy of what it scales, per token: the input of the feed-forward projection
    (the MLP's last linear, ``4 * in``), the output of the others (``4 * out``).
    """
    if method in ("loha", "lokr"):
        return 0.0, float(s * sum(lin.in_features * lin.out_features for lin in chosen))
    if method == "adalora":
        noise = (4 if device == "cpu" else 1) if dropout > 0 else 0
        per_token = sum(s * (lin.in_features + rank) + noise * lin.in_features for lin in chosen)
        return float(per_token), float(sum((s + 4) * rank * (lin.in_features + lin.out_features) for lin in chosen))
    if method == "ia3":
        down = shape.linears[-1].name
        return float(sum(4 * (lin.in_features if lin.name == down else lin.out_features) for lin in chosen)), 0.0
    return 0.0, 0.0


AUTO_ACTIVATION_SHARE = 0.25  # max_forward_tokens: auto keeps a forward's activations under 1/4 of a reference


def auto_forward_budget(shape: Shape, s: int, reference_bytes: int, device: str,
                        gradient_checkpointing: bool = False, offload: bool = False, dora: bool = False,
                        dora_dropout: float = 0.0, full_logits: int = 0) -> int:
    """Tokens one forward may hold under the trainer's ``max_forward_tokens: auto``.

    ``AUTO_ACTIVATION_SHARE * reference_bytes / per_token``, at least 1, with
    ``per_token`` from :func:`block_activation_bytes` for every linear adapted at
    r 16 without dropout (DoRA, ``dora``: with what its layers keep besides, at
    ``dora_dropout``): ``layers * block``; under gradient checkpointing each
    block's input plus one block, ``layers * hidden * s + block``; with those
    inputs offloaded to the host, ``block`` alone. A head whose loss takes the full
    logits (not the chunked output layer) adds their fp32 copies, ``full_logits``
    of them (:func:`full_logit_copies`; 0 for the chunked layer), ``4 * vocab`` bytes
    a token each. The trainer's reference is the
    frozen weights' bytes on a CPU and, on CUDA, the device memory the process can
    have (free plus what torch holds, at most the total).
    """
    adapted = {lin.name for lin in shape.linears}
    block = block_activation_bytes(shape, s, full=False, adapted=adapted, lora_r=16,
                                   lora_dropout=dora_dropout if dora else 0.0, device=device, dora=dora)
    if gradient_checkpointing:
        per_token = block if offload else shape.layers * shape.hidden * s + block
    else:
        per_token = shape.layers * block
    per_token += int(full_logits) * 4 * shape.vocab
    return max(1, int(AUTO_ACTIVATION_SHARE * reference_bytes // max(per_token, 1)))


def rows_per_forward(batch_size: int, max_length: int, max_forward_tokens: int) -> int:
    """Rows of ``max_length`` tokens the trainer puts in one forward: as many as fit ``max_forward_tokens``
    (0: no limit), at least one, at most ``batch_size``."""
    if not max_forward_tokens:
        return batch_size
    return max(1, min(batch_size, max_forward_tokens // max_length))

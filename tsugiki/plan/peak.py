"""The peak memory of one training step, part by part, from a model's config alone.

``estimate(source, ...)`` reads only a model's configuration (a HF folder, a
``config.json``, the metadata of a ``.gguf`` file, the built-in default name, or
a transformers config object; never the weights), counts the parameters exactly,
and adds up what one training step holds at its peak::

    total = runtime + weights + trainable + gradients + optimizer + compute_copies
            + optimizer_step + best_weights + activations + logits + allocator_slack

* ``weights``: frozen base parameters. Linear layers inside the blocks are
  stored at 4.5 bits/param for NF4 (4 bits + one fp32 absmax per 64 weights),
  ~4.127 with double quantization (the absmax in 8 bits + one fp32 per 256
  blocks), or 1 byte + one fp32 scale per output row for 8-bit. Embeddings,
  ``lm_head`` and norms stay at the compute dtype.
* ``trainable``/``gradients``/``optimizer``: adapter parameters are fp32 (the
  HF PEFT default; methods other than LoRA are counted on the meta device by
  :func:`count_trainable`), so 4 bytes each, 4 more for the gradient and 8 for AdamW's
  two moments (2 with 8-bit AdamW). Full fine-tuning keeps
  them fp32 too (the trainer's dtype policy).
* ``compute_copies``: under bf16/fp16 autocast a 16-bit copy of every fp32
  trained weight, kept for the backward (``trainable x s``; full fine-tuning
  of SmolLM2: 0.25 GiB).
* ``optimizer_step``: the update's own temporaries. torch's fused AdamW has
  none; bitsandbytes' 8-bit optimizers on a CPU dequantize both moments of
  one tensor to fp32 and quantize them back, measured 22 bytes per element of
  the largest trained tensor (SmolLM2's embedding in full fine-tuning:
  0.58 GiB).
* ``best_weights``: with ``keep_best`` on a CPU, the trainer's fp32 copy of the
  trained weights at the best evaluation (4 bytes each; on a GPU it sits in host
  memory, so 0 here).
* ``activations``: tensors autograd saves for backward, per token per layer,
  derived op by op for Llama-style blocks with SDPA attention (O(T), no T x T
  matrix; on a CPU in bf16, tsugiki's attention, which keeps a little less)
  and checked against ``torch.autograd.graph.saved_tensors_hooks`` counts; with
  gradient checkpointing only each block's input plus one recomputed block.
  They are one forward's: the trainer runs a micro-batch in forwards of as
  many rows as ``max_forward_tokens`` allows (``auto``:
  :func:`auto_forward_budget`, which the trainer uses too), each backward
  before the next forward. ``logits`` too.
* ``logits``: what the loss holds. tsugiki's trainer computes the output
  layer only at scored positions, a chunk of rows at a time
  (``tsugiki.kernels.target_logits``, ``target_logits_only: true``, for
  architectures whose logits are the head of the last hidden state): one
  chunk of 4 Mi fp32 logits and its probabilities in the compute dtype, plus
  ``dL/dh`` for every scored token (``B * T * hidden * s``). The model's own
  loss over full logits (other architectures, a trained head as in full
  fine-tuning, ``target_logits_only=False``)
  holds ``12 * B * T * vocab`` bytes: the fp32 log-softmax kept for backward,
  its gradient and the gradient of the fp32 logits, alive together when
  backward starts; a final logit soft-cap (Gemma 2: ``tanh(z / c) * c``) keeps
  one more fp32 copy, its tanh.
* ``allocator_slack``: freed temporaries that glibc's heap keeps resident on
  CPU (its dynamic mmap threshold moves multi-MB blocks to the heap), measured
  at ~40% of the un-checkpointed activations (half that under gradient
  checkpointing, measured 18-28%); 10% on CUDA for the caching allocator.
  When the trainer splits a micro-batch into several forwards, the heap
  cannot reuse all of one forward's freed blocks for the next and settles at
  about one more forward's activations (measured 1.0-1.3x on SmolLM2 with
  one-row forwards, steady from the second forward on).
* ``runtime``: Python + torch + transformers resident before the model
  (measured 401 MiB with torch 2.13 / transformers 5.24), or the CUDA context;
  a k-bit base on a CPU adds bitsandbytes' own (112 MiB, version 0.50).

Loading a ``.gguf`` file on a CPU can peak above training: transformers
dequantizes it, so while it loads the process holds (``Estimate.loading``)::

    loading = runtime + parameters x load bytes + file size + largest tensor in fp32 + 24 MiB

where the load bytes are the compute dtype's (fp32 for full fine-tuning, as
the trainer loads), the file is mapped and read, and one tensor is dequantized
to fp32 at a time. A model folder whose weights are saved in another dtype
than the one they train in (an fp32 checkpoint trained in bf16, transformers'
default for ``save_pretrained``) peaks the same way: the mapped files are read
whole while the cast copies are made::

    loading = runtime + checkpoint files + frozen weights as they train

``Estimate.peak`` is the larger of loading and training, and what ``fits``
compares.

The CPU constants are calibrated by ``benchmarks/plan_accuracy.py`` and
``benchmarks/gguf_load_memory.py`` (results in ``benchmarks/README.md``); the
CUDA ones are not measured there. Assumptions: no padding attention mask
(SDPA's causal path), the optimizer states exist (any step after the first),
other loading transients are not counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .activations import (LAYER_METHODS, auto_forward_budget, block_activation_bytes, method_activation_bytes,
                          rows_per_forward, uses_fast_attention)
from .shapes import Linear, count_parameters, model_shape, targeted_linears
from .sources import DEFAULT_MODEL, checkpoint_bytes, gguf_file, load_config

MiB = 1024**2
GiB = 1024**3

# Calibrated on CPU (see benchmarks/README.md); CUDA values are typical, not measured here.
RUNTIME_BYTES = {"cpu": 401 * MiB, "cuda": 500 * MiB}
BNB_RUNTIME_BYTES = 112 * MiB  # importing bitsandbytes 0.50 (a k-bit base) on a CPU: measured 112.5 MiB
GGUF_LOAD_REST = 24 * MiB  # a GGUF load's peak beyond the model, the file and one fp32 tensor (measured 12-27 MiB)
SLACK_FRACTION = {"cpu": 0.40, "cuda": 0.10}
SPLIT_SLACK_FRACTION = {"cpu": 1.0, "cuda": 0.0}  # x one forward's activations, when a step runs 2+ forwards
LOGITS_FP32_COPIES = 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAVED_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # a config's dtype, as torch names it
# Per fp32 trainable param (the trainer's `optimizer` names; paged states count where they live).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2}
# Temporaries of bitsandbytes 0.50's CPU 8-bit update per element of the tensor it updates (measured 22.0).
BNB_CPU_STEP_BYTES = 22


def full_logit_copies(config) -> int:
    """fp32 copies of the full logits the model's own loss holds: one more with a soft-capped head."""
    return LOGITS_FP32_COPIES + (1 if getattr(config, "final_logit_softcapping", None) is not None else 0)


def nf4_bits_per_param(double_quant: bool, blocksize: int = 64) -> float:
    """4 bits + an fp32 absmax per block; double quant stores the absmax in 8 bits + fp32 per 256 blocks."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def linear_weight_bytes(lin: Linear, quantization, double_quant: bool, dtype_bytes: int) -> float:
    bias = lin.out_features * dtype_bytes if lin.bias else 0
    n = lin.in_features * lin.out_features
    if quantization == "4bit":
        return n * nf4_bits_per_param(double_quant) / 8 + bias
    if quantization == "8bit":
        return n + 4 * lin.out_features + bias  # int8 + one fp32 scale per row
    return n * dtype_bytes + bias


# ----------------------------------------------------------------------------- the compute dtype

GPUS_WITHOUT_BF16 = ("T4", "P100", "V100", "V100-32GB")


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (avx512_bf16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: str, gpu: Optional[str] = None) -> str:
    """What the trainer's ``dtype: auto`` gives: bf16 where the hardware runs it natively, else fp32.

    ``gpu``: a card name as ``--gpu`` takes it; the cards of
    :data:`GPUS_WITHOUT_BF16` only emulate bf16.
    """
    if device == "cuda":
        return "fp32" if gpu is not None and gpu.upper() in GPUS_WITHOUT_BF16 else "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


PART_MEANINGS = {
    "runtime": "the libraries themselves (on a GPU: the CUDA context)",
    "weights": "the frozen base weights",
    "trainable": "the trained weights (fp32)",
    "gradients": "their gradients",
    "optimizer": "the optimizer's state",
    "compute_copies": "16-bit copies of the trained weights for each step",
    "optimizer_step": "the 8-bit optimizer's temporaries",
    "best_weights": "keep_best's copy of the trained weights",
    "activations": "what one forward keeps for backward",
    "logits": "the output layer's values at the loss",
    "allocator_slack": "freed memory the allocator keeps for reuse",
}


@dataclass
class Estimate:
    """Peak memory of one training step, in bytes, by part; ``total`` is their sum.

    ``loading``: the process while a GGUF file, or a checkpoint saved in another
    dtype, loads on a CPU (0 when not modelled); ``peak``, the larger of the two,
    is what :meth:`fits` compares.
    """

    parts: dict[str, int]
    params: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    offloaded: int = 0  # bytes held in pinned host memory instead (activation_offloading), not in ``total``
    forward_rows: int = 0  # rows in each forward of the micro-batch (the trainer's max_forward_tokens)
    loading: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return max(self.total, self.loading)

    def fits(self, available_bytes: int) -> bool:
        return self.peak <= available_bytes

    def table(self) -> str:
        """The parts that hold memory, each with what it is, then the total."""
        width = max(len(k) for k in self.parts)
        lines = [f"  {k:<{width}}  {v / GiB:8.3f} GiB  {PART_MEANINGS.get(k, '')}".rstrip()
                 for k, v in self.parts.items() if v or k == "runtime"]
        lines.append(f"  {'total':<{width}}  {self.total / GiB:8.3f} GiB")
        if self.loading > self.total:
            why = ("the GGUF file is dequantized while it loads" if self.settings.get("loads_from") == "gguf" else
                   "its files are read whole while the weights are cast to the training dtype")
            lines.append(f"  loading the model peaks higher: {self.loading / GiB:.3f} GiB ({why})")
        return "\n".join(lines)


def logits_bytes(tokens: int, vocab: int, hidden: int, s: int, chunked: bool,
                 copies: int = LOGITS_FP32_COPIES) -> int:
    """Bytes the loss holds at the end of the forward (see ``logits`` in the module docstring)."""
    from ..kernels.target_logits import CHUNK_ELEMENTS

    if chunked:
        return min(tokens * vocab, CHUNK_ELEMENTS) * (4 + s) + tokens * hidden * s
    return copies * 4 * tokens * vocab


def chunked_output_layer(model_type: str, full: bool, target_logits_only: bool = True) -> bool:
    """Whether the trainer's loss goes through the chunked output layer: a plain head, frozen (not ``full``)."""
    from ..kernels.target_logits import PLAIN_HEAD_MODEL_TYPES

    return target_logits_only and not full and model_type in PLAIN_HEAD_MODEL_TYPES


def estimate(source: Any = DEFAULT_MODEL, *, method: str = "lora", lora_r: int = 8, lora_dropout: float = 0.0,
             target_modules=None, trainable_params: int | None = None, quantization: str | None = None,
             double_quant: bool = True, dtype: str = "bf16", batch_size: int = 1, max_length: int = 512,
             optimizer: str = "adamw", gradient_checkpointing: bool = False, device: str = "cpu",
             activation_offloading: bool = False, target_logits_only: bool = True,
             max_forward_tokens: Union[int, str] = "auto", device_memory: Optional[int] = None,
             virtual_tokens: int = 0, keep_best: bool = False) -> Estimate:
    """Estimate the peak memory of training ``source`` (see the module docstring for each part).

    Defaults: LoRA r=8 without dropout on the architecture's default targets
    (q_proj/v_proj for Llama), bf16, no quantization, batch 1 x 512 tokens,
    AdamW with fp32 states, no gradient checkpointing, CPU. ``method`` is
    ``"lora"``, ``"dora"`` (LoRA plus a magnitude per output row, and what
    DoRA keeps for backward), ``"full"`` or any other name, treated like LoRA
    but with ``trainable_params`` fp32 parameters; LoHa, LoKr, AdaLoRA and IA3
    (on ``target_modules``) with what their layers keep for backward
    (:func:`method_activation_bytes`), the others with no per-module
    activations. ``trainable_params``, when given, replaces LoRA's and DoRA's count
    too (a model-side count sees rank patterns and ``modules_to_save``).
    ``activation_offloading`` (CUDA, with gradient checkpointing): the blocks'
    inputs move to pinned host memory; they are reported in ``offloaded``.
    ``target_logits_only`` (default True, as in the trainer): the chunked output
    layer where the architecture allows it; False: full logits.
    ``max_forward_tokens`` (default ``"auto"``, as in the trainer): the micro-batch
    runs in forwards of as many ``max_length`` rows as this many tokens allow (at
    least one), each one's backward before the next forward, so activations and
    logits count one forward; ``"auto"`` is :func:`auto_forward_budget` of the
    frozen weights on a CPU, of ``device_memory`` on CUDA (no limit without it);
    0: the whole micro-batch in one forward. ``virtual_tokens``: what a prompt
    method puts in front of every row (prompt tuning, p-tuning): the rows the
    model runs are that much longer than the ``max_length`` the data is cut to.
    ``keep_best``: the trainer holds a copy of the trained weights (``best_weights``).
    ``dtype="auto"`` and ``quantization="none"`` read as in a training config.
    """
    if dtype == "auto":
        dtype = auto_dtype(device)
    if quantization == "none":
        quantization = None
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPE_BYTES)} or auto")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization={quantization!r}: use None (or 'none'), '4bit' or '8bit'")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if device not in RUNTIME_BYTES:
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    if activation_offloading and not (gradient_checkpointing and device == "cuda"):
        raise ValueError("activation_offloading=True moves what gradient checkpointing keeps off a GPU: "
                         "pass gradient_checkpointing=True and device='cuda'")
    if method in ("lora", "dora") and (not isinstance(lora_r, int) or lora_r < 1):
        raise ValueError(f"lora_r={lora_r!r}: the LoRA rank must be a whole number >= 1")
    for key, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a whole number >= 1")
    if trainable_params is not None and (not isinstance(trainable_params, int) or trainable_params < 0):
        raise ValueError(f"trainable_params={trainable_params!r} must be a whole number >= 0")
    if max_forward_tokens != "auto" and not (isinstance(max_forward_tokens, int) and max_forward_tokens >= 0):
        raise ValueError(f"max_forward_tokens={max_forward_tokens!r}: use 'auto', 0 (no limit) or a token count")
    full = method == "full"
    if full and quantization:
        raise ValueError("method='full' cannot train a quantized base: drop quantization or use method='lora'")
    if method not in ("lora", "dora", "full") and trainable_params is None:
        raise ValueError(f"method={method!r}: pass trainable_params=<count> to estimate it like LoRA")

    config = load_config(source)
    shape = model_shape(config)
    counts = count_parameters(config)
    s = DTYPE_BYTES[dtype]

    # Frozen (or, for full fine-tuning, trained) base weights.
    block_linear = shape.layers * sum(linear_weight_bytes(lin, quantization, double_quant, s) for lin in shape.linears)
    weights = block_linear + (counts["total"] - counts["block_linear"]) * s

    adapted: set[str] = set()
    chosen: list[Linear] = []  # the adapted linears of a block
    param_bytes = 4  # the trainer's dtype policy keeps trained weights fp32, under bf16 compute too
    if full:
        trainable = counts["total"]
        largest_trained = max([shape.vocab * shape.hidden]
                              + [lin.in_features * lin.out_features for lin in shape.linears])
    elif method in ("lora", "dora"):
        chosen = targeted_linears(shape, target_modules)
        adapted = {lin.name for lin in chosen}
        trainable = shape.layers * sum(lora_r * (lin.in_features + lin.out_features)
                                       + (lin.out_features if method == "dora" else 0) for lin in chosen)
        largest_trained = max([lora_r * max(lin.in_features, lin.out_features) for lin in chosen], default=0)
        if trainable_params is not None:  # counted on the model: rank patterns, layer choices, modules_to_save
            # What the formula lacks is trained whole (modules_to_save): bounded by its total as one tensor.
            largest_trained = max(largest_trained, int(trainable_params) - trainable)
            trainable = int(trainable_params)
    else:
        trainable = int(trainable_params)
        largest_trained = 0  # adapter tensors of the other methods are small beside everything else
        chosen = targeted_linears(shape, target_modules) if method in LAYER_METHODS else []
        if method in ("loha", "lokr"):
            adapted = {lin.name for lin in chosen}  # they keep their inputs as LoRA does (r = 0 below)

    frozen = 0 if full else weights
    if max_forward_tokens == "auto":
        reference = device_memory if device == "cuda" else frozen
        full_logits = full_logit_copies(config) if shape.family != "bert" and not chunked_output_layer(
            config.model_type, full, target_logits_only) else 0
        budget = 0 if reference is None else auto_forward_budget(shape, s, reference, device, gradient_checkpointing,
                                                                  activation_offloading, dora=method == "dora",
                                                                  dora_dropout=lora_dropout, full_logits=full_logits)
    else:
        budget = max_forward_tokens
    forward_rows = rows_per_forward(batch_size, max_length, budget)  # the trainer splits by data tokens
    tokens = forward_rows * (max_length + virtual_tokens)  # what one forward holds for its backward

    fast = uses_fast_attention(shape, config, dtype, device, max_length)
    per_block = block_activation_bytes(shape, s, full=full, adapted=adapted, seq_len=max_length + virtual_tokens,
                                       lora_r=lora_r if method in ("lora", "dora") else 0,
                                       lora_dropout=lora_dropout, device=device, fast_attention=fast,
                                       dora=method == "dora")
    per_token_more, per_forward = method_activation_bytes(shape, s, method, chosen, lora_r, lora_dropout, device)
    per_block += per_token_more
    block_inputs = tokens * shape.layers * s * shape.hidden
    if gradient_checkpointing:
        # Each block's input is kept (on the host when offloaded); backward recomputes one block at a time.
        activations = tokens * per_block + per_forward + (0 if activation_offloading else block_inputs)
    else:
        activations = tokens * shape.layers * per_block + shape.layers * per_forward
    # Fewer long-lived tensors pin the heap under checkpointing, so more freed blocks are reused.
    slack = SLACK_FRACTION[device] * tokens * shape.layers * per_block * (0.5 if gradient_checkpointing else 1)
    if forward_rows < batch_size:
        slack += SPLIT_SLACK_FRACTION[device] * activations

    parts = {
        "runtime": RUNTIME_BYTES[device] + (BNB_RUNTIME_BYTES if quantization and device == "cpu" else 0),
        "weights": frozen,
        "trainable": trainable * param_bytes,
        "gradients": trainable * param_bytes,
        "optimizer": trainable * OPTIMIZER_STATE_BYTES[optimizer] * param_bytes // 4,
        "compute_copies": trainable * s if s < param_bytes else 0,
        "optimizer_step": (BNB_CPU_STEP_BYTES * largest_trained
                           if optimizer.endswith("_8bit") and device == "cpu" else 0),
        "best_weights": trainable * 4 if keep_best and device == "cpu" else 0,
        "activations": activations,
        "logits": logits_bytes(tokens, shape.vocab, shape.hidden, s,
                               chunked_output_layer(config.model_type, full, target_logits_only),
                               full_logit_copies(config)),
        "allocator_slack": slack,
    }
    parts = {k: int(round(v)) for k, v in parts.items()}
    settings = dict(model_type=config.model_type, method=method, lora_r=lora_r, lora_dropout=lora_dropout,
                    target_modules=target_modules, trainable_params=trainable_params, quantization=quantization,
                    double_quant=double_quant, dtype=dtype, batch_size=batch_size, max_length=max_length,
                    optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, device=device,
                    activation_offloading=activation_offloading, target_logits_only=target_logits_only,
                    max_forward_tokens=max_forward_tokens, device_memory=device_memory,
                    virtual_tokens=virtual_tokens, keep_best=keep_best, sized_by="layout" if shape.family == "generic" else "formula",
                    experts=shape.experts)
    gguf = gguf_file(source)
    loading = 0
    checkpoint = checkpoint_bytes(source) if gguf is None and device == "cpu" else 0
    saved_bytes = SAVED_DTYPE_BYTES.get(str(getattr(config, "dtype", None)).replace("torch.", ""))
    trained_bytes = 4 if full else s
    if checkpoint and saved_bytes and saved_bytes != trained_bytes:
        settings["loads_from"] = "checkpoint"
        loading = parts["runtime"] + checkpoint + (weights if quantization else counts["total"] * trained_bytes)
    if gguf is not None and device == "cpu":
        settings["loads_from"] = "gguf"
        load_bytes = 4 if full or dtype == "fp32" else s  # as the trainer loads it (pipeline.load_dtype)
        largest = max([shape.vocab * shape.hidden] + [lin.in_features * lin.out_features for lin in shape.linears])
        loading = (RUNTIME_BYTES[device] + counts["total"] * load_bytes + os.path.getsize(gguf) + 4 * largest
                   + GGUF_LOAD_REST)
    return Estimate(parts, {**counts, "trainable": trainable}, settings,
                    offloaded=block_inputs if activation_offloading else 0, forward_rows=forward_rows,
                    loading=int(loading))

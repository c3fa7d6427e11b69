"""The supervised fine-tuning loop: batches -> token-weighted loss -> AdamW -> checkpoints.

Loss. The loop computes the loss itself from the logits: token t predicts
label t+1, labels of -100 are ignored, and for packed rows (``position_ids``
given) the first token of each packed sequence is never a target (it cannot be
predicted from the previous sequence). One optimizer step covers
``batch_size * grad_accum`` examples split into micro-batches; its loss is

    loss = sum over every target token of the step of -log p(token) / (number of target tokens of the step)

i.e. a mean over tokens of the whole accumulated batch, not a mean of
micro-batch means, so a short row weighs as much per token as a long one and
the result does not depend on how the step is split into micro-batches.

Dtype policy. ``dtype: auto`` is bf16 where the hardware runs it natively
(CUDA: compute capability 8.0 or newer, not the emulated bf16 of a T4 or
V100; CPU: the avx512_bf16 or amx_bf16 flag) and fp32 otherwise. Under
bf16/fp16 the frozen floating-point weights are cast to that dtype, trainable
weights and the optimizer state stay fp32, and the forward runs under
autocast. fp16 also uses a gradient scaler.

Method hooks. A model (for a PeftModel: its tuner) may define
``training_regularizer() -> scalar tensor``, whose gradient is added once per
step, and ``on_optimizer_step(step, total_steps)``, called after every
optimizer step while the gradients are still there (AdaLoRA uses both). State
such hooks build up beyond the weights goes into checkpoints through
``state_for_checkpoint()`` / ``load_checkpoint_state(state)`` (see
:mod:`tsugiki.train.checkpoint`), so a resumed run ends like an uninterrupted one.

Out of memory. When a micro-batch runs out of memory, the step is retried with
the micro-batch halved (so twice as many accumulation steps): the effective
batch, and the data order, stay the same.

Across processes (``torchrun --nproc_per_node N`` or ``accelerate launch``, see
:mod:`tsugiki.train.distributed`) training is data-parallel: one optimizer step
covers ``batch_size * grad_accum * world_size`` examples, like Hugging Face's
Trainer. Every rank computes the same step plan (same seed) and takes its own
contiguous share of the step's rows; the denominator above is the step's
target-token count summed over all ranks (reduced before any backward), each
rank backprops ``loss_sum_rank / targets_all_ranks``, and the gradients are
summed over ranks. The update therefore equals a single process's with the same
effective batch up to float summation order, and every rank applies it
identically. Only rank 0 writes files (checkpoints, records, the adapter).
LoRA dropout draws the same random stream on every rank; runs with dropout are
statistically, not bitwise, equivalent to one process.

With ``fsdp: true`` (2+ processes) the weights are sharded across the ranks
(see :mod:`tsugiki.train.fsdp`); the loss, the data split and the summed
gradient are the same as above, so the adapter matches a single process's.
Because every forward and backward then runs collectives:

* every rank runs the same number of micro-batch forwards per step (and per
  evaluation); a rank with fewer rows adds zero-weighted forwards of a
  one-token batch without targets;
* the micro-batch is not halved on out of memory (ranks would disagree on the
  number of forwards): the run stops and says to lower ``batch_size``;
* checkpoints and the final adapter hold whole tensors, gathered by every rank
  and written by rank 0;
* not supported (refused up front): fp16 (the grad scaler's overflow check
  would differ per shard), methods with per-step hooks (AdaLoRA) and
  4-bit/8-bit bases (bitsandbytes' packed weights cannot be split).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..kernels.attention import fast_attention
from ..kernels.block_fused import fused_blocks
from ..kernels.target_logits import (full_logits_loss_sum as token_loss_sum, scored_positions, shifted_targets,
                                      split_causal_lm, target_logits_loss_sum)
from ..data import IGNORE_INDEX, Collator, PackedCollator, batch_plan, pack, pad_token_id_for
from ..fileio import open_up_private_files
from .. import plan
from ..plan import cpu_has_native_bf16
from ..inject import bnb_linear_types
from ..quant import no_cpu_repacking
from . import distributed, fsdp
from .checkpoint import (CARD_FILE, check_resume_compatible, is_our_card, latest_checkpoint, load_checkpoint,
                         method_hook, record_outputs, recorded_outputs, release_run_lock, resolve_resume,
                         rng_state, rotate_checkpoints, save_checkpoint, TRAINABLE_FILE, trainable_state,
                         user_files)
from .config import ConfigError, TrainConfig
from .neftune import neftune
from .records import files_size, make_recorder, peak_memory_bytes, plot_loss_curve, write_summary
from .schedules import make_scheduler

log = logging.getLogger("tsugiki.train")

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What ``Trainer.train()`` returns: where the outputs are and the final summary numbers."""
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- small policies
FSDP_FP16_REFUSAL = ("fsdp: true does not support dtype: fp16 (the gradient scaler would check each shard for "
                     "overflow on its own and ranks could disagree on skipping a step); use bf16 or fp32")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``dtype: name`` on ``device`` (see the module docstring for 'auto')."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


class TrainingDiverged(ValueError):
    """A step's loss or gradient was NaN or infinite: the run stops before it corrupts the weights."""


def apply_dtype_policy(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating weights -> ``dtype``; trainable weights -> fp32. Quantized (integer) weights are left alone.

    On a 4-bit/8-bit base, frozen fp32 vectors (norm weights, biases) stay fp32:
    ``prepare_model_for_kbit_training`` put these small, numerically sensitive
    ones there on purpose. Frozen fp32 matrices it upcast (embeddings, an
    unquantized output head) go to ``dtype`` like any frozen weight.
    """
    kbit = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        if kbit and not param.requires_grad and param.dtype == torch.float32 and param.ndim < 2:
            continue
        target = torch.float32 if param.requires_grad else dtype
        if param.dtype != target:
            param.data = param.data.to(target)


def _find_attr(model: nn.Module, name: str):
    """``model.name``, looking through PEFT-style wrappers to the base model."""
    for candidate in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if candidate is not None and hasattr(candidate, name):
            return getattr(candidate, name)
    return None


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Non-reentrant activation checkpointing; input embeddings made to require grad so frozen bases still backprop.

    ``offload``: the layers' inputs, which checkpointing keeps, are held in pinned
    host memory (transformers' ``activation_checkpointing_enable(offload=True)``:
    torch's ``save_on_cpu`` around each checkpointed layer).
    """
    enable = _find_attr(model, "activation_checkpointing_enable")  # transformers >= 5 name
    if offload and (enable is None or "offload" not in inspect.signature(enable).parameters):
        import transformers

        raise ConfigError(f"activation_offloading: transformers {transformers.__version__} cannot offload checkpointed "
                          "activations (no activation_checkpointing_enable(offload=...)); upgrade transformers "
                          "or set activation_offloading: false")
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, **({"offload": True} if offload else {}))
    else:
        enable = _find_attr(model, "gradient_checkpointing_enable")
        if enable is None:
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable(); "
                             "set gradient_checkpointing: false")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    require = _find_attr(model, "enable_input_require_grads")
    if require is not None:
        require()


def check_fsdp_world(config: TrainConfig) -> None:
    """``fsdp: true`` needs a process group of 2+ ranks (call after ``init_distributed``)."""
    if config.fsdp and distributed.world_size() < 2:
        raise ConfigError("fsdp: true needs torchrun --nproc_per_node 2+ (this run is a single process); "
                          "start it with torchrun, or set fsdp: false")


def auto_forward_tokens(model: nn.Module, dtype: torch.dtype, device: torch.device = torch.device("cpu"),
                        gradient_checkpointing: bool = False, offload: bool = False,
                        full_logits: int = 0) -> int:
    """``max_forward_tokens: auto``: tokens whose saved activations are a quarter of a reference size.

    :func:`tsugiki.plan.auto_forward_budget` for the model's shape (as DoRA when
    an adapted layer has DoRA magnitudes, at its largest dropout; ``full_logits``:
    the fp32 copies of the whole vocabulary's logits the loss holds, 0 under the
    chunked output layer); 0 (no limit) for architectures the plan cannot size.
    A row longer than the budget still runs whole, alone.

    The reference is the frozen weights' bytes on the CPU, so the weights dominate
    the peak there (one short row per forward costs little speed on a CPU). On a
    CUDA device it is the device memory this process can have: free memory plus
    what torch already holds, at most the device's total (other processes' memory
    is not counted; it is what the memory plan calls free before loading). Each
    forward there pays a fixed launch cost that makes short forwards several
    times slower per token, and an out-of-memory error halves the micro-batch anyway.
    """
    config = _find_attr(model, "config")
    try:
        shape = plan.model_shape(plan.load_config(config))
    except Exception:  # an architecture the estimate has no formula for
        return 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reference = min(total, free + torch.cuda.memory_reserved(device))
    else:
        reference = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    s = torch.tensor([], dtype=dtype).element_size()
    dora_dropouts = [dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                     for module in model.modules() if len(getattr(module, "lora_magnitude_vector", ())) > 0
                     for dropout in module.lora_dropout.values()]
    return plan.auto_forward_budget(shape, s, reference, device.type, gradient_checkpointing, offload,
                                    dora=bool(dora_dropouts), dora_dropout=max(dora_dropouts, default=0.0),
                                    full_logits=full_logits)


def split_rows(examples: Sequence[dict], max_rows: int, max_tokens: int,
               pad_to_multiple_of: Optional[int] = None) -> list[list[dict]]:
    """Consecutive groups of at most ``max_rows`` rows whose padded size (rows x longest, the longest
    rounded up to ``pad_to_multiple_of`` as the collator pads it) is at most ``max_tokens`` (0 = no
    token limit); a row longer than ``max_tokens`` goes alone."""
    multiple = pad_to_multiple_of or 1
    groups: list[list[dict]] = []
    longest = 0
    for example in examples:
        n = len(example["input_ids"])
        group = groups[-1] if groups else None
        padded = -(-max(longest, n) // multiple) * multiple
        if group is not None and len(group) < max_rows and (
                not max_tokens or (len(group) + 1) * padded <= max_tokens):
            group.append(example)
            longest = max(longest, n)
        else:
            groups.append([example])
            longest = n
    return groups


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW(betas=(0.9, 0.999), eps=1e-8) over trainable parameters, as ``config.optimizer`` names it.

    ``adamw``: torch's, fused when the device supports it. ``adamw_8bit`` /
    ``paged_adamw`` / ``paged_adamw_8bit``: bitsandbytes' (8-bit block-wise
    states for tensors of 4096+ elements, 32-bit below; paged states live in CUDA
    unified memory). Weight decay applies to matrices only: 1-D parameters
    (biases, norm weights, DoRA's magnitudes, LLaMA-Adapter's gates) get none.
    """
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (nothing with requires_grad); "
                         "wrap it with get_peft_model(...) or unfreeze the weights to train")
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer in BNB_OPTIMIZERS:
        from ..quant import require_bitsandbytes

        if config.fsdp:
            raise ConfigError(f"optimizer: {config.optimizer} does not take FSDP's sharded parameters; "
                              "use optimizer: adamw with fsdp: true")
        bnb = require_bitsandbytes(f"optimizer: {config.optimizer}")
        return getattr(bnb.optim, BNB_OPTIMIZERS[config.optimizer])(groups, lr=config.learning_rate)
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused needs a supported device/dtype
        return torch.optim.AdamW(groups, lr=config.learning_rate)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


# ---------------------------------------------------------------------- batches and loss
def count_targets(batch: Batch) -> int:
    return int((shifted_targets(batch["labels"], batch.get("position_ids")) != IGNORE_INDEX).sum())


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens of a batch; what tokens/s counts."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return batch["input_ids"].numel()  # packed rows carry no padding mask (or a 4-D block mask)


# ---------------------------------------------------------------------- the trainer
def _check_examples(examples: Sequence[dict], name: str) -> None:
    """Refuse rows the collators cannot batch, naming the first such row."""
    for i, e in enumerate(examples):
        missing = [k for k in ("input_ids", "labels") if not isinstance(e, Mapping) or k not in e]
        if missing:
            raise ValueError(
                f"{name}[{i}] has no {' or '.join(repr(k) for k in missing)}: each row needs 'input_ids' and "
                "'labels' (-100 where no loss is taken; a copy of input_ids trains on every token), as "
                "tsugiki.data.build_dataset makes them")
        if len(e["input_ids"]) != len(e["labels"]):
            raise ValueError(f"{name}[{i}]: 'input_ids' has {len(e['input_ids'])} tokens but 'labels' "
                             f"{len(e['labels'])}; they must be the same length")


class Trainer:
    """Train ``model`` on tokenized examples according to ``config``.

    Args:
        model: causal LM (possibly a PEFT wrapper); ``forward(input_ids=, attention_mask=, position_ids=)``
            returns ``.logits``. Trainable parameters are those with ``requires_grad``. It stays on its device.
        config: a TrainConfig.
        train_examples: sequence of dicts with ``input_ids`` and ``labels`` (lists of ints, -100 = no loss),
            e.g. from ``tsugiki.data.build_dataset``. With ``config.packing`` they are packed here
            (``tsugiki.data.pack``, ``max_length`` tokens per pack); one "example" is then one pack.
        eval_examples: same shape, never packed, for eval loss / perplexity (optional).
        collate_fn: list of rows -> batch of tensors (``input_ids``, ``labels``, and ``attention_mask``
            or ``position_ids``). Default: ``tsugiki.data.Collator`` (right padding), or
            ``PackedCollator`` (one padding-free row) with packing. Eval always uses ``Collator``.
        tokenizer: saved next to the final adapter when given; supplies the pad id.
        callbacks: functions ``f(trainer, record)`` called after every optimizer step; one returning
            False stops the run after that step, which then saves and reports as at its end (under
            several processes, on every rank when one returns False).
        progress: show the tqdm bar.

    Data order: each epoch is cut into optimizer steps of ``batch_size * grad_accum * world_size``
    rows (``examples_per_step``; world_size = 1 in a single process) by ``tsugiki.data.batch_plan``
    (a pure function of seed and epoch). Each rank takes a contiguous share of at most
    ``batch_size * grad_accum`` of a step's rows and cuts it into micro-batches of ``batch_size``;
    a checkpoint records (epoch, step within epoch), so resume skips exactly.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_examples: Sequence[dict],
                 eval_examples: Optional[Sequence[dict]] = None, collate_fn: Optional[Callable] = None,
                 tokenizer=None, callbacks: Sequence[Callable] = (), progress: bool = True):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if len(train_examples) == 0:
            raise ValueError("train_examples is empty: nothing to train on (check `data` and `max_rows`)")
        if config.eval_steps and not eval_examples:
            raise config.no_eval_rows_error()
        _check_examples(train_examples, "train_examples")
        if eval_examples:
            _check_examples(eval_examples, "eval_examples")
        self.model, self.config, self.tokenizer = model, config, tokenizer
        pad = pad_token_id_for(tokenizer) if tokenizer is not None else 0
        if config.packing:
            train_examples = pack(train_examples, config.max_length)
        self.train_examples, self.eval_examples = train_examples, eval_examples
        multiple = config.pad_to_multiple_of if config.pad_to_multiple_of > 1 else None
        self.pad_multiple = None if config.packing or collate_fn is not None else multiple  # how rows are padded
        self.collate_fn = collate_fn or (PackedCollator(pad) if config.packing else Collator(pad, multiple))
        self.eval_collate_fn = Collator(pad, multiple) if config.packing else self.collate_fn
        self.callbacks = list(callbacks)
        distributed.init_distributed()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        check_fsdp_world(config)
        self.fsdp = bool(config.fsdp)
        self.progress = progress and self.rank == 0  # one bar and one summary, from rank 0
        self.rows_per_rank = config.batch_size * config.grad_accum
        self.examples_per_step = self.rows_per_rank * self.world_size
        self.micro_batch_size = config.batch_size
        self.steps_per_epoch = math.ceil(len(train_examples) / self.examples_per_step)
        self.total_steps = (config.max_steps if config.max_steps > 0
                            else max(1, math.ceil(config.num_epochs * self.steps_per_epoch - 1e-9)))
        self.device = next(model.parameters()).device
        self._lengths = [len(e["input_ids"]) for e in train_examples]
        self._plan: tuple[int, list[list[int]]] = (-1, [])

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank now (grows when the micro-batch is halved on OOM)."""
        return math.ceil(self.rows_per_rank / self.micro_batch_size)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Row indices of each optimizer step of ``epoch``: a fixed function of (seed, epoch)."""
        if self._plan[0] != epoch:
            self._plan = (epoch, batch_plan(self._lengths, self.examples_per_step, self.config.group_by_length,
                                            shuffle=self.config.shuffle, seed=self.config.seed, epoch=epoch))
        return self._plan[1]

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    def _forward_loss_sum(self, batch: Batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self._pass_use_cache:
            inputs["use_cache"] = False  # packed position_ids are only honoured without a KV cache
        parts = self._parts
        scored = (batch["scored_index"], batch["scored_targets"]) if "scored_index" in batch else None
        with self._autocast():
            if parts is not None:  # the output layer only where a token is scored
                return target_logits_loss_sum(*parts, inputs, batch["labels"], scored)
            out = self.model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return token_loss_sum(logits, batch["labels"], batch.get("position_ids"))

    def _on_device(self, batch: Batch) -> Batch:
        """``batch`` on the model's device, its scored positions found on the CPU first.

        Nothing here waits for the GPU (pinned, non-blocking copies; no data-dependent
        shape on the device), so the next forward is queued while the last one runs.
        """
        if self._parts is not None:
            batch = dict(batch)
            batch["scored_index"], batch["scored_targets"] = scored_positions(batch["labels"],
                                                                              batch.get("position_ids"))
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def _micro_batches(self, examples: Sequence[dict]) -> list[Batch]:
        return [self.collate_fn(group) for group in split_rows(examples, self.micro_batch_size, self.forward_tokens,
                                                               self.pad_multiple)]

    def accumulate_gradients(self, examples: list[dict], step_targets: Optional[int] = None,
                             forwards: int = 0) -> tuple[float, int, int]:
        """Forward/backward over ``examples`` in micro-batches; adds d(loss_sum / step_targets)/d(params).

        ``step_targets`` is the target-token count of the whole step (all ranks); default: the count
        of ``examples`` themselves. ``forwards``: run at least this many forwards, padding with
        zero-weighted one-token batches (under FSDP every rank must run as many as the busiest one).
        Returns this call's (loss_sum, target count, token count), padding not counted.
        """
        batches = self._micro_batches(examples)
        n_targets = sum(count_targets(b) for b in batches)
        # A step without targets gives zero gradients, not NaN.
        denom = max(n_targets if step_targets is None else step_targets, 1)
        loss_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in batches:
            n_tokens += count_tokens(batch)
            batch = self._on_device(batch)
            loss = self._forward_loss_sum(batch)
            scaled = loss / denom
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach()  # read once per step: a read per forward would wait for the GPU
        for _ in range(forwards - len(batches)):
            # Gradients of exactly zero, but the same FSDP all-gathers and reduce-scatters as a real batch.
            padding = self._padding_batch(self.train_examples, self.collate_fn)
            loss = self._forward_loss_sum(self._on_device(padding)) * 0.0
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return float(loss_sum), n_targets, n_tokens

    def _padding_batch(self, examples: Sequence[dict], collate: Callable) -> Batch:
        """A one-token batch without targets, built from the first of ``examples`` (see :func:`fsdp.zero_weight_batch`)."""
        return fsdp.zero_weight_batch(examples[0], collate)

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """One optimizer step over ``examples`` (this rank's share of the effective batch).

        Halves the micro-batch on OOM and retries (per rank: the micro-batch size does not change
        the result). Returns the step's loss sum, target and token counts summed over all ranks.
        """
        step_targets, forwards = None, 0
        if self.world_size > 1:
            # Every rank must divide by the same step-wide count, known before the first backward.
            batches = self._micro_batches(examples)
            local = sum(count_targets(b) for b in batches)
            # Under FSDP each rank also reports its number of micro-batches (slot `rank` of a
            # one-hot vector, so one sum gives everyone's), to pad to the largest.
            counts = [len(batches) if r == self.rank else 0 for r in range(self.world_size)] if self.fsdp else []
            sums = distributed.all_reduce_sum([local, *counts])
            step_targets = int(sums[0])
            forwards = int(max(sums[1:])) if self.fsdp else 0
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                loss_sum, n_targets, n_tokens = self.accumulate_gradients(examples, step_targets, forwards)
                break
            except Exception as err:
                if not is_oom(err):
                    raise
                if self.fsdp:  # the other ranks are inside collectives this rank will not join
                    raise RuntimeError(
                        f"out of memory under fsdp with a micro-batch of {self.micro_batch_size} on rank {self.rank}; "
                        "the micro-batch is not halved under FSDP (every rank must run the same forwards): lower "
                        "batch_size (and raise grad_accum), lower max_length, set gradient_checkpointing: true, "
                        "or add processes") from err
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro_batch_size == 1:
                    raise RuntimeError(
                        "out of memory with a micro-batch of 1 example; lower max_length, set "
                        "gradient_checkpointing: true, or use quantization: 4bit") from err
                self.micro_batch_size = max(1, self.micro_batch_size // 2)
                self._say(f"out of memory: micro-batch halved to {self.micro_batch_size}, "
                          f"grad_accum now {self.grad_accum} (effective batch stays {self.examples_per_step})")
        if self.world_size > 1:
            if not self.fsdp:  # under FSDP the backward already reduce-scattered (summed) each shard
                distributed.all_reduce_grads(self.trainable)  # now every rank holds the whole step's gradient
            loss_sum, n_tokens = distributed.all_reduce_sum([loss_sum, n_tokens])
            n_targets, n_tokens = step_targets, int(n_tokens)
        regularizer = method_hook(self.model, "training_regularizer")
        if regularizer is not None:  # e.g. AdaLoRA's orthogonality penalty, once per step
            with self._autocast():
                penalty = regularizer()
            (self.scaler.scale(penalty) if self.scaler is not None else penalty).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        total_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if fsdp.is_dtensor(total_norm):  # from sharded gradients: a DTensor, reduced over ranks on demand
            total_norm = total_norm.full_tensor()
        grad_norm = float(total_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        if self.scaler is None and not (math.isfinite(grad_norm) and math.isfinite(float(loss_sum))):
            # fp16's scaler skips such a step by itself; anywhere else it would write NaN into every weight
            raise TrainingDiverged(
                f"training diverged at step {self.state['step'] + 1}: loss "
                f"{float(loss_sum) / max(n_targets, 1):.4g}, gradient norm {grad_norm:.4g}, so the step was not "
                "taken and nothing more is saved. Lower "
                f"learning_rate (this step's: {lr:.3g}) or raise warmup_steps, check the data, and start again "
                "(overwrite: true); checkpoints already saved are intact")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        on_step = method_hook(self.model, "on_optimizer_step")
        if on_step is not None:  # e.g. AdaLoRA re-allocating its rank budget; gradients are still there
            on_step(self.state["step"] + 1, self.total_steps)
        return {"loss_sum": loss_sum, "targets": n_targets, "tokens": n_tokens, "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted eval loss over ``eval_examples`` and perplexity exp(loss).

        Across processes each rank scores a contiguous share of the rows and the sums are added up.
        """
        if not self.eval_examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        total, targets = 0.0, 0
        rows = distributed.shard(self.eval_examples, self.rank, self.world_size)
        m = self.micro_batch_size
        # Rank 0's share is the largest (distributed.shard), so its count of forwards is everyone's under FSDP.
        forwards = math.ceil(math.ceil(len(self.eval_examples) / self.world_size) / m) if self.fsdp else 0
        try:
            with no_cpu_repacking(self.model):  # evaluation changes nothing the next steps compute
                for s in range(0, len(rows), m):
                    batch = self.eval_collate_fn(list(rows[s:s + m]))
                    targets += count_targets(batch)
                    total += float(self._forward_loss_sum(self._on_device(batch)))
                for _ in range(forwards - math.ceil(len(rows) / m)):  # the same collectives as the busiest rank
                    padding = self._padding_batch(self.eval_examples, self.eval_collate_fn)
                    self._forward_loss_sum(self._on_device(padding))
        finally:
            self.model.train(was_training)
        total, targets = distributed.all_reduce_sum([total, targets])
        loss = total / max(targets, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}

    # ------------------------------------------------------------------ setup
    def _say(self, message: str) -> None:
        recorder = getattr(self, "recorder", None)
        recorder.write(message) if recorder is not None else print(message)

    def prepare(self) -> Optional[str]:
        """Check output_dir, seed, apply the dtype policy, build optimizer/scheduler, load a checkpoint to resume.

        Called by ``train()``; call it yourself only to inspect the set-up. Returns the checkpoint resumed from.
        """
        if getattr(self, "_prepared", False):
            return self._resumed_from
        cfg = self.config
        resume_from = resolve_resume(cfg)
        # Files of the user's in output_dir, which the final save must not replace (resolve_resume refused
        # those under the names a run writes; this also guards a tokenizer's unusual file names).
        self._user_files = user_files(cfg.output_dir) if self.rank == 0 else set()
        set_seed(cfg.seed)
        self.compute_dtype = resolve_dtype(cfg.dtype, self.device)
        apply_dtype_policy(self.model, self.compute_dtype)
        offload = cfg.activation_offloading and self.device.type == "cuda"
        if cfg.activation_offloading and not offload and self.rank == 0:
            self._say(f"activation_offloading: ignored on {self.device.type}: the activations already live in "
                      "host memory")
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, offload=offload)
        model_config = _find_attr(self.model, "config")
        self._pass_use_cache = model_config is not None and hasattr(model_config, "use_cache")
        if self._pass_use_cache:
            self._use_cache_before = (model_config, model_config.use_cache)  # put back when training ends
            model_config.use_cache = False  # no KV cache while training
        self._parts = split_causal_lm(self.model) if cfg.target_logits_only else None
        vocab_head = _find_attr(self.model, "get_output_embeddings")
        whole_vocabulary = self._parts is None and vocab_head is not None and vocab_head() is not None
        logit_copies = plan.full_logit_copies(model_config) if whole_vocabulary else 0  # held by the loss
        self.forward_tokens = (auto_forward_tokens(self.model, self.compute_dtype, self.device,
                                                   cfg.gradient_checkpointing, offload, logit_copies)
                               if cfg.max_forward_tokens == "auto" else cfg.max_forward_tokens)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_params(self.trainable)  # every rank starts from rank 0's weights
        if self.fsdp:
            self._shard()
        local, full = fsdp.param_bytes(self.model)
        self.param_bytes = full
        # Each rank's resident parameter bytes, rank by rank (a one-hot sum: one collective).
        self.local_param_bytes = [int(b) for b in distributed.all_reduce_sum(
            [local if r == self.rank else 0 for r in range(self.world_size)])]
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, cfg.warmup_steps, self.total_steps)
        if cfg.warmup_steps >= self.total_steps and distributed.is_main():
            log.warning("warmup_steps=%d is not below the run's %d steps: the learning rate never reaches "
                        "learning_rate=%g; lower warmup_steps (e.g. to %d)", cfg.warmup_steps, self.total_steps,
                        cfg.learning_rate, max(1, self.total_steps // 10))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_index": 0, "tokens_seen": 0,
                                      "train_time_s": 0.0, "window": _new_window(), "last": {}}
        if resume_from is not None:
            check_resume_compatible(resume_from, cfg, self.world_size)
            saved = load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, self.scaler)
            saved.pop("examples_per_step", None)  # checked above; the trainer recomputes it
            if saved["step"] > self.total_steps:
                raise ConfigError(
                    f"cannot resume from {resume_from}: it is at step {saved['step']}, past this run's "
                    f"{self.total_steps} steps (max_steps / num_epochs), so nothing would train and the step-"
                    f"{saved['step']} adapter would be saved as this run's; raise max_steps to at least "
                    f"{saved['step']}, or start over with another output_dir (or overwrite: true)")
            self.state.update(saved)
            # The saved lr followed the old schedule; recompute it in case max_steps changed.
            for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            self.micro_batch_size = min(saved.get("micro_batch_size", cfg.batch_size), cfg.batch_size)
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            cfg.save(cfg.output_dir)
            if resume_from is not None and resume_from == latest_checkpoint(cfg.output_dir):
                # A run stopped between a checkpoint and the deletion of the oldest one left one too many.
                rotate_checkpoints(cfg.output_dir, cfg.save_total_limit)
        self._prepared, self._resumed_from = True, resume_from
        return resume_from

    def _shard(self) -> None:
        """Shard the model with FSDP2 (called by ``prepare`` after the dtype policy), or refuse what it cannot run."""
        if self.compute_dtype == torch.float16:
            raise ConfigError(FSDP_FP16_REFUSAL)
        kbit = bnb_linear_types()
        if kbit and any(isinstance(m, kbit) for m in self.model.modules()):
            raise ConfigError("fsdp: true cannot shard a 4-bit/8-bit base (FSDP would split bitsandbytes' packed "
                              "weights and lose their quantization state); set fsdp: false")
        hooks = [n for n in ("training_regularizer", "on_optimizer_step") if method_hook(self.model, n) is not None]
        if hooks:
            raise ConfigError(f"fsdp: true does not support methods with per-step hooks ({', '.join(hooks)}: "
                              f"method {self.config.method!r}); set fsdp: false")
        if self._parts is not None and fsdp.tied_outside(self.model, self._parts[1]):
            # A head tied to the input embeddings cannot be a unit apart from them: full logits instead
            # (the same loss and gradients, computed for every position).
            self._parts = None
        fsdp.shard_model(self.model, entry_points=self._parts or ())
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _checkpoint(self, step: int) -> Optional[str]:
        """Rank 0 writes ``checkpoint-{step}``; others return None.

        Without FSDP every rank holds the same weights and only rank 0 does anything; under FSDP
        every rank first gathers whole tensors from the shards (collectives), then rank 0 writes.
        """
        trainable = optimizer_state = None
        rng_states = distributed.gather_objects(rng_state())  # a collective: before rank 0 goes its own way
        with contextlib.ExitStack() as stack:
            if self.fsdp:
                gathered = stack.enter_context(fsdp.gathered_for_save(self.model))
                trainable = {n: gathered[n] for n, p in self.model.named_parameters() if p.requires_grad}
                optimizer_state = fsdp.full_optimizer_state(self.optimizer)
            if self.rank != 0:
                return None
            state = {k: v for k, v in self.state.items() if k != "step"}
            state["micro_batch_size"] = self.micro_batch_size
            state["examples_per_step"] = self.examples_per_step
            return save_checkpoint(self.config.output_dir, step, self.model, self.optimizer, self.scheduler,
                                   self.config, state, self.scaler, trainable=trainable,
                                   optimizer_state=optimizer_state, rng_states=rng_states)

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run (or resume) training to ``total_steps``; returns the output folder and summary metrics.

        While it runs, ``output_dir`` holds a lock file naming this process, so a second run into the
        same folder is refused instead of mixing its files with this one's.
        """
        try:
            return self._train()
        finally:
            if self.rank == 0:
                release_run_lock(self.config.output_dir)

    def _train(self) -> TrainResult:
        cfg = self.config
        resume_from = self.prepare()
        st = self.state
        self.recorder = make_recorder(cfg.output_dir, self.total_steps, st["step"], cfg.tensorboard, self.progress,
                                      rank=self.rank, earlier_run=os.path.dirname(resume_from) if resume_from else None)
        for note in self.recorder.notes:
            self._say(note)
        if resume_from and self.rank == 0:
            self._say(f"resuming from {resume_from} (step {st['step']} of {self.total_steps})")
            if self._patience_spent():
                self._say(f"early stopping ended this run at step {st['step']} (early_stopping_patience="
                          f"{cfg.early_stopping_patience}); raise it to train on")
        was_training = self.model.training
        self.model.train()
        eval_metrics: dict[str, float] = dict(st["last"].get("eval", {}))
        try:
            with neftune(self.model, cfg.neftune_alpha), fused_blocks(self.model, cfg.fused_blocks), \
                    fast_attention(self.model, cfg.fast_attention):
                while st["step"] < self.total_steps and not self._patience_spent():
                    plan = self.epoch_plan(st["epoch"])
                    t0 = time.perf_counter()
                    rows = distributed.shard(plan[st["batch_index"]], self.rank, self.world_size)
                    out = self.train_step([self.train_examples[i] for i in rows])
                    dt = time.perf_counter() - t0
                    st["step"] += 1
                    st["batch_index"] += 1
                    if st["batch_index"] >= len(plan):  # the position saved is that of the next batch
                        st["epoch"], st["batch_index"] = st["epoch"] + 1, 0
                    st["tokens_seen"] += out["tokens"]
                    st["train_time_s"] += dt
                    window = st["window"]
                    for key in ("loss_sum", "targets", "tokens"):
                        window[key] += out[key]
                    window["time"] += dt
                    record = self._maybe_record(out)
                    early_stop = False
                    if record.get("eval_loss") is not None:
                        eval_metrics = {k: record[k] for k in ("eval_loss", "eval_ppl")}
                        st["last"]["eval"] = eval_metrics
                        early_stop = self._note_evaluation(eval_metrics)  # the same loss, so verdict, on every rank
                    self.recorder.advance()
                    if cfg.save_steps and (st["step"] % cfg.save_steps == 0 or st["step"] == self.total_steps
                                           or early_stop):
                        self._checkpoint(st["step"])
                    # A callback returning False stops the run after this step (it still saves and reports);
                    # on any rank: the others stop with it instead of waiting in the next step's collectives.
                    stop = any([callback(self, record) is False for callback in self.callbacks])  # each one runs
                    if self.callbacks and distributed.is_distributed():
                        stop = distributed.all_reduce_sum([float(stop)])[0] > 0
                    if early_stop and st["step"] < self.total_steps:
                        best = st["best"]
                        if self.rank == 0:
                            self._say(f"early stopping after step {st['step']}: {st['evals_since_best']} "
                                      f"evaluations without an eval loss below {best['eval_loss']:.4f} "
                                      f"(step {best['step']})")
                        break
                    if stop:
                        self._say(f"stopped by a callback after step {st['step']}")
                        break
            if self.eval_examples and (not eval_metrics or st["last"].get("eval_step") != st["step"]):
                eval_metrics = self.evaluate()
                self.recorder.log({"step": st["step"], "epoch": self._epoch_float(), **eval_metrics})
                self._note_evaluation(eval_metrics)
            eval_metrics = self._restore_best(eval_metrics)
            self._restore_use_cache()  # before the final save: a saved config.json keeps the model's own setting
            adapter_files = self._save_final()
        finally:
            self._restore_use_cache()
            self.recorder.close()
            self.model.train(was_training)
        summary = self._summarise(resume_from, eval_metrics, adapter_files)
        distributed.barrier()  # when train() returns on any rank, rank 0's files are all in place
        return TrainResult(cfg.output_dir, summary)

    def _note_evaluation(self, metrics: dict[str, float]) -> bool:
        """Track the evaluation with the lowest eval loss (for keep_best and early_stopping_patience);
        True when early stopping ends the run here.

        ``state["best"]`` holds its step and metrics, and with keep_best a CPU copy of the trainable
        weights (saved in checkpoints with the rest of the state, so a resumed run keeps it).
        """
        cfg, st = self.config, self.state
        if not (cfg.keep_best or cfg.early_stopping_patience):
            return False
        best = st.get("best")
        # A run resumed with keep_best newly on has a best without weights: the next evaluation starts over.
        if best is None or metrics["eval_loss"] < best["eval_loss"] or (cfg.keep_best and best["weights"] is None):
            weights = None
            if cfg.keep_best:
                weights = {n: p.detach().to("cpu", copy=True)
                           for n, p in self.model.named_parameters() if p.requires_grad}
            st["best"] = {"step": st["step"], **metrics, "weights": weights}
            st["evals_since_best"] = 0
            return False
        st["evals_since_best"] = st.get("evals_since_best", 0) + 1
        return self._patience_spent()

    def _patience_spent(self) -> bool:
        """Whether early stopping has ended the run: also true of a run resumed from the checkpoint written
        when it stopped, so a rerun of the command does not train on (a raised patience does)."""
        patience = self.config.early_stopping_patience
        return 0 < patience <= self.state.get("evals_since_best", 0)

    def _restore_best(self, eval_metrics: dict[str, float]) -> dict[str, float]:
        """With keep_best, put the best evaluation's weights back when a later step's are the model's;
        returns the metrics of the weights that will be saved."""
        best = self.state.get("best")
        self._saved_step = self.state["step"]
        if not self.config.keep_best or not best or best["weights"] is None or best["step"] == self.state["step"]:
            return eval_metrics
        self._saved_step = best["step"]
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(best["weights"][name])
        if self.rank == 0:
            self._say(f"keep_best: saving the weights of step {best['step']} (eval loss {best['eval_loss']:.6g}); "
                      f"the last evaluation, at step {self.state['step']}, gave {eval_metrics['eval_loss']:.6g}")
        return {"eval_loss": best["eval_loss"], "eval_ppl": best["eval_ppl"]}

    def _save_tokenizer(self, folder: str) -> None:
        """Saved as it came (a left-padding tokenizer stays so, for batched generation), not as training pads."""
        side = getattr(self.tokenizer, "padding_side", None)
        saved_side = getattr(self.tokenizer, "saved_padding_side", side)
        if saved_side != side:
            self.tokenizer.padding_side = saved_side
        try:
            self.tokenizer.save_pretrained(folder)
        finally:
            if saved_side != side:
                self.tokenizer.padding_side = side

    def _restore_use_cache(self) -> None:
        config, value = self.__dict__.pop("_use_cache_before", (None, None))
        if config is not None:
            config.use_cache = value

    def _epoch_float(self) -> float:
        return round(self.state["epoch"] + self.state["batch_index"] / self.steps_per_epoch, 4)

    def _maybe_record(self, out: dict) -> dict[str, Any]:
        cfg, st = self.config, self.state
        step = st["step"]
        record: dict[str, Any] = {"step": step, "epoch": self._epoch_float()}
        if step % cfg.logging_steps == 0 or step == self.total_steps:
            w = st["window"]
            record.update(loss=w["loss_sum"] / max(w["targets"], 1), lr=out["lr"],
                          grad_norm=out["grad_norm"], tokens_per_s=w["tokens"] / max(w["time"], 1e-9))
            if self.micro_batch_size != cfg.batch_size:
                record.update(micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum)
            st["last"]["loss"] = record["loss"]
            st["window"] = _new_window()
        if self.eval_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == self.total_steps):
            record.update(self.evaluate())
            st["last"]["eval_step"] = step
        if len(record) > 2:
            self.recorder.log(record)
        return record

    def _save_final(self) -> list[str]:
        """Rank 0 saves the adapter (and tokenizer) into output_dir; returns the adapter files ([] elsewhere).

        Under FSDP every rank first gathers the adapter's whole tensors (collectives).
        """
        with contextlib.ExitStack() as stack:
            gathered = stack.enter_context(fsdp.gathered_for_save(self.model)) if self.fsdp else None
            if self.rank != 0:
                return []
            trainable = None
            if gathered is not None:
                trainable = {n: gathered[n] for n, p in self.model.named_parameters() if p.requires_grad}
            return self._write_final(trainable)

    def _write_final(self, trainable: Optional[dict[str, torch.Tensor]] = None) -> list[str]:
        """Save the adapter (and tokenizer) into output_dir via a temporary folder; returns the adapter files.

        A file of the user's is never replaced: a README.md without tsugiki's card marker stays (no card
        is written), as does any file that was in output_dir before the run and is not an earlier run's.
        """
        out = self.config.output_dir
        kept = set(getattr(self, "_user_files", ()))
        tmp = os.path.join(out, ".final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "model"))
        try:
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(os.path.join(tmp, "model"))
            else:
                from safetensors.torch import save_file
                save_file(trainable if trainable is not None else trainable_state(self.model),
                          os.path.join(tmp, "model", TRAINABLE_FILE))
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self._save_tokenizer(os.path.join(tmp, "tokenizer"))
            open_up_private_files(tmp)
            # Recorded before anything moves, so that a later overwrite removes these and nothing else.
            def users(name: str) -> bool:  # a file of the user's in the way: it stays, ours is not written
                dest = os.path.join(out, name)
                return os.path.lexists(dest) and (name in kept or (name == CARD_FILE and not is_our_card(dest)))

            # Recorded before anything moves, so that a later overwrite removes these and nothing else.
            written = {name for sub in ("tokenizer", "model") if os.path.isdir(os.path.join(tmp, sub))
                       for name in os.listdir(os.path.join(tmp, sub)) if not users(name)}
            record_outputs(out, sorted(written | (recorded_outputs(out) or set())))
            adapter = []
            for sub in ("tokenizer", "model"):  # model last, so its files win any name clash
                src = os.path.join(tmp, sub)
                for name in sorted(os.listdir(src)) if os.path.isdir(src) else []:
                    dest = os.path.join(out, name)
                    if users(name):
                        if name != CARD_FILE:  # a user's README simply stays the card; anything else is news
                            self._say(f"kept {dest}: it was there before this run and is not an earlier "
                                      f"run's, so the {name} saved with the {sub} was not written")
                        continue
                    if os.path.isdir(dest) and not os.path.isdir(os.path.join(src, name)):
                        raise IsADirectoryError(f"cannot save {name} into {out}: a folder of that name is in the way")
                    if os.path.isdir(dest):
                        shutil.rmtree(dest)
                    os.replace(os.path.join(src, name), dest)
                    if sub == "model":
                        adapter.append(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return adapter

    def _summarise(self, resume_from, eval_metrics, adapter_files) -> dict[str, Any]:
        st, cfg = self.state, self.config
        summary = {
            "steps": st["step"],
            "epochs": self._epoch_float(),
            "train_time_s": st["train_time_s"],
            "tokens": st["tokens_seen"],
            "tokens_per_s": st["tokens_seen"] / max(st["train_time_s"], 1e-9),
            "train_loss": st["last"].get("loss"),
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_ppl": eval_metrics.get("eval_ppl"),
            "best_step": st["best"]["step"] if st.get("best") else None,  # lowest eval loss, when tracked
            "saved_step": self._saved_step,  # whose weights the adapter holds: best_step with keep_best
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_max_rss",
            "adapter_size_bytes": files_size(adapter_files),
            "adapter_files": [os.path.basename(p) for p in adapter_files],
            "trainable_params": sum(p.numel() for p in self.trainable),
            "dtype": str(self.compute_dtype).replace("torch.", ""),
            "effective_batch": self.examples_per_step,
            "world_size": self.world_size,
            "fsdp": self.fsdp,
            "param_bytes": self.param_bytes,
            "local_param_bytes": self.local_param_bytes,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "resumed_from": resume_from,
            "output_dir": cfg.output_dir,
        }
        if self.rank != 0:  # rank 0 draws and writes; the others only return the numbers
            return summary
        curve, note = plot_loss_curve(cfg.output_dir)
        summary["loss_curve"] = curve
        if note:
            self._say(note)
            summary["notes"] = [note]
        write_summary(cfg.output_dir, summary, echo=self.progress)
        return summary


def _new_window() -> dict[str, float]:
    return {"loss_sum": 0.0, "targets": 0, "tokens": 0, "time": 0.0}

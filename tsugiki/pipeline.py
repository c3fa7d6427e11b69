"""The whole training job in one call: config → model + data → adapter on disk.

    import tsugiki
    result = tsugiki.train({"data": "train.jsonl", "max_steps": 100})   # or a YAML path / TrainConfig
    print(result.output_dir, result.metrics["train_loss"])

Order of work, cheapest checks first so bad input fails before the model loads:
output folder → tokenizer → data (template, masking, eval split) → memory plan
(one line: ``tsugiki plan``'s estimate for this job's real rows against the
memory available, with changes that fit when it does not) → base model
(quantized if asked) → adapter → :class:`~tsugiki.train.Trainer`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .data import build_dataset, get_template
from .data.jinja import match_chat_template
from .data.templates import Template
from .fileio import TEMPLATE_FILE, atomic_write_text, check_writable
from .config import ADAPTER_KEYS, METHOD_BUILDERS, METHOD_READS, PeftConfig
from .model import get_peft_model
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model
from .train import distributed
from .train.checkpoint import record_outputs, recorded_outputs, resolve_resume
from .train.config import ConfigError, TrainConfig
from .train.loop import FSDP_FP16_REFUSAL, Trainer, TrainResult, check_fsdp_world, resolve_dtype, set_seed

logger = logging.getLogger("tsugiki")


def as_config(config: Union[None, str, os.PathLike, Mapping[str, Any], TrainConfig] = None,
              **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML path, a mapping, or a TrainConfig; ``overrides`` win."""
    if isinstance(config, TrainConfig):
        return config.replace(**overrides) if overrides else config
    if config is None or isinstance(config, Mapping):
        return TrainConfig.load(None, {**(config or {}), **overrides})
    return TrainConfig.load(os.fspath(config), overrides)


def method_names() -> list[str]:
    return sorted(METHOD_BUILDERS) + ["full"]


def quantization_of(cfg: TrainConfig) -> Optional[str]:
    """``qlora`` means LoRA on a 4-bit base unless a quantization is named explicitly."""
    if cfg.quantization != "none":
        return cfg.quantization
    return "4bit" if cfg.method == "qlora" else None


# Methods whose virtual tokens take positions in front of every row.
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning", "prefix_tuning")


def check_method(cfg: TrainConfig) -> None:
    """The job's method, its quantization and its ``method_args``, checked before anything loads."""
    if cfg.method not in method_names():
        close = difflib.get_close_matches(cfg.method, method_names(), n=1)
        raise ConfigError(
            f"method={cfg.method!r} is not available; use one of {', '.join(method_names())}"
            + (f" (did you mean {close[0]!r}?)" if close else ""))
    if cfg.method == "full" and quantization_of(cfg):
        raise ConfigError(
            f"method='full' cannot train a {quantization_of(cfg)} base: quantized weights are frozen. "
            "Use method: qlora (LoRA on the quantized base) or quantization: none")
    if cfg.fsdp and quantization_of(cfg):
        raise ConfigError(
            f"fsdp: true cannot shard a {quantization_of(cfg)} base: FSDP would split bitsandbytes' packed "
            "weights and lose their quantization state. Use fsdp: false (each process keeps the whole "
            "quantized base, which is small), or quantization: none")
    if cfg.fsdp and cfg.dtype == "fp16":  # also refused by the trainer, where dtype: auto resolves
        raise ConfigError(FSDP_FP16_REFUSAL)
    if cfg.fsdp and cfg.method == "adalora":
        raise ConfigError("fsdp: true does not support method 'adalora': its rank budget is set from whole "
                          "matrices at every step; set fsdp: false")
    if cfg.optimizer != "adamw":  # bitsandbytes' optimizers: say now, not after the model has loaded
        from .quant import require_bitsandbytes

        require_bitsandbytes(f"optimizer: {cfg.optimizer}")
    if cfg.method == "full" and cfg.method_args:
        raise ConfigError("method_args: method 'full' takes no options")
    if cfg.packing and cfg.method in VIRTUAL_TOKEN_METHODS:
        raise ConfigError(f"packing: true cannot train {cfg.method}: its virtual tokens go in front of each row "
                          "once, and a packed row holds several examples; use packing: false")
    if cfg.method != "full":
        adapter_config(shapes_only(cfg), cfg.model or DEFAULT_MODEL)  # an option the method lacks, said now


# Where the setting a method does not read from a train config key goes instead, per (method, key).
_UNREAD_KEY_HINTS = {
    **{(m, "lora_r"): "the number of virtual tokens is method_args num_virtual_tokens" for m in VIRTUAL_TOKEN_METHODS},
    **{(m, "lora_r"): "the adapter's width is method_args bottleneck_size" for m in ("series_adapter", "parallel_adapter")},
    **{(m, "lora_dropout"): "LoHa and LoKr take rank_dropout and module_dropout in method_args" for m in ("loha", "lokr")},
    ("llama_adapter", "lora_r"): "the adapter's length is method_args adapter_len",
}


def unused_settings(cfg: TrainConfig) -> list[str]:
    """Warnings for keys the job sets away from their defaults that its method does not read
    (``lora_r`` for prompt tuning, ``eval_split`` beside ``eval_data``): a run that silently
    ignores them trains something else than its config says."""
    defaults = TrainConfig()
    unread = [key for key in ADAPTER_KEYS
              if key not in METHOD_READS.get(cfg.method, ()) and getattr(cfg, key) != getattr(defaults, key)]
    hints = {key: _UNREAD_KEY_HINTS.get((cfg.method, key)) for key in unread}
    notes = [f"{key}={getattr(cfg, key)!r} is not used by method {cfg.method} and is ignored"
             + (f" ({hints[key]})" if hints[key] else "") for key in unread]
    if cfg.eval_data and cfg.eval_split:
        notes.append(f"eval_split={cfg.eval_split!r} is ignored: eval_data is given, so every row of data trains "
                     "and the evaluation uses eval_data")
    return notes


# Prompt initialisations that need real values (a tokenizer, the vocabulary, a file), and the keys only they use.
_VALUE_INITS = ("TEXT", "SAMPLE_VOCAB", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
_VALUE_INIT_KEYS = ("prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
                    "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task")


def shapes_only(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with a prompt that starts from real values started at random instead.

    The adapter has the same shapes and options, and setting it up needs no
    tokenizer, weights or file: what checking the job and counting its
    parameters before anything loads want.
    """
    args = dict(cfg.method_args or {})
    if args.get("prompt_tuning_init") not in _VALUE_INITS:
        return cfg
    args["prompt_tuning_init"] = "RANDOM"
    for key in _VALUE_INIT_KEYS:
        args.pop(key, None)
    return cfg.replace(method_args=args)


def adapter_config(cfg: TrainConfig, base_name: str) -> PeftConfig:
    """The adapter config the training job's ``method`` and keys describe."""
    return METHOD_BUILDERS[cfg.method](cfg, base_name)


def graft(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model`` for the configured method (LoRA adapters, or every weight for ``full``)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if quantization_of(cfg):
        from .quant import prepare_model_for_kbit_training

        # The trainer's dtype policy keeps frozen matrices at the compute dtype: no fp32 round trip for them.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                upcast_matrices=False)
    return get_peft_model(model, adapter_config(cfg, recorded_base_name(cfg.model)))


def recorded_base_name(model: Optional[str]) -> str:
    """The base model name an adapter records (``base_model_name_or_path``).

    A local folder or file is recorded as an absolute path, so that ``generate``,
    ``eval`` and ``merge`` on the adapter find the base from any working directory;
    a hub id or the built-in default's name is kept as given.
    """
    if model and os.path.exists(model):
        return os.path.abspath(model)
    return model or DEFAULT_MODEL


def save_template(template: Template, folder: str) -> str:
    path = os.path.join(folder, TEMPLATE_FILE)
    atomic_write_text(path, json.dumps(template.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def load_saved_template(folder: str, tokenizer: Any) -> Optional[Template]:
    """The template an adapter was trained with, if its folder records one."""
    path = os.path.join(folder, TEMPLATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return Template.from_dict(json.load(fh), tokenizer)


def folder_template(template: Optional[Union[str, dict]], tokenizer: Any, *folders: Optional[str]) -> Template:
    """The template to format rows with: ``template`` if given, else the first one saved in
    ``folders`` (an adapter's, then its model's: a merged model or a full fine-tune records its
    training template too), else the tokenizer's chat template or ``alpaca``
    (:func:`tsugiki.data.get_template`). generate, chat, eval, train and inspect all take it so."""
    for folder in folders if template is None else ():
        saved = load_saved_template(folder, tokenizer) if folder and os.path.isdir(folder) else None
        if saved is not None:
            return saved
    return get_template(template, tokenizer)


@contextlib.contextmanager
def _transformers_bars(shown: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights) off when the job's are."""
    from transformers.utils import logging as hf_logging

    was_shown = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_shown and not shown:
            hf_logging.enable_progress_bar()


def run_training(config: Union[None, str, os.PathLike, Mapping[str, Any], TrainConfig] = None,
                 progress: bool = True, callbacks: Sequence[Callable] = (), **overrides: Any) -> TrainResult:
    """Fine-tune as ``config`` says; returns ``TrainResult(output_dir, metrics)``.

    ``config`` is a YAML path, a dict of keys, or a :class:`TrainConfig`;
    keyword arguments override its keys. See ``tsugiki train --help`` for every key.
    ``callbacks``: functions ``f(trainer, record)`` called after every optimizer step; one returning
    False stops the run after that step (the adapter is saved as at the end).
    """
    cfg = as_config(config, **overrides)
    # Local files saved as absolute paths, so a resume from another directory finds them.
    cfg = cfg.replace(**{key: os.path.abspath(getattr(cfg, key)) for key in ("model", "data", "eval_data")
                         if isinstance(getattr(cfg, key), str) and os.path.exists(getattr(cfg, key))})
    callbacks = [callbacks] if callable(callbacks) else list(callbacks)  # one function, or several
    if not all(callable(c) for c in callbacks):
        raise TypeError(f"callbacks must be functions f(trainer, record), got {callbacks!r}")
    check_method(cfg)
    for note in unused_settings(cfg) if distributed.is_main() else []:
        logger.warning(note)
    if not cfg.data:
        raise ConfigError("data is not set: give a training file (jsonl/json/csv/parquet) or a saved dataset folder")
    if cfg.eval_steps and not cfg.eval_data and not cfg.eval_split:
        raise cfg.no_eval_rows_error()
    distributed.init_distributed()  # before any CUDA work: each rank pins its own GPU
    check_fsdp_world(cfg)  # before the model loads
    progress = progress and distributed.is_main()
    # Refuses a non-empty output_dir early, before anything slow happens; removes nothing yet (the trainer
    # does, once data and model have loaded), so a job refused on the way keeps the run it would replace.
    resolve_resume(cfg, clean=False)
    check_writable(cfg.output_dir, "output_dir")

    cfg = _max_length_within_context(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = folder_template(cfg.template, tokenizer, cfg.model)
    data_args = dict(max_length=cfg.max_length, train_on=cfg.train_on, seed=cfg.seed)
    train_rows, eval_rows, stats = build_dataset(
        cfg.data, tokenizer, template, max_rows=cfg.max_rows,
        eval_split=_eval_split(cfg), **data_args)
    _say(stats.summary(), progress)
    if cfg.eval_data:
        eval_rows, _, eval_stats = build_dataset(cfg.eval_data, tokenizer, template, **data_args)
        _say("eval data: " + eval_stats.summary(role="eval"), progress)
    distributed.refuse_different_rows(train_rows, "training rows")  # before the model loads
    distributed.refuse_different_rows(eval_rows or [], "evaluation rows")

    planned = memory_plan(cfg, train_rows) if distributed.world_size() == 1 else None  # the plan sizes one process
    if planned and not planned[1] and not progress:
        logger.warning(planned[0])
    elif planned:
        _say(planned[0], progress)

    set_seed(cfg.seed)  # before the adapter is created, so its initial weights repeat
    with _transformers_bars(progress):
        model = load_model(cfg.model, quantization=quantization_of(cfg), device=distributed.local_device(),
                           dtype=load_dtype(cfg))
    model = graft(model, cfg)
    if progress and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    match_chat_template(tokenizer, template)  # the saved tokenizer's apply_chat_template formats as trained
    result = Trainer(model, cfg, train_rows, eval_rows or None, tokenizer=tokenizer, progress=progress,
                     callbacks=callbacks).train()
    if distributed.is_main():
        record_outputs(cfg.output_dir, sorted((recorded_outputs(cfg.output_dir) or set()) | {TEMPLATE_FILE}))
        save_template(template, cfg.output_dir)
    result.metrics["data"] = stats.to_dict()
    return result


def load_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """The dtype to load the base in: None (the loader's own) except for a GGUF file trained in 16 bits.

    A GGUF file loads dequantized to fp32 by default, and the trainer's dtype
    policy then casts every frozen weight to the compute dtype: loading it in
    that dtype gives the same bits without the fp32 copy (the default model's
    load peak falls from 1.13 to 0.88 GiB). A base quantized to 4 or 8 bits is
    then quantized from those 16-bit values, as from a 16-bit checkpoint: its
    error against the fp32 weights is the same to 0.1% a layer (NF4, default
    model), and the load peak falls from 1.15 to 0.90 GiB. Not when a base
    weight trains (``full``, ``modules_to_save``, trained biases): those start
    from fp32 values.
    """
    if resolve_model(cfg.model).kind != "gguf":
        return None
    args = cfg.method_args or {}
    if cfg.method == "full" or args.get("modules_to_save") or args.get("bias", "none") != "none":
        return None
    dtype = resolve_dtype(cfg.dtype, _training_device())
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _max_length_within_context(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``max_length`` cut to the model's context, with a warning, where it is longer:
    positions past it have no embedding (GPT-2 style) or were never trained (RoPE). As it is
    when the model's config cannot be read before loading."""
    from . import plan
    from .generation import context_length

    try:
        limit = context_length(plan.load_config(cfg.model or DEFAULT_MODEL))
        virtual = (adapter_config(shapes_only(cfg), cfg.model or DEFAULT_MODEL).num_virtual_tokens
                   if cfg.method in VIRTUAL_TOKEN_METHODS else 0)
    except (ValueError, OSError, ImportError):
        return cfg
    if limit is None or cfg.max_length + virtual <= limit:
        return cfg
    room = max(limit - virtual, 1)
    if distributed.is_main():
        besides = f" besides the method's {virtual} virtual tokens" if virtual else ""
        logger.warning("max_length=%d is longer than the model's %d-token context holds%s: rows are cut at %d "
                       "tokens", cfg.max_length, limit, besides, room)
    return cfg.replace(max_length=room)


def memory_plan(cfg: TrainConfig, train_rows: Sequence[Mapping[str, Any]]) -> Optional[tuple[str, bool]]:
    """:func:`tsugiki.plan.training_fit`'s line for this job on this machine, rows sized by the longest
    training row, and whether it fits; for a model the plan cannot read or a method it cannot count,
    a line saying so (which counts as fitting: training goes on)."""
    from . import plan

    device = _training_device()
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        available, where = plan.available_ram(), "of RAM available"
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_dtype(cfg.dtype, device), "fp32")
    longest = max(len(row["input_ids"]) for row in train_rows)
    try:
        est, line = plan.training_fit(cfg, available, where, device=device.type, dtype=dtype, longest_row=longest)
    except (ValueError, OSError, ImportError) as err:  # a model the plan cannot read: training goes on
        logger.debug("no memory plan for %s: %s", cfg.model, err)
        return f"memory plan: none for this job ({err})", True
    return line, est.fits(available)


def _training_device() -> torch.device:
    """Where the model will train: this rank's GPU, else the loader's default (CUDA when there is one)."""
    return torch.device(distributed.local_device() or ("cuda" if torch.cuda.is_available() else "cpu"))


def _eval_split(cfg: TrainConfig) -> Union[None, int, float]:
    """A fraction below 1, or a whole number of rows; None when eval_data is given or nothing is held out."""
    if cfg.eval_data or not cfg.eval_split:
        return None
    return int(cfg.eval_split) if cfg.eval_split >= 1 else cfg.eval_split


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, flush=True)
    else:
        logger.info(message)

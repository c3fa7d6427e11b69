"""The memory plan of a ``tsugiki train`` job: its settings as :func:`~tsugiki.plan.peak.estimate`
arguments, its adapter's trainable parameters counted on torch's meta device, and the one line the
trainer prints before loading the model."""

from __future__ import annotations

from typing import Any, Optional

from .peak import Estimate, GiB, auto_dtype, estimate
from .fit import suggestions
from .sources import DEFAULT_MODEL, load_config


def count_trainable(cfg: Any, source: Any = None) -> int:
    """Trainable parameters of ``cfg``'s method (a ``TrainConfig``) grafted onto ``source``'s architecture.

    The model is built on torch's meta device: shapes only, no weights read and
    no memory taken. ``source`` defaults to ``cfg.model``. The base is counted
    unquantized (quantization changes no adapter's size).

    Raises:
        ValueError: the method cannot be set up on shapes alone (e.g. prompt
            tuning initialised from text); the message says so.
    """
    import torch
    import transformers

    from ..pipeline import check_method, graft, shapes_only

    check_method(cfg)  # an unknown method: the training job's error, with the closest name
    config = load_config(source if source is not None else cfg.model or DEFAULT_MODEL)
    builder = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = builder.from_config(config)
    try:
        # Neither the run's length (AdaLoRA's rank schedule) nor the initial values (prompt methods started
        # from text, vocabulary rows or a file, which meta tensors do not hold) change the count.
        job = shapes_only(cfg).replace(quantization="none", method="lora" if cfg.method == "qlora" else cfg.method,
                                       max_steps=cfg.max_steps if cfg.max_steps > 0 else 10_000)
        model = graft(model, job)
    except (RuntimeError, NotImplementedError, TypeError) as err:  # an initialiser that needs real values
        raise ValueError(f"method {cfg.method!r}: its trainable parameters cannot be counted from the config "
                         f"alone ({type(err).__name__}: {err}); give the count (--trainable-params)") from err
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Prompt methods whose virtual tokens join every row's sequence (prefix tuning's go to the attention's
# keys and values instead, and LLaMA-Adapter's to a few layers' attention: neither is counted).
SEQUENCE_PROMPT_METHODS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")


def training_settings(cfg: Any, *, device: str = "cpu", dtype: Optional[str] = None,
                      longest_row: Optional[int] = None, trainable_params: Optional[int] = None) -> dict[str, Any]:
    """The :func:`estimate` arguments (besides the model) of the job a training config describes.

    ``cfg`` is a ``tsugiki.train.TrainConfig``. ``dtype`` overrides its ``dtype``;
    ``auto`` resolves as the trainer's does: bf16 on a GPU, and on a CPU with
    bf16 instructions; fp32 elsewhere. ``longest_row``: the longest training row
    in tokens, when the data is known; the estimate then sizes rows by it
    (at most ``max_length``), except with ``packing``, whose rows fill
    ``max_length``. ``activation_offloading`` counts only on CUDA, as in training.
    Methods other than lora, qlora and full are estimated like LoRA with their
    own trainable parameters: ``trainable_params``, else :func:`count_trainable`
    (DoRA with its own activations too, see :func:`block_activation_bytes`;
    prompt tuning, p-tuning and multitask prompt tuning with their virtual
    tokens in every row).

    Raises:
        ValueError: the method's parameters cannot be counted without a model (see :func:`count_trainable`).
    """
    method = "lora" if cfg.method in ("lora", "qlora") else cfg.method
    if trainable_params is None and counted_on_the_model(cfg):
        trainable_params = count_trainable(cfg)
    quantization = cfg.quantization if cfg.quantization != "none" else "4bit" if cfg.method == "qlora" else None
    dtype = dtype or cfg.dtype
    if dtype == "auto":
        dtype = auto_dtype(device)
    from ..config import train_targets

    targets = train_targets(cfg.target_modules)
    max_length = cfg.max_length
    if longest_row is not None and not cfg.packing:
        max_length = max(1, min(max_length, longest_row))
    return dict(method=method, lora_r=cfg.lora_r, lora_dropout=cfg.lora_dropout, target_modules=targets,
                trainable_params=trainable_params, quantization=quantization, dtype=dtype,
                batch_size=cfg.batch_size, max_length=max_length, optimizer=cfg.optimizer,
                gradient_checkpointing=cfg.gradient_checkpointing, device=device,
                activation_offloading=bool(cfg.activation_offloading and cfg.gradient_checkpointing
                                           and device == "cuda"),
                target_logits_only=cfg.target_logits_only, max_forward_tokens=cfg.max_forward_tokens,
                virtual_tokens=virtual_tokens(cfg), keep_best=cfg.keep_best)


def virtual_tokens(cfg: Any) -> int:
    """Virtual tokens ``cfg``'s method puts in front of every row (:data:`SEQUENCE_PROMPT_METHODS`), else 0."""
    if cfg.method not in SEQUENCE_PROMPT_METHODS:
        return 0
    from ..pipeline import adapter_config, shapes_only

    return adapter_config(shapes_only(cfg), cfg.model or DEFAULT_MODEL).num_virtual_tokens


def training_fit(cfg: Any, available: int, where: str, **settings: Any) -> tuple[Estimate, str]:
    """The estimate for a training config and one line saying how it compares with ``available`` bytes.

    ``settings`` go to :func:`training_settings`; ``device_memory`` is
    ``available`` on CUDA. When the estimate does not fit, the line names up to
    two changes that would (see :func:`suggestions`).
    """
    source = cfg.model or DEFAULT_MODEL
    args = training_settings(cfg, **settings)
    if args["device"] == "cuda":
        args["device_memory"] = available
    est = estimate(source, **args)
    line = f"memory plan: about {est.peak / GiB:.2f} GiB at peak; {available / GiB:.2f} GiB {where}"
    if est.fits(available):
        return est, line
    found = suggestions(est, available, source)[:2]
    fixes = "; ".join(f"{text} ({e.peak / GiB:.2f} GiB)" for text, e in found) or "none of the usual changes"
    return est, (f"warning: {line}: the run may run out of memory. Changes that fit: {fixes}. "
                 "Details: tsugiki plan with the same options (or --config <the run's YAML>)")


# What a flag means when neither it nor a --config gives a value (estimate()'s defaults).
CLI_KEYS = ("method", "lora_r", "lora_dropout", "target_modules", "trainable_params", "quantization",
            "double_quant", "dtype", "batch_size", "max_length", "optimizer", "gradient_checkpointing",
            "activation_offloading", "target_logits_only", "max_forward_tokens")


def cli_defaults() -> dict[str, Any]:
    """What ``tsugiki plan`` assumes for a setting not given: ``tsugiki train``'s default, so a plain
    ``tsugiki plan`` sizes the job a plain ``tsugiki train`` runs (rows of max_length tokens)."""
    from ..train.config import TrainConfig

    job = TrainConfig()
    return dict(method=job.method, lora_r=job.lora_r, lora_dropout=job.lora_dropout, target_modules=None,
                trainable_params=None, quantization=None, double_quant=True, dtype=job.dtype,
                batch_size=job.batch_size, max_length=job.max_length, optimizer=job.optimizer,
                gradient_checkpointing=job.gradient_checkpointing, activation_offloading=False,
                target_logits_only=job.target_logits_only, max_forward_tokens=job.max_forward_tokens)


def adapter_counts(keys: dict[str, Any], source: Any, trainable_params: Optional[int] = None) -> dict[str, Any]:
    """``trainable_params`` and ``virtual_tokens`` of the adapter that training ``keys`` (method,
    lora_r, lora_dropout, target_modules, method_args) describe on ``source``'s architecture.

    The parameters are counted for methods other than LoRA and full (:func:`estimate`
    counts those itself), unless ``trainable_params`` is given.
    """
    from ..train.config import TrainConfig

    if keys.get("method") == "adalora" and "total_step" not in (keys.get("method_args") or {}):
        # AdaLoRA's schedule needs the run's length, its parameter count does not: any length counts.
        keys = {**keys, "max_steps": keys.get("max_steps") or 1}
    job = TrainConfig.load(None, keys)
    if trainable_params is None and counted_on_the_model(job):
        trainable_params = count_trainable(job, source)
    return {"trainable_params": trainable_params, "virtual_tokens": virtual_tokens(job)}


def counted_on_the_model(cfg: Any) -> bool:
    """Whether the job's trainable parameters need :func:`count_trainable`: every method but full,
    and LoRA whose ``method_args`` (``modules_to_save``, rank patterns, layer choices) move the
    count off :func:`estimate`'s own formula."""
    return cfg.method not in ("lora", "qlora", "full") or (cfg.method != "full" and bool(cfg.method_args))

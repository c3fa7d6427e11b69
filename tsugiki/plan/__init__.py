"""Will it fit? Estimate the peak memory of a fine-tuning run from ``config.json`` alone.

    import tsugiki
    tsugiki.plan("path/to/model", quantization="4bit", batch_size=4)   # prints the breakdown and the verdict
    est = tsugiki.plan.estimate("path/to/model", max_length=1024)      # the numbers alone
    est.peak, est.parts, est.fits(16 * 2**30)

The parts, by module:

* :mod:`~tsugiki.plan.sources`: a model's config without its weights (a folder,
  ``config.json``, ``.gguf`` metadata, the built-in default, a hub id).
* :mod:`~tsugiki.plan.shapes`: exact parameter counts and each block's linear layers.
* :mod:`~tsugiki.plan.activations`: what a forward keeps for backward, and the
  trainer's forward size (``max_forward_tokens``).
* :mod:`~tsugiki.plan.peak`: the sum, part by part (the formula is in its docstring).
* :mod:`~tsugiki.plan.fit`: the fit verdict, the changes that would fit, the report.
* :mod:`~tsugiki.plan.job`: a ``tsugiki train`` job's estimate.
* :mod:`~tsugiki.plan.cli`: ``tsugiki plan``.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Optional, Union

from .activations import (ATTENTION_DROPOUT_BYTES, AUTO_ACTIVATION_SHARE, LAYER_METHODS, activation_bytes,
                          auto_forward_budget, block_activation_bytes, method_activation_bytes, rows_per_forward,
                          uses_fast_attention)
from .cli import add_plan_arguments, main, run_plan_cli
from .peak import (BNB_CPU_STEP_BYTES, BNB_RUNTIME_BYTES, DTYPE_BYTES, GGUF_LOAD_REST, LOGITS_FP32_COPIES,
                       OPTIMIZER_STATE_BYTES, PART_MEANINGS, RUNTIME_BYTES, SAVED_DTYPE_BYTES, SLACK_FRACTION,
                       SPLIT_SLACK_FRACTION, GiB, MiB, Estimate, auto_dtype, chunked_output_layer,
                       cpu_has_native_bf16, estimate, full_logit_copies, linear_weight_bytes, logits_bytes,
                       nf4_bits_per_param)
from .fit import GPU_SIZES_MIB, available_ram, describe, parse_size, report, suggestions
from .job import (SEQUENCE_PROMPT_METHODS, adapter_counts, cli_defaults, count_trainable, training_fit,
                  training_settings, virtual_tokens)
from .shapes import Linear, Shape, count_parameters, matches, model_shape, targeted_linears
from .sources import DEFAULT_MODEL, LLAMA_LIKE, gguf_config, load_config

__all__ = [
    "plan", "ATTENTION_DROPOUT_BYTES", "AUTO_ACTIVATION_SHARE", "BNB_CPU_STEP_BYTES", "BNB_RUNTIME_BYTES",
    "DEFAULT_MODEL", "DTYPE_BYTES", "GGUF_LOAD_REST", "GPU_SIZES_MIB", "LAYER_METHODS", "LLAMA_LIKE",
    "LOGITS_FP32_COPIES", "OPTIMIZER_STATE_BYTES", "PART_MEANINGS", "RUNTIME_BYTES", "SAVED_DTYPE_BYTES",
    "SEQUENCE_PROMPT_METHODS", "SLACK_FRACTION", "SPLIT_SLACK_FRACTION", "activation_bytes", "adapter_counts",
    "add_plan_arguments", "auto_dtype", "auto_forward_budget", "available_ram", "block_activation_bytes",
    "chunked_output_layer", "cli_defaults", "count_parameters", "count_trainable", "cpu_has_native_bf16",
    "describe", "Estimate", "estimate", "full_logit_copies", "gguf_config", "GiB", "Linear",
    "linear_weight_bytes", "load_config", "logits_bytes", "main", "matches", "method_activation_bytes", "MiB",
    "model_shape", "nf4_bits_per_param", "parse_size", "report", "rows_per_forward", "run_plan_cli", "Shape",
    "suggestions", "targeted_linears", "training_fit", "training_settings", "uses_fast_attention",
    "virtual_tokens",
]


def plan(source: Any = None, *, config: Any = None, available: Optional[Union[int, str]] = None,
         verbose: bool = True, **estimate_args: Any) -> Estimate:
    """Estimate (see :func:`estimate` for the arguments), print the breakdown and the fit verdict, return it.

    ``source`` defaults to ``config``'s model, else the built-in default model. Settings not
    given are ``tsugiki train``'s defaults (batch 4 x 1024 tokens, ...), as in ``tsugiki plan``.
    ``config``: a training job (a YAML path, a dict of train keys or a
    ``TrainConfig``) whose settings :func:`training_settings` turns into the
    estimate's; ``estimate_args`` override them. ``available`` is a memory size
    in bytes or a name such as ``"24GB"`` or ``"T4"`` (default: this machine's
    available RAM); with ``device="cuda"`` it is also the device memory that
    ``max_forward_tokens: auto`` sizes forwards by, unless ``device_memory`` is given.
    """
    # The keys that say what the adapter is: its trainable parameters are counted for them.
    adapter = {k: estimate_args.pop(k) for k in ("method", "lora_r", "lora_dropout", "target_modules")
               if k in estimate_args}
    if config is not None:
        from ..pipeline import as_config

        cfg = as_config(config)
        cfg = cfg.replace(**adapter) if adapter else cfg
        device = estimate_args.get("device", "cpu")
        gpu = available if isinstance(available, str) else None
        job = training_settings(cfg, device=device, dtype=auto_dtype(device, gpu) if cfg.dtype == "auto" else None,
                                trainable_params=estimate_args.get("trainable_params"))
        estimate_args = {**job, **estimate_args}
        source = source if source is not None else cfg.model
    else:  # what is not given is tsugiki train's default, as on the command line
        defaults = {k: v for k, v in cli_defaults().items()
                    if k not in adapter and k not in ("method", "target_modules", "trainable_params")}
        estimate_args = {**defaults, **estimate_args}
    if config is None and adapter:  # as the command line does: qlora is LoRA on a 4-bit base; others counted
        if adapter.get("method") == "qlora":
            adapter["method"] = "lora"
            estimate_args["quantization"] = estimate_args.get("quantization") or "4bit"
        counts = adapter_counts(adapter, source if source is not None else DEFAULT_MODEL,
                                estimate_args.get("trainable_params"))
        estimate_args = {**adapter, **counts, **estimate_args}
    source = source if source is not None else DEFAULT_MODEL
    size = None if available is None else parse_size(available) if isinstance(available, str) else int(available)
    if estimate_args.get("device") == "cuda" and size is not None:
        estimate_args.setdefault("device_memory", size)
    est = estimate(source, **estimate_args)
    if verbose:
        if size is None:
            size, where = available_ram(), "this machine's available RAM"
        else:
            where = str(available)
        print(report(est, size, where, source))
    return est


class _PlanModule(types.ModuleType):
    """``tsugiki.plan(...)`` runs :func:`plan`; ``tsugiki.plan.estimate`` etc. stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Estimate:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _PlanModule

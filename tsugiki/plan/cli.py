"""``tsugiki plan`` and ``python -m tsugiki.plan``: the options, their defaults (``tsugiki train``'s),
and the run."""

from __future__ import annotations

import argparse
import json
from typing import Any, Union

from .peak import DTYPE_BYTES, OPTIMIZER_STATE_BYTES, auto_dtype, estimate
from .fit import available_ram, parse_size, report
from .job import CLI_KEYS, adapter_counts, cli_defaults, training_settings
from .sources import DEFAULT_MODEL


def _forward_tokens(text: str) -> Union[int, str]:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use 'auto', 0 or a number of tokens")
    return int(text)


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``plan`` options to ``parser`` (used by ``tsugiki plan`` and ``python -m tsugiki.plan``).

    Every setting defaults to ``None`` so that :func:`run_plan_cli` can tell a
    flag given from one left to ``--config`` or to :func:`cli_defaults` (``tsugiki train``'s).
    """
    a = parser.add_argument
    a("model", nargs="?", default=None,
      help=f"model folder, config.json, .gguf file or {DEFAULT_MODEL!r} (default: the config's model, else "
           f"{DEFAULT_MODEL!r})")
    a("--model", dest="model_flag", metavar="MODEL", default=None,
      help="the same as the positional MODEL (the name tsugiki train uses)")
    a("--config", metavar="YAML", default=None,
      help="a tsugiki train config: plan that job (its model, method, quantization, dtype, batch_size, "
           "max_length, optimizer, ...); the flags below override it. Rows are taken to be max_length tokens; "
           "tsugiki train re-checks with the real rows before loading the model")
    a("--method", default=None, help="lora (default), qlora, dora, full, or any other training method (ia3, "
                                     "prompt_tuning, ...; estimated like LoRA with their own parameter count)")
    a("--lora-r", type=int, default=None, help="LoRA rank (default: tsugiki train's, 8)")
    a("--lora-dropout", type=float, default=None, help="LoRA dropout (default: tsugiki train's, 0.05)")
    a("--target-modules", default=None,
      help="comma-separated module names or 'all-linear' (default: the architecture's, q_proj,v_proj for Llama)")
    a("--method-args", default=None, metavar="KEY=VALUE,...",
      help="the method's own options, as tsugiki train takes them: key=value pairs or a JSON object "
           "(e.g. num_virtual_tokens=50 for prompt_tuning)")
    a("--trainable-params", type=int, default=None,
      help="trainable parameter count for methods other than LoRA (default: counted from the model's config)")
    a("--quantization", choices=["none", "4bit", "8bit"], default=None, help="k-bit base (default: none)")
    a("--no-double-quant", dest="double_quant", action="store_false", default=None,
      help="4-bit without double quantization")
    a("--dtype", choices=sorted(DTYPE_BYTES) + ["auto"], default=None,
      help="compute dtype (default: auto, as in training: bf16 where the hardware runs it natively, else fp32)")
    a("--batch-size", type=int, default=None, help="batch size (default: tsugiki train's, 4)")
    a("--max-length", type=int, default=None,
      help="tokens per row (default: tsugiki train's max_length, 1024; training re-checks with its real rows)")
    a("--optimizer", choices=sorted(OPTIMIZER_STATE_BYTES), default=None, help="default adamw")
    a("--gradient-checkpointing", action="store_true", default=None, help="recompute blocks in backward")
    a("--full-logits", dest="target_logits_only", action="store_false", default=None,
      help="the loss over full logits (the trainer's target_logits_only: false) instead of the chunked output layer")
    a("--activation-offloading", action="store_true", default=None,
      help="with --gpu and --gradient-checkpointing: keep the blocks' inputs in host memory")
    a("--max-forward-tokens", default=None, type=_forward_tokens,
      help="tokens one forward may hold, as the trainer's max_forward_tokens: 'auto' (default), 0 (the whole "
           "batch at once) or a count")
    a("--gpu", default=None, help="check against a GPU: a size (24GB) or a name (T4, A100-40GB, H100); "
                                  "GB and GiB both mean 2^30 bytes")
    a("--ram", default=None, help="check against this much RAM (e.g. 16GB; GB = GiB) instead of this machine's "
                                  "available memory")
    a("--json", action="store_true", help="print the estimate as JSON")
    return parser


def _cli_settings(args: argparse.Namespace, device: str) -> tuple[Any, dict[str, Any]]:
    """The model and the estimate() arguments: cli_defaults() < the --config job < flags given."""
    from ..train.config import TrainConfig

    settings = cli_defaults()
    model = None
    method_args = args.method_args
    if args.config:
        cfg = TrainConfig.load(args.config)
        model = cfg.model
        method_args = cfg.method_args if method_args is None else method_args
        job = training_settings(cfg, device=device, dtype=auto_dtype(device, args.gpu) if cfg.dtype == "auto" else None,
                                trainable_params=args.trainable_params)
        settings.update({key: value for key, value in job.items() if key != "device"})
    given = {key: getattr(args, key) for key in CLI_KEYS if getattr(args, key) is not None}
    if "method" in given and given["method"] == "qlora":
        if given.get("quantization") == "none":
            raise ValueError("--method qlora is LoRA on a 4-bit base, which --quantization none contradicts: "
                             "use --method lora for a 16-bit base (tsugiki train reads qlora as 4-bit)")
        given["method"] = "lora"
        given.setdefault("quantization", "4bit")
    if given.get("quantization") == "none":
        given["quantization"] = None
    if isinstance(given.get("target_modules"), str):  # as tsugiki train reads it: names, all-linear or a regex
        from ..config import train_targets

        given["target_modules"] = train_targets([t.strip() for t in given["target_modules"].split(",") if t.strip()])
    settings.update(given)
    adapter_keys = {"method", "lora_r", "lora_dropout", "target_modules"}
    if args.trainable_params is None and (adapter_keys & set(given) or args.method_args is not None):
        settings["trainable_params"] = None  # the --config job's count is for another adapter: count again
    if settings["dtype"] == "auto":
        settings["dtype"] = auto_dtype(device, args.gpu)
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError(f"two models given: {args.model!r} and --model {args.model_flag!r}; pass one")
    source = args.model or args.model_flag or model or DEFAULT_MODEL
    keys = {key: settings[key] for key in ("method", "lora_r", "lora_dropout", "target_modules")}
    if method_args:  # an option the method does not have: the training job's error, now
        from ..pipeline import check_method

        # AdaLoRA's rank schedule needs the run's length, which its size does not depend on.
        check_method(TrainConfig.load(None, {**keys, "method_args": method_args, "max_steps": 1}))
    settings.update(adapter_counts({**keys, "method_args": method_args}, source, settings["trainable_params"]))
    return source, settings


def run_plan_cli(args: argparse.Namespace) -> int:
    """Run ``plan`` with parsed ``args``; exit code 0 if it fits, 1 if not."""
    device = "cuda" if args.gpu else "cpu"
    model, settings = _cli_settings(args, device)
    if settings["activation_offloading"] and not (args.gpu and settings["gradient_checkpointing"]):
        raise ValueError("--activation-offloading moves what gradient checkpointing keeps off a GPU: "
                         "add --gpu <size> and --gradient-checkpointing")
    est = estimate(model, **settings, device=device, device_memory=parse_size(args.gpu) if args.gpu else None)
    if args.gpu:
        available, where = parse_size(args.gpu), f"GPU {args.gpu}"
    elif args.ram:
        available, where = parse_size(args.ram), f"RAM {args.ram}"
    else:
        available, where = available_ram(), "this machine's available RAM"
    if args.json:
        print(json.dumps({"parts": est.parts, "total": est.total, "loading": est.loading, "peak": est.peak,
                          "offloaded": est.offloaded, "params": est.params,
                          "available": available, "fits": est.fits(available)}, indent=2))
    else:
        print(report(est, available, where, model))
        if args.config and _shards_weights(args.config):
            print("note: the config sets fsdp: true; this sizes one process holding every weight. Under torchrun "
                  "each of N processes holds about 1/N of the weights, which this plan does not size; a 4-bit "
                  "change suggested above is refused with fsdp")
    return 0 if est.fits(available) else 1


def _shards_weights(config_path: str) -> bool:
    """Whether the training config at ``config_path`` shards the weights across processes (``fsdp: true``)."""
    from ..train.config import TrainConfig

    return bool(TrainConfig.load(config_path).fsdp)


def main(argv=None) -> int:
    parser = add_plan_arguments(argparse.ArgumentParser(
        prog="python -m tsugiki.plan",
        description="Estimate the peak memory of fine-tuning a model from its config alone, and whether it fits."))
    return run_plan_cli(parser.parse_args(argv))

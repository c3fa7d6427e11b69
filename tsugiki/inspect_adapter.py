"""Human-readable views for ``tsugiki inspect``: an adapter folder, or a tokenized example."""

from __future__ import annotations

import math
import os
from typing import Any

from safetensors import safe_open

from .adapter_io import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .config import PeftConfig, adapters_in_subfolders
from .fileio import TEMPLATE_FILE

IGNORE_INDEX = -100


def _size(n_bytes: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB), as training reports sizes."""
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


def _adapter_param_names() -> set[str]:
    """The attribute names every method gives its adapter tensors (``lora_A``, ``hada_w1_a``, ...)."""
    from . import methods  # noqa: F401  (defines the adapter layer classes)
    from .tuner import AdapterLayer

    names: set[str] = set()
    pending = [AdapterLayer]
    while pending:
        cls = pending.pop()
        names.update(cls.adapter_param_names)
        pending.extend(cls.__subclasses__())
    return names


def _safetensors_dtypes() -> dict[Any, str]:
    import torch

    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _tensor_shapes(folder: str) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
    """The weights file of an adapter folder and each tensor's shape and dtype, without loading the values
    of a safetensors file; a pickle ``.bin`` (saved with ``safe_serialization=False``) is read weights-only."""
    weights = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(weights):
        try:
            with safe_open(weights, "pt") as fh:
                return weights, {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype())
                                 for k in fh.keys()}
        except Exception as err:  # safetensors' own error types
            raise ValueError(f"{weights} is corrupt or truncated ({err}); save the adapter again") from err
    pickled = os.path.join(folder, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickled):
        import torch

        state = torch.load(pickled, map_location="cpu", weights_only=True, mmap=True)
        names = _safetensors_dtypes()
        return pickled, {k: (tuple(v.shape), names.get(v.dtype, str(v.dtype))) for k, v in state.items()}
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in {folder!r}")


def describe_adapter(folder: str) -> str:
    """Base model, method, settings, target modules, parameter count and size of an adapter folder."""
    config = PeftConfig.from_pretrained(folder)
    weights, tensors = _tensor_shapes(folder)
    adapter_names = _adapter_param_names()
    n_params, modules, dtypes = 0, set(), set()
    for key, (shape, dtype) in tensors.items():
        n_params += math.prod(shape)
        dtypes.add(dtype)
        parts = key.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if part in adapter_names:
                modules.add(parts[i - 1])
                break
    settings = config.to_dict()
    lines = [
        f"adapter:      {folder}",
        f"base model:   {config.base_model_name_or_path or 'unknown'}",
        f"method:       {config.peft_type}" + (" with DoRA" if settings.get("use_dora") else "")
        + (f" ({config.task_type})" if config.task_type else ""),
    ]
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "modules_to_save"):
        if settings.get(key) not in (None, [], {}):
            lines.append(f"{key + ':':<14}{settings[key]}")
    targets = ", ".join(sorted(modules)) or settings.get("target_modules")
    if not targets and settings.get("num_virtual_tokens"):  # prompt learning adapts the input, no module
        targets = f"none: {settings['num_virtual_tokens']} virtual tokens before the input"
    lines.append(f"targets:      {targets}")
    lines.append(f"parameters:   {n_params:,d} ({', '.join(sorted(dtypes))})")
    lines.append(f"size on disk: {_size(os.path.getsize(weights))}")
    others = adapters_in_subfolders(folder)
    if others:  # save_pretrained of several adapters puts all but 'default' in subfolders
        lines.append(f"more adapters in subfolders: {', '.join(others)} (inspect {os.path.join(folder, others[0])})")
    template = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(template):
        import json

        with open(template, encoding="utf-8") as fh:
            lines.append(f"template:     {json.load(fh).get('name')}")
    return "\n".join(lines)


def show_example(example: dict[str, Any], tokenizer: Any) -> str:
    """The example's text with the tokens that carry loss wrapped in [[...]]."""
    out: list[str] = []
    run: list[int] = []
    trained = False
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trained = label != IGNORE_INDEX
        if is_trained != trained and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if trained else text)
            run = []
        trained = is_trained
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)

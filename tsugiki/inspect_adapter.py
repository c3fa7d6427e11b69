"""Human-readable views for ``tsugiki inspect``: an adapter folder, or a tokenized example."""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

from .adapter_io import WEIGHTS_NAME
from .config import PeftConfig

IGNORE_INDEX = -100


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def describe_adapter(folder: str) -> str:
    """Base model, method, settings, target modules, parameter count and size of an adapter folder."""
    config = PeftConfig.from_pretrained(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}")
    n_params, modules, dtypes = 0, set(), set()
    with safe_open(weights, "pt") as fh:
        for key in fh.keys():
            shape = fh.get_slice(key).get_shape()
            count = 1
            for dim in shape:
                count *= dim
            n_params += count
            dtypes.add(fh.get_slice(key).get_dtype())
            parts = key.split(".")
            for i, part in enumerate(parts):
                if part.startswith("lora_"):
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
    lines.append(f"targets:      {', '.join(sorted(modules)) or settings.get('target_modules')}")
    lines.append(f"parameters:   {n_params:,d} ({', '.join(sorted(dtypes))})")
    lines.append(f"size on disk: {_size(os.path.getsize(weights))}")
    template = os.path.join(folder, "tsugiki_template.json")
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

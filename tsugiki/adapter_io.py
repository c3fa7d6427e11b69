"""Adapter weights on disk, in HF PEFT's layout.

``adapter_model.safetensors`` holds only what the adapter adds, keyed like the
wrapped model's parameters with the adapter name removed::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (in memory: lora_A.<name>.weight)
    base_model.model.model.embed_tokens.lora_embedding_A            (in memory: lora_embedding_A.<name>)
    base_model.model.score.weight                                   (in memory: score.modules_to_save.<name>.weight)

Loading maps keys back, and is strict by default: a missing or unexpected key,
or a shape that does not fit, is an error naming the key.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterNotFoundError
from .fileio import atomic_write_with
from .tuner import AdapterLayer, ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model it is loaded into."""


class IncompatibleKeys(NamedTuple):
    """What a non-strict load left out: adapter tensors the state had no value for
    (model keys) and state keys that fit no adapter tensor (as given)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# Holders whose one tensor HF PEFT files under the holder's own key: DoRA's magnitude is
# ``...lora_magnitude_vector.<adapter>.weight`` in the model but ``...lora_magnitude_vector`` on disk.
_WEIGHT_UNDER_HOLDER_KEY = ("lora_magnitude_vector",)


def _adapter_attr_pattern(attrs: tuple[str, ...]) -> re.Pattern:
    return re.compile(rf"(^|\.)({'|'.join(map(re.escape, attrs))})\.([^.]+)(\.|$)")


def adapter_state_dict(peft_model: nn.Module, adapter_name: str, adapter_attrs: tuple[str, ...],
                       bias: str = "none", state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, under HF PEFT's file keys (adapter name stripped).

    ``state``: a full state dict of ``peft_model`` to take the tensors from
    (default: ``peft_model.state_dict()``).
    """
    out: dict[str, torch.Tensor] = {}
    pattern = _adapter_attr_pattern(adapter_attrs)
    lora_owners: set[str] = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, AdapterLayer):
            lora_owners.add(name)
    if state is None:
        # The class's state_dict, not an instance's replacement: alpaca-lora style scripts set
        # ``model.state_dict`` to one returning file keys already, which hold no adapter name.
        state = type(peft_model).state_dict(peft_model, keep_vars=True)
    for name, tensor in state.items():
        m = pattern.search(name)
        if m:
            if m.group(3) == adapter_name:
                key = name[: m.start(3)] + name[m.end(3) + 1:] if m.group(4) else name[: m.start(3) - 1]
                if m.group(2) in _WEIGHT_UNDER_HOLDER_KEY:
                    key = key.removesuffix(".weight")
                out[key] = tensor
            continue
        if ".modules_to_save." in name:
            prefix, rest = name.split(".modules_to_save.", 1)
            owner, _, param = rest.partition(".")
            if owner == adapter_name:
                out[f"{prefix}.{param}"] = tensor
            continue
        if ".original_module." in name:
            continue
        if name.endswith("bias") and bias != "none":
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            if bias == "all" or owner in lora_owners:
                out[name] = tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_adapter_weights(state: dict[str, torch.Tensor], folder: str, safe_serialization: bool = True) -> str:
    """Write ``state`` as ``adapter_model.safetensors`` (or, unsafe, ``adapter_model.bin``); returns the path.

    The file of the other format, left by an earlier save, is removed afterwards:
    readers prefer safetensors, so a stale one would shadow a new ``.bin``.
    """
    name, stale = (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if safe_serialization else (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME)
    path = os.path.join(folder, name)
    # safetensors refuses shared storage; clone tensors that share memory (tied copies).
    cpu_state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    if safe_serialization:
        atomic_write_with(path, lambda tmp: save_file(cpu_state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write_with(path, lambda tmp: torch.save(cpu_state, tmp))
    if os.path.isfile(os.path.join(folder, stale)):
        os.remove(os.path.join(folder, stale))
    return path


def read_adapter_weights(folder: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or, only when allowed, the pickle ``.bin``)."""
    st = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            return load_file(st, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(
                f"{st} is corrupt or truncated ({err}); save the adapter again or re-download it"
            ) from err
    pkl = os.path.join(folder, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pkl):
        if not allow_pickle:
            raise AdapterLoadError(
                f"{pkl} is a pickle file, which can run arbitrary code when loaded; pass "
                "allow_pickle=True only if you trust its source, or convert it to safetensors"
            )
        try:
            return torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterLoadError(f"{pkl} could not be read ({err})") from err
    raise AdapterNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}; is this an adapter folder?")


def file_key_to_model_key(key: str, adapter_name: str, adapter_attrs: tuple[str, ...],
                          wrapper_prefixes: set[str]) -> str:
    """Re-insert the adapter name into a file key, as the wrapped model names the tensor."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in adapter_attrs:
            tail = ["weight"] if part in _WEIGHT_UNDER_HOLDER_KEY and i == len(parts) - 1 else parts[i + 1:]
            return ".".join(parts[: i + 1] + [adapter_name] + tail)
    # A modules_to_save module may have sub-modules (RoBERTa's head: classifier.dense, classifier.out_proj).
    for i in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:i])
        if owner in wrapper_prefixes:
            rest = parts[i:]
            # HF PEFT files with bias="all" also hold the wrapper's biases under their in-model
            # names: "<head>.modules_to_save.bias" (the trained copy) and "<head>.original_module.bias".
            if rest[0] == "original_module":
                return key
            if rest[0] == "modules_to_save" and len(rest) > 1:
                rest = rest[1:]
            return ".".join([owner, "modules_to_save", adapter_name, *rest])
    return key


def _shape_mismatch_cause(model: nn.Module, param: torch.Tensor, tensor: torch.Tensor) -> str:
    """Why a file's tensor does not fit the model's: a vocabulary resized for training, else another base."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = embeddings.weight.shape[0] if embeddings is not None and hasattr(embeddings, "weight") else None
    differing = [(have, want) for have, want in zip(param.shape, tensor.shape) if have != want]
    if vocab is not None and len(differing) == 1 and differing[0][0] == vocab and param.dim() == tensor.dim():
        return (f"the adapter was trained with a vocabulary of {differing[0][1]} tokens, the model has {vocab}: "
                f"resize the base first, base.resize_token_embeddings({differing[0][1]}) (AutoPeftModel does "
                "it when the adapter folder holds the tokenizer)")
    return "the adapter was made for a different base model (or a different rank_pattern)"


def load_adapter_weights(peft_model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str,
                         adapter_attrs: tuple[str, ...], source: str, strict: bool = True) -> IncompatibleKeys:
    """Copy ``state`` (file keys) into ``peft_model``; strict checks name every bad key.

    Everything is checked before anything is copied, so a failed load leaves the
    adapter as it was. Returns the keys a non-strict load left out.
    """
    merged = [n for n, m in peft_model.named_modules()
              if isinstance(m, AdapterLayer) and adapter_name in getattr(m, "merged_adapters", ())]
    if merged:  # unmerging later would subtract the new update from a base that holds the old one
        raise AdapterLoadError(
            f"adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]}): weights loaded into "
            "it now would leave the base holding its old update for good; call unmerge_adapter() first, or "
            "load under another adapter_name")
    wrappers = {n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    model_state = peft_model.state_dict(keep_vars=True)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        model_key = file_key_to_model_key(key, adapter_name, adapter_attrs, wrappers)
        if model_key not in model_state:
            # Files written from a model saved with ".base_layer" omitted (older layouts).
            alt = model_key.rsplit(".", 1)
            alt_key = f"{alt[0]}.base_layer.{alt[1]}" if len(alt) == 2 else model_key
            if alt_key in model_state:
                model_key = alt_key
            else:
                unexpected.append(key)
                continue
        mapped[model_key] = tensor

    expected = set(adapter_state_dict(peft_model, adapter_name, adapter_attrs).keys())
    expected_model_keys = {
        file_key_to_model_key(k, adapter_name, adapter_attrs, wrappers) for k in expected
    }
    missing = sorted(k for k in expected_model_keys if k not in mapped)
    if strict and (unexpected or missing):
        lines = [f"adapter weights in {source} do not match the model:"]
        if missing:
            lines.append(f"  missing {len(missing)} key(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:5])}")
        lines.append("  Was it trained on another base model or with other target_modules? (In Python, "
                     "from_pretrained/load_adapter(..., strict=False) loads what fits anyway.)")
        raise AdapterLoadError("\n".join(lines))

    for model_key, tensor in mapped.items():
        param = model_state[model_key]
        if tuple(param.shape) != tuple(tensor.shape) and not param.is_meta:
            raise AdapterLoadError(
                f"{source}: tensor {model_key!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(param.shape)} in the model; " + _shape_mismatch_cause(peft_model, param, tensor))
    with torch.no_grad():
        for model_key, tensor in mapped.items():
            param = model_state[model_key]
            if param.is_meta:
                continue
            param.copy_(tensor.to(dtype=param.dtype, device=param.device))  # bumps the version counter caches check
    return IncompatibleKeys(missing, unexpected)

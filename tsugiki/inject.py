"""Find the modules an adapter grafts onto, and swap modules in and out.

Matching follows HF PEFT so configs behave the same:

* ``target_modules`` a **string**: a regular expression that must match the
  whole module name (``re.fullmatch``); the string ``"all-linear"`` means every
  linear layer except the output head.
* ``target_modules`` a **list**: a module matches when its name equals an entry
  or ends with ``"." + entry``.
* ``None``: the per-architecture default (:data:`DEFAULT_TARGETS`).
* ``layers_to_transform`` keeps only modules inside the listed layer indices,
  found with ``layers_pattern`` (default: ``layers``, ``h``, ``blocks``, ``layer``).
* ``exclude_modules`` uses the same rules as ``target_modules`` and wins.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

# model_type -> default LoRA targets: the attention query and value projections, HF PEFT's choice where
# it has one (phi adds its MLP; fused attention projections are targeted whole).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "llama4", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3", "opt",
        "cohere", "mllama", "xglm", "m2m_100", "blenderbot", "bart", "mbart", "pegasus", "marian", "whisper",
        "gptj", "gpt_neo",
    )},
    **{t: ["query", "value"] for t in (
        "bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "ernie", "megatron-bert",
    )},
    **{t: ["query_key_value"] for t in ("gpt_neox", "bloom", "falcon", "RefinedWeb", "RefinedWebModel", "chatglm")},
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "xlm": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
}

DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")  # HF PEFT's, in its order

TargetSpec = Union[str, Sequence[str], None]


def linear_layer_types() -> tuple[type, ...]:
    """Module classes that count as linear layers: nn.Linear, GPT-2's Conv1D, bitsandbytes k-bit."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    types.extend(bnb_linear_types())
    return tuple(types)


def conv1d_type() -> Optional[type]:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with its weight stored in x out), if available."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def bnb_linear_types() -> tuple[type, ...]:
    """bitsandbytes' Linear4bit / Linear8bitLt if bitsandbytes is loaded, else ().

    A model holding such layers has imported bitsandbytes already, so there is no
    need to import it here (which is slow and prints backend warnings).
    """
    bnb = sys.modules.get("bitsandbytes")
    nn_module = getattr(bnb, "nn", None)
    if nn_module is None:
        return ()
    return (nn_module.Linear4bit, nn_module.Linear8bitLt)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head and its aliases) to leave out of "all-linear"."""
    names: set[str] = set()
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    if not names and hasattr(model, "lm_head"):
        names.add("lm_head")
    return names


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Every distinct linear-layer name suffix (4-bit/8-bit ones too) except the output head.

    Returns short names such as ``["down_proj", "gate_proj", "k_proj", ...]`` as users
    write them by hand in ``target_modules``.
    """
    linear = linear_layer_types()
    head = _output_head_names(model)
    found: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, linear) and name not in head and not _is_adapter_internal(name):
            found.add(name.split(".")[-1])
    return sorted(found)


def _is_adapter_internal(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("lora_") or p in ("base_layer", "modules_to_save", "original_module") for p in parts)


def _layer_index(name: str, patterns: Sequence[str]) -> Optional[int]:
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def name_matches(name: str, spec: TargetSpec) -> bool:
    """Does module ``name`` match a target spec (regex string or list of names/suffixes)?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_default_targets(model: nn.Module) -> list[str]:
    """The per-architecture default targets, or an error that says what to pass instead."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    hint = ", ".join(find_all_linear_names(model)[:12])
    raise ValueError(
        f"no default target_modules for {type(model).__name__} (model_type={model_type!r}); "
        f"pass target_modules explicitly, e.g. a list of layer names ({hint}) or 'all-linear'"
    )


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
    allowed_types: Optional[tuple[type, ...]] = None,
) -> list[str]:
    """Names of the modules ``target_modules`` selects, in model order.

    Raises ``ValueError`` naming the request and some existing module names when
    nothing matches, and naming the modules when it selects some that are not of
    ``allowed_types`` (the method cannot adapt them).
    """
    if target_modules is None:
        target_modules = resolve_default_targets(model)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    linear = linear_layer_types()
    head = _output_head_names(model) if all_linear else set()
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    patterns = list(layers_pattern or DEFAULT_LAYER_PATTERNS)

    selected: list[str] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or _is_adapter_internal(name):
            continue
        if all_linear:
            # a layer already grafted counts as what it wraps, so a second adapter finds the same layers
            wrapped = getattr(module, "base_layer", None)
            layer = wrapped if isinstance(wrapped, nn.Module) else module
            if not isinstance(layer, linear) or name in head:
                continue
        elif not name_matches(name, target_modules):
            continue
        if exclude_modules is not None and name_matches(name, exclude_modules):
            continue
        if layers_to_transform is not None:
            if _layer_index(name, patterns) not in set(layers_to_transform):
                continue
        if allowed_types is not None and not isinstance(module, allowed_types):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        selected.append(name)

    if not selected:
        raise TargetsNotFoundError(_no_match_message(model, target_modules, layers_to_transform, allowed_types))
    if unsupported:  # named, not skipped: the user asked for them (HF PEFT refuses them too)
        shown = ", ".join(unsupported[:5]) + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        raise ValueError(f"target_modules={target_modules!r} selects modules this method cannot adapt: {shown}. "
                         f"Supported types: {', '.join(t.__name__ for t in allowed_types)}; leave those out of "
                         "target_modules (or list them in exclude_modules)"
                         + ("; LoHa and LoKr adapt nn.Conv2d" if "(Conv2d)" in shown else ""))
    return selected


def config_targets(model: nn.Module, config: Any, target_modules: TargetSpec = None,
                   allowed_types: Optional[tuple[type, ...]] = None) -> list[str]:
    """The modules an adapter config grafts onto (:func:`find_targets` with its settings).

    Modules trained whole (``modules_to_save``, e.g. a classifier head) are left out, sub-modules
    included: RoBERTa's head holds ``classifier.dense``, which "all-linear" would otherwise match.
    ``target_modules`` overrides the config's (a method that resolves its own).
    """
    keep_whole = list(getattr(config, "modules_to_save", None) or [])
    targets = find_targets(model, target_modules if target_modules is not None else config.target_modules,
                           config.exclude_modules, config.layers_to_transform, config.layers_pattern,
                           allowed_types=allowed_types)
    return [n for n in targets if not _within(n, keep_whole)]


def _within(name: str, modules: Sequence[str]) -> bool:
    """Whether ``name`` is one of ``modules`` (names or suffixes) or inside one."""
    parts = name.split(".")
    return bool(modules) and any(name_matches(".".join(parts[:i]), modules) for i in range(1, len(parts) + 1))


class TargetsNotFoundError(ValueError):
    """``target_modules`` matched no module of the model (an adapter made for another architecture)."""


def _no_match_message(model, target_modules, layers_to_transform, allowed_types) -> str:
    from .tuner import AdapterLayer, ModulesToSaveWrapper  # the tuner builds on this module

    # An adapter layer counts as the module it wraps (q_proj), not as its parts (base_layer, lora_A.<name>).
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]

    def inside(name: str) -> bool:
        return any(name.startswith(w + ".") for w in wrappers)

    names = [n for n, _ in model.named_modules() if n and not inside(n)]
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules()
                     if n and not inside(n) and (n in wrappers or not list(m.children()))})
    msg = f"target_modules={target_modules!r} matched no module of {type(model).__name__}"
    if layers_to_transform is not None:
        msg += f" within layers {list(layers_to_transform)}"
    if allowed_types is not None:
        msg += f" of a supported type ({', '.join(t.__name__ for t in allowed_types)})"
    msg += f". Module names that exist include: {', '.join(leaves[:20])}"
    msg += f" (full names look like {names[min(len(names) - 1, 5)]!r})" if names else ""
    return msg


def tied_weights(model: nn.Module, targets: Sequence[str]) -> dict[str, list[str]]:
    """Targets whose ``weight`` is also another module's (a tied input/output embedding), with those modules."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module_name)
    shared = {}
    for name in targets:
        module = model.get_submodule(name)
        weight = getattr(module, "base_layer", module)._parameters.get("weight")
        others = [o for o in owners.get(id(weight), []) if o != name and not o.startswith(name + ".")]
        if others:
            shared[name] = others
    return shared


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute the child lives under."""
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` was; return the old module."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def parameter_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def iter_named(model: nn.Module, cls: type) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, cls):
            yield name, module

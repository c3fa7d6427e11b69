"""Bottleneck adapters: series (Houlsby et al., 2019) and parallel (He et al., 2022).

A small two-layer network ``f(z) = up(dropout(act(down(z))))`` (``down``:
dim -> ``bottleneck_size``, ``up``: ``bottleneck_size`` -> dim, both with bias)
is added around a sub-layer ``g`` (an attention or feed-forward block, or its
output projection):

* **series** (Houlsby): after the sub-layer, on its output::

      h = g(x);   h <- h + s * f(h)

* **parallel** (He et al.): beside the sub-layer, on its input::

      h = g(x) + s * f(x)

``s`` is ``scaling`` (default 1.0, which is Houlsby's plain residual for series).
``up`` starts at zero (weight and bias), so the wrapped model first computes
exactly what the base did. The adapter is non-linear, so it cannot be merged
into the base weights: ``merge_adapter`` / ``merge_and_unload`` refuse with an
error, ``unload()`` removes it.

This method is tsugiki's own (HF PEFT has no bottleneck adapter); its files use
``peft_type: BOTTLENECK`` and the keys ``<module>.adapter_down.weight`` /
``.bias`` and ``<module>.adapter_up.weight`` / ``.bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import (PeftConfig, PeftType, config_from_method_args, module_spec_problem, register_config,
                      register_method)
from ..inject import config_targets, replace_module
from ..tuner import AdapterLayer, BaseTuner, register_tuner, rows_per_adapter

ADAPTER_TYPES = ("series", "parallel")
PLACEMENTS = ("attn", "ffn", "both")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# model_type -> the modules each placement wraps: series wraps a sub-layer's output projection
# (whose output is the sub-layer's output), parallel wraps the whole sub-layer (to see its input).
_LLAMA_LIKE = {"series": {"attn": "self_attn.o_proj", "ffn": "mlp.down_proj"},
               "parallel": {"attn": "self_attn", "ffn": "mlp"}}
DEFAULT_PLACES: dict[str, dict[str, dict[str, str]]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3", "stablelm")},
    "gpt2": {"series": {"attn": "attn.c_proj", "ffn": "mlp.c_proj"}, "parallel": {"attn": "attn", "ffn": "mlp"}},
}

Spec = Optional[Union[list[str], str]]


@register_config
@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (tsugiki's own method; see the module docstring).

    Args:
        adapter_type: ``"series"`` (default; after the sub-layer) or ``"parallel"`` (beside it).
        bottleneck_size: width of the bottleneck (default 64).
        non_linearity: ``"relu"`` (default), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        adapter_dropout: dropout on the bottleneck activation, training only (default 0.0).
        scaling: ``s`` multiplying the adapter's output (default 1.0).
        adapter_layers: which sub-layers get an adapter when ``target_modules`` is ``None``:
            ``"attn"``, ``"ffn"`` or ``"both"``; ``None`` (default) means ``"both"`` for series
            (Houlsby) and ``"ffn"`` for parallel (He et al.'s best placement). Llama: series wraps
            ``self_attn.o_proj`` / ``mlp.down_proj``, parallel wraps ``self_attn`` / ``mlp``.
        target_modules: modules to wrap instead (names / suffixes or a regex). Series adds the
            adapter to the module's output; parallel feeds it the module's input (a module that
            returns a tuple has its first element adapted).
        exclude_modules: modules to leave alone (same forms as ``target_modules``).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        modules_to_save: modules trained in full and saved beside the adapter.
        init_weights: ``True`` (default): ``up`` starts at zero (a no-op); ``False``: random ``up``
            (for tests).
    """

    peft_type_name = PeftType.BOTTLENECK.value

    adapter_type: str = "series"
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    scaling: float = 1.0
    adapter_layers: Optional[str] = None
    target_modules: Spec = None
    exclude_modules: Spec = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"BottleneckConfig: {key}={getattr(self, key)!r} is invalid: {why}")

        if self.adapter_type not in ADAPTER_TYPES:
            raise bad("adapter_type", "use 'series' (after the sub-layer) or 'parallel' (beside it)")
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise bad("bottleneck_size", "must be a positive integer, e.g. 64")
        if self.non_linearity not in ACTIVATIONS:
            raise bad("non_linearity", f"use one of {', '.join(ACTIVATIONS)}")
        drop = self.adapter_dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
            raise bad("adapter_dropout", "must be a probability in [0, 1)")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise bad("scaling", "must be a number, e.g. 1.0")
        if self.adapter_layers is not None and self.adapter_layers not in PLACEMENTS:
            raise bad("adapter_layers", "use 'attn', 'ffn' or 'both' (or None for the adapter type's default)")
        if self.adapter_layers is not None and self.target_modules is not None:
            raise bad("adapter_layers", "it picks the default targets; with target_modules set, leave it None")
        for key in ("target_modules", "exclude_modules"):
            problem = module_spec_problem(getattr(self, key))
            if problem:
                raise bad(key, problem)
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules or []
        if any(isinstance(name, str) and name.lower() == "all-linear" for name in names):
            raise bad("target_modules", "'all-linear' is for LoRA-like methods; name the sub-layers to wrap")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise bad("layers_pattern", "it only applies together with layers_to_transform")
        if not isinstance(self.init_weights, bool):
            raise bad("init_weights", "use True (up-projection starts at zero) or False (random)")

    def default_targets(self, model: nn.Module) -> list[str]:
        """The modules ``adapter_layers`` names for this architecture (series: projections, parallel: blocks)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_PLACES:
            raise ValueError(f"no default bottleneck placement for {type(model).__name__} (model_type="
                             f"{model_type!r}); pass target_modules, e.g. the attention/MLP block names")
        places = DEFAULT_PLACES[model_type][self.adapter_type]
        wanted = ("attn", "ffn") if self.adapter_layers == "both" else (self.adapter_layers,)
        return [places[w] for w in wanted]


class BottleneckLayer(AdapterLayer, nn.Module):
    """Wraps a sub-module and adds ``s * up(dropout(act(down(z))))`` to its output (see module docstring)."""

    adapter_param_names = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, in_dim: int, out_dim: int):
        super().__init__()
        self._init_adapter_state()
        self.base_layer = base_layer
        self.in_dim, self.out_dim = in_dim, out_dim
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_type: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, name: str, config: BottleneckConfig, init: bool) -> None:
        source = self.out_dim if config.adapter_type == "series" else self.in_dim
        device, dtype = _device_dtype(self.base_layer)
        kw = {"device": device, "dtype": dtype}
        self.adapter_down[name] = nn.Linear(source, config.bottleneck_size, **kw)
        self.adapter_up[name] = nn.Linear(config.bottleneck_size, self.out_dim, **kw)
        self.adapter_act[name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[name] = nn.Dropout(config.adapter_dropout) if config.adapter_dropout else nn.Identity()
        self.adapter_type[name] = config.adapter_type
        self.scaling[name] = float(config.scaling)
        if init:  # zero up-projection: the adapter starts as a no-op
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)

    def _adapter_out(self, name: str, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        source = hidden if self.adapter_type[name] == "series" else x
        down = self.adapter_down[name]
        z = self.adapter_dropout[name](self.adapter_act[name](down(source.to(down.weight.dtype))))
        return (self.adapter_up[name](z) * self.scaling[name]).to(hidden.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if x is None and "parallel" in self.adapter_type.values():
            raise ValueError(f"parallel bottleneck adapter around {type(self.base_layer).__name__}: cannot find its "
                             "input (pass it first or as hidden_states=); target another module")
        mixed = self._check_mixed_batch()
        if mixed is not None:
            hidden = hidden.clone()
            for name, rows in rows_per_adapter(mixed, hidden.shape[0]).items():
                if name in self.adapter_down:
                    rows = rows.to(hidden.device)
                    hidden[rows] = hidden[rows] + self._adapter_out(name, x[rows], hidden[rows])
        elif self.active_adapter in self.adapter_down:
            hidden = hidden + self._adapter_out(self.active_adapter, x, hidden)
        else:
            return out
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def unmerge(self, name: Optional[str] = None) -> None:
        return None  # never merged

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for holder in (self.adapter_dropout, self.adapter_act):
            if name in holder:
                del holder[name]
        self.adapter_type.pop(name, None)
        self.scaling.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        # Code that reads attributes of the wrapped block (layer_idx, config, weight, ...) still finds them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"in={self.in_dim}, out={self.out_dim}, types={self.adapter_type}"


_CANNOT_MERGE = ("bottleneck adapters are non-linear (h + s * up(act(down(z)))), so they cannot be merged into "
                 "the base weights; keep the adapter attached for inference, or call unload() to remove it")


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        # Half-precision / k-bit bases keep their adapters in fp32 (stable updates).
        return p.device, p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.device("cpu"), torch.float32


def _dims(module: nn.Module, hidden_size: Optional[int]) -> tuple[int, int]:
    """(input, output) width of the wrapped module: a linear layer's own, else the model's hidden size."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers Conv1D
        return int(module.nx), int(module.nf)
    if hidden_size is None:
        raise ValueError(f"cannot tell the width of {type(module).__name__}: the model config has no hidden_size; "
                         "target linear layers instead")
    return hidden_size, hidden_size


def _hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None)


@register_tuner(PeftType.BOTTLENECK.value)
class BottleneckModel(BaseTuner):
    """``PeftModel.base_model`` for bottleneck adapters: wraps sub-modules in :class:`BottleneckLayer`."""

    layer_classes = (BottleneckLayer,)

    def _inject(self, config: BottleneckConfig, adapter_name: str, init_weights: bool) -> None:
        if config.target_modules is None and config.adapter_layers is None:
            # record the resolved placement in the saved config
            config.adapter_layers = "both" if config.adapter_type == "series" else "ffn"
        targets_spec = config.target_modules if config.target_modules is not None else config.default_targets(self.model)
        targets = config_targets(self.model, config, target_modules=targets_spec)
        # a wrapped block's own children are not wrapped again (nested adapters would double-count)
        targets = [t for t in targets if not any(t.startswith(o + ".") for o in targets if o != t)]
        hidden = _hidden_size(self.model)
        for name in targets:
            target = self.model.get_submodule(name)
            if isinstance(target, BottleneckLayer):
                layer = target
            else:
                layer = BottleneckLayer(target, *_dims(target, hidden))
            layer.update_layer(adapter_name, config, init=config.init_weights if init_weights else True)
            layer.set_adapter(self.active_adapter, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)

    def merge_adapter(self, adapter_names: Any = None, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(_CANNOT_MERGE)


def _builder(adapter_type: str):
    def build(cfg: Any, base_name: str) -> BottleneckConfig:
        fixed: dict[str, Any] = {"adapter_type": adapter_type, "task_type": "CAUSAL_LM",
                                 "base_model_name_or_path": base_name}
        if cfg.target_modules:
            fixed["target_modules"] = list(cfg.target_modules)
        args = dict(cfg.method_args or {})
        if args.get("adapter_type", adapter_type) != adapter_type:
            raise ValueError(f"method_args: adapter_type={args['adapter_type']!r} contradicts the method "
                             f"{adapter_type}_adapter; drop it or pick the other method")
        args.pop("adapter_type", None)
        return config_from_method_args(BottleneckConfig, args, **fixed)

    build.__doc__ = (f"{adapter_type.capitalize()} bottleneck adapter for ``tsugiki train``: any "
                     "BottleneckConfig option in ``method_args`` (bottleneck_size, non_linearity, ...).")
    return build


series_adapter_from_train_config = register_method("series_adapter", reads=("target_modules",))(_builder("series"))
parallel_adapter_from_train_config = register_method("parallel_adapter", reads=("target_modules",))(_builder("parallel"))

"""(IA)^3: infused adapters that rescale activations (Liu et al., 2022).

Each targeted linear layer ``h = W x + b`` gets one learned vector ``l``:

* attention-type targets (e.g. Llama ``k_proj``, ``v_proj``) scale the output::

      h = l * (W x + b)                 l: out_features, stored as (out, 1)

* feed-forward targets (listed in ``feedforward_modules``, e.g. ``down_proj``)
  scale the input::

      h = W (l * x) + b                 l: in_features, stored as (1, in)

``l`` starts at ones, so the wrapped model first computes what the base did.
Merging is exact: output scaling multiplies the rows of ``W`` (and ``b``),
input scaling multiplies its columns. Unmerging divides again; rows or columns
whose scale is zero cannot be recovered by division, so they are kept aside
at merge time and restored.

Layers covered: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored
in x out) and bitsandbytes ``Linear4bit`` / ``Linear8bitLt``.
File keys follow HF PEFT: ``<module>.ia3_l``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import (PeftConfig, PeftType, config_from_method_args, module_spec_problem, register_config,
                      register_method, train_targets)
from ..inject import bnb_linear_types, config_targets, conv1d_type, linear_layer_types, replace_module
from ..tuner import AdapterLayer, BaseTuner, register_tuner, rows_per_adapter

# model_type -> default targets / the feed-forward ones among them (HF PEFT's per-architecture defaults).
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"], "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"], "bart": ["fc2"], "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"],
    "llama4": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "bert": ["output.dense"],
    "deberta-v2": ["output.dense"], "deberta": ["output.dense"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}

Spec = Optional[Union[list[str], str]]


@register_config
@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter (HF PEFT's ``IA3Config`` names and defaults).

    Args:
        target_modules: module names / name suffixes, a regex over the full name, ``"all-linear"``,
            or ``None`` for the architecture's default (Llama: ``k_proj``, ``v_proj``, ``down_proj``).
        feedforward_modules: the targets whose *input* is scaled (a subset of ``target_modules``);
            ``None``: the architecture's default (Llama: ``down_proj``), or none if it has no default.
            A list entry matches a module whose name ends with it; a string is a regex.
        exclude_modules: modules to leave alone (same forms as ``target_modules``).
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set automatically).
        modules_to_save: modules trained in full and saved beside the adapter (e.g. a new head).
        init_ia3_weights: ``True`` (default): ``l`` starts at ones (a no-op); ``False``: random
            normal values (for tests).
        layers_to_transform / layers_pattern: restrict to these layer indices (tsugiki extension;
            the chosen modules are written into ``target_modules`` by full name so HF PEFT, which
            lacks these options, selects the same ones).
    """

    peft_type_name = PeftType.IA3.value

    target_modules: Spec = None
    feedforward_modules: Spec = None
    exclude_modules: Spec = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # HF PEFT's IA3Config has no layer options: leave them out when unused so it loads without warnings.
        for key in ("layers_to_transform", "layers_pattern"):
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"IA3Config: {key}={getattr(self, key)!r} is invalid: {why}")

        for key in ("target_modules", "feedforward_modules", "exclude_modules"):
            problem = module_spec_problem(getattr(self, key))
            if problem:
                raise bad(key, problem)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise bad("feedforward_modules", f"{extra} are not in target_modules; feedforward_modules must "
                          "name a subset of the targets")
        if not isinstance(self.init_ia3_weights, bool):
            raise bad("init_ia3_weights", "use True (vectors start at ones) or False (random)")
        if not isinstance(self.fan_in_fan_out, bool):
            raise bad("fan_in_fan_out", "use True or False")
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)
                                       or isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
            raise bad("layers_to_transform", "give a layer index or a list of them")
        if isinstance(self.target_modules, str) and layers is not None:
            raise bad("layers_to_transform", "it cannot be combined with a regex/'all-linear' target_modules; "
                      "list the module names instead, or put the layer indices into the regex")
        if self.layers_pattern is not None and layers is None:
            raise bad("layers_pattern", "it only applies together with layers_to_transform")


def is_feedforward(name: str, feedforward_modules: Spec) -> bool:
    """HF PEFT's rule: a regex must match the whole name; a list entry matches a name ending with it."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(key) for key in feedforward_modules)


class IA3Linear(AdapterLayer, nn.Module):
    """(IA)^3 around a linear-like layer; see the module docstring for the formula."""

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, fan_in_fan_out: bool = False):
        super().__init__()
        self._init_adapter_state()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_shape(base_layer, fan_in_fan_out)
        self.ia3_l = nn.ParameterDict()
        # name -> (index of the zero scales, the weight/bias slices they erased at merge time)
        self._erased: dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}

    def update_layer(self, name: str, init: bool) -> None:
        weight = getattr(self.base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype in (torch.float32, torch.float64) \
            else torch.float32  # half/k-bit bases keep their vectors in fp32
        device = weight.device if weight is not None else torch.device("cpu")
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vec = torch.ones(shape, dtype=dtype, device=device) if init else torch.randn(shape, dtype=dtype,
                                                                                      device=device)
        self.ia3_l[name] = nn.Parameter(vec)

    def _scale(self, name: str) -> torch.Tensor:
        return self.ia3_l[name].flatten()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            self.unmerge_all()
            return self.base_layer(x, *args, **kwargs)
        mixed = self._check_mixed_batch()
        if mixed is not None:
            return self._mixed_forward(x, mixed, *args, **kwargs)
        name = self.active_adapter
        if self.merged or name not in self.ia3_l:
            return self.base_layer(x, *args, **kwargs)
        scale = self._scale(name)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out.to(scale.dtype) * scale).to(out.dtype)

    def _mixed_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One scale vector per batch row (rows of other adapters / the base keep scale 1)."""
        n = self.in_features if self.is_feedforward else self.out_features
        dtype = next(iter(self.ia3_l.values())).dtype
        scale = torch.ones(x.shape[0], n, dtype=dtype, device=x.device)
        for name, rows in rows_per_adapter(names, x.shape[0]).items():
            if name in self.ia3_l:
                scale[rows.to(x.device)] = self._scale(name)
        scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), n)  # broadcast over sequence positions
        if self.is_feedforward:
            return self.base_layer((x.to(dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out.to(dtype) * scale).to(out.dtype)

    # -- merging: multiply the weight's rows (output scale) or columns (input scale) ----------
    def _scaled_dim(self) -> int:
        """The stored weight's dimension ``l`` scales: 0 (rows) or 1 (columns).

        The weight is (out, in), or (in, out) with fan_in_fan_out; an output scale acts on ``out``.
        """
        on_out = not self.is_feedforward
        return int(on_out == self.fan_in_fan_out)

    def _weight_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` shaped to broadcast over the stored weight."""
        return scale[:, None] if self._scaled_dim() == 0 else scale[None, :]

    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        if name in self.merged_adapters:
            return
        scale = self._scale(name).detach().float()
        if safe_merge and not torch.isfinite(scale).all():
            raise ValueError(f"refusing to merge (IA)^3 adapter {name!r}: its scale vector contains NaN/Inf")
        weight, bias = self._base_weight(), self._base_bias()
        zero = (scale == 0).nonzero().flatten()
        if len(zero):  # division cannot bring these back: remember them
            erased_w = weight.index_select(self._scaled_dim(), zero).clone()
            erased_b = bias[zero].clone() if bias is not None and not self.is_feedforward else None
            self._erased[name] = (zero, erased_w, erased_b)
        self._write_base(weight * self._weight_scale(scale),
                         bias * scale if bias is not None and not self.is_feedforward else None)
        self.merged_adapters.append(name)

    def unmerge(self, name: Optional[str] = None) -> None:
        if name is None:
            return self.unmerge_all()
        if name not in self.merged_adapters:
            return
        scale = self._scale(name).detach().float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        weight, bias = self._base_weight(), self._base_bias()
        weight = weight / self._weight_scale(safe)
        scales_bias = bias is not None and not self.is_feedforward
        bias = bias / safe if scales_bias else None
        if name in self._erased:
            zero, erased_w, erased_b = self._erased.pop(name)
            weight = weight.index_copy(self._scaled_dim(), zero, erased_w)
            if erased_b is not None:
                bias = bias.index_copy(0, zero, erased_b)
        self._write_base(weight, bias)
        self.merged_adapters.remove(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._erased.pop(name, None)

    def _base_weight(self) -> torch.Tensor:
        if isinstance(self.base_layer, bnb_linear_types()):
            from ..quant import dequantize_weight

            return dequantize_weight(self.base_layer).float()
        return self.base_layer.weight.data.float()

    def _base_bias(self) -> Optional[torch.Tensor]:
        bias = getattr(self.base_layer, "bias", None)
        return bias.data.float() if bias is not None else None

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        base = self.base_layer
        with torch.no_grad():
            if isinstance(base, bnb_linear_types()):
                from ..quant import requantize_like

                requantize_like(base, weight)
            else:
                base.weight.data = weight.to(base.weight.dtype)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, feedforward={self.is_feedforward}, "
                f"fan_in_fan_out={self.fan_in_fan_out}")


def _linear_shape(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if hasattr(layer, "nf") and hasattr(layer, "nx"):  # transformers Conv1D
        return int(layer.nx), int(layer.nf)
    rows, cols = layer.weight.shape
    return (rows, cols) if fan_in_fan_out else (cols, rows)


@register_tuner(PeftType.IA3.value)
class IA3Model(BaseTuner):
    """``PeftModel.base_model`` for (IA)^3: grafts :class:`IA3Linear` onto the targets."""

    layer_classes = (IA3Linear,)

    def _inject(self, config: IA3Config, adapter_name: str, init_weights: bool) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if config.target_modules is None:  # record the resolved defaults in the saved config
            if model_type not in IA3_DEFAULT_TARGETS:
                raise ValueError(f"no default (IA)^3 target_modules for {type(self.model).__name__} "
                                 f"(model_type={model_type!r}); pass target_modules (and feedforward_modules)")
            config.target_modules = list(IA3_DEFAULT_TARGETS[model_type])
        if config.feedforward_modules is None:
            config.feedforward_modules = list(IA3_DEFAULT_FEEDFORWARD.get(model_type, []))
        targets = config_targets(self.model, config)
        supported = linear_layer_types() + (IA3Linear,)
        for name in targets:
            if not isinstance(self.model.get_submodule(name), supported):
                kind = type(self.model.get_submodule(name)).__name__
                raise ValueError(f"(IA)^3 target {name!r} is a {kind}; only linear layers (nn.Linear, Conv1D, "
                                 "bitsandbytes 4/8-bit) are supported. Narrow target_modules to linear layers")
        if config.layers_to_transform is not None:
            # HF PEFT has no layers_to_transform for (IA)^3: name the chosen modules exactly instead.
            config.feedforward_modules = [n for n in targets if is_feedforward(n, config.feedforward_modules)]
            config.target_modules = list(targets)
        conv1d = conv1d_type()
        init = config.init_ia3_weights if init_weights else True
        for name in targets:
            target = self.model.get_submodule(name)
            if isinstance(target, IA3Linear):
                layer = target
            else:
                fan_in_fan_out = config.fan_in_fan_out
                if conv1d is not None and isinstance(target, conv1d):
                    if not fan_in_fan_out:
                        warnings.warn(f"{name} is a Conv1D (weight stored in x out): using fan_in_fan_out=True",
                                      stacklevel=4)
                    fan_in_fan_out = config.fan_in_fan_out = True
                elif fan_in_fan_out:
                    warnings.warn(f"fan_in_fan_out=True but {name} is a {type(target).__name__} (weight stored "
                                  "out x in): using fan_in_fan_out=False", stacklevel=4)
                    fan_in_fan_out = config.fan_in_fan_out = False
                layer = IA3Linear(target, is_feedforward(name, config.feedforward_modules), fan_in_fan_out)
            layer.update_layer(adapter_name, init)
            layer.set_adapter(self.active_adapter, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)


@register_method("ia3", reads=("target_modules",))
def ia3_from_train_config(cfg: Any, base_name: str) -> IA3Config:
    """(IA)^3 for ``tsugiki train``: ``target_modules`` (if set) plus any IA3Config option in ``method_args``."""
    targets = train_targets(cfg.target_modules)
    fixed: dict[str, Any] = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_name}
    if targets:
        fixed["target_modules"] = targets
    return config_from_method_args(IA3Config, cfg.method_args, **fixed)

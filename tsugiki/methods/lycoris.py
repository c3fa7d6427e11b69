"""What LoHa and LoKr (the LyCORIS family) share: config fields, the layer, the tuner.

Both methods build a full-size update ``delta_W`` from small factors and add
``F.linear(x, delta_W)`` (or ``F.conv2d``) to the base output. Subclasses give
the factors (``create_factors``), their initialisation and ``delta_weight``; this
module does the bookkeeping, the dropouts, merging and injection.

* ``rank_dropout`` (training only): zero whole output rows of ``delta_W`` with this
  probability (LoHa rescales the kept rows by ``1 / mean(kept)``; LoKr only with
  ``rank_dropout_scale=True``), as HF PEFT does.
* ``module_dropout`` (training only): skip the whole adapter for a forward pass with
  this probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import PeftConfig, config_from_method_args, module_spec_problem, train_targets
from ..inject import bnb_linear_types, config_targets, replace_module, resolve_default_targets
from ..tuner import AdapterLayer, BaseTuner
from .lora import _pattern_value


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (HF PEFT's names and defaults; see the subclasses)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None

    init_choices: ClassVar[tuple] = (True, False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def _bad(self, key: str, why: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: {key}={getattr(self, key)!r} is invalid: {why}")

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise self._bad("r", "the rank must be a positive integer, e.g. 8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise self._bad("alpha", "must be a positive number, e.g. 8")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise self._bad(key, "must be a probability in [0, 1)")
        if not isinstance(self.use_effective_conv2d, bool):
            raise self._bad("use_effective_conv2d", "must be True or False")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c)
                   for c in self.init_choices):
            raise self._bad("init_weights", f"use one of {', '.join(map(repr, self.init_choices))}")
        for key in ("target_modules", "exclude_modules"):
            problem = module_spec_problem(getattr(self, key))
            if problem:
                raise self._bad(key, problem)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise self._bad("layers_to_transform", "it cannot be combined with a regex/'all-linear' "
                            "target_modules; list the module names instead")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise self._bad("layers_pattern", "it only applies together with layers_to_transform")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: rank_pattern[{key!r}]={value!r} must be a positive integer")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{type(self).__name__}: alpha_pattern[{key!r}]={value!r} must be a positive number")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``r`` and ``alpha`` for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))


class LycorisLayer(AdapterLayer, nn.Module):
    """A frozen ``nn.Linear`` / ``nn.Conv2d`` plus ``F.linear(x, delta_W)`` per adapter.

    Subclasses set ``adapter_param_names`` (all ``nn.ParameterDict``, the first one
    present for every adapter) and implement ``create_factors``, ``init_factors``
    and ``delta_weight``.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self._init_adapter_state()
        self.base_layer = base_layer
        for attr in self.adapter_param_names:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    # -- creating ---------------------------------------------------------------------------
    def update_layer(self, name: str, r: int, alpha: float, config: LycorisConfig, init: Union[bool, str]) -> None:
        self.r[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.rank_dropout_scale[name] = self._rank_dropout_rescales(config)
        self.module_dropout[name] = config.module_dropout
        base = self.base_layer
        effective = (config.use_effective_conv2d and isinstance(base, nn.Conv2d)
                     and tuple(base.kernel_size) != (1, 1))  # a 1x1 kernel is a plain matrix
        for attr, shape in self.create_factors(r, config, effective).items():
            weight = base.weight
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            getattr(self, attr)[name] = nn.Parameter(torch.empty(shape, dtype=dtype, device=weight.device))
        if not base.weight.is_meta:
            with torch.no_grad():
                self.init_factors(name, init)

    def _rank_dropout_rescales(self, config: LycorisConfig) -> bool:
        return True

    def create_factors(self, r: int, config: LycorisConfig, effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
        """``{attribute name: shape}`` of the factors of one adapter."""
        raise NotImplementedError

    def init_factors(self, name: str, init: Union[bool, str]) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """``delta_W`` in the factors' dtype, shaped like the base weight, scaling included."""
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        base = self.base_layer
        if isinstance(base, bnb_linear_types()):  # the stored weight is packed; use the logical shape
            return (base.out_features, base.in_features)
        return tuple(base.weight.shape)

    def flat_shape(self) -> tuple[int, int]:
        """The base weight as a matrix: (out, in * kernel area)."""
        shape = self.weight_shape
        return shape[0], int(torch.Size(shape[1:]).numel())

    # -- running ----------------------------------------------------------------------------
    def _delta_for_forward(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``delta_W`` for a forward: cast to ``dtype`` (None: the factors' own), with rank dropout.

        Under autograd the update is checkpointed: backward remakes the full-size fp32
        intermediates (LoHa's two Hadamard factors, the fp32 product) from the small factors
        instead of keeping them, so a forward keeps only the cast update.
        """
        factors = [getattr(self, attr)[name] for attr in self.adapter_param_names if name in getattr(self, attr)]
        if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
            weight = checkpoint(self._cast_delta, name, dtype, use_reentrant=False)
        else:
            weight = self._cast_delta(name, dtype)
        p = self.rank_dropout[name]
        if self.training and p:
            keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(weight.dtype)
            if self.rank_dropout_scale[name]:
                keep = keep / keep.mean().clamp_min(torch.finfo(weight.dtype).tiny)
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1))
        return weight

    def _cast_delta(self, name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
        delta = self.delta_weight(name)
        return delta if dtype is None else delta.to(dtype)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        x = x.to(delta.dtype)
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation,
                            groups=base.groups)
        return F.linear(x, delta)

    def _adapter_out(self, x: torch.Tensor, name: str, base_out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if self.training and self.module_dropout[name] and torch.rand(1).item() <= self.module_dropout[name]:
            return None  # module dropout: this step runs without the adapter
        # A bf16/fp16 input (the compute dtype) multiplies the update at its own precision, as
        # autocast would; the fp32 factors and their gradients stay fp32.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None
        return self._apply_delta(x, self._delta_for_forward(name, dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.additive_forward(x, *args, **kwargs)

    # -- merging ----------------------------------------------------------------------------
    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        if name in self.merged_adapters:
            return  # idempotent
        delta = self.delta_weight(name).detach().float()
        if safe_merge and not torch.isfinite(delta).all():
            raise ValueError(f"refusing to merge adapter {name!r}: its update for this layer contains NaN/Inf "
                             f"(layer {type(self.base_layer).__name__} {tuple(delta.shape)})")
        self._add_to_base_weight(delta)
        self.merged_adapters.append(name)

    def unmerge(self, name: Optional[str] = None) -> None:
        if name is None:
            return self.unmerge_all()
        if name not in self.merged_adapters:
            return
        self._add_to_base_weight(-self.delta_weight(name).detach().float())
        self.merged_adapters.remove(name)

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        if isinstance(self.base_layer, bnb_linear_types()):  # merge in fp32, quantize again
            from ..quant import dequantize_weight, requantize_like

            requantize_like(self.base_layer, dequantize_weight(self.base_layer) + delta)
            return
        w = self.base_layer.weight
        with torch.no_grad():
            w.data = (w.data.float() + delta).to(w.dtype)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``delta_W`` in fp32, shaped like the base weight (HF PEFT's name)."""
        return self.delta_weight(name).float()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for table in (self.alpha, self.rank_dropout, self.rank_dropout_scale, self.module_dropout):
            table.pop(name, None)

    def extra_repr(self) -> str:
        return f"base={tuple(self.weight_shape)}"


class LycorisTuner(BaseTuner):
    """``PeftModel.base_model`` for a LyCORIS method: wraps Linear / Conv2d targets in ``layer_classes[0]``."""

    layer_classes: tuple[type[LycorisLayer], ...] = ()
    method_name = "LyCORIS"

    def _inject(self, config: LycorisConfig, adapter_name: str, init_weights: bool) -> None:
        if config.target_modules is None:  # record the resolved default in the saved config
            config.target_modules = resolve_default_targets(self.model)
        targets = config_targets(self.model, config)
        init = config.init_weights if init_weights else False
        for name in targets:
            target = self.model.get_submodule(name)
            layer = target if isinstance(target, self.layer_classes) else self._wrap(name, target)
            r, alpha = config.rank_and_alpha(name)
            layer.update_layer(adapter_name, r, alpha, config, init)
            layer.set_adapter(self.active_adapter, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)

    def _wrap(self, name: str, target: nn.Module) -> LycorisLayer:
        kbit = bnb_linear_types()
        # Subclasses count (Falcon's FalconLinear); GPT-2's Conv1D is not an nn.Linear.
        if not isinstance(target, (nn.Linear, nn.Conv2d)) and not (kbit and isinstance(target, kbit)):
            raise ValueError(f"{self.method_name} supports nn.Linear and nn.Conv2d targets, but {name} is "
                             f"{type(target).__name__}; remove it from target_modules (or use LoRA, which "
                             "also covers GPT-2's Conv1D and embeddings)")
        layer = self.layer_classes[0](target)
        return layer.train(target.training)  # dropouts follow the mode the model is in


def lycoris_from_train_config(cls: type[LycorisConfig], cfg: Any, base_name: str) -> LycorisConfig:
    """A LoHa/LoKr config for ``tsugiki train``: r/alpha from ``lora_r``/``lora_alpha``, the rest from method_args."""
    return config_from_method_args(cls, cfg.method_args, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                   target_modules=train_targets(cfg.target_modules), task_type="CAUSAL_LM",
                                   base_model_name_or_path=base_name)

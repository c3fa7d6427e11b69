"""LoRA: low-rank adaptation (Hu et al., 2021), with rsLoRA scaling, PiSSA init and DoRA.

A frozen weight ``W0`` (out x in) gets a trainable low-rank update::

    h = W0 x + s * B A dropout(x),    A: r x in,  B: out x r,  s = alpha / r

(``s = alpha / sqrt(r)`` with ``use_rslora=True``). ``B`` starts at zero, so the
wrapped model first computes exactly what the base did. Merging adds
``s * B A`` to ``W0`` (computed in fp32, whatever the weight's dtype), which
makes inference cost nothing extra; unmerging subtracts it again.

DoRA (Liu et al., 2024; ``use_dora=True``) splits the adapted weight into a
direction and a trainable magnitude ``m`` (one entry per output row)::

    W' = m * (W0 + s B A) / ||W0 + s B A||_c,     m initialised to ||W0 + s B A||_c (= ||W0||_c)

where ``||.||_c`` is the L2 norm of each output row of the (out x in) weight. As
the paper suggests (section 4.3), the norm is treated as a constant: it gets no
gradient, so ``m``, ``A`` and ``B`` learn only through the numerator.

Layers covered: ``nn.Linear``, ``nn.Embedding``, transformers' GPT-2 ``Conv1D``
(weight stored in x out, i.e. ``fan_in_fan_out``), and bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` (QLoRA). DoRA covers the linear-like layers,
not embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from ..config import (NotComputedError, PeftConfig, PeftType, config_from_method_args, module_spec_problem,
                      register_config, register_method, train_targets)
from ..inject import (bnb_linear_types, config_targets, conv1d_type, linear_layer_types, replace_module,
                      resolve_default_targets, tied_weights)
from ..kernels import decode, native
from ..kernels.lora_fused import lora_add
from ..tuner import AdapterLayer, BaseTuner, current_batch_adapters, register_tuner

_INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
# HF PEFT initialisations tsugiki does not compute. Their adapters hold ordinary A and B
# matrices, so a saved one loads and runs; only creating a new adapter with them is refused.
_LOAD_ONLY_INITS = ("eva", "corda", "loftq", "orthogonal", "mica")


def new_adapter_init_problem(init: Union[bool, str]) -> Optional[str]:
    """Why a *new* adapter cannot start from ``init``, or None when it can."""
    if init in _LOAD_ONLY_INITS:
        return (f"init_lora_weights={init!r} is an HF PEFT initialisation tsugiki does not compute; adapters "
                "saved with it load as they are (PeftModel.from_pretrained), but to create one use True, "
                "'gaussian', 'pissa' or 'olora'")
    return None


def starts_from_base_weight(init: Union[bool, str]) -> bool:
    """PiSSA and OLoRA: A, B start as a factor of W, and the base keeps W - s B0 A0.

    Their adapters are trained on that residual base, so loading one rebuilds it
    (deterministically: SVD, QR, a seeded randomized SVD) before the saved A and B go in.
    """
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


def as_lora_for_original_base(state: dict[str, torch.Tensor], config: "LoraConfig",
                              initial: dict[str, torch.Tensor], where: str) -> tuple[dict, "LoraConfig"]:
    """A trained PiSSA/OLoRA adapter rewritten as a plain LoRA for the original base W.

    Trained on the residual W - s B0 A0, the model computes W + s (B A - B0 A0) =
    W + s [B, -B0] [A; A0]: a rank-2r LoRA, with ``lora_alpha`` (and ``alpha_pattern``) doubled,
    or times sqrt(2) under rsLoRA, so that the scale s stays. ``initial`` holds A0, B0: the
    adapter saved before training, under the same file keys as ``state``.
    """
    if not starts_from_base_weight(config.init_lora_weights):
        raise ValueError(f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters; this one has "
                         f"init_lora_weights={config.init_lora_weights!r} and loads on the original base as it is")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion: a DoRA adapter's update is not linear in A and "
                         "B, so it cannot be rewritten for the original base; save it as it is (it loads on any "
                         "copy of the base: the residual is recomputed)")
    out = dict(state)
    for key, tensor in state.items():
        part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
        if part is None:
            continue  # modules_to_save and biases do not depend on the start
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            found = "missing" if start is None else f"of shape {tuple(start.shape)}, not {tuple(tensor.shape)}"
            raise ValueError(f"{where}: {key} is {found}; give the folder where this adapter was saved right "
                             "after get_peft_model, before training")
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start]) if part == ".lora_A." else torch.cat([tensor, -start], dim=1)
    factor = math.sqrt(2) if config.use_rslora else 2
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha *= factor
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: factor * v for k, v in config.alpha_pattern.items()}
    return out, converted


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (HF PEFT's ``LoraConfig`` names and defaults).

    Args:
        r: rank of the update (default 8).
        lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / r`` (default 8).
        lora_dropout: dropout on the adapter's input, training only (default 0.0).
        target_modules: list of module names or name suffixes, a regex matched against the
            full name, ``"all-linear"``, or ``None`` for the architecture's default.
        exclude_modules: modules to leave alone (same forms as ``target_modules``).
        bias: which biases train: ``"none"`` (default), ``"all"`` or ``"lora_only"``.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set automatically
            for Conv1D layers).
        modules_to_save: modules trained in full and saved beside the adapter (e.g. a new head).
        layers_to_transform / layers_pattern: restrict to these layer indices, found in names
            like ``layers.<i>.`` (``layers_pattern`` names the ``layers`` part).
        rank_pattern / alpha_pattern: per-module ``r`` / ``lora_alpha``, keyed by a name or regex.
        use_rslora: use ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r)),
            ``"pissa"`` / ``"pissa_niter_<k>"`` (A, B from the top-r singular vectors of W; W keeps
            the residual), ``"olora"`` (B, A = the first r columns of Q and rows of R in W = QR;
            W keeps the residual), or ``False`` (both random: the adapter is not a no-op; for tests).
            PiSSA and OLoRA adapters are saved as trained on the residual; loading one
            recomputes it from the original W, or ``save_pretrained(...,
            path_initial_model_for_weight_conversion=)`` saves a plain LoRA for the original W.
        use_dora: weight-decomposed LoRA (DoRA, see the module docstring); linear-like layers only
            (default False).
        lora_bias: accepted so HF PEFT files load; must be ``False`` here.
    """

    peft_type_name = PeftType.LORA.value

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    lora_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"LoraConfig: {key}={getattr(self, key)!r} is invalid: {why}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "the rank must be a positive integer, e.g. 8 or 16")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be a positive number, e.g. 16")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be a probability in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise bad("bias", "use 'none', 'all' or 'lora_only'")
        init = self.init_lora_weights
        if not (init in _INIT_CHOICES + _LOAD_ONLY_INITS
                or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
            raise bad("init_lora_weights", "use True, False, 'gaussian', 'pissa', 'pissa_niter_<k>' or 'olora'")
        for key in ("target_modules", "exclude_modules"):
            problem = module_spec_problem(getattr(self, key))
            if problem:
                raise bad(key, problem)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise bad("layers_to_transform", "it cannot be combined with a regex/'all-linear' target_modules; "
                      "list the module names instead, or put the layer indices into the regex")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise bad("layers_pattern", "it only applies together with layers_to_transform")
        for key, pattern in self.rank_pattern.items():
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}]={pattern!r} must be a positive integer")
        for key, pattern in self.alpha_pattern.items():
            if not isinstance(pattern, (int, float)) or pattern <= 0:
                raise ValueError(f"LoraConfig: alpha_pattern[{key!r}]={pattern!r} must be a positive number")
        if not isinstance(self.use_dora, bool):
            raise bad("use_dora", "must be True or False")
        if self.lora_bias:
            raise bad("lora_bias", "a LoRA bias term is not available in this version of tsugiki")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``r`` and ``lora_alpha`` for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The first pattern that names ``module_name`` (exact, suffix, or regex over a suffix) wins."""
    for key, value in patterns.items():
        if module_name == key or re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_scale(scale: Any, caller: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{caller}: scale={scale!r} must be a finite number (the factor on lora_alpha / r)")


class LoraLayer(AdapterLayer):
    """Bookkeeping shared by the LoRA layer types."""

    def _init_lora(self, base_layer: nn.Module) -> None:
        self._init_adapter_state()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()

    def _adapter_dtype(self) -> torch.dtype:
        # Half-precision bases keep their adapters in fp32 (stable updates, exact merges).
        weight = getattr(self.base_layer, "weight", None)
        dtype = weight.dtype if weight is not None else torch.float32
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _base_device(self) -> torch.device:
        weight = getattr(self.base_layer, "weight", None)
        return weight.device if weight is not None else torch.device("cpu")

    def _record(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.use_rslora[name] = use_rslora
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the active adapter's update (per row in a mixed-adapter batch)."""
        return self.additive_forward(x, *args, **kwargs)

    # -- scaling (HF PEFT's set_scale / scale_layer / unscale_layer) ---------------------------
    def initial_scaling(self, name: str) -> float:
        """The scaling adapter ``name`` was made with: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA)."""
        return lora_scaling(self.r[name], self.lora_alpha[name], self.use_rslora.get(name, False))

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set adapter ``adapter``'s scaling to ``scale`` times its initial one: ``scale * lora_alpha / r``
        (``scale * lora_alpha / sqrt(r)`` with rsLoRA), whatever it was before.

        A layer that does not carry ``adapter`` is left as it is (as in HF PEFT), so that one loop
        can go over every layer of a model whose adapters target different modules.
        """
        _check_scale(scale, "set_scale")
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapter's current scaling by ``scale`` (undone by ``unscale_layer(scale)``)."""
        _check_scale(scale, "scale_layer")
        for name in self._active_adapters_here():
            self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Divide the active adapter's current scaling by ``scale``; with ``scale=None`` (the default)
        put it back to its initial ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        if scale is not None:
            _check_scale(scale, "unscale_layer")
            if scale == 0:
                raise ValueError("unscale_layer(0) would divide the scaling by zero; pass the factor given "
                                 "to scale_layer, or None to restore the initial scaling")
        for name in self._active_adapters_here():
            self.scaling[name] = self.initial_scaling(name) if scale is None else self.scaling[name] / scale

    def _active_adapters_here(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.scaling]

    def _adapter_out(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``base_out`` (DoRA needs to see it)."""
        return self._lora_out(x, name)

    # merge/unmerge: subclasses give get_delta_weight() in the base weight's layout.
    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        if name in self.merged_adapters:
            return  # idempotent
        delta = self.get_delta_weight(name)
        if safe_merge and not torch.isfinite(delta).all():
            raise ValueError(
                f"refusing to merge adapter {name!r}: its update for this layer contains NaN/Inf "
                f"(layer {type(self.base_layer).__name__} {tuple(delta.shape)})"
            )
        self._add_to_base_weight(delta)
        self.merged_adapters.append(name)

    def unmerge(self, name: Optional[str] = None) -> None:
        if name is None:
            return self.unmerge_all()
        if name not in self.merged_adapters:
            return
        self._add_to_base_weight(-self.get_delta_weight(name))
        self.merged_adapters.remove(name)

    def _base_weight_changing(self) -> None:
        """Drop what was computed from the base weight before merging rewrites it. Its checks (version
        counter, storage address) miss a ``.data`` reassignment whose new storage reuses the freed
        address, as merge-unmerge cycles can; the decode stack would also keep the old weight alive."""
        for cache in ("_decode_stack", "_inference_plan", "_row_squares"):
            self.__dict__.pop(cache, None)

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        self._base_weight_changing()
        base = self.base_layer
        if isinstance(base, bnb_linear_types()):
            from ..quant import dequantize_weight, requantize_like

            requantize_like(base, dequantize_weight(base).float() + delta)
            return
        w = base.weight
        with torch.no_grad():
            w.data = (w.data.float() + delta).to(w.dtype)


class DoraMagnitude(nn.Module):
    """DoRA's magnitude ``m`` of one adapter, one entry per output row, as ``.weight``
    (HF PEFT's layout: ``lora_magnitude_vector[name].weight``; files drop the ``.weight``)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(LoraLayer, nn.Module):
    """LoRA around a linear-like layer: nn.Linear, Conv1D, or a bitsandbytes k-bit linear."""

    # lora_magnitude_vector holds DoRA's m only for adapters made with use_dora=True.
    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        self._init_lora(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # name -> DoraMagnitude
        self._dora_merge_factor: dict[str, torch.Tensor] = {}  # m / norm used at merge, to undo it
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_shape(base_layer, fan_in_fan_out)

    def update_layer(self, name: str, r: int, alpha: float, dropout: float, init: Union[bool, str],
                     use_rslora: bool, use_dora: bool = False) -> None:
        self.__dict__.pop("_inference_plan", None)
        self._record(name, r, alpha, dropout, use_rslora)
        kw = {"dtype": self._adapter_dtype(), "device": self._base_device()}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.reset_parameters(name, init)
        if use_dora:
            self._init_dora(name)

    def reset_parameters(self, name: str, init: Union[bool, str]) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if A.is_meta or init is False:
            return  # meta: nothing to fill; False: keep nn.Linear's random init for both
        with torch.no_grad():
            if starts_from_base_weight(init):
                self._factor_base_init(name, init)
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def _factor_base_init(self, name: str, init: str) -> None:
        """A, B from a factorisation of W (out, in); the base keeps W - s B A.

        PiSSA: W = U S Vh, A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s), so s B A is W's best
        rank-r part (``pissa_niter_<k>``: a randomized SVD with k power iterations, seeded so that
        loading repeats it). OLoRA: W = Q R, A = R[:r], B = Q[:, :r].
        """
        if isinstance(self.base_layer, bnb_linear_types()):
            raise ValueError(f"init_lora_weights={init!r} needs an unquantized base layer: the adapter starts from "
                             "W, and W - s B A stays in the base. Load the base unquantized (PiSSA/OLoRA adapters "
                             "too), or save the adapter with path_initial_model_for_weight_conversion")
        r, s = self.r[name], self.scaling[name]
        w = self.base_layer.weight.data.float()
        w = w.T if self.fan_in_fan_out else w  # (out, in)
        if init == "olora":
            Q, R = torch.linalg.qr(w)
            A, B = R[:r], Q[:, :r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            else:
                devices = [w.device.index or 0] if w.is_cuda else []  # svd_lowrank draws on w's device
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    U, S, V = torch.svd_lowrank(w, q=r, niter=int(init.rsplit("_", 1)[1]))
                Vh = V.T
            root = torch.sqrt(S[:r] / s)
            A = root[:, None] * Vh[:r]  # (r, in)
            B = U[:, :r] * root[None, :]  # (out, r)
        self.lora_A[name].weight.data = A.contiguous().to(self.lora_A[name].weight.dtype)
        self.lora_B[name].weight.data = B.contiguous().to(self.lora_B[name].weight.dtype)
        self._add_to_base_weight(-self.get_delta_weight(name))

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` in fp32, laid out like the base weight (transposed for fan_in_fan_out)."""
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float() * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the active adapter's update.

        The common case (one unmerged plain-LoRA adapter, no mixed batch) goes through
        :func:`tsugiki.kernels.lora_fused.lora_add`: the update is added in place and the
        dropout mask is re-drawn in backward instead of stored. The rest takes the
        composed reference path (``additive_forward``).
        """
        if not (self.training or args or kwargs or torch.is_grad_enabled()):
            out = self._inference_forward(x)
            if out is not None:
                return out
        name = self.active_adapter
        if (args or kwargs or self.disabled or self.merged_adapters or name not in self.lora_A or self.extra_active
                or current_batch_adapters() is not None):
            return self.additive_forward(x, *args, **kwargs)
        dropout = self.lora_dropout[name]
        p = dropout.p if self.training and type(dropout) is nn.Dropout else 0.0
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, name, dropout if p else None)
        return lora_add(self.base_layer(x), x, self.lora_A[name].weight, self.lora_B[name].weight,
                        self.scaling[name], p, self.training)

    def _lora_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A = self.lora_A[name]
        x = x.to(A.weight.dtype)
        return self.lora_B[name](A(self.lora_dropout[name](x))) * self.scaling[name]

    def _inference_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``base(x) + (x A^T) (s B^T)`` on the shortest path, or None when another path must run.

        Used in eval mode without autograd (generation, evaluation) for one unmerged
        LoRA or DoRA adapter outside a mixed batch. Generation calls each adapted
        layer once per token, where the rank-r products take microseconds and
        ``nn.Module`` lookups as long again, so what the call needs (for DoRA also
        its constant factor) is kept in an :class:`_InferencePlan` and checked, not
        looked up.
        """
        plan = self._current_plan()
        if (plan.scaled_B_t is None or self.disabled or self.merged_adapters
                or current_batch_adapters() is not None or torch.is_autocast_enabled(plan.device_type)):
            return None
        base = self._modules["base_layer"]
        run = self._direct_base_linear()
        out = base(x) if run is None else run(x, base._parameters["weight"], base._parameters["bias"])
        if plan.factor is not None:  # DoRA: f * (W x + b) + (1 - f) b, before the update (s B^T f)
            if not plan.current(self):  # the base call changed W (bitsandbytes' CPU repacking, eval mode)
                plan = self._current_plan()
            out = out.contiguous().mul_(plan.factor)
            if plan.bias_shift is not None:
                out.add_(plan.bias_shift)
        return _add_low_rank_update(out, x, plan.a_params["weight"].t(), plan.scaled_B_t, plan.dtype)

    def _current_plan(self) -> "_InferencePlan":
        plan = self.__dict__.get("_inference_plan")
        if plan is None or not plan.current(self):
            plan = self._inference_plan = _InferencePlan.build(self)
        return plan

    def _direct_base_linear(self) -> Optional[Callable[..., torch.Tensor]]:
        """The function that computes the base layer's forward when nothing hooks it, else None.

        A plain ``nn.Linear`` whose forward is its class's is ``F.linear`` (one
        ``nn.Module`` call less); one routed by ``decode.single_row_decoding`` is
        ``decode.linear``. Other layers, replaced forwards (accelerate's hooks)
        and any forward hook, the layer's own or a global one, need the module call.
        """
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear or base._forward_pre_hooks or base._forward_hooks or (
                _GLOBAL_FORWARD_HOOKS[0] or _GLOBAL_FORWARD_HOOKS[1]):
            return None
        replaced = base.__dict__.get("forward")
        if replaced is None:
            return F.linear
        return decode.linear if decode.routed(base) else None

    def _decoding_forward(self) -> Optional[Callable[..., torch.Tensor]]:
        """A forward for this layer as it is now, or None when the general one must run.

        Made by :func:`decoding_forwards` for the length of one ``generate`` call,
        when the layer would take :meth:`_inference_forward`'s path: its checks
        and lookups are done once here instead of at every token. It still falls
        back to :meth:`forward` when gradients, training, a mixed batch or
        autocast appear during the call.

        A base routed through ``decode.single_row_decoding`` (bf16 weights on a
        CPU, up to :data:`ROW_STACK_MAX_ELEMENTS`) computes one bf16 row from the
        :meth:`_row_stack` ``[W; A]`` (:func:`decode.stacked_row`)::

            [y; z] = row_kernel([W; A], x) + [b; 0]   (one product: y = W x + b and z = A x)
            y     += (s B) z                          (one addmv_, s B as a bf16 copy)

        At one row each operator costs a few microseconds whatever its size, so
        what the adapter costs follows the number of calls: on SmolLM2-135M
        with every linear adapted, generation at batch size 1 runs at 0.92 of
        the bare base's tokens/s with these two, against 0.85-0.87 with the
        product followed by a cast, a ``matmul`` and an ``add_`` in fp32, 0.83
        with two products, and 0.80 with :func:`_add_low_rank_update`
        (``benchmarks/inference_overhead.py``). ``A``, ``z`` and ``s B`` are
        rounded to bf16, a relative error of about 2^-8 of the update, itself a
        fraction of ``y``: the output is within a rounding or two of ``y`` of
        the general forward's.

        Other bf16 CPU inputs (a decoding batch, a prompt, or one row of a base
        too large to stack) get the update from
        :class:`tsugiki.kernels.native.LowRankRows`, one C call (``A`` and ``s B``
        in bf16, as in the stack; sums in fp32) where the CPU and a compiler
        allow it: at 8 rows torch's cast, two products and add cost 25-45 us a
        layer, the call 5-10 us. Everything else takes
        :func:`_add_low_rank_update` in the adapter's dtype. A DoRA adapter's plan
        scales the base output by ``f`` and adds ``(1 - f) b`` before the update
        (:class:`_InferencePlan`), two elementwise calls more.
        """
        plan = self._current_plan()
        run = self._direct_base_linear()
        if plan.scaled_B_t is None or run is None or self.disabled or self.merged_adapters:
            return None
        base = self._modules["base_layer"]
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        A = plan.a_params["weight"]
        A_t, scaled_B_t, dtype, device_type = A.t(), plan.scaled_B_t, plan.dtype, plan.device_type
        general = LoraLinear.forward.__get__(self)

        def needs_general(args: tuple, kwargs: dict) -> bool:
            return bool(args or kwargs or self.training or torch.is_grad_enabled()
                        or current_batch_adapters() is not None or torch.is_autocast_enabled(device_type))

        rows_update = native.LowRankRows.build(A, scaled_B_t) if weight.dtype is torch.bfloat16 else None
        factor, shift = plan.factor, plan.bias_shift  # DoRA's (None for LoRA)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if needs_general(args, kwargs):
                return general(x, *args, **kwargs)
            out = run(x, weight, bias)
            if factor is not None:
                out = out.contiguous().mul_(factor)
                if shift is not None:
                    out.add_(shift)
            if rows_update is not None and rows_update.add_(out, x):
                return out
            return _add_low_rank_update(out, x, A_t, scaled_B_t, dtype)

        stack = self._row_stack(weight, A) if run is decode.linear else None
        if stack is None:
            return forward
        out, r = weight.shape[0], A.shape[0]
        sizes = [out, r]
        update = scaled_B_t.to(torch.bfloat16).t()  # s B, out x r, column-major: what addmv_ walks fastest
        bias_row = None if bias is None else torch.cat([bias.detach().to(torch.bfloat16),
                                                        bias.new_zeros(r, dtype=torch.bfloat16)])

        def stacked_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if x.dtype is not torch.bfloat16 or x.numel() != x.shape[-1] or needs_general(args, kwargs):
                return forward(x, *args, **kwargs)
            return decode.stacked_row(x, stack, bias_row, sizes, update, factor, shift)

        return stacked_forward

    def _row_stack(self, weight: torch.Tensor, A: torch.Tensor) -> Optional[torch.Tensor]:
        """``[W; A]``: one bf16 ``(out + r, in)`` tensor whose first ``out`` rows *are* the base weight.

        Built once: the base weight's storage moves into the stack (``weight.data``
        becomes a view of its first rows, so memory grows by ``A``'s r rows only),
        and every later call, one per ``generate``, copies the adapter's current
        ``A`` into the last rows. It is built again when the weight no longer lies
        there (``.data`` reassigned, as merging does) or the rank changed. None
        for a weight that is not a contiguous 2-D bf16 CPU tensor, or that has
        more than :data:`ROW_STACK_MAX_ELEMENTS` elements.
        """
        if not (weight.dtype is torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
                and weight.is_contiguous() and A.shape[1] == weight.shape[1]
                and weight.numel() <= ROW_STACK_MAX_ELEMENTS):
            return None
        out, r = weight.shape[0], A.shape[0]
        stack = self.__dict__.get("_decode_stack")
        # Never an inference tensor, even under the caller's inference_mode: the base weight lives in it, and
        # later no_grad generation or training must be able to use that weight.
        with torch.inference_mode(False), torch.no_grad():
            if stack is None or stack.data_ptr() != weight.data_ptr() or stack.shape[0] != out + r:
                stack = torch.empty(out + r, weight.shape[1], dtype=weight.dtype)
                stack[:out].copy_(weight)
                weight.data = stack[:out]
                self.__dict__["_decode_stack"] = stack
            stack[out:].copy_(A)
        return stack

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "LoraLinear":
        self.__dict__.pop("_decode_stack", None)  # .to(), .half(), ...: the weight moves out of the stack
        self.__dict__.pop("_row_squares", None)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "LoraLinear":
        self.__dict__.pop("_inference_plan", None)  # also the way to drop a plan after edits through .data
        self.__dict__.pop("_row_squares", None)
        return super().train(mode)

    def set_adapter(self, name: Union[str, Sequence[str]], trainable: bool = True) -> None:
        self.__dict__.pop("_inference_plan", None)  # a plan serves one adapter; this may change extra_active
        super().set_adapter(name, trainable)

    def delete_adapter(self, name: str) -> None:
        self.__dict__.pop("_inference_plan", None)
        super().delete_adapter(name)

    # -- DoRA -------------------------------------------------------------------------------
    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) tensor (dequantized for k-bit bases; a view otherwise)."""
        base = self.base_layer
        if isinstance(base, bnb_linear_types()):
            from ..quant import dequantize_weight

            return dequantize_weight(base)
        w = base.weight
        return w.T if self.fan_in_fan_out else w

    def _set_weight_out_in(self, weight: torch.Tensor) -> None:
        self._base_weight_changing()
        base = self.base_layer
        if isinstance(base, bnb_linear_types()):
            from ..quant import requantize_like

            requantize_like(base, weight)
            return
        w = base.weight
        with torch.no_grad():
            w.data = (weight.T if self.fan_in_fan_out else weight).to(w.dtype).contiguous()

    def _dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``||W0 + s B A||`` per output row, without gradient (DoRA paper, section 4.3).

        Expanded so that no weight-sized temporary is made (each forward computes it)::

            ||w_o + s (B A)_o||^2 = ||w_o||^2 + 2 s (W A^T)_o . B_o + s^2 B_o (A A^T) B_o^T

        ``W A^T`` is one product (out x r, :meth:`_weight_times_a_t`), ``||w_o||^2`` is
        kept from the last forward (:meth:`_base_row_squares`), the rest is r-wide, in fp32.
        """
        with torch.no_grad():
            A, B, s = self.lora_A[name].weight.float(), self.lora_B[name].weight.float(), self.scaling[name]
            square = self._base_row_squares().clone()
            wa = self._weight_times_a_t(A)
            square += 2 * s * (wa * B).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1)
            return square.clamp_min_(0).sqrt_().to(dtype)

    def _base_row_squares(self) -> torch.Tensor:
        """``||w_o||^2`` of the frozen base weight, fp32, kept between forwards.

        Computed again when the base weight is replaced, updated in place (its
        version counter moves), or its storage moves (``.data`` reassigned, as
        merging and requantizing do; ``.to()``). Edits through ``weight.data`` move
        neither; ``layer.train()`` / ``eval()`` drop the kept value after such edits.
        """
        param = self.base_layer.weight
        key = (param._version, param.data_ptr(), param.device)
        cached = self.__dict__.get("_row_squares")  # (weak reference to the weight, key, squares)
        if cached is None or cached[0]() is not param or cached[1] != key:
            cached = (weakref.ref(param), key, _row_squares(self._weight_out_in()))
            self.__dict__["_row_squares"] = cached
        return cached[2]

    def _weight_times_a_t(self, A: torch.Tensor) -> torch.Tensor:
        """``W A^T`` (out x r, fp32) for the base weight ``W``, without autograd.

        A 4-bit base computes it as bitsandbytes' own product of ``A``'s r rows with
        the packed weight, in its compute dtype: dequantizing the weight to fp32
        first takes about 6x as long on a CPU. Other bases multiply at the weight's
        dtype (8-bit through the dequantized weight, since bitsandbytes' 8-bit
        product would round ``A`` to int8).
        """
        base = self.base_layer
        state = getattr(base.weight, "quant_state", None)
        if isinstance(base, bnb_linear_types()[:1]) and state is not None:  # Linear4bit
            import bitsandbytes as bnb

            # The layer's own product, called directly: its forward would also repack the weight (eval mode).
            rows = A.to(base.compute_dtype or A.dtype)
            return bnb.matmul_4bit(rows, base.weight.t(), quant_state=state).t().float()
        weight = self._weight_out_in()
        return (weight @ A.t().to(weight.dtype)).float()

    def _init_dora(self, name: str) -> None:
        A = self.lora_A[name].weight
        if A.is_meta:
            self.lora_magnitude_vector[name] = DoraMagnitude(torch.empty(self.out_features, dtype=A.dtype,
                                                                         device="meta"))
            return
        self.lora_magnitude_vector[name] = DoraMagnitude(self._dora_norm(name, A.dtype))

    def _dora_forward(self, x: torch.Tensor, name: str, dropout: Optional[nn.Module]) -> torch.Tensor:
        """DoRA's output ``b + f * z`` with ``z = W x + s B A x`` and ``f = m / ||W + s B A||``.

        With dropout ``d`` on the adapter's input it is ``W x + b + f * z - W d(x)``, ``z``
        on ``d(x)``, as in HF PEFT. ``z`` comes from the fused LoRA add and ``W d(x)`` from
        the base layer itself, so backward keeps ``z`` at the base output's dtype (for
        ``f``'s gradient) where the reference path (:meth:`_adapter_out`) keeps ``W x`` in
        fp32 and ``s B A x``, and with dropout a copy of the weight (for every linear
        layer of SmolLM2 in bf16, 0.7 MiB less a token, 0.8 with dropout). Same value
        up to rounding order.
        """
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        factor = self.lora_magnitude_vector[name].weight / self._dora_norm(name, A.dtype)  # (out,)
        bias = getattr(self.base_layer, "bias", None)
        out = self.base_layer(x)
        if dropout is None:
            z = out if bias is None else out - bias
            rest = bias
        else:
            x = dropout(x)
            z = self.base_layer(x)
            if bias is not None:
                z = z - bias
            rest = out - z  # W x + b - W d(x)
        z = lora_add(z, x, A, B, s)
        out = factor.to(z.dtype) * z
        return out if rest is None else out + rest

    def _adapter_out(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return self._lora_out(x, name)
        # DoRA: m/n * (W x + s B A x) - W x, added to the base output (the reference for _dora_forward).
        A, B = self.lora_A[name], self.lora_B[name]
        dropout, s = self.lora_dropout[name], self.scaling[name]
        factor = self.lora_magnitude_vector[name].weight / self._dora_norm(name, A.weight.dtype)  # (out,)
        x = x.to(A.weight.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            plain = base_out if bias is None else base_out - bias  # reuse W x from the base call
            plain = plain.to(A.weight.dtype)
        else:
            # the dropped-out input goes through both W and B A, so recompute W x on it
            x = dropout(x)
            plain = F.linear(x, self._weight_out_in().to(A.weight.dtype))
        return (factor - 1) * plain + factor * B(A(x)) * s

    def merge_problem(self, name: str, merged: Sequence[str]) -> Optional[str]:
        dora = [n for n in [*merged, name] if n in self.lora_magnitude_vector]
        if dora and merged and name not in merged:
            # DoRA's norm is of W0 + s B A; stacking merges would change which W0 it sees.
            return (f"cannot merge adapter {name!r} on top of {list(merged)}: a DoRA adapter ({dora[0]!r}) "
                    "is merged alone; unmerge the others first, or merge_and_unload one adapter at a time")
        return None

    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        if name in self.merged_adapters:
            return
        problem = self.merge_problem(name, self.merged_adapters)
        if problem:
            raise ValueError(problem)
        if name not in self.lora_magnitude_vector:
            return super()._merge_adapter(name, safe_merge)
        weight = self._weight_out_in().float()
        norm = self._dora_norm(name, torch.float32)
        factor = self.lora_magnitude_vector[name].weight.detach().float() / norm
        new = factor[:, None] * (weight + self._delta_out_in(name))
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"refusing to merge DoRA adapter {name!r}: the merged weight contains NaN/Inf "
                             f"(layer {type(self.base_layer).__name__} {tuple(new.shape)})")
        self._set_weight_out_in(new)
        self._dora_merge_factor[name] = factor
        self.merged_adapters.append(name)

    def unmerge(self, name: Optional[str] = None) -> None:
        if name is None or name not in self._dora_merge_factor:
            return super().unmerge(name)
        factor = self._dora_merge_factor.pop(name)
        weight = self._weight_out_in().float()
        self._set_weight_out_in(weight / factor[:, None] - self._delta_out_in(name))
        self.merged_adapters.remove(name)

    def _delta_out_in(self, name: str) -> torch.Tensor:
        delta = self.get_delta_weight(name)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"


def _row_squares(weight: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """The fp32 sum of squares of each row of ``weight``, a few rows at a time (no fp32 copy of it all)."""
    rows = max(1, chunk_elements // max(weight.shape[1], 1))
    return torch.cat([part.float().square().sum(1) for part in weight.split(rows)])


def _add_low_rank_update(out: torch.Tensor, x: torch.Tensor, A_t: torch.Tensor, scaled_B_t: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``out + (x A^T) (s B^T)``, the products in the adapter's ``dtype``, added into ``out`` in place.

    ``out`` is the base layer's fresh output, so adding into it is safe without
    autograd (a non-contiguous one is copied first); it keeps its dtype. The
    products run on 2-D views: ``matmul``'s folding of a 3-D input costs a few
    microseconds a call, which at one row is as much as the product.
    """
    rows = x.reshape(-1, x.shape[-1])
    update = torch.mm(torch.mm(rows if rows.dtype is dtype else rows.to(dtype), A_t), scaled_B_t)
    out = out.contiguous()
    out.view(-1, out.shape[-1]).add_(update)
    return out


@contextlib.contextmanager
def decoding_forwards(model: nn.Module) -> Iterator[int]:
    """Inside the block, LoRA linear layers on the inference path run a forward made for them.

    Generation calls every adapted layer once per new token, and on a small
    model the per-call Python of :meth:`LoraLinear._inference_forward` (its
    checks, plan and module lookups) is a measurable part of the adapter's cost.
    For the length of the block the layers' state is taken as fixed, so each
    layer that would take that path (one unmerged plain-LoRA adapter active,
    a plain ``nn.Linear`` base, no hooks) gets an instance ``forward`` that only
    computes ``base(x) + (x A^T) (s B^T)`` (one bf16 row on a CPU: from the
    ``[W; A]`` stack of :meth:`LoraLinear._row_stack`, which the base weight
    then lives in); on exit each gets its class's ``forward`` back. Layers
    whose ``forward`` is already replaced are left alone. Enter it inside
    ``decode.single_row_decoding``, so that routed base layers are seen as
    such. Yields how many layers got one.
    """
    installed = []
    for module in model.modules():
        if isinstance(module, LoraLinear) and "forward" not in module.__dict__ and not module.training:
            forward = module._decoding_forward()
            if forward is not None:
                module.forward = forward
                installed.append(module)
    try:
        yield len(installed)
    finally:
        for module in installed:
            module.__dict__.pop("forward", None)


# Base weights up to this size (4 MiB in bf16) get a [W; A] stack for one-row decoding
# (LoraLinear._row_stack). There the product takes a fraction of a millisecond and the
# operator the stack saves is worth a few percent of it; a larger weight gains under 1%,
# and copying it out of a memory-mapped checkpoint costs seconds and resident memory (a
# Llama-1B-shaped model from safetensors, every weight stacked: 4.4 s, and 4.2 GB resident
# after the first generate instead of 2.9 GB; with this limit, 0.06 s and 2.96 GB).
ROW_STACK_MAX_ELEMENTS = 1 << 21

# nn.Module's global forward (pre-)hooks, which a direct F.linear call would skip; private torch names,
# read once (registering a hook adds to these dicts), with "always present" as the safe fallback.
_GLOBAL_FORWARD_HOOKS = (getattr(_nn_module, "_global_forward_pre_hooks", True),
                         getattr(_nn_module, "_global_forward_hooks", True))


class _InferencePlan:
    """One adapter's state for :meth:`LoraLinear._inference_forward`.

    ``scaled_B_t`` is ``s * B^T`` (r x out, contiguous): on CPU a one-row product
    with it takes about half the time of one with ``B`` as stored. For DoRA it is
    ``s * B^T * f`` with the constant factor ``f = m / ||W + s B A||`` per output
    row, and the output is ``f * base(x) + (1 - f) * b + x A^T (s B^T f)``
    (``factor`` and ``bias_shift``): the norm, which the general path takes again
    at every forward, is taken once. Being copies, they are rebuilt when a tensor
    they came from (``B``; for DoRA also ``A``, ``m`` and the base weight) is
    replaced or updated in place (its version counter moves), when ``.data`` is
    reassigned (its storage moves), when the active adapter changes, or when its
    ``scaling`` entry does (``set_scale``, ``scale_layer``, or a direct write). Edits
    through ``.data`` move neither; ``layer.eval()`` drops the plan after such edits.
    """

    __slots__ = ("name", "scale", "a_params", "b_params", "B", "b_version", "b_ptr", "scaled_B_t", "dtype",
                 "device_type", "factor", "bias_shift", "watched")

    @classmethod
    def build(cls, layer: "LoraLinear") -> "_InferencePlan":
        """The plan for the active adapter; ``scaled_B_t`` is None where the general path is needed."""
        plan = cls()
        plan.name = name = layer.active_adapter
        plan.scale = layer.scaling.get(name)
        plan.B = plan.scaled_B_t = plan.factor = plan.bias_shift = None
        plan.watched = ()
        if name not in layer.lora_A or layer.extra_active:  # several active adapters: the general path
            return plan
        plan.a_params = layer.lora_A[name]._parameters
        plan.b_params = layer.lora_B[name]._parameters
        plan.B = B = plan.b_params["weight"]
        plan.b_version, plan.b_ptr = B._version, B.data_ptr()
        plan.dtype, plan.device_type = plan.a_params["weight"].dtype, B.device.type
        with torch.no_grad():
            if name not in layer.lora_magnitude_vector:
                plan.scaled_B_t = (B.t() * layer.scaling[name]).contiguous()
                return plan
            magnitudes, base = layer.lora_magnitude_vector[name]._parameters, layer.base_layer._parameters
            watched = [(plan.a_params, "weight"), (magnitudes, "weight"), (base, "weight")]
            if base.get("bias") is not None:  # bias_shift below is made of it
                watched.append((base, "bias"))
            plan.watched = tuple((params, key, params[key], params[key]._version, params[key].data_ptr())
                                 for params, key in watched)
            factor = magnitudes["weight"].float() / layer._dora_norm(name, torch.float32)
            plan.scaled_B_t = (B.t().float() * (layer.scaling[name] * factor)).to(B.dtype).contiguous()
            plan.factor = factor
            bias = base.get("bias")
            if bias is not None:
                plan.bias_shift = (1 - factor) * bias.float()
        return plan

    def current(self, layer: "LoraLinear") -> bool:
        if self.name != layer.active_adapter or layer.scaling.get(self.name) != self.scale:
            return False
        if self.B is None:
            return True  # nothing cached; update_layer/delete_adapter drop the plan
        B = self.b_params["weight"]
        if not (B is self.B and B._version == self.b_version and B.data_ptr() == self.b_ptr):
            return False
        return all(params.get(key) is t and t._version == version and t.data_ptr() == ptr
                   for params, key, t, version, ptr in self.watched)


def _linear_shape(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if hasattr(layer, "nf") and hasattr(layer, "nx"):  # transformers Conv1D
        return int(layer.nx), int(layer.nf)
    rows, cols = layer.weight.shape
    return (rows, cols) if fan_in_fan_out else (cols, rows)


class LoraEmbedding(LoraLayer, nn.Module):
    """LoRA around ``nn.Embedding``: ``E[x] + s * (A^T[x]) B^T`` with A: r x vocab, B: dim x r.

    Embedding adapters start with A = 0 and B ~ N(0, 1) (the reverse of linear layers),
    so the first lookup still equals the base.
    """

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        self._init_lora(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, name: str, r: int, alpha: float, dropout: float, init: Union[bool, str],
                     use_rslora: bool) -> None:
        self._record(name, r, alpha, dropout, use_rslora)
        base = self.base_layer
        kw = {"dtype": self._adapter_dtype(), "device": self._base_device()}
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, base.num_embeddings, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(base.embedding_dim, r, **kw))
        if self.lora_embedding_A[name].is_meta:
            return
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])
            elif starts_from_base_weight(init):
                raise ValueError(f"init_lora_weights={init!r} is for linear layers; do not target embeddings with it")
            else:
                nn.init.zeros_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])

    def get_delta_weight(self, name: str) -> torch.Tensor:
        B, A = self.lora_embedding_B[name].float(), self.lora_embedding_A[name].float()
        return (B @ A).T * self.scaling[name]  # (vocab, dim)

    def _lora_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        out = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]
        # Scaled embeddings (Gemma 3's, BART's) multiply their lookup inside the module: the update
        # too, as it is once merged into the table.
        embed_scale = getattr(base, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            return out * embed_scale.to(out.dtype)
        return out * embed_scale if isinstance(embed_scale, (int, float)) else out



@register_tuner(PeftType.LORA.value)
class LoraModel(BaseTuner):
    """``PeftModel.base_model`` for LoRA: grafts :class:`LoraLinear` / :class:`LoraEmbedding`."""

    layer_classes = (LoraLinear, LoraEmbedding)
    several_active = True  # set_adapter(["a", "b"]) sums their updates (plain LoRA; DoRA refused)

    def _inject(self, config: LoraConfig, adapter_name: str, init_weights: bool) -> None:
        supported = linear_layer_types() + (nn.Embedding, LoraLinear, LoraEmbedding)
        if config.target_modules is None:  # record the resolved default in the saved config
            config.target_modules = resolve_default_targets(self.model)
        targets = config_targets(self.model, config, allowed_types=supported)
        conv1d = conv1d_type()
        init = config.init_lora_weights
        if not init_weights:
            # Loading: A and B come from the file. A PiSSA/OLoRA adapter was trained on the base
            # minus its starting update, so that residual is rebuilt first (as HF PEFT does too).
            init = init if starts_from_base_weight(init) else False
        problem = new_adapter_init_problem(init)
        if problem:
            raise ValueError(problem)
        self._warn_about_shared_weights(targets)
        for name in targets:
            target = self.model.get_submodule(name)
            if config.use_dora and isinstance(target, (nn.Embedding, LoraEmbedding)):
                raise NotComputedError(f"use_dora=True: DoRA is not available for embedding layers ({name}); "
                                 "leave embeddings out of target_modules, or use plain LoRA for them")
            r, alpha = config.rank_and_alpha(name)
            if isinstance(target, (LoraLinear, LoraEmbedding)):
                layer = target
            elif isinstance(target, nn.Embedding):
                layer = LoraEmbedding(target)
            else:
                fan_in_fan_out = config.fan_in_fan_out
                if conv1d is not None and isinstance(target, conv1d) and not fan_in_fan_out:
                    warnings.warn(f"{name} is a Conv1D (weight stored in x out): using fan_in_fan_out=True",
                                  stacklevel=4)
                    fan_in_fan_out = config.fan_in_fan_out = True
                layer = LoraLinear(target, fan_in_fan_out=fan_in_fan_out)
            if isinstance(layer, LoraLinear):
                layer.update_layer(adapter_name, r, alpha, config.lora_dropout, init, config.use_rslora,
                                   use_dora=config.use_dora)
            else:  # an embedding: PiSSA/OLoRA never moved its weight, so loading rebuilds nothing
                layer.update_layer(adapter_name, r, alpha, config.lora_dropout, init if init_weights else False,
                                   config.use_rslora)
            layer.set_adapter(self.active_adapters, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)

    def _adapters_to_activate(self, adapter_name: Union[str, Sequence[str]]) -> list[str]:
        names = super()._adapters_to_activate(adapter_name)
        dora = [n for n in names if getattr(self.peft_config[n], "use_dora", False)]
        if len(names) > 1 and dora:
            raise ValueError(f"DoRA adapters ({', '.join(map(repr, dora))}) run one at a time: their magnitude "
                             "rescales the whole weight, so updates do not add up; activate one alone")
        return names

    def _warn_about_shared_weights(self, targets: Sequence[str]) -> None:
        """Warn where base + adapter is not what a user would take it for: a base another
        adapter's PiSSA/OLoRA start changed, or a target whose weight another module shares."""
        moved = [n for n, c in self.peft_config.items() if starts_from_base_weight(getattr(c, "init_lora_weights", None))]
        if moved and len(self.peft_config) > 1:
            warnings.warn(f"adapter(s) {moved} (PiSSA/OLoRA) changed the base weights, so the base under the other "
                          "adapters is not the one they were made for; keep such an adapter alone on its base, or "
                          "save it with save_pretrained(..., path_initial_model_for_weight_conversion=) as plain "
                          "LoRA first", stacklevel=5)
        shared = tied_weights(self.model, targets)
        if shared:
            pairs = ", ".join(f"{name} with {', '.join(others)}" for name, others in shared.items())
            warnings.warn(f"LoRA on a weight another module shares (tied embeddings: {pairs}): the adapter changes "
                          "only its own module's use of the weight, but merging folds the update into the shared "
                          "weight, so a merged model differs from base + adapter. Keep this adapter unmerged, or "
                          "leave the tied module out of target_modules (modules_to_save trains a separate copy)",
                          stacklevel=5)

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, the LoRA ``adapters`` combined with ``weights`` (HF PEFT's
        ``LoraModel.add_weighted_adapter``; formulas and defaults in :mod:`tsugiki.combine`)."""
        from ..combine import add_weighted_adapter  # combine builds on this module

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                             svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                             density=density, majority_sign_method=majority_sign_method)

    def _mark_trainable(self, config: LoraConfig, adapter_name: str, trainable: bool = True) -> None:
        super()._mark_trainable(config, adapter_name, trainable)
        if not trainable or config.bias == "none":
            return
        for name, module in self.model.named_modules():
            if config.bias == "lora_only" and not isinstance(module, LoraLayer):
                continue
            if "original_module" in name.split("."):  # a trained head's frozen original stays frozen
                continue
            target = module.base_layer if isinstance(module, LoraLayer) else module
            bias = getattr(target, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


@register_method("lora", "qlora")
def lora_from_train_config(cfg: Any, base_name: str) -> LoraConfig:
    """LoRA for ``tsugiki train``: the ``lora_*`` keys, plus any other LoraConfig option in ``method_args``."""
    return _lora_config_for_training(cfg, base_name, cfg.method_args)


@register_method("dora")
def dora_from_train_config(cfg: Any, base_name: str) -> LoraConfig:
    """DoRA for ``tsugiki train``: LoRA's keys with ``use_dora=True``."""
    args = dict(cfg.method_args or {})
    if args.pop("use_dora", True) is not True:
        raise ValueError("method_args: use_dora must stay True for method 'dora'; use method 'lora' for plain LoRA")
    return _lora_config_for_training(cfg, base_name, args, use_dora=True)


def _lora_config_for_training(cfg: Any, base_name: str, method_args: Optional[dict], **extra: Any) -> LoraConfig:
    config = config_from_method_args(
        LoraConfig, method_args, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=train_targets(cfg.target_modules), task_type="CAUSAL_LM", base_model_name_or_path=base_name, **extra)
    problem = new_adapter_init_problem(config.init_lora_weights)
    if problem:
        raise ValueError(f"method_args: {problem}")
    return config

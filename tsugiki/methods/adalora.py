"""AdaLoRA: LoRA whose rank budget is re-allocated during training (Zhang et al., 2023).

Each adapted weight ``W0`` (out x in) gets an update in SVD form::

    h = W0 x + s / (ranknum + 1e-5) * P (Λ ⊙ Q) dropout(x)

    Q = lora_A: r x in,   Λ = lora_E: r x 1,   P = lora_B: out x r
    s = lora_alpha (or r when lora_alpha == 0),   ranknum = init_r (a constant, never saved)

``Λ`` starts at zero, ``Q`` and ``P`` at N(0, 0.02²), so the wrapped model first
computes exactly what the base did. Rank ``i`` of a layer is the triplet
``(P[:, i], Λ[i], Q[i])``; pruning a triplet sets ``Λ[i] = 0``.

Training (call :meth:`AdaLoraModel.update_and_allocate` after every optimizer
step, before the gradients are cleared; ``tsugiki train`` does it through
``on_optimizer_step``):

* importance of every entry ``p`` of ``Q, Λ, P``: ``I = |p * grad|``, smoothed
  ``Ī ← β1 Ī + (1 - β1) I``, uncertainty ``Ū ← β2 Ū + (1 - β2) |I - Ī|``, score ``Ī Ū``;
* triplet score: ``score(Λ[i]) + mean_j score(Q[i, j]) + mean_k score(P[k, i])``;
* budget (total kept triplets) at step ``t``, with ``b0 = Σ init_r`` and ``bT = target_r * layers``::

      t <= tinit:                   b0 (no masking)
      tinit < t < total - tfinal:   int((b0 - bT) * (1 - (t - tinit) / (total - tfinal - tinit))**3 + bT),
                                    masking when t % deltaT == 0
      t == total - tfinal:          bT, masked one last time; this is the final ``rank_pattern``
      t > total - tfinal:           the final pattern is re-applied (pruned Λ stay zero)

* the lowest-scored triplets beyond the budget get ``Λ[i] = 0``; the kept ones are
  recorded in ``config.rank_pattern`` as ``{"<module>.lora_E": [True, False, ...]}``.

The orthogonality penalty keeping ``P``, ``Q`` close to singular vectors is::

    R = orth_reg_weight * mean over every Q and P of the adapter of ||Q Qᵀ - I||_F and ||Pᵀ P - I||_F

(Frobenius norms, not squared, averaged over the 2 x layers matrices, as HF PEFT
does). :meth:`AdaLoraModel.training_regularizer` returns it; ``forward`` also adds
it to ``outputs.loss`` when the model is in training mode and a loss was
computed (labels given), as HF PEFT does, so a hand-written loop needs no extra code.

Saving writes only the kept triplets (``lora_A`` rows, ``lora_B`` columns,
``lora_E`` rows) plus ``rank_pattern``; loading builds each layer with the kept
rank, so files are interchangeable with HF PEFT's. Supported bases: ``nn.Linear``
and transformers' GPT-2 ``Conv1D`` (``fan_in_fan_out``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import (PeftConfig, PeftType, config_from_method_args, module_spec_problem, register_config,
                      register_method, train_targets)
from ..inject import (config_targets, conv1d_type, linear_layer_types, replace_module,
                      resolve_default_targets)
from ..tuner import register_tuner
from .lora import LoraLayer, LoraModel, _linear_shape

# HF PEFT's AdaLoRA defaults where they differ from the LoRA ones (others: tsugiki.inject.DEFAULT_TARGETS).
ADALORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
}

RANKNUM_EPS = 1e-5  # added to ranknum in the scale, as HF PEFT does


@register_config
@dataclass
class AdaLoraConfig(PeftConfig):
    """Configuration of an AdaLoRA adapter (HF PEFT's ``AdaLoraConfig`` names and defaults).

    Args:
        target_r: average rank per layer left after allocation (default 8).
        init_r: rank each layer starts with (default 12).
        tinit: warm-up steps before any pruning (default 0).
        tfinal: final steps with the rank pattern fixed (default 0).
        deltaT: steps between two budget allocations (default 1).
        beta1: EMA factor of the importance (sensitivity) scores (default 0.85).
        beta2: EMA factor of their uncertainty (default 0.85).
        orth_reg_weight: weight of the orthogonality penalty (default 0.5).
        total_step: total optimizer steps of the run; required.
        rank_pattern: kept triplets per layer, ``{"<module>.lora_E": [bool] * init_r}``; written during
            training. A config that has one builds each layer with only the kept ranks (a trained adapter).
        r: unused (HF PEFT keeps it from LoraConfig); set ``init_r`` instead.
        lora_alpha: scale numerator ``s``; the update is ``s / init_r`` times ``P Λ Q`` (default 8;
            ``0`` means ``s = r``).
        lora_dropout: dropout on the adapter's input, training only (default 0.0).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save /
            bias / fan_in_fan_out: as in :class:`~tsugiki.methods.lora.LoraConfig`.
        init_lora_weights: ``True`` (Λ = 0, Q and P ~ N(0, 0.02²)) or ``False`` (all N(0, 1): the
            adapter is not a no-op; for tests).
    """

    peft_type_name = PeftType.ADALORA.value

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
    init_lora_weights: bool = True
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict[str, list[bool]]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()
        if self.rank_pattern is not None:
            self.rank_pattern = {k: [bool(b) for b in v] for k, v in self.rank_pattern.items()}
        if self.r != 8:
            warnings.warn("AdaLoraConfig: r is not used by AdaLoRA and is ignored; set init_r (the starting "
                          "rank) and target_r (the average final rank) instead", stacklevel=3)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"AdaLoraConfig: {key}={getattr(self, key)!r} is invalid: {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for key in ("target_r", "init_r", "deltaT"):
            if not is_int(getattr(self, key)) or getattr(self, key) <= 0:
                raise bad(key, "must be a positive integer")
        for key in ("tinit", "tfinal"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise bad(key, "must be a number of steps >= 0")
        if self.target_r > self.init_r:  # accepted (HF PEFT takes it too), but nothing will be pruned
            warnings.warn(f"AdaLoraConfig: target_r={self.target_r} is above init_r={self.init_r}: the rank "
                          "budget never shrinks, so every starting triplet is kept (LoRA of rank init_r); "
                          "set target_r below init_r for AdaLoRA's pruning", stacklevel=4)
        if self.total_step is None:
            raise bad("total_step", "AdaLoRA needs the run's total number of optimizer steps "
                      "(its budget schedule depends on it); pass total_step=N")
        if not is_int(self.total_step) or self.total_step <= 0:
            raise bad("total_step", "must be a positive number of optimizer steps")
        if self.tinit + self.tfinal >= self.total_step:
            raise bad("total_step", f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be smaller than total_step, "
                      "or no step is left to prune ranks in; lower tinit/tfinal or raise total_step")
        for key in ("beta1", "beta2"):
            if not is_num(getattr(self, key)) or not 0.0 < getattr(self, key) < 1.0:
                raise bad(key, "an EMA factor must lie strictly between 0 and 1, e.g. 0.85")
        if not is_num(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise bad("orth_reg_weight", "must be a number >= 0 (0 turns the penalty off)")
        if not is_num(self.lora_alpha) or self.lora_alpha < 0:
            raise bad("lora_alpha", "must be a number >= 0, e.g. 32")
        if not is_num(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be a probability in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise bad("bias", "use 'none', 'all' or 'lora_only'")
        if not isinstance(self.init_lora_weights, bool):
            raise bad("init_lora_weights", "AdaLoRA has one initialisation: use True (or False for random "
                      "weights in tests); LoRA's 'gaussian'/'pissa' do not apply")
        for key in ("target_modules", "exclude_modules"):
            problem = module_spec_problem(getattr(self, key))
            if problem:
                raise bad(key, problem)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise bad("layers_to_transform", "it cannot be combined with a regex/'all-linear' target_modules")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise bad("layers_pattern", "it only applies together with layers_to_transform")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise bad("rank_pattern", "must be a mapping '<module>.lora_E' -> list of booleans")
            for key, mask in self.rank_pattern.items():
                if not isinstance(mask, (list, tuple)) or not all(isinstance(b, int) and b in (0, 1) for b in mask):
                    raise ValueError(f"AdaLoraConfig: rank_pattern[{key!r}] must be a list of booleans "
                                     f"(True = rank kept), got {mask!r}")


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step``: the cubic schedule of the module docstring (HF PEFT's)."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining ** 3 + target_budget)
    return budget, step % deltaT == 0


def orthogonality_penalty(matrices: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over every (Q, P) pair's two matrices of ``||Q Qᵀ - I||_F`` and ``||Pᵀ P - I||_F``."""
    terms = []
    for Q, P in matrices:
        for gram in (Q @ Q.T, P.T @ P):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    return torch.stack(terms).mean()


class AdaLoraLinear(LoraLayer, nn.Module):
    """An SVD-form update around ``nn.Linear`` or GPT-2's ``Conv1D`` (see the module docstring)."""

    adapter_param_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        self._init_lora(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_shape(base_layer, fan_in_fan_out)

    def update_layer(self, name: str, r: int, ranknum: int, alpha: float, dropout: float, init: bool) -> None:
        """Add adapter ``name`` with ``r`` triplets; ``ranknum`` (the starting rank) divides the scale."""
        self.r[name] = r
        self.ranknum[name] = float(ranknum)
        self.lora_alpha[name] = alpha
        self.scaling[name] = self.initial_scaling(name)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"dtype": self._adapter_dtype(), "device": self._base_device()}
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, **kw))
        if self.lora_A[name].is_meta:
            return
        with torch.no_grad():
            if init:
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
            else:
                for p in (self.lora_A[name], self.lora_E[name], self.lora_B[name]):
                    nn.init.normal_(p)

    def initial_scaling(self, name: str) -> float:
        """``lora_alpha`` (``r`` when it is 0): AdaLoRA divides by the rank at each forward instead.

        (HF PEFT's AdaLoRA layers inherit LoRA's ``lora_alpha / r`` here, so its ``set_scale(name, 1)``
        changes what the adapter computes; this one does not.)
        """
        alpha = self.lora_alpha[name]
        return float(alpha) if alpha > 0 else float(self.r[name])

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.ranknum.pop(name, None)

    def _scale(self, name: str) -> float:
        return self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """``s / (ranknum + 1e-5) * P (Λ ⊙ Q)`` in fp32, laid out like the base weight."""
        A, B, E = (p.float() for p in (self.lora_A[name], self.lora_B[name], self.lora_E[name]))
        delta = B @ (A * E) * self._scale(name)
        return delta.T if self.fan_in_fan_out else delta

    def _lora_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x = self.lora_dropout[name](x.to(A.dtype))
        return (x @ (A * E).T @ B.T) * self._scale(name)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"


class RankAllocator:
    """Importance scores (EMAs) of one adapter's triplets and the masking that follows the budget."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, AdaLoraLinear], adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.init_budget = sum(layer.r[adapter_name] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal, c.total_step, c.deltaT)

    @torch.no_grad()
    def update_importance(self, layers: dict[str, AdaLoraLinear]) -> None:
        """One EMA step of importance ``|p * grad|`` and its uncertainty, for every entry of Q, Λ, P."""
        b1, b2 = self.config.beta1, self.config.beta2
        for layer_name, layer in layers.items():
            for attr in AdaLoraLinear.adapter_param_names:
                p = getattr(layer, attr)[self.adapter_name]
                key = f"{layer_name}.{attr}"
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, layers: dict[str, AdaLoraLinear]) -> dict[str, torch.Tensor]:
        """Per layer, a vector (r,): score(Λ[i]) + mean_j score(Q[i, j]) + mean_k score(P[k, i])."""
        out = {}
        for layer_name, layer in layers.items():
            A, B, E = (getattr(layer, a)[self.adapter_name] for a in ("lora_A", "lora_B", "lora_E"))
            s_A = self._score(f"{layer_name}.lora_A", A).mean(dim=1)  # (r,)
            s_B = self._score(f"{layer_name}.lora_B", B).mean(dim=0)  # (r,)
            s_E = self._score(f"{layer_name}.lora_E", E).view(-1)  # (r,)
            out[layer_name] = (s_E + s_A + s_B).float()
        return out

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, AdaLoraLinear], budget: int) -> dict[str, list[bool]]:
        """Zero Λ of all but the ``budget`` best-scored triplets; return the kept pattern per layer."""
        scores = self.triplet_scores(layers)
        names = list(scores)
        flat = torch.cat([scores[n].cpu() for n in names]) if names else torch.zeros(0)
        n_prune = max(0, min(flat.numel(), flat.numel() - budget))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:n_prune]] = False
        pattern, start = {}, 0
        for n in names:
            r = scores[n].numel()
            mask = keep[start:start + r]
            start += r
            E = layers[n].lora_E[self.adapter_name]
            E.masked_fill_(~mask.to(E.device).view(-1, 1), 0.0)
            pattern[f"{n}.lora_E"] = mask.tolist()
        return pattern


@register_tuner(PeftType.ADALORA.value)
class AdaLoraModel(LoraModel):
    """``PeftModel.base_model`` for AdaLoRA: grafts :class:`AdaLoraLinear` and allocates the rank budget.

    One adapter trains at a time (others must be loaded with ``inference_mode=True``), as in HF PEFT.
    An adapter built from a config that already has a ``rank_pattern`` (a loaded one) keeps its ranks:
    training it further fine-tunes the kept triplets and ``update_and_allocate`` does nothing.
    :meth:`state_for_checkpoint` / :meth:`load_checkpoint_state` carry the importance averages and
    the current ``rank_pattern`` through the trainer's checkpoints, so a resumed run allocates the
    ranks as an uninterrupted one would.
    """

    several_active = False  # one adapter at a time, as HF PEFT's AdaLoRA

    layer_classes = (AdaLoraLinear,)

    def inject_adapter(self, config: AdaLoraConfig, adapter_name: str, init_weights: bool = True) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if not config.inference_mode and trainable:
            raise ValueError(f"AdaLoRA trains one adapter at a time and {trainable[0]!r} is trainable; "
                             "add the others with inference_mode=True")
        if config.rank_pattern is not None:  # HF's in-memory keys carry ".<adapter>"; the file's do not
            config.rank_pattern = {k.replace(f".lora_E.{adapter_name}", ".lora_E"): v
                                   for k, v in config.rank_pattern.items()}
        super().inject_adapter(config, adapter_name, init_weights=init_weights)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self._warned_total = False
            # A config that arrives with a rank_pattern holds a finished allocation: its ranks stay fixed.
            self.rank_allocator = (RankAllocator(config, self._layers(adapter_name), adapter_name)
                                   if config.rank_pattern is None else None)

    def _inject(self, config: AdaLoraConfig, adapter_name: str, init_weights: bool) -> None:
        if config.target_modules is None:  # record the resolved default in the saved config
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            config.target_modules = list(ADALORA_DEFAULT_TARGETS.get(model_type) or resolve_default_targets(self.model))
        targets = config_targets(self.model, config, allowed_types=linear_layer_types() + (AdaLoraLinear,))
        pattern = dict(config.rank_pattern or {})
        conv1d = conv1d_type()
        for name in targets:
            target = self.model.get_submodule(name)
            mask = pattern.pop(f"{name}.lora_E", None)
            r = sum(mask) if mask is not None else config.init_r
            if isinstance(target, AdaLoraLinear):
                layer = target
            else:
                fan_in_fan_out = config.fan_in_fan_out
                if conv1d is not None and isinstance(target, conv1d) and not fan_in_fan_out:
                    warnings.warn(f"{name} is a Conv1D (weight stored in x out): using fan_in_fan_out=True",
                                  stacklevel=5)
                    fan_in_fan_out = config.fan_in_fan_out = True
                elif isinstance(target, nn.Linear) and fan_in_fan_out:
                    warnings.warn(f"{name} is an nn.Linear: using fan_in_fan_out=False", stacklevel=5)
                    fan_in_fan_out = config.fan_in_fan_out = False
                layer = AdaLoraLinear(target, fan_in_fan_out=fan_in_fan_out)
            layer.update_layer(adapter_name, r, config.init_r, config.lora_alpha, config.lora_dropout,
                               config.init_lora_weights if init_weights else False)
            layer.set_adapter(self.active_adapter, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)
        if pattern:
            raise ValueError(f"rank_pattern names modules that are not adapted: {', '.join(sorted(pattern))}; "
                             f"adapted: {', '.join(targets[:8])}")

    def _layers(self, adapter_name: str) -> dict[str, AdaLoraLinear]:
        return {n: m for n, m in self.model.named_modules()
                if isinstance(m, AdaLoraLinear) and adapter_name in m.adapter_names}

    def _trainable(self) -> Optional[str]:
        name = getattr(self, "trainable_adapter_name", None)
        return name if name in self.peft_config else None

    # -- training hooks -------------------------------------------------------
    def training_regularizer(self) -> torch.Tensor:
        """``orth_reg_weight`` times the orthogonality penalty of the trainable adapter (module docstring)."""
        name = self._trainable()
        layers = self._layers(name) if name is not None else {}
        if not layers:
            return torch.zeros((), requires_grad=True)
        pairs = [(layer.lora_A[name], layer.lora_B[name]) for layer in layers.values()]
        return self.peft_config[name].orth_reg_weight * orthogonality_penalty(pairs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if self.model.training and isinstance(loss, torch.Tensor) and self._trainable() is not None:
            outputs.loss = loss + self.training_regularizer()
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and apply the budget at ``global_step`` (HF PEFT's name).

        Call it after every optimizer step, with the gradients still in place, counting steps from 1.
        """
        name = self._trainable()
        if name is None or self.rank_allocator is None:
            return  # inference-only, or an adapter whose ranks were allocated already
        config, allocator = self.peft_config[name], self.rank_allocator
        layers = self._layers(name)
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            allocator.update_importance(layers)
            budget, mask_now = allocator.budget(global_step)
            if mask_now:
                config.rank_pattern = allocator.mask_to_budget(layers, budget)
        elif global_step == final_step:
            config.rank_pattern = allocator.mask_to_budget(layers, allocator.target_budget)
            allocator.reset()
        else:
            if config.rank_pattern is None:  # e.g. resumed after the final allocation: pruned Λ are zero
                config.rank_pattern = {f"{n}.lora_E": (layer.lora_E[name].view(-1) != 0).tolist()
                                       for n, layer in layers.items()}
            self._apply_rank_pattern(layers, name, config.rank_pattern)

    @staticmethod
    @torch.no_grad()
    def _apply_rank_pattern(layers: dict[str, AdaLoraLinear], name: str, pattern: dict[str, list[bool]]) -> None:
        for layer_name, layer in layers.items():
            E = layer.lora_E[name]
            mask = torch.tensor(pattern[f"{layer_name}.lora_E"], dtype=torch.bool, device=E.device)
            E.masked_fill_(~mask.view(-1, 1), 0.0)

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        """The trainer's per-step hook: :meth:`update_and_allocate` at ``step`` (counted from 1)."""
        name = self._trainable()
        if name is not None and not self._warned_total and total_steps != self.peft_config[name].total_step:
            warnings.warn(f"AdaLoRA's total_step={self.peft_config[name].total_step} but the run has "
                          f"{total_steps} steps; the rank budget follows total_step", stacklevel=2)
            self._warned_total = True
        self.update_and_allocate(step)

    # -- checkpoints ----------------------------------------------------------
    def state_for_checkpoint(self) -> dict[str, Any]:
        """What resuming needs besides the weights: the importance averages and the current rank pattern.

        The weights alone are not enough: the averages decide every later allocation, and after the
        final one the pattern says which triplets the saved adapter keeps.
        """
        name = self._trainable()
        if name is None:
            return {}
        pattern = self.peft_config[name].rank_pattern
        state: dict[str, Any] = {"rank_pattern": None if pattern is None
                                 else {k: list(v) for k, v in pattern.items()}}
        if self.rank_allocator is not None:
            for key in ("exp_avg_ipt", "exp_avg_unc"):
                state[key] = {k: v.detach().cpu().clone() for k, v in getattr(self.rank_allocator, key).items()}
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_for_checkpoint` returned (the weights are loaded separately)."""
        name = self._trainable()
        if name is None or not state:
            return
        self.peft_config[name].rank_pattern = state.get("rank_pattern")
        if self.rank_allocator is None:
            return
        layers = self._layers(name)
        params = {f"{n}.{attr}": getattr(layer, attr)[name]
                  for n, layer in layers.items() for attr in AdaLoraLinear.adapter_param_names}
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            saved = state.get(key, {})
            unknown = sorted(set(saved) - set(params))
            if unknown:
                raise ValueError(f"AdaLoRA checkpoint state names parameters this model lacks "
                                 f"({', '.join(unknown[:3])}); was it saved with other target_modules?")
            setattr(self.rank_allocator, key, {k: v.to(params[k].device) for k, v in saved.items()})

    # -- saving ---------------------------------------------------------------
    def adapter_state_to_save(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep only the triplets ``rank_pattern`` keeps (HF PEFT's file form)."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return state
        state = dict(state)
        for key, mask in pattern.items():
            prefix = "base_model.model." + key[: -len(".lora_E")]
            keep = torch.tensor(mask, dtype=torch.bool)
            E = state.get(f"{prefix}.lora_E")
            if E is None or E.shape[0] != keep.numel() or bool(keep.all()):
                continue  # already the kept ranks (a loaded adapter), or nothing pruned
            state[f"{prefix}.lora_E"] = E[keep]
            state[f"{prefix}.lora_A"] = state[f"{prefix}.lora_A"][keep]
            state[f"{prefix}.lora_B"] = state[f"{prefix}.lora_B"][:, keep]
        return state


@register_method("adalora")
def adalora_from_train_config(cfg: Any, base_name: str) -> AdaLoraConfig:
    """AdaLoRA for ``tsugiki train``.

    ``init_r`` defaults to ``lora_r``, ``target_r`` to two thirds of it (HF PEFT's 12 -> 8 ratio), and
    ``total_step`` to ``max_steps``; with ``max_steps: -1`` (epochs) give ``method_args: {total_step: N}``.
    ``lora_alpha``, ``lora_dropout`` and ``target_modules`` come from the run's keys; any other
    AdaLoraConfig option goes in ``method_args``.
    """
    args = dict(cfg.method_args or {})
    fixed: dict[str, Any] = {}
    if "total_step" not in args:
        if cfg.max_steps <= 0:
            raise ValueError("method 'adalora' needs the run's total number of optimizer steps for its rank "
                             "budget schedule: set max_steps, or give method_args: {total_step: N}")
        fixed["total_step"] = cfg.max_steps
    if "target_r" not in args:  # init_r is lora_r (method_args may repeat it, not contradict it)
        fixed["target_r"] = max(1, (2 * cfg.lora_r) // 3)
    return config_from_method_args(
        AdaLoraConfig, args, init_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=train_targets(cfg.target_modules), task_type="CAUSAL_LM", base_model_name_or_path=base_name, **fixed)

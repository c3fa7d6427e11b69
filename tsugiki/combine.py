"""Combine LoRA adapters into a new one: ``LoraModel.add_weighted_adapter`` (also on ``PeftModel``).

Notation, per adapted layer: adapter ``i`` has factors ``A_i`` (r_i x in), ``B_i``
(out x r_i), scaling ``s_i`` and update ``D_i = s_i B_i A_i``; ``w_i`` is its weight
(negative weights subtract). The new adapter gets ``lora_alpha = r`` and no rsLoRA,
so its scaling is 1 and its update is ``B A``. Embedding adapters are handled the
same way (``lora_embedding_A`` is r x vocab, ``lora_embedding_B`` is dim x r).

Combination types (the semantics of HF PEFT's ``LoraModel.add_weighted_adapter``,
so the same inputs give the same adapter):

* ``"linear"`` -- every source must have the same rank r (new rank r)::

      c_i = w_i s_i,   A = sum_i sign(c_i) sqrt(|c_i|) A_i,   B = sum_i sqrt(|c_i|) B_i

  Cheap but only an approximation of ``sum_i w_i D_i`` (cross terms ``B_i A_j``).
* ``"cat"`` -- exact: ``A = concat_rows(w_i s_i A_i)``, ``B = concat_cols(B_i)``, so
  ``B A = sum_i w_i D_i``; new rank ``sum_i r_i``.
* ``"svd"`` (the default) -- exact up to truncation: ``D = sum_i w_i D_i``, then
  ``D ~ U_k S_k Vh_k`` with ``k = svd_rank`` (default ``max_i r_i``);
  ``B = U_k S_k``, ``A = Vh_k``. ``svd_clamp=q`` clamps both to ``[-t, t]``, ``t`` the
  q-quantile of all their entries together.
* ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` -- same rank
  required; the merge rule below is applied to the A factors with weights
  ``sign(c_i) sqrt(|c_i|)`` and to the B factors with weights ``sqrt(|c_i|)``, as for
  ``"linear"``. Their ``*_svd`` variants apply it to the updates ``D_i`` with weights
  ``w_i`` and factor the result like ``"svd"``.

Merge rules for tensors ``T_i`` with weights ``v_i`` (``density`` in (0, 1] is required):

* magnitude_prune: keep the ``int(density * numel)`` entries of largest ``|T_i|`` in each
  ``T_i``; return ``sum_i v_i T_i``.
* dare_linear: keep each entry with probability ``density`` (``torch.bernoulli``, the global
  RNG) and divide kept entries by ``density``; return ``sum_i v_i T_i``.
* ties: magnitude-prune, elect a sign per entry from the pruned ``T_i`` (``"total"``: sign
  of ``sum_i T_i``; ``"frequency"``: sign of ``sum_i sign(T_i)``; ties go to +), then
  the mean of ``v_i T_i`` over the ``i`` whose entry is non-zero with the elected sign
  (0 where there is none).
* dare_ties: the dare random drop, then ties' election and disjoint mean.

``density=1`` prunes nothing. With a single source adapter the combination is always
``"linear"`` (HF PEFT does the same).

Where this differs from HF PEFT, on purpose:

* an ``adapter_name`` that already exists is an error (HF returns silently);
* the new adapter never uses rsLoRA (HF copies ``use_rslora`` from the first source,
  which makes the new scaling ``sqrt(r)`` instead of 1 and scales the update by it);
* a ``modules_to_save`` module trained by exactly one source is copied, trained, into
  the new adapter (HF gives the new adapter an untrained copy of the original);
* a layer that some source adapts but the new adapter's targets miss is an error
  (HF silently leaves it out);
* ranks above what the SVD yields are zero-padded rather than failing.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import nn

from .methods.lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear, starts_from_base_weight
from .tuner import ModulesToSaveWrapper

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + FACTOR_TYPES + SVD_TYPES
SIGN_METHODS = ("total", "frequency")

# The merge rule behind each combination type (None: plain weighted sum).
_RULE = {
    "linear": "linear", "svd": "linear",
    "ties": "ties", "ties_svd": "ties",
    "dare_linear": "dare_linear", "dare_linear_svd": "dare_linear",
    "dare_ties": "dare_ties", "dare_ties_svd": "dare_ties",
    "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune",
}


# -- merge rules on plain tensors ------------------------------------------------------------
def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` entries of largest magnitude."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat_mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    flat_mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
    return tensor * flat_mask.reshape(tensor.shape)


def prune_random(tensor: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """DARE drop: keep each entry with probability ``density``; rescale by ``1/density`` to keep the mean."""
    if density >= 1:
        return tensor
    # full_like + bernoulli per tensor: a seeded run draws the same masks every time. They
    # differ from HF PEFT's with the same seed, which draws the new adapter's random init first.
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Entries of ``stacked`` (tasks on dim 0) whose sign is the elected one; zeros never are."""
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r} is not known; use one of {SIGN_METHODS}")
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the masked entries (an entry with none left is 0)."""
    total = (weighted * mask).sum(dim=0)
    count = mask.sum(dim=0).clamp(min=1)
    return total / count


def merge_tensors(rule: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor,
                  density: Optional[float] = None, majority_sign_method: str = "total") -> torch.Tensor:
    """Apply one merge rule (see the module docstring) to same-shape ``tensors`` with ``weights``."""
    if rule in ("magnitude_prune", "ties"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [prune_random(t, density) for t in tensors]
    elif rule != "linear":
        raise ValueError(f"unknown merge rule {rule!r}")
    stacked = torch.stack(list(tensors), dim=0)
    w = weights.to(stacked.device).reshape((-1,) + (1,) * (stacked.dim() - 1))
    if rule in ("ties", "dare_ties"):
        # The sign is elected from the unweighted (pruned) tensors, as in TIES.
        mask = majority_sign_mask(stacked, majority_sign_method)
        return disjoint_merge(stacked * w, mask)
    return (stacked * w).sum(dim=0)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its input-size limit."""
    flat = values.reshape(-1).sort().values
    pos = q * (flat.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.numel() - 1)
    return torch.lerp(flat[lo], flat[hi], torch.tensor(pos - lo, dtype=flat.dtype, device=flat.device))


# -- per-layer helpers ----------------------------------------------------------------------
def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter: A is rank x in (vocab), B is out (dim) x rank."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _delta_in_factor_layout(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """Turn a ``get_delta_weight``-layout update into the ``B @ A`` (out x in) layout."""
    transposed = isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False)
    return delta.T if transposed else delta


def _svd_factors(delta: torch.Tensor, rank: int, clamp: Optional[float], full_matrices: bool,
                 driver: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"driver": driver} if driver is not None else {}
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, **kw)
    k = min(rank, S.numel())
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        limit = quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), clamp)
        B = B.clamp(-limit, limit)
        A = A.clamp(-limit, limit)
    return A, B


def _combine_layer(layer: LoraLayer, layer_name: str, sources: list[tuple[str, float]], combination_type: str,
                   new_rank: int, density: Optional[float], majority_sign_method: str,
                   svd_clamp: Optional[float], svd_full_matrices: bool, svd_driver: Optional[str]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A, B) for one layer, zero-padded to ``new_rank`` (padding does not change ``B A``)."""
    factors = [_factors(layer, name) for name, _ in sources]
    if combination_type == "cat":
        A = torch.cat([a.data * w * layer.scaling[n] for (n, w), (a, _) in zip(sources, factors)], dim=0)
        B = torch.cat([b.data for _, b in factors], dim=1)
    elif combination_type in SVD_TYPES:
        deltas = [layer.get_delta_weight(n) for n, _ in sources]  # includes s_i
        weights = torch.tensor([w for _, w in sources], dtype=torch.float32)
        delta = merge_tensors(_RULE[combination_type], deltas, weights, density, majority_sign_method)
        A, B = _svd_factors(_delta_in_factor_layout(layer, delta), new_rank, svd_clamp, svd_full_matrices,
                            svd_driver)
    else:
        ranks = {n: a.shape[0] for (n, _), (a, _) in zip(sources, factors)}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"combination_type={combination_type!r} needs equal ranks, but layer {layer_name!r} "
                             f"has ranks {ranks}; use 'cat' or 'svd'")
        c = [w * layer.scaling[n] for n, w in sources]
        # sqrt(|c|) on both factors gives |c| in B A; the sign goes on A only so it is not squared away.
        w_A = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in c])
        w_B = torch.tensor([math.sqrt(abs(x)) for x in c])
        rule = _RULE[combination_type]
        A = merge_tensors(rule, [a.data for a, _ in factors], w_A, density, majority_sign_method)
        B = merge_tensors(rule, [b.data for _, b in factors], w_B, density, majority_sign_method)
    k = A.shape[0]
    A_full = A.new_zeros((new_rank, A.shape[1]))
    B_full = B.new_zeros((B.shape[0], new_rank))
    A_full[:k] = A
    B_full[:, :k] = B
    return A_full, B_full


# -- config of the new adapter --------------------------------------------------------------
def _config_rank(config: LoraConfig) -> int:
    # rank_pattern may raise some layers above r; the new adapter has one rank, so take the largest.
    return max([config.r, *config.rank_pattern.values()])


def _adapted_layer_names(model: nn.Module, adapter: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.adapter_names]


def _new_target_modules(model: nn.Module, configs: dict[str, LoraConfig]):
    """HF's rule: lists are united, regexes are OR-ed, a list/regex mix is an error.

    ``None`` (architecture default) and ``"all-linear"`` are resolved to the layers the
    adapter actually sits on, as HF PEFT resolves them when it injects.
    """
    specs = {}
    for name, config in configs.items():
        spec = config.target_modules
        if spec is None or (isinstance(spec, str) and spec.lower() == "all-linear"):
            spec = None if all(c.target_modules is None for c in configs.values()) else \
                _adapted_layer_names(model, name)
        specs[name] = spec
    values = list(specs.values())
    if all(v is None for v in values):
        return None
    if all(isinstance(v, str) for v in values):
        return values[0] if len(set(values)) == 1 else "|".join(f"({v})" for v in values)
    if all(isinstance(v, list) for v in values):
        return sorted(set().union(*values))
    kinds = {n: ("regex " + repr(v)) if isinstance(v, str) else "list" for n, v in specs.items()}
    raise ValueError(f"cannot combine adapters whose target_modules mix a regex and a list: {kinds}; "
                     "give them target_modules of the same kind")


def _new_config(model: nn.Module, configs: dict[str, LoraConfig], rank: int) -> LoraConfig:
    first = next(iter(configs.values()))
    config = copy.deepcopy(first)
    config.r = rank
    config.lora_alpha = rank
    config.use_rslora = False  # scaling exactly 1: the factors below already carry every s_i
    config.rank_pattern = {}
    config.alpha_pattern = {}
    config.target_modules = _new_target_modules(model, configs)
    if starts_from_base_weight(config.init_lora_weights):
        # The combined weights are not a PiSSA/OLoRA split of the base; never re-run that init on load.
        config.init_lora_weights = True
    saved = [m for c in configs.values() for m in (c.modules_to_save or [])]
    config.modules_to_save = list(dict.fromkeys(saved)) or None
    return config


# -- entry point ----------------------------------------------------------------------------
def _check_args(tuner, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                majority_sign_method) -> None:
    known = tuner.peft_config
    if isinstance(adapters, str):
        raise TypeError(f"adapters must be a list of adapter names, got the string {adapters!r}")
    if not adapters:
        raise ValueError("adapters is empty; name at least one adapter to combine")
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; have: {', '.join(known)}")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters {list(adapters)}; "
                         "give one weight per adapter")
    for a, w in zip(adapters, weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"weight {w!r} for adapter {a!r} must be a finite number")
    if adapter_name in known:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not known; "
                         f"use one of {', '.join(COMBINATION_TYPES)}")
    for a in adapters:
        if not isinstance(known[a], LoraConfig):
            raise ValueError(f"adapter {a!r} is {known[a].peft_type}; only LoRA adapters can be combined")
        if known[a].use_dora:
            raise ValueError(f"adapter {a!r} is a DoRA adapter; its magnitude vector cannot be combined, "
                             "only plain LoRA adapters can")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer (or None for the largest source rank)")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp={svd_clamp!r} must be a quantile in [0, 1] (or None for no clamping)")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is not known; use one of {SIGN_METHODS}")
    if len(adapters) > 1 and _RULE.get(combination_type, "linear") != "linear":
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} needs density, the fraction of entries "
                             "to keep, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density={density!r} must be in (0, 1] (the fraction of entries to keep)")


def add_weighted_adapter(tuner, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> None:
    """Add ``adapter_name`` to ``tuner`` (a ``LoraModel``), a combination of its LoRA ``adapters`` with ``weights``.

    See the module docstring for each ``combination_type``'s formula. Defaults:
    ``combination_type="svd"``, ``svd_rank`` = the largest source rank, no clamping,
    ``svd_full_matrices=True``, ``majority_sign_method="total"``; ``density`` has no
    default and is required by the ties / dare / magnitude_prune types. The new adapter
    has ``lora_alpha = r`` (scaling 1), is not made active, and its config is the first
    source's with the new ``r`` and the sources' ``target_modules`` combined.
    """
    # A tensor of weights (or of one weight each) reads as plain numbers, as HF PEFT takes it.
    weights = [w.item() if isinstance(w, torch.Tensor) and w.numel() == 1 else w for w in weights]
    _check_args(tuner, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                majority_sign_method)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if len(adapters) == 1:
        combination_type = "linear"  # one source: a rescaled copy, whatever was asked (as HF does)
    configs = {a: tuner.peft_config[a] for a in dict.fromkeys(adapters)}
    ranks = {a: _config_rank(c) for a, c in configs.items()}
    if combination_type in FACTOR_TYPES and len(set(ranks.values())) > 1:
        raise ValueError(f"combination_type={combination_type!r} needs adapters of equal rank, got ranks {ranks}; "
                         "use 'cat' or 'svd' for different ranks")
    if combination_type == "cat":
        new_rank = sum(ranks[a] for a in adapters)
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(ranks.values())
    else:
        new_rank = next(iter(ranks.values()))

    model = tuner.model
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    trained_copies: dict[str, str] = {}
    for name, wrapper in wrappers.items():
        owners = [a for a in configs if a in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(f"adapters {owners} each train their own copy of {name!r} (modules_to_save); "
                             "full copies cannot be combined, so combine adapters where at most one trains it")
        if owners:
            trained_copies[name] = owners[0]

    # Compute everything before the new adapter exists, so that with a seeded RNG the DARE
    # masks do not depend on how the new layers get initialised.
    new_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if not sources:
            continue
        if not isinstance(layer, (LoraLinear, LoraEmbedding)):
            raise ValueError(f"layer {layer_name!r} ({type(layer).__name__}) cannot be combined; "
                             "only linear and embedding LoRA layers can")
        with torch.no_grad():
            new_factors[layer_name] = _combine_layer(
                layer, layer_name, sources, combination_type, new_rank, density,
                majority_sign_method, svd_clamp, svd_full_matrices, svd_driver)

    config = _new_config(model, configs, new_rank)
    tuner.inject_adapter(config, adapter_name, init_weights=False)  # no init: every weight is set below
    try:
        placed = set(_adapted_layer_names(model, adapter_name))
        missed = sorted(set(new_factors) - placed)
        if missed:
            raise ValueError(f"the combined target_modules {config.target_modules!r} (with the first adapter's "
                             f"layers_to_transform / exclude_modules) miss layers the sources adapt: {missed}")
        with torch.no_grad():
            for layer_name in placed:
                layer = model.get_submodule(layer_name)
                A, B = _factors(layer, adapter_name)
                if layer_name in new_factors:
                    new_A, new_B = new_factors[layer_name]
                    A.copy_(new_A.to(A.dtype))
                    B.copy_(new_B.to(B.dtype))
                else:  # no source adapts this layer: the combined update there is zero
                    A.zero_()
                    B.zero_()
            for name, owner in trained_copies.items():
                wrapper = model.get_submodule(name)
                if adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owner].state_dict())
    except BaseException:
        tuner.delete_adapter(adapter_name)  # leave the model as it was
        raise

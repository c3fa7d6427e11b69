"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., 2022; LyCORIS).

The update of a frozen weight ``W0`` (out x in) is the element-wise product of two
rank-``r`` matrices, so its rank can reach ``r**2`` with ``2r(out + in)`` parameters::

    delta_W = (W1a W1b) * (W2a W2b) * alpha / r,   W1a, W2a: out x r,   W1b, W2b: r x in
    h = W0 x + delta_W x

Stored as HF PEFT does: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``.
``W2b`` starts at zero (the others Kaiming-uniform), so the adapter starts as a no-op.

For ``nn.Conv2d`` the weight is flattened to out x (in * kh * kw); with
``use_effective_conv2d=True`` (kernels larger than 1x1) each factor is a CP
decomposition instead: ``W1 = einsum('ijkl,jr,ip->prkl', T1, W1b, W1a)`` with
``hada_t1``: r x r x kh x kw, ``hada_w1_a``: r x out, ``hada_w1_b``: r x in (same for W2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from ..config import PeftType, register_config, register_method
from ..tuner import register_tuner
from .lycoris import LycorisConfig, LycorisLayer, LycorisTuner, lycoris_from_train_config


@register_config
@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (HF PEFT's ``LoHaConfig`` names and defaults).

    Args:
        r: rank of each of the two factor pairs (default 8).
        alpha: the update is multiplied by ``alpha / r`` (default 8).
        rank_dropout: training only: drop each output row of ``delta_W`` with this probability and
            rescale the kept rows by ``1 / mean(kept)`` (default 0.0).
        module_dropout: training only: skip the adapter for a whole forward pass with this
            probability (default 0.0).
        use_effective_conv2d: CP-decompose Conv2d kernels larger than 1x1 (default False).
        target_modules / exclude_modules: module names, suffixes, a regex, ``"all-linear"``, or
            ``None`` for the architecture's default. Targets must be ``nn.Linear`` or ``nn.Conv2d``.
        init_weights: ``True`` (``hada_w2_b`` zero: a no-op at first) or ``False`` (all random).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module ``r`` / ``alpha``, keyed by a name or regex.
        modules_to_save: modules trained in full and saved beside the adapter.
    """

    peft_type_name = PeftType.LOHA.value


class LoHaLayer(LycorisLayer):
    """LoHa around an ``nn.Linear`` or ``nn.Conv2d``."""

    adapter_param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def create_factors(self, r: int, config: LycorisConfig, effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
        if effective_conv2d:
            out_ch, in_ch, kh, kw = self.weight_shape
            return {"hada_w1_a": (r, out_ch), "hada_w1_b": (r, in_ch), "hada_t1": (r, r, kh, kw),
                    "hada_w2_a": (r, out_ch), "hada_w2_b": (r, in_ch), "hada_t2": (r, r, kh, kw)}
        out_f, in_f = self.flat_shape()
        return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}

    def init_factors(self, name: str, init: Union[bool, str]) -> None:
        for attr in self.adapter_param_names:
            if name in getattr(self, attr):
                nn.init.kaiming_uniform_(getattr(self, attr)[name], a=math.sqrt(5))
        if init is not False:
            nn.init.zeros_(self.hada_w2_b[name])  # one zero factor makes the product zero

    def delta_weight(self, name: str) -> torch.Tensor:
        s = self.scaling[name]
        w1a, w1b = self.hada_w1_a[name], self.hada_w1_b[name]
        w2a, w2b = self.hada_w2_a[name], self.hada_w2_b[name]
        if name in self.hada_t1:
            w1 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1[name], w1b, w1a)  # (out, in, kh, kw)
            w2 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2[name], w2b, w2a)
            return w1 * w2 * s
        return ((w1a @ w1b) * (w2a @ w2b) * s).reshape(self.weight_shape)


@register_tuner(PeftType.LOHA.value)
class LoHaModel(LycorisTuner):
    """``PeftModel.base_model`` for LoHa: grafts :class:`LoHaLayer` onto Linear / Conv2d targets."""

    layer_classes = (LoHaLayer,)
    method_name = "LoHa"


@register_method("loha", reads=("lora_r", "lora_alpha", "target_modules"))
def loha_from_train_config(cfg: Any, base_name: str) -> LoHaConfig:
    """LoHa for ``tsugiki train``: ``lora_r`` / ``lora_alpha`` as r / alpha, other options in ``method_args``."""
    return lycoris_from_train_config(LoHaConfig, cfg, base_name)

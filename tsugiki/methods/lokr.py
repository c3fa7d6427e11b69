"""LoKr: Kronecker-product adaptation (KronA / LyCORIS).

The update of a frozen weight ``W0`` (out x in) is a Kronecker product of a small
and a larger factor, with ``out = a * c`` and ``in = b * d`` split by
:func:`factorization`::

    delta_W = kron(W1, W2) * alpha / r,   W1: a x b,   W2: c x d
    h = W0 x + delta_W x

``W2`` is low-rank (``W2 = W2a W2b``, ``lokr_w2_a``: c x r, ``lokr_w2_b``: r x d) unless
``r >= max(c, d) / 2``, when it is one full matrix ``lokr_w2``. ``W1`` is a full
``lokr_w1`` unless ``decompose_both=True`` and ``r < max(a, b) / 2`` (then
``lokr_w1_a``: a x r, ``lokr_w1_b``: r x b). By default ``W1`` (or ``W1a``) starts at
zero, so the adapter starts as a no-op.

For ``nn.Conv2d``, ``in`` is ``in_channels / groups`` and the kernel lives in ``W2``:
``lokr_w2``: c x d x kh x kw, or low-rank ``W2b``: r x (d * kh * kw), or with
``use_effective_conv2d=True`` a CP decomposition
``W2 = einsum('ijkl,ip,jr->prkl', T2, W2a, W2b)`` (``lokr_t2``: r x r x kh x kw,
``lokr_w2_a``: r x c, ``lokr_w2_b``: r x d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import nn

from ..config import PeftType, register_config, register_method
from ..tuner import register_tuner
from .lycoris import LycorisConfig, LycorisLayer, LycorisTuner, lycoris_from_train_config


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n == dimension`` (HF PEFT's rule).

    ``factor > 0`` dividing ``dimension`` gives ``(factor, dimension // factor)``. Otherwise
    ``m`` steps through the divisors from 1 upwards while ``m < n`` and ``m <= factor``
    (``factor=-1``: no limit, i.e. the most balanced split): 128 -> (8, 16), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m:
            next_m += 1
        if next_m > limit:
            break
        m, n = next_m, dimension // next_m
    return (m, n) if m <= n else (n, m)


@register_config
@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (HF PEFT's ``LoKrConfig`` names and defaults).

    Args:
        r: rank of the low-rank factor(s) (default 8).
        alpha: the update is multiplied by ``alpha / r`` (default 8).
        rank_dropout: training only: drop each output row of ``delta_W`` with this probability
            (default 0.0).
        rank_dropout_scale: rescale the kept rows by ``1 / mean(kept)`` (default False).
        module_dropout: training only: skip the adapter for a whole forward pass with this
            probability (default 0.0).
        decompose_both: also make ``W1`` low-rank when ``r < max(a, b) / 2`` (default False).
        decompose_factor: the preferred size of the smaller factor of each dimension;
            ``-1`` (default) splits as evenly as possible (see :func:`factorization`).
        use_effective_conv2d: CP-decompose ``W2`` of Conv2d kernels larger than 1x1 (default False).
        target_modules / exclude_modules: module names, suffixes, a regex, ``"all-linear"``, or
            ``None`` for the architecture's default. Targets must be ``nn.Linear`` or ``nn.Conv2d``.
        init_weights: ``True`` (``W1`` zero), ``"lycoris"`` (``W2`` / ``W2b`` zero instead, as the
            LyCORIS library does), or ``False`` (all random: not a no-op).
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module ``r`` / ``alpha``, keyed by a name or regex.
        modules_to_save: modules trained in full and saved beside the adapter.
    """

    peft_type_name = PeftType.LOKR.value
    init_choices: ClassVar[tuple] = (True, False, "lycoris")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        for key in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, key), bool):
                raise self._bad(key, "must be True or False")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f <= 0):
            raise self._bad("decompose_factor", "use -1 (balanced split) or a positive integer")


class LoKrLayer(LycorisLayer):
    """LoKr around an ``nn.Linear`` or ``nn.Conv2d``."""

    adapter_param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    @property
    def adapter_names(self) -> list[str]:
        # W1 is either lokr_w1 or lokr_w1_a/b, so no single table lists every adapter.
        return list(dict.fromkeys([*self.lokr_w1.keys(), *self.lokr_w1_a.keys()]))

    def _rank_dropout_rescales(self, config: LycorisConfig) -> bool:
        return bool(getattr(config, "rank_dropout_scale", False))

    def create_factors(self, r: int, config: LycorisConfig, effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
        out_dim, in_dim = self.weight_shape[:2]
        kernel = self.weight_shape[2:]
        a, c = factorization(out_dim, config.decompose_factor)
        b, d = factorization(in_dim, config.decompose_factor)
        shapes: dict[str, tuple[int, ...]] = {}
        if config.decompose_both and r < max(a, b) / 2:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, b))
        else:
            shapes.update(lokr_w1=(a, b))
        if r >= max(c, d) / 2:
            shapes.update(lokr_w2=(c, d, *kernel))
        elif effective_conv2d:
            shapes.update(lokr_t2=(r, r, *kernel), lokr_w2_a=(r, c), lokr_w2_b=(r, d))
        else:
            shapes.update(lokr_w2_a=(c, r), lokr_w2_b=(r, d * math.prod(kernel)))
        return shapes

    def init_factors(self, name: str, init: Union[bool, str]) -> None:
        for attr in self.adapter_param_names:
            if name in getattr(self, attr):
                nn.init.kaiming_uniform_(getattr(self, attr)[name], a=math.sqrt(5))
        if init is False:
            return
        # One zero factor makes the Kronecker product zero.
        if init == "lycoris":
            zero = self.lokr_w2 if name in self.lokr_w2 else self.lokr_w2_b
        else:
            zero = self.lokr_w1 if name in self.lokr_w1 else self.lokr_w1_a
        nn.init.zeros_(zero[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            w1 = self.lokr_w1[name]
        else:
            w1 = self.lokr_w1_a[name] @ self.lokr_w1_b[name]  # (a, b)
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]  # (c, d * kernel area)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scaling[name]).reshape(self.weight_shape)


@register_tuner(PeftType.LOKR.value)
class LoKrModel(LycorisTuner):
    """``PeftModel.base_model`` for LoKr: grafts :class:`LoKrLayer` onto Linear / Conv2d targets."""

    layer_classes = (LoKrLayer,)
    method_name = "LoKr"


@register_method("lokr", reads=("lora_r", "lora_alpha", "target_modules"))
def lokr_from_train_config(cfg: Any, base_name: str) -> LoKrConfig:
    """LoKr for ``tsugiki train``: ``lora_r`` / ``lora_alpha`` as r / alpha, other options in ``method_args``."""
    return lycoris_from_train_config(LoKrConfig, cfg, base_name)

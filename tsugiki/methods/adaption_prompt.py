"""LLaMA-Adapter: adaption prompts with zero-initialised gated attention (Zhang et al., 2023).

The top ``adapter_layers`` attention modules each get ``adapter_len`` learnable
prompt vectors ``P`` (1 x adapter_len x hidden) and a scalar gate ``g`` (starts
at 0). The prompt goes through the layer's own (frozen) key and value
projections; every query of the layer attends to it in a separate softmax,
scaled by the gate, and the result is projected by the layer's ``o_proj``::

    K_p = k_proj(P),  V_p = v_proj(P)                    (no rotary embedding: the prompt has no position)
    A   = g * softmax(rope(q_proj(x)) K_p^T / sqrt(d_head)) V_p
    out = attention(x) + W_o A                           (W_o without its bias: attention(x) already has it)

With ``g = 0`` the model computes exactly what the base did. The prompt keys
and values do not depend on the input, so nothing goes into the KV cache:
generation with a cache gives the same tokens as full recomputation.

Supported: Llama-style attention (``model_type`` ``llama`` or ``mistral``:
``q_proj``/``k_proj``/``v_proj``/``o_proj``, rotary ``position_embeddings``,
grouped-query heads). Not mergeable. File keys follow HF PEFT:
``<layer>.self_attn.adaption_prompt`` and ``<layer>.self_attn.adaption_gate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, config_from_method_args, register_config, register_method
from ..inject import replace_module
from ..tuner import AdapterLayer, BaseTuner, register_tuner, rows_per_adapter

SUPPORTED_MODEL_TYPES = {"llama": "self_attn", "mistral": "self_attn"}  # model_type -> default target_modules
PAPER_ADAPTER_LEN = 10  # the paper's prompt length; used by `tsugiki train --method llama_adapter`


@register_config
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of a LLaMA-Adapter (HF PEFT's ``AdaptionPromptConfig`` names).

    Args:
        target_modules: name of the attention sub-module in each decoder layer (a name, not a
            regex); ``None`` (default): ``"self_attn"`` for Llama / Mistral.
        adapter_len: number of prompt vectors per layer (required, as in HF PEFT; the paper uses 10).
        adapter_layers: how many attention modules, counted from the top, get prompts; ``None``:
            every layer (tsugiki extension; the resolved number is written to the saved config).
        init_weights: ``True`` (default): the gate starts at zero (a no-op); ``False``: a random
            gate (for tests). The prompts always start ~ N(0, 1).
    """

    peft_type_name = PeftType.ADAPTION_PROMPT.value

    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.init_weights:  # the default; HF PEFT's config has no such key, so leave it out
            del out["init_weights"]
        return out

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"AdaptionPromptConfig: {key}={getattr(self, key)!r} is invalid: {why}")

        def positive(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if self.adapter_len is None:
            raise bad("adapter_len", f"it is required: the number of prompt vectors per layer "
                      f"(the paper uses {PAPER_ADAPTER_LEN})")
        if not positive(self.adapter_len):
            raise bad("adapter_len", "must be a positive integer, e.g. 10")
        if self.adapter_layers is not None and not positive(self.adapter_layers):
            raise bad("adapter_layers", "must be a positive integer (layers counted from the top) or None for all")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise bad("target_modules", "give the attention sub-module's name as one string, e.g. 'self_attn'")
        if not isinstance(self.init_weights, bool):
            raise bad("init_weights", "use True (gate starts at zero) or False (random gate)")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer, nn.Module):
    """A Llama-style attention module plus gated attention to learned prompts (see module docstring)."""

    adapter_param_names = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self._init_adapter_state()
        self.base_layer = base_layer
        config = base_layer.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = base_layer.head_dim
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def update_layer(self, name: str, adapter_len: int, init: bool) -> None:
        weight = self.base_layer.q_proj.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        hidden = self.base_layer.q_proj.in_features
        kw = {"device": weight.device, "dtype": dtype}
        self.adaption_prompt[name] = nn.Parameter(torch.randn(1, adapter_len, hidden, **kw))
        gate = torch.zeros(1, **kw) if init else torch.randn(1, **kw)
        self.adaption_gate[name] = nn.Parameter(gate)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        mixed = self._check_mixed_batch()
        if mixed is None and self.active_adapter not in self.adaption_prompt:
            return out
        attn_out = out[0] if isinstance(out, tuple) else out
        x = args[0] if args else kwargs["hidden_states"]
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rope is None:
            raise ValueError("LLaMA-Adapter needs the rotary position_embeddings (cos, sin) that transformers' "
                             "Llama decoder layers pass to their attention; call the attention through the model")
        cos, sin = rope
        if mixed is None:
            attn_out = attn_out + self._prompt_attention(self.active_adapter, x, cos, sin)
        else:
            attn_out = attn_out.clone()
            for name, rows in rows_per_adapter(mixed, x.shape[0]).items():
                if name in self.adaption_prompt:
                    rows = rows.to(x.device)
                    pick = (lambda t: t[rows] if t.shape[0] == x.shape[0] else t)  # cos/sin may broadcast
                    attn_out[rows] = attn_out[rows] + self._prompt_attention(name, x[rows], pick(cos), pick(sin))
        return (attn_out, *out[1:]) if isinstance(out, tuple) else attn_out

    def _prompt_attention(self, name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn = self.base_layer
        bsz, q_len, _ = x.shape
        prompt = self.adaption_prompt[name].to(x.dtype)  # (1, L, hidden)
        L = prompt.shape[1]
        q = attn.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, T, d)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = attn.k_proj(prompt).view(1, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1, Hkv, L, d)
        v = attn.v_proj(prompt).view(1, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads  # each kv head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (1, H, L, d)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (b, H, T, L)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = probs * self.adaption_gate[name].to(q.dtype)
        mixed_v = (probs @ v).transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        projected = attn.o_proj(mixed_v)
        bias = getattr(attn.o_proj, "bias", None)
        return projected - bias if bias is not None else projected  # the base output already holds the bias

    def _merge_adapter(self, name: str, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def unmerge(self, name: Optional[str] = None) -> None:
        return None  # never merged

    def __getattr__(self, name: str) -> Any:
        # The decoder layer and attention backends read layer_idx, config, is_causal, ... from here.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        lens = {n: p.shape[1] for n, p in self.adaption_prompt.items()}
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, adapter_len={lens}"


_CANNOT_MERGE = ("LLaMA-Adapter prompts act through a softmax over the queries, so they cannot be merged into the "
                 "base weights; keep the adapter attached for inference, or call unload() to remove it")


@register_tuner(PeftType.ADAPTION_PROMPT.value)
class AdaptionPromptModel(BaseTuner):
    """``PeftModel.base_model`` for LLaMA-Adapter: wraps the top attention modules in :class:`AdaptedAttention`."""

    layer_classes = (AdaptedAttention,)

    def _inject(self, config: AdaptionPromptConfig, adapter_name: str, init_weights: bool) -> None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"LLaMA-Adapter supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                             f"{type(self.model).__name__} is {model_type!r}. Use LoRA or a bottleneck adapter")
        if config.target_modules is None:
            config.target_modules = SUPPORTED_MODEL_TYPES[model_type]
        suffix = "." + config.target_modules
        found = [n for n, _ in self.model.named_modules() if n.endswith(suffix)]
        if not found:
            raise ValueError(f"target_modules={config.target_modules!r} names no module of {type(self.model).__name__}"
                             "; give the attention sub-module's name, e.g. 'self_attn'")
        if config.adapter_layers is None:  # record the resolved count in the saved config
            config.adapter_layers = len(found)
        if config.adapter_layers > len(found):
            raise ValueError(f"adapter_layers={config.adapter_layers} but {type(self.model).__name__} has only "
                             f"{len(found)} {config.target_modules!r} modules")
        for name in found[-config.adapter_layers:]:
            target = self.model.get_submodule(name)
            if isinstance(target, AdaptedAttention):
                layer = target
            else:
                missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj", "config", "head_dim")
                           if not hasattr(target, p)]
                if missing:
                    raise ValueError(f"{name} ({type(target).__name__}) is not a Llama-style attention module: it "
                                     f"lacks {', '.join(missing)}")
                layer = AdaptedAttention(target)
            layer.update_layer(adapter_name, config.adapter_len, init=config.init_weights if init_weights else True)
            layer.set_adapter(self.active_adapter, trainable=False)
            if layer is not target:
                replace_module(self.model, name, layer)

    def merge_adapter(self, adapter_names: Any = None, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(_CANNOT_MERGE)


@register_method("llama_adapter", reads=("target_modules",))
def llama_adapter_from_train_config(cfg: Any, base_name: str) -> AdaptionPromptConfig:
    """LLaMA-Adapter for ``tsugiki train``: ``adapter_len`` (default 10, the paper's) and ``adapter_layers``
    (default: every layer) in ``method_args``; ``target_modules`` may name the attention module."""
    fixed: dict[str, Any] = {"adapter_len": PAPER_ADAPTER_LEN, "task_type": "CAUSAL_LM",
                             "base_model_name_or_path": base_name}
    if cfg.target_modules:
        if len(cfg.target_modules) != 1:
            raise ValueError(f"target_modules={cfg.target_modules!r}: LLaMA-Adapter takes one attention module "
                             "name, e.g. self_attn")
        fixed["target_modules"] = cfg.target_modules[0]
    return config_from_method_args(AdaptionPromptConfig, cfg.method_args, **fixed)

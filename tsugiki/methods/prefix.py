"""Prefix tuning (Li & Liang, 2021): trainable key/value prefixes for every attention layer.

For each layer ``l`` the attention sees ``n`` extra keys and values in front of the
input's own::

    K_l = [Pk_l; W_k h],   V_l = [Pv_l; W_v h],   Pk_l, Pv_l: (heads x n x head_dim)

The prefixes come from a table ``E`` (n x 2·L·d, ``d = token_dim``), or with
``prefix_projection=True`` from ``MLP(T)`` (``T``: n x d, ``Linear(d, h)-Tanh-Linear(h, 2·L·d)``,
``h = encoder_hidden_size``, default ``d``). They reach the model as a pre-filled
key/value cache (transformers' ``DynamicCache``), built anew for every forward pass
and every ``generate`` call; generation then extends that cache as usual. The
attention mask gets ``n`` ones in front and position ids continue after the prefix
(``n + i`` for the i-th real token, following the mask, so left padding is handled).
Prefix keys carry no rotary position: they are used as stored. For grouped-query
attention ``d`` and the head count are the key/value ones (``head_dim * num_key_value_heads``).

Works with ``task_type="CAUSAL_LM"`` only, and not with gradient checkpointing (the
recomputed layers would extend the cache twice).

On disk (HF PEFT's layout) ``prompt_embeddings`` is the folded ``n x 2·L·d`` table; a
loaded adapter is that table (a projection is not recovered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import PeftType, TaskType, config_from_method_args, register_config, register_method
from ..tuner import register_tuner
from .prompt_base import PromptLearningConfig, PromptLearningModel, _text_config


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (HF PEFT's ``PrefixTuningConfig`` names and defaults).

    Args:
        num_virtual_tokens: prefix length ``n`` (required).
        prefix_projection: make the prefixes with a 2-layer MLP over an ``n x d`` table (default ``False``:
            the ``n x 2·L·d`` table is trained directly).
        encoder_hidden_size: the MLP's hidden width; ``None`` uses ``token_dim``.
        init_weights: ``None`` (default; random, N(0, 1) tables and PyTorch's Linear init) or ``"zero"`` (the
            prefixes start at zero).
    """

    peft_type_name = PeftType.PREFIX_TUNING.value

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r}; use None (random) or 'zero'")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")


class PrefixEncoder(nn.Module):
    """``E`` or ``MLP(T)``: returns the prefixes of all layers as (1, n, 2·L·d)."""

    def __init__(self, config: PrefixTuningConfig, projection: bool):
        super().__init__()
        n, d = config.num_virtual_tokens, config.token_dim
        width = config.num_layers * 2 * d
        self.transform: Optional[nn.Sequential] = None
        if projection:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
        else:
            self.embedding = nn.Embedding(n, width)
        if config.init_weights == "zero":
            last = self.transform[-1] if self.transform is not None else None
            with torch.no_grad():
                if last is not None:
                    last.weight.zero_()
                    last.bias.zero_()
                else:
                    self.embedding.weight.zero_()

    def forward(self, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, n, d) or (1, n, 2·L·d)
        return self.transform(x) if self.transform is not None else x

    def to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.forward()[0].detach()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        table = state["prompt_embeddings"]
        if self.transform is not None or tuple(self.embedding.weight.shape) != tuple(table.shape):
            device = self.embedding.weight.device
            self.transform = None  # the file holds the projected prefixes: keep them as the table
            self.embedding = nn.Embedding(*table.shape, device=device)
        with torch.no_grad():
            self.embedding.weight.copy_(table)


@register_tuner(PeftType.PREFIX_TUNING.value)
class PrefixTuningModel(PromptLearningModel):
    """``PeftModel.base_model`` for prefix tuning."""

    task_types = (TaskType.CAUSAL_LM.value,)
    inserts_tokens = False

    def _inject(self, config: PrefixTuningConfig, adapter_name: str, init_weights: bool) -> None:
        _kv_dims(config, self.model)
        super()._inject(config, adapter_name, init_weights)

    def _make_encoder(self, config: PrefixTuningConfig, init_weights: bool) -> nn.Module:
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"token_dim={config.token_dim} is not a multiple of "
                             f"num_attention_heads={config.num_attention_heads}")
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        # A loaded adapter is the folded table, whatever prefix_projection says.
        return PrefixEncoder(config, projection=config.prefix_projection and init_weights)

    def _virtual_tokens(self, config: PrefixTuningConfig, task_ids: Optional[torch.Tensor], batch: int,
                        cache: Any = None) -> Any:
        """The prefix as a key/value cache of ``batch`` rows: added to ``cache``, or a new ``DynamicCache``."""
        n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        prefix = self.prompt_encoder[self.active_adapter]()  # (1, n, 2·L·d)
        prefix = prefix.to(self.word_embeddings.weight.dtype).expand(batch, -1, -1)
        prefix = prefix.reshape(batch, n, 2 * layers, heads, config.token_dim // heads)
        prefix = prefix.permute(2, 0, 3, 1, 4)  # (2·L, batch, heads, n, head_dim): keys at 2l, values at 2l+1
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        for layer in range(layers):
            cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
        return cache

    def _insert_prompt(self, inputs: dict, config: PrefixTuningConfig, task_ids: Optional[torch.Tensor],
                       cache_key: str) -> None:
        ref = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs["input_ids"]
        inputs[cache_key] = self._virtual_tokens(config, task_ids, ref.shape[0], inputs.get(cache_key))


def _kv_dims(config: PrefixTuningConfig, model: nn.Module) -> None:
    """For grouped-query attention the prefixes have the key/value width (as HF PEFT sets them)."""
    model_config = _text_config(model)
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if getattr(model_config, "model_type", None) == "falcon" and not (
            model_config.new_decoder_architecture or not model_config.multi_query):
        kv_heads = 1  # Falcon's multi-query attention (Falcon-7B): one key/value head, whatever num_kv_heads says
    if kv_heads is None or config.token_dim is not None or config.num_attention_heads is not None:
        return
    heads = getattr(model_config, "num_attention_heads", None)
    head_dim = getattr(model_config, "head_dim", None) or getattr(model_config, "hidden_size") // heads
    config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads


@register_method("prefix_tuning", reads=())
def prefix_from_train_config(cfg: Any, base_name: str) -> PrefixTuningConfig:
    """Prefix tuning for ``tsugiki train``: every PrefixTuningConfig option in ``method_args`` (n defaults to 20)."""
    return config_from_method_args(PrefixTuningConfig, cfg.method_args, num_virtual_tokens=20,
                                   task_type="CAUSAL_LM", base_model_name_or_path=base_name)

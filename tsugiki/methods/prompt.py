"""Prompt learning: trainable virtual tokens in front of the input.

Three methods feed extra embeddings ``P`` (n x d) before the token embeddings
``E(x)`` (L x d) and run the frozen model on ``[P; E(x)]``:

* **Prompt tuning** (Lester et al., 2021): ``P`` is a trainable table.
* **P-tuning** (Liu et al., 2021): ``P = head(T)`` for a trainable table ``T``,
  ``head`` an MLP (``Linear-ReLU-Linear-ReLU-Linear``) or a bidirectional LSTM
  followed by ``Linear-ReLU-Linear``.
* **Multitask prompt tuning** (Wang et al., 2023): ``P_t = T * (u_t v_t)`` with a
  shared table ``T``, per-task ``u_t`` (n x r) and ``v_t`` (r x d), ``*`` elementwise.

Prefix tuning (per-layer key/value prefixes) lives in :mod:`tsugiki.methods.prefix`
and shares the tuner base in :mod:`tsugiki.methods.prompt_base`.

Inputs and outputs. The attention mask gets ``n`` ones in front; position ids
follow the mask (virtual tokens take positions ``0..n-1`` and the real tokens
continue from ``n``), so a left-padded row is computed as it would be alone. For
``CAUSAL_LM`` the returned ``logits`` cover the *input* positions only (the
``n`` virtual positions are dropped, unlike HF PEFT), so ``logits[:, t]``
predicts token ``t + 1`` as for the bare model; labels passed in are padded with
-100 for the virtual positions before the model computes its loss.

On disk (HF PEFT's layout): ``prompt_embeddings`` holds the final ``n x d``
prompt (P-tuning's encoder is run once and folded into it), plus
``prefix_task_cols`` / ``prefix_task_rows`` for multitask; a trained
``classifier``/``score`` head is saved as ``base_model.<name>.<param>``. A
loaded P-tuning adapter is therefore a plain table (training it further trains
the table).
"""

from __future__ import annotations

import math
import os
from dataclasses import InitVar, dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import NameEnum, PeftConfig, PeftType, config_from_method_args, register_config, register_method
from ..tuner import register_tuner
from .prompt_base import PromptLearningConfig, PromptLearningModel, find_word_embeddings

# ---------------------------------------------------------------------------- configs

class PromptTuningInit(NameEnum):
    """How prompt tuning's virtual tokens start (HF PEFT's names; plain strings work too)."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class PromptEncoderReparameterizationType(NameEnum):
    """P-tuning's encoder (HF PEFT's names; plain strings work too)."""

    MLP = "MLP"
    LSTM = "LSTM"


_PT_INITS = tuple(m.value for m in PromptTuningInit)


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``n`` trainable embeddings prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (default; N(0, 1), like ``nn.Embedding``), ``"TEXT"`` (the embeddings
            of ``prompt_tuning_init_text``'s tokens, repeated or cut to ``n``) or ``"SAMPLE_VOCAB"``
            (embeddings of ``n`` random vocabulary tokens).
        prompt_tuning_init_text: the text for ``"TEXT"``.
        tokenizer_name_or_path: tokenizer for ``"TEXT"`` (a local folder works offline).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``"TEXT"`` only).
        tokenizer: a tokenizer object to use instead of ``tokenizer_name_or_path`` (not saved).
    """

    peft_type_name = PeftType.PROMPT_TUNING.value
    _inits = _PT_INITS

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    tokenizer: InitVar[Any] = None

    def __post_init__(self, tokenizer: Any = None) -> None:
        super().__post_init__()
        object.__setattr__(self, "_tokenizer", tokenizer)
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in self._inits:
            raise ValueError(f"prompt_tuning_init={init!r} is not supported; use one of {', '.join(self._inits)}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if not self.tokenizer_name_or_path and tokenizer is None:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (or a tokenizer object)")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


_ENCODER_TYPES = tuple(m.value for m in PromptEncoderReparameterizationType)


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual tokens come from a small encoder over a trainable table.

    Args:
        encoder_reparameterization_type: ``"MLP"`` (default; exactly 3 linear layers, no dropout) or ``"LSTM"``
            (bidirectional, ``encoder_num_layers`` layers, ``encoder_dropout`` between them, then a 2-layer MLP).
        encoder_hidden_size: hidden width; ``None`` uses ``token_dim``.
        encoder_num_layers: LSTM layers (default 2); the MLP accepts only 2 (its fixed depth).
        encoder_dropout: LSTM dropout (default 0.0); the MLP accepts only 0.
    """

    peft_type_name = PeftType.P_TUNING.value

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in _ENCODER_TYPES:
            raise ValueError(f"encoder_reparameterization_type={kind!r}; use 'MLP' or 'LSTM'")
        self.encoder_reparameterization_type = kind
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}")


_MPT_INITS = _PT_INITS + ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
_SOURCE_INITS = _MPT_INITS[3:]


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: ``P_t = T * (u_t v_t)`` for task ``t`` (``task_ids`` in forward/generate).

    Args:
        num_tasks: number of tasks (default 1).
        num_ranks: rank ``r`` of ``u_t v_t`` (default 1); ``u``, ``v`` start N(0, 0.02^2).
        prompt_tuning_init: as for prompt tuning, or from a source-task adapter file
            (``prompt_tuning_init_state_dict_path``, safetensors or a torch file): ``"AVERAGE_SOURCE_TASKS"``
            (``T`` and the mean of the source tasks' ``u``, ``v``), ``"EXACT_SOURCE_TASK"`` (task
            ``prompt_tuning_init_task``'s ``u``, ``v``) or ``"ONLY_SOURCE_SHARED"`` (``T`` only). The chosen
            ``u``, ``v`` initialise every one of the ``num_tasks`` tasks.
        default_task_id: task used when no ``task_ids`` are given (``tsugiki train`` passes none); ``None``
            (default) allows that only with ``num_tasks=1``. Written to the file only when set.
    """

    peft_type_name = PeftType.MULTITASK_PROMPT_TUNING.value
    _inits = _MPT_INITS

    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1
    default_task_id: Optional[int] = None

    def __post_init__(self, tokenizer: Any = None) -> None:
        super().__post_init__(tokenizer)
        for name in ("num_ranks", "num_tasks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.prompt_tuning_init in _SOURCE_INITS and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} needs prompt_tuning_init_state_dict_path")
        if self.default_task_id is not None and not 0 <= self.default_task_id < self.num_tasks:
            raise ValueError(f"default_task_id={self.default_task_id} is not a task id (0..{self.num_tasks - 1})")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("default_task_id") is None:
            out.pop("default_task_id", None)  # tsugiki's own key: keep HF PEFT's file unchanged when unused
        return out


# ---------------------------------------------------------------------------- encoders


class PromptEmbedding(nn.Module):
    """Prompt tuning's table; also the folded (saved) form of every embedding-prompt encoder."""

    def __init__(self, num_virtual_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)

    def forward(self, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0)  # (1, n, d)

    def to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            was_training = self.training
            self.eval()  # fold without dropout
            try:
                prompt = self.forward()[0]
            finally:
                self.train(was_training)
        return {"prompt_embeddings": prompt.detach()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(state["prompt_embeddings"])


class PromptEncoder(PromptEmbedding):
    """P-tuning: ``head(T)``; ``head`` is an MLP or a bidirectional LSTM + MLP (``None`` once folded)."""

    def __init__(self, config: PromptEncoderConfig):
        super().__init__(config.num_virtual_tokens, config.token_dim)
        d, h = config.token_dim, config.encoder_hidden_size
        self.lstm_head: Optional[nn.LSTM] = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head: Optional[nn.Sequential] = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(),
                                                                    nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2 or config.encoder_dropout:
                raise ValueError("the MLP prompt encoder has a fixed depth and no dropout: leave encoder_num_layers=2 "
                                 "and encoder_dropout=0, or use encoder_reparameterization_type='LSTM'")
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, n, d)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (1, n, 2h)
        return self.mlp_head(x) if self.mlp_head is not None else x

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        self.lstm_head = self.mlp_head = None  # the file holds the encoder's output: keep it as a plain table
        super().load_saved(state)


class MultitaskPromptEmbedding(PromptEmbedding):
    """``T * (u_t v_t)``: ``prefix_task_cols`` holds ``u`` (tasks x n x r), ``prefix_task_rows`` ``v`` (tasks x r x d)."""

    def __init__(self, config: MultitaskPromptTuningConfig):
        super().__init__(config.num_virtual_tokens, config.token_dim)
        n, d, r, tasks = config.num_virtual_tokens, config.token_dim, config.num_ranks, config.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(tasks, n, r)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(tasks, r, d)))

    def forward(self, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task id per row)")
        cols = self.prefix_task_cols.index_select(0, task_ids)  # (B, n, r)
        rows = self.prefix_task_rows.index_select(0, task_ids)  # (B, r, d)
        return self.embedding.weight.unsqueeze(0) * torch.matmul(cols, rows)  # (B, n, d)

    def to_save(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight.detach(),
                "prefix_task_cols": self.prefix_task_cols.detach(),
                "prefix_task_rows": self.prefix_task_rows.detach()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saved(state)
        with torch.no_grad():
            self.prefix_task_cols.copy_(state["prefix_task_cols"])
            self.prefix_task_rows.copy_(state["prefix_task_rows"])


def _read_state_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt_tuning_init_state_dict_path {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _init_from_source(encoder: MultitaskPromptEmbedding, config: MultitaskPromptTuningConfig) -> None:
    path = config.prompt_tuning_init_state_dict_path
    source = _read_state_file(path)
    need = ["prompt_embeddings"] + ([] if config.prompt_tuning_init == "ONLY_SOURCE_SHARED"
                                    else ["prefix_task_cols", "prefix_task_rows"])
    missing = [k for k in need if k not in source]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; is it a multitask prompt tuning adapter?")
    with torch.no_grad():
        encoder.embedding.weight.copy_(source["prompt_embeddings"])
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0), rows.mean(0)
        else:
            if not 0 <= config.prompt_tuning_init_task < cols.shape[0]:
                raise ValueError(f"prompt_tuning_init_task={config.prompt_tuning_init_task}, but {path} has "
                                 f"{cols.shape[0]} tasks")
            cols, rows = cols[config.prompt_tuning_init_task], rows[config.prompt_tuning_init_task]
        encoder.prefix_task_cols.copy_(cols.expand_as(encoder.prefix_task_cols))
        encoder.prefix_task_rows.copy_(rows.expand_as(encoder.prefix_task_rows))


def _init_from_vocab(encoder: PromptEmbedding, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word_embeddings.weight.shape[0], (n,))
    else:
        tokenizer = getattr(config, "_tokenizer", None)
        if tokenizer is None:
            from transformers import AutoTokenizer

            kwargs = dict(config.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # a saved config must not run code
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        token_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
        if not token_ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens")
        ids = torch.tensor((token_ids * math.ceil(n / len(token_ids)))[:n])  # repeat, then cut to n
    with torch.no_grad():
        weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().float()
        encoder.embedding.weight.copy_(weight.to(encoder.embedding.weight.device))


@register_tuner(PeftType.PROMPT_TUNING.value)
class PromptTuningModel(PromptLearningModel):
    """``PeftModel.base_model`` for prompt tuning."""

    def _make_encoder(self, config: PromptTuningConfig, init_weights: bool) -> nn.Module:
        encoder = PromptEmbedding(config.num_virtual_tokens, config.token_dim)
        if init_weights and config.prompt_tuning_init != "RANDOM":
            _init_from_vocab(encoder, config, find_word_embeddings(self.model))
        return encoder


@register_tuner(PeftType.P_TUNING.value)
class PromptEncoderModel(PromptLearningModel):
    """``PeftModel.base_model`` for P-tuning (an adapter loaded from a file is its folded table)."""

    def _make_encoder(self, config: PromptEncoderConfig, init_weights: bool) -> nn.Module:
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        if not init_weights:  # loading: the file holds the encoder's output
            return PromptEmbedding(config.num_virtual_tokens, config.token_dim)
        return PromptEncoder(config)


@register_tuner(PeftType.MULTITASK_PROMPT_TUNING.value)
class MultitaskPromptTuningModel(PromptLearningModel):
    """``PeftModel.base_model`` for multitask prompt tuning (``task_ids`` in forward and generate)."""

    def _make_encoder(self, config: MultitaskPromptTuningConfig, init_weights: bool) -> nn.Module:
        encoder = MultitaskPromptEmbedding(config)
        if init_weights and config.prompt_tuning_init in _SOURCE_INITS:
            _init_from_source(encoder, config)
        elif init_weights and config.prompt_tuning_init != "RANDOM":
            _init_from_vocab(encoder, config, find_word_embeddings(self.model))
        return encoder


# ---------------------------------------------------------------------------- tsugiki train


def _builder(cls: type, **defaults: Any):
    def build(cfg: Any, base_name: str) -> PeftConfig:
        args = dict(cfg.method_args or {})
        fixed = dict(defaults)
        if args.get("prompt_tuning_init") == "TEXT" and not args.get("tokenizer_name_or_path"):
            from ..models import load_tokenizer

            # The run's own tokenizer: a GGUF file or the default model has no tokenizer folder to name.
            args["tokenizer_name_or_path"] = base_name
            fixed["tokenizer"] = load_tokenizer(cfg.model)
        return config_from_method_args(cls, args, task_type="CAUSAL_LM", base_model_name_or_path=base_name,
                                       **fixed)
    return build


# num_virtual_tokens has no default in HF PEFT; the CLI uses 20 unless method_args sets it.
register_method("prompt_tuning", reads=())(_builder(PromptTuningConfig, num_virtual_tokens=20))
register_method("p_tuning", reads=())(_builder(PromptEncoderConfig, num_virtual_tokens=20))
# Training batches carry no task column: every row trains task `default_task_id` (0 unless method_args sets it).
register_method("multitask_prompt_tuning", reads=())(_builder(MultitaskPromptTuningConfig, num_virtual_tokens=20,
                                                    default_task_id=0))

"""What the prompt-learning methods share: the config fields and the tuner that adds a prompt to model calls.

The methods (:mod:`tsugiki.methods.prompt`, :mod:`tsugiki.methods.prefix`) differ only in
how the prompt is made (``_make_encoder``) and how it reaches the model (``_insert_prompt``:
as input embeddings or as a key/value cache); masks, position ids, ``generate``, files and
adapter switching are handled here. See :mod:`tsugiki.methods.prompt` for the conventions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..config import PeftConfig, TaskType
from ..tuner import BaseTuner, ModulesToSaveWrapper, _batch_adapter_names

if TYPE_CHECKING:
    from ..adapter_io import IncompatibleKeys

@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (HF PEFT's names).

    Args:
        num_virtual_tokens: number of virtual tokens ``n`` (required).
        token_dim: embedding width ``d``; ``None`` reads the model config (``hidden_size``).
        num_transformer_submodules: 1 for decoder-only models (``None`` sets 1); other values are refused.
        num_attention_heads / num_layers: read from the model config when ``None``.
        modules_to_save: modules trained in full and saved beside the prompt (SEQ_CLS adds the head).
    """

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or isinstance(self.num_virtual_tokens, bool) \
                or not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"num_transformer_submodules={self.num_transformer_submodules}: only decoder-only and "
                             "encoder-only models (1) are supported")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True



# ---------------------------------------------------------------------------- shared tuner

_MODEL_DIM_KEYS = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def fill_model_dims(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fill ``num_layers``, ``token_dim`` and ``num_attention_heads`` left ``None`` from the model config."""
    model_config = _text_config(model)
    for field_name, keys in _MODEL_DIM_KEYS.items():
        value = next((getattr(model_config, k) for k in keys if getattr(model_config, k, None) is not None), None)
        given = getattr(config, field_name)
        if given is not None:
            _check_model_dim(config, model, field_name, int(given), value)
            continue
        if value is None:
            raise ValueError(f"{type(model).__name__} has no config value for {field_name}; set {field_name} "
                             f"in {type(config).__name__}")
        setattr(config, field_name, int(value))
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1


def _check_model_dim(config: PromptLearningConfig, model: nn.Module, field_name: str, given: int,
                     value: Any) -> None:
    """A dimension set in the config that the model contradicts cannot run (it failed deep inside the first
    forward): prefix tuning's layer count, and the width of the virtual tokens that join the word embeddings
    (prefix tuning's keys and values may be narrower, under grouped-query attention)."""
    if field_name == "num_layers" and value is not None and given != int(value):
        have, what = int(value), "num_hidden_layers"
    elif field_name == "token_dim" and config.peft_type != "PREFIX_TUNING":
        weight = getattr(find_word_embeddings(model), "weight", None)
        if weight is None or weight.dim() != 2 or given == weight.shape[1]:
            return
        have, what = int(weight.shape[1]), "its word embeddings' width"
    else:
        return
    raise ValueError(f"{field_name}={given} does not match the model's {have} ({what}); leave it out: it is "
                     "read from the model")


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding table."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return emb
    vocab = getattr(_text_config(model), "vocab_size", None)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise ValueError(f"cannot find the word embeddings of {type(model).__name__}: it needs get_input_embeddings()")


class PromptLearningModel(BaseTuner):
    """Base tuner of the prompt-learning methods: one prompt encoder per adapter in ``prompt_encoder``.

    Subclasses set ``task_types`` and implement ``_make_encoder`` and ``_insert_prompt``
    (how the prompt reaches the model: as embeddings or as a key/value cache).
    """

    task_types: tuple[str, ...] = (TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value)
    inserts_tokens = True  # the prompt occupies positions in the input (False for prefix tuning)

    # -- grafting ---------------------------------------------------------------
    def _inject(self, config: PromptLearningConfig, adapter_name: str, init_weights: bool) -> None:
        if config.task_type not in self.task_types:
            raise ValueError(f"{config.peft_type} supports task_type {' or '.join(map(repr, self.task_types))}, "
                             f"got {config.task_type!r}")
        if "prompt_encoder" not in self._modules:
            self.prompt_encoder = nn.ModuleDict()
        fill_model_dims(config, self.model)
        encoder = self._make_encoder(config, init_weights)
        self.prompt_encoder[adapter_name] = encoder.to(find_word_embeddings(self.model).weight.device)

    def _make_encoder(self, config: PromptLearningConfig, init_weights: bool) -> nn.Module:
        raise NotImplementedError

    def _mark_trainable(self, config: PeftConfig, adapter_name: str, trainable: bool = True) -> None:
        super()._mark_trainable(config, adapter_name, trainable)
        for name, encoder in self.prompt_encoder.items():  # the prompts live here, not in the model
            for p in encoder.parameters():
                p.requires_grad_(trainable and name == adapter_name)

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        super()._remove_adapter_modules(adapter_name)
        if "prompt_encoder" in self._modules and adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(f"{type(self).__name__}: prompt-learning adapters add inputs, not weights; there is "
                         "nothing to merge (use the PeftModel as is)")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.merge_adapter()
        return self.model

    # -- files --------------------------------------------------------------------
    def adapter_state_to_save(self, adapter_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF PEFT's keys: ``prompt_embeddings`` (+ multitask's factors), heads as ``base_model.<module>.<param>``."""
        out = {k: v.detach().contiguous() for k, v in self.prompt_encoder[adapter_name].to_save().items()}
        for name, wrapper in self._wrappers(adapter_name):
            for param, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"base_model.{name}.{param}"] = tensor.detach().contiguous()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str, source: str,
                                strict: bool = True) -> IncompatibleKeys:
        """Copy a file's tensors (the keys :meth:`adapter_state_to_save` writes) into ``adapter_name``.

        Returns the keys a non-strict load left out."""
        from ..adapter_io import AdapterLoadError, IncompatibleKeys

        encoder = self.prompt_encoder[adapter_name]
        expected = {k: v.shape for k, v in encoder.to_save().items()}
        heads: dict[str, tuple[nn.Module, str]] = {}
        for name, wrapper in self._wrappers(adapter_name):
            for param, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                expected[f"base_model.{name}.{param}"] = tensor.shape
                heads[f"base_model.{name}.{param}"] = (wrapper.modules_to_save[adapter_name], param)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if "prompt_embeddings" in missing or (strict and (missing or unexpected)):
            raise AdapterLoadError(f"adapter weights in {source} do not match the model: missing {missing}, "
                                   f"unexpected {unexpected}")
        for key, shape in expected.items():
            if key in state and tuple(state[key].shape) != tuple(shape):
                raise AdapterLoadError(f"{source}: {key!r} has shape {tuple(state[key].shape)} in the file but "
                                       f"{tuple(shape)} in the model; was it made for another base model or "
                                       "num_virtual_tokens?")
        encoder.load_saved({k: state[k].to(encoder.embedding.weight.device) for k in expected if k in state
                            and not k.startswith("base_model.")})
        with torch.no_grad():
            for key, (module, param) in heads.items():
                if key in state:
                    target = module.state_dict()[param]
                    target.copy_(state[key].to(dtype=target.dtype, device=target.device))
        self.set_adapter(self.active_adapter)  # a folded encoder has new parameters: set their requires_grad
        return IncompatibleKeys(missing, unexpected)

    def _wrappers(self, adapter_name: str):
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                yield name, module

    # -- running ------------------------------------------------------------------
    def _config(self) -> PromptLearningConfig:
        if _batch_adapter_names.get() is not None:
            raise ValueError("prompt-learning adapters cannot be mixed in one batch (adapter_names); "
                             "run one adapter per call with set_adapter()")
        return self.peft_config[self.active_adapter]

    def _accepts(self, name: str) -> bool:
        try:
            return name in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False

    def _cache_key(self, inputs: dict) -> str:
        if "past_key_values" in inputs and "cache" not in inputs:
            return "past_key_values"
        return "cache" if self._accepts("cache") else "past_key_values"

    def _task_ids(self, config: PromptLearningConfig, task_ids: Any, batch: int,
                  device: torch.device) -> Optional[torch.Tensor]:
        if not hasattr(config, "num_tasks"):  # only multitask prompt tuning has tasks
            if task_ids is not None:
                raise ValueError(f"task_ids is only used by multitask prompt tuning, not {config.peft_type}")
            return None
        if task_ids is None:
            default = config.default_task_id if config.default_task_id is not None else (
                0 if config.num_tasks == 1 else None)
            if default is None:
                raise ValueError(f"pass task_ids (one per row): the adapter has num_tasks={config.num_tasks} "
                                 "and no default_task_id")
            task_ids = [default] * batch
        task_ids = torch.as_tensor(task_ids, dtype=torch.long, device=device).reshape(-1)
        if task_ids.numel() != batch:
            if task_ids.numel() == 0 or batch % task_ids.numel():
                raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {batch} rows")
            task_ids = task_ids.repeat_interleave(batch // task_ids.numel())  # generate repeats rows (beams)
        if ((task_ids < 0) | (task_ids >= config.num_tasks)).any():
            raise ValueError(f"task_ids {task_ids.tolist()} out of range for num_tasks={config.num_tasks}")
        return task_ids

    def _adapt_inputs(self, inputs: dict, task_ids: Any) -> dict:
        """Add the active adapter's prompt to a model call: mask, position ids, and on the first call the prompt."""
        config = self._config()
        n = config.num_virtual_tokens
        ref = inputs.get("inputs_embeds") if inputs.get("inputs_embeds") is not None else inputs.get("input_ids")
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch, device = ref.shape[0], ref.device
        key = self._cache_key(inputs)
        cache = inputs.get(key)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("prompt-learning adapters need a dynamic KV cache; do not use a static cache "
                             "(cache_implementation='static')")
        first = cache is None or cache.get_seq_length() == 0  # the prompt is not in the cache yet
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise ValueError("prompt-learning adapters need a 2-D attention_mask (batch x length)")
            inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        positions = inputs.get("position_ids")
        if positions is not None:
            positions = positions + n  # real tokens continue after the virtual ones
            if first and self.inserts_tokens:
                virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([virtual.expand(positions.shape[0], n), positions], dim=-1)
            inputs["position_ids"] = positions
        if first:
            self._insert_prompt(inputs, config, self._task_ids(config, task_ids, batch, device), key)
        elif task_ids is not None:
            self._task_ids(config, task_ids, batch, device)  # still check it
        return inputs

    @property
    def word_embeddings(self) -> nn.Module:
        """The base model's token embedding table (HF PEFT's attribute)."""
        return find_word_embeddings(self.model)

    def get_prompt(self, batch_size: int, task_ids: Any = None) -> Any:
        """The active adapter's virtual tokens for ``batch_size`` rows, as the model receives them:
        embeddings ``(batch_size, n, d)`` (prefix tuning: its key/value cache). HF PEFT's method."""
        config = self._config()
        device = self.word_embeddings.weight.device
        return self._virtual_tokens(config, self._task_ids(config, task_ids, batch_size, device), batch_size)

    def _virtual_tokens(self, config: PromptLearningConfig, task_ids: Optional[torch.Tensor], batch: int) -> Any:
        prompt = self.prompt_encoder[self.active_adapter](task_ids)  # (1 or B, n, d)
        return prompt.to(self.word_embeddings.weight.dtype).expand(batch, -1, -1)

    def _insert_prompt(self, inputs: dict, config: PromptLearningConfig, task_ids: Optional[torch.Tensor],
                       cache_key: str) -> None:
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = find_word_embeddings(self.model)(inputs["input_ids"])
        prompt = self._virtual_tokens(config, task_ids, embeds.shape[0]).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        inputs["input_ids"] = None
        if inputs.get("token_type_ids") is not None:
            types = inputs["token_type_ids"]
            inputs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], config.num_virtual_tokens), types], 1)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                task_ids: Any = None, **kwargs: Any) -> Any:
        """Run the model with the prompt; for CAUSAL_LM, ``logits`` cover the input positions only (see module docs)."""
        inputs = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        if self._disabled:
            return self.model(**inputs, labels=labels)
        config = self._config()
        n = config.num_virtual_tokens
        if self.training and not self.inserts_tokens and any(
                getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ValueError("prefix tuning does not work with gradient checkpointing (the recomputed layers would "
                             "extend the prefix cache twice); turn gradient checkpointing off")
        positions = inputs.get("position_ids")
        if positions is not None and positions.dim() == 2 and (positions[:, 1:] < positions[:, :-1]).any():
            raise ValueError("position_ids restart inside a row (packed sequences): prompt-learning methods add the "
                             "prompt once per row, so train them without packing (packing: false)")
        cache = inputs.get(self._cache_key(inputs))
        first = cache is None or cache.get_seq_length() == 0
        length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        if positions is None and attention_mask is not None and self._accepts("position_ids"):
            positions = attention_mask.long().cumsum(-1) - 1  # left padding does not shift the real tokens
            inputs["position_ids"] = positions.masked_fill(attention_mask == 0, 0)[:, -length:]
        inputs = self._adapt_inputs(inputs, task_ids)
        strip = first and self.inserts_tokens and config.task_type == TaskType.CAUSAL_LM.value
        if labels is not None and strip:
            labels = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        out = self.model(**inputs, labels=labels) if labels is not None else self.model(**inputs)
        logits = getattr(out, "logits", None)
        if strip and isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == n + length:
            out.logits = logits[:, n:]
        return out

    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """``model.generate`` with the prompt added on the first step (also with the KV cache and left padding)."""
        if self._disabled:
            return super().generate(*args, **kwargs)
        config = self._config()
        if config.task_type != TaskType.CAUSAL_LM.value:
            raise ValueError(f"generate needs task_type='CAUSAL_LM', this adapter is {config.task_type!r}")
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("generate takes input_ids as its only positional argument")
            kwargs["input_ids"] = args[0]
        model = self.model
        own = model.__dict__.get("prepare_inputs_for_generation")
        original = model.prepare_inputs_for_generation

        # transformers checks generate's arguments against this signature: keep the name **kwargs
        def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict:
            inputs = original(*args, **kwargs)
            if inputs.get("use_cache") is False:
                # without caching every step sees the whole sequence; the cache the model handed back from
                # the last step (prompt + tokens) must not be reused, so the prompt is added afresh
                inputs.pop("cache", None)
                inputs.pop("past_key_values", None)
            return self._adapt_inputs(inputs, task_ids)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            return model.generate(**kwargs)
        finally:
            if own is not None:
                model.prepare_inputs_for_generation = own
            else:
                del model.prepare_inputs_for_generation

"""``PeftModel``: a base model with named adapters, in HF PEFT's shape.

    model = get_peft_model(base, LoraConfig(r=8, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    ... train ...
    model.save_pretrained("out")                      # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "out")    # frozen, for inference

The wrapped model lives at ``model.base_model.model`` so tensor names match
HF PEFT's (``base_model.model.<name>``); attributes not found on the wrapper
(``config``, ``generation_config``, ...) are read from the base model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import adapter_io
from .config import NotComputedError, PeftConfig, TaskType
from .fileio import atomic_write_text, ensure_directory
from . import methods  # noqa: F401  (registers every method's config and tuner)
from .inject import TargetsNotFoundError
from .kernels.decode import single_row_decoding
from .methods.lora import LoraConfig, as_lora_for_original_base, decoding_forwards
from .quant import unpack_cpu_4bit
from .tuner import (BASE_ADAPTER_NAME, TUNER_REGISTRY, AdapterLayer, BaseTuner, ModulesToSaveWrapper,
                    batch_adapter_names)


# Task heads that adapters train in full and save, by task type (the names HF PEFT adds).
HEAD_MODULE_NAMES = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}

CARD_MARKER = "<!-- written by tsugiki: safe to regenerate -->"


def _tuner_for(config: PeftConfig) -> type[BaseTuner]:
    try:
        return TUNER_REGISTRY[config.peft_type]
    except KeyError:
        raise ValueError(f"no tuner for peft_type={config.peft_type!r}; "
                         f"available: {', '.join(sorted(TUNER_REGISTRY))}") from None


def _prepare_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    user_modules = getattr(config, "modules_to_save", None)
    object.__setattr__(config, "_user_modules_to_save", bool(user_modules))
    if config.task_type in HEAD_MODULE_NAMES and hasattr(config, "modules_to_save"):
        extra = [n for n in HEAD_MODULE_NAMES[config.task_type] if n not in (config.modules_to_save or [])]
        config.modules_to_save = list(config.modules_to_save or []) + extra
    return config


class PeftModel(nn.Module):
    """A base model plus named adapters; see the module docstring."""

    # transformers' Trainer refuses to train a quantized model unless it carries trainable adapters, which
    # it detects by HF PEFT's class or by this flag (set by its own adapter integration).
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 _init_weights: bool = True):
        super().__init__()
        if any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
            warnings.warn("this base model already carries adapter layers (it was wrapped before, by "
                          "get_peft_model or PeftModel.from_pretrained): the new adapter is grafted beside them, "
                          "and the earlier wrapper shares the same modules, so its outputs change too. Load the "
                          "base again for an independent model", stacklevel=3)
        peft_config = _prepare_config(peft_config, model)
        self.base_model = _tuner_for(peft_config)(model, peft_config, adapter_name, init_weights=_init_weights)
        self.special_peft_forward_args = {"adapter_names"}

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and _defined_in(value).startswith("trl."):
            # TRL's trainers swap in a forward that runs `model.base_model` as the transformer backbone
            # (true of HF PEFT's wrapper only): here it would fail at the first step with an obscure error.
            raise TypeError("TRL's trainer replaces the model's forward with one that only fits HF PEFT's "
                            "PeftModel, so it cannot train a tsugiki model. Use `tsugiki train` (or "
                            "tsugiki.train(...)) for supervised fine-tuning, or transformers' Trainer with this model")
        super().__setattr__(name, value)

    # -- passthrough ----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names (one unless ``base_model.set_adapter`` got a list; empty once every
        adapter is deleted)."""
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        """The active adapter's config."""
        if self.active_adapter not in self.peft_config:
            raise ValueError("the model has no adapter left (all were deleted); add one with add_adapter "
                             "or load_adapter")
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> str:
        """The active adapter's method, e.g. ``"LORA"``."""
        return self.active_peft_config.peft_type

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _check_adapter_names(self, adapter_names: Optional[Sequence[str]], batch: Optional[int]) -> None:
        if adapter_names is None:
            return
        known = set(self.peft_config) | {BASE_ADAPTER_NAME}
        bad = sorted({n for n in adapter_names if n not in known})
        if bad:
            raise ValueError(f"adapter_names has unknown adapters {bad}; known: {sorted(known)}")
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
        for value in list(args) + [kwargs.get("input_ids"), kwargs.get("inputs_embeds")]:
            if isinstance(value, torch.Tensor):
                return value.shape[0]
        return None

    def train(self, mode: bool = True) -> "PeftModel":
        """``nn.Module.train``; entering training also gives repacked 4-bit layers their trainable layout back.

        (bitsandbytes repacks 4-bit weights on an eval-mode CPU forward into a layout
        with no backward: :func:`tsugiki.quant.unpack_cpu_4bit`.)
        """
        if mode:
            unpack_cpu_4bit(self)
        return super().train(mode)

    def forward(self, *args: Any, input_ids: Any = None, attention_mask: Any = None, labels: Any = None,
                token_type_ids: Any = None, position_ids: Any = None, inputs_embeds: Any = None,
                adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the model; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters.

        The usual input names are in the signature (and passed on when given) so that
        transformers' Trainer, which keeps the dataset columns ``forward`` names, keeps them
        for a model wrapped without a ``task_type`` too.
        """
        named = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        kwargs.update((k, v) for k, v in named.items() if v is not None)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        self._check_adapter_names(adapter_names, self._batch_size(args, kwargs))
        with batch_adapter_names(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` as in :meth:`forward`.

        On a CPU, one-row bf16 products run through the CPU's fastest row
        kernel (:mod:`tsugiki.kernels.decode`); LoRA layers run a forward made
        for the call (:func:`tsugiki.methods.lora.decoding_forwards`).
        """
        with single_row_decoding(self):
            if adapter_names is None:
                with decoding_forwards(self):
                    return self.base_model.generate(*args, **kwargs)
            self._check_adapter_names(adapter_names, self._batch_size(args, kwargs))
            with batch_adapter_names(adapter_names):
                return self.base_model.generate(*args, **kwargs)

    # -- adapters -------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    _init_weights: bool = True) -> None:
        """Graft another adapter; the active adapter does not change."""
        base_type = next(iter(self.peft_config.values())).peft_type if self.peft_config else None
        if base_type and peft_config.peft_type != base_type:
            raise ValueError(f"cannot mix {peft_config.peft_type} with {base_type} adapters in one model (tsugiki "
                             "has no PeftMixedModel): keep one method per model, or load the base again for "
                             "the other")
        config = _prepare_config(peft_config, self.get_base_model())
        self.base_model.inject_adapter(config, adapter_name, init_weights=_init_weights)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate ``adapter_name``; its parameters become trainable unless ``inference_mode`` (HF PEFT's rule).

        Adapters merged into the base are unmerged first, with a warning. LoRA takes a list too
        (their updates add up), as HF PEFT's ``base_model.set_adapter`` does.
        """
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly what the bare base does; after it, the adapters are
        as the block found them (still off inside an outer block or after ``disable_adapter_layers()``)."""
        was_disabled = self.base_model.adapters_disabled
        self.base_model.set_disabled(True)
        try:
            yield
        finally:
            if not was_disabled:
                self.base_model.set_disabled(False)

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None, dequantize: bool = False,
                         dtype: Optional[torch.dtype] = None) -> nn.Module:
        """Fold the adapter into the base weights and return the plain base (see ``BaseTuner.merge_and_unload``)."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names, dequantize=dequantize,
                                                dtype=dtype)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """Combine LoRA adapters into a new one: ``base_model.add_weighted_adapter`` (:mod:`tsugiki.combine`)."""
        combine = getattr(type(self.base_model), "add_weighted_adapter", None)
        if combine is None:
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; this model's are {self.peft_type}")
        combine(self.base_model, adapters, weights, adapter_name, combination_type, **kwargs)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turn gradients on (default) or off for the named adapters' parameters, their
        ``modules_to_save`` copies included, without changing which adapter is active (HF PEFT's
        ``set_requires_grad``). Not for prompt-learning methods (``TypeError``, as in HF PEFT)."""
        if getattr(self.active_peft_config, "is_prompt_learning", False):
            raise TypeError(f"set_requires_grad is not available for prompt-learning methods like "
                            f"{self.peft_type}; their prompt encoders train through set_adapter")
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when some adapter is active and adapters are not switched off
        (``disable_adapter()``, ``disable_adapter_layers()``): the model is not computing its bare base."""
        return bool(self.active_adapters) and not self.base_model.adapters_disabled

    # -- counting -------------------------------------------------------------
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """A prompt-learning adapter's prompt as its file stores it (``prompt_embeddings``:
        the virtual tokens' embeddings, after p-tuning's encoder), detached."""
        config = self.peft_config.get(adapter_name)
        if config is None:
            raise ValueError(f"no adapter named {adapter_name!r}; the model has {list(self.peft_config)}")
        if not getattr(config, "is_prompt_learning", False):
            raise ValueError(f"adapter {adapter_name!r} is {config.peft_type}, not a prompt-learning method: "
                             "it has no prompt embedding")
        return self.base_model.prompt_encoder[adapter_name].to_save()["prompt_embeddings"]

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """Every adapter's ``modules_to_save`` names together (None when there are none), as HF PEFT."""
        names = {n for c in self.peft_config.values() for n in (getattr(c, "modules_to_save", None) or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """The base model's dtype (transformers' ``model.dtype``), None for a module without one."""
        return getattr(self.get_base_model(), "dtype", None)

    def get_layer_status(self) -> list:
        """Each adapter layer's adapters, flags and devices (:func:`tsugiki.get_layer_status`)."""
        from .status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self):
        """The adapters' status over the whole model (:func:`tsugiki.get_model_status`)."""
        from .status import get_model_status

        return get_model_status(self)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit weights count as unpacked parameters."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit" and getattr(p, "bnb_quantized", False):
                storage = getattr(p, "quant_storage", torch.uint8)
                n = n * 2 * torch.empty((), dtype=storage).element_size()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files ----------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Optional[Sequence[str]] = None,
                        is_main_process: bool = True, safe_serialization: bool = True,
                        state_dict: Optional[dict[str, torch.Tensor]] = None, **kwargs: Any) -> None:
        """Write each adapter: ``default`` in ``save_directory``, others in ``save_directory/<name>``.

        ``state_dict``: a full state dict of this model to take the tensors from instead
        of the live parameters (what transformers' Trainer passes when the weights are
        sharded across processes). ``safe_serialization=False`` writes the pickle
        ``adapter_model.bin`` instead of ``adapter_model.safetensors``. Either file left
        from an earlier save in the other format is removed, so the folder holds one
        adapter. ``path_initial_model_for_weight_conversion``: the folder a PiSSA/OLoRA
        adapter was saved in before training; the adapter is then written as a plain
        rank-2r LoRA for the original base (:func:`tsugiki.methods.lora.as_lora_for_original_base`).
        HF PEFT's other options (``save_embedding_layers``, ``push_to_hub``, ...)
        are not supported and are named in a warning.
        """
        initial_folder = kwargs.pop("path_initial_model_for_weight_conversion", None)
        if kwargs:
            warnings.warn(f"save_pretrained: ignoring options tsugiki does not support: {', '.join(sorted(kwargs))}",
                          stacklevel=2)
        save_directory = os.fspath(save_directory)
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        if initial_folder is not None and len(names) != 1:
            raise ValueError("path_initial_model_for_weight_conversion holds one adapter's start; save one adapter "
                             f"at a time (selected_adapters=[name]); this model has {names}")
        if not names:
            raise ValueError("nothing to save: the model has no adapter (all were deleted)"
                             if not self.peft_config else "selected_adapters is empty; name the adapters to save")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters has unknown adapters {unknown}; have {list(self.peft_config)}")
        if not is_main_process:
            return
        converted = None
        if initial_folder is not None:  # checked before anything is written
            name, where = names[0], os.fspath(initial_folder)
            try:
                initial = adapter_io.read_adapter_weights(where)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"path_initial_model_for_weight_conversion={where!r} holds no adapter "
                                        f"({err}); give the folder the adapter was saved in before training") from None
            converted = as_lora_for_original_base(get_peft_model_state_dict(self, state_dict=state_dict,
                                                                            adapter_name=name),
                                                  self.peft_config[name], initial, where)
        # Every adapter's tensors are gathered (and checked) before any folder is made.
        states = {name: converted or (get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name),
                                      self.peft_config[name]) for name in names}
        ensure_directory(save_directory, "adapter folder")
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            ensure_directory(folder, "adapter folder")
            state, config = states[name]
            adapter_io.save_adapter_weights(state, folder, safe_serialization=safe_serialization)
            saved = copy.deepcopy(config)
            saved.inference_mode = True
            if saved.task_type is None:  # what AutoPeftModel (tsugiki's or HF PEFT's) loads the base as
                base_class = type(self.get_base_model())
                saved.auto_mapping = {"base_model_class": base_class.__name__,
                                      "parent_library": base_class.__module__}
            saved.save_pretrained(folder)
            _write_model_card(folder, saved, state)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload adapter with tsugiki",
                    private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None,
                    create_pr: bool = False, selected_adapters: Optional[Sequence[str]] = None,
                    **kwargs: Any) -> Any:
        """Upload the adapter files (what :meth:`save_pretrained` writes, never the base model's
        weights) to the Hugging Face Hub repository ``repo_id``, created when missing (HF PEFT's
        method). Returns huggingface_hub's commit info. ``use_auth_token`` is taken as ``token``."""
        import tempfile

        from huggingface_hub import HfApi

        token = kwargs.pop("use_auth_token", None) if token is None else token
        if kwargs:
            warnings.warn(f"push_to_hub: ignoring options tsugiki does not support: {', '.join(sorted(kwargs))}",
                          stacklevel=2)
        api = HfApi(token=token if isinstance(token, str) else None)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)  # before any repo is created
            repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            return api.upload_folder(repo_id=repo, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        subfolder: Optional[str] = None, allow_pickle: bool = False, strict: bool = True,
                        **kwargs: Any) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (frozen unless ``is_trainable``)."""
        if kwargs.get("autocast_adapter_dtype", True) is False:
            _warn_fp32_adapters("PeftModel.from_pretrained")
        folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        object.__setattr__(config, "_user_modules_to_save", False)
        state = adapter_io.read_adapter_weights(folder, allow_pickle=allow_pickle)
        target_cls = cls if cls is not PeftModel else TASK_MODELS.get(config.task_type, PeftModel)
        with _adapter_that_does_not_fit(folder, model, config):
            peft_model = target_cls(model, config, adapter_name, _init_weights=False)
        _load_weights(peft_model, state, adapter_name, folder, strict)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: Optional[str] = None, allow_pickle: bool = False, strict: bool = True,
                     **kwargs: Any) -> adapter_io.IncompatibleKeys:
        """Load another saved adapter under ``adapter_name`` (the active adapter does not change);
        returns the keys a ``strict=False`` load left out, as HF PEFT does.

        Into an adapter that already exists under that name, as HF PEFT does, only the
        weights are loaded: its config (rank, scaling, targets) stays, and a file that
        does not fit it is an error that changes nothing. Unless ``is_trainable``, the
        model is put in eval mode afterwards (dropout off), as HF PEFT does; with it, the
        adapter's parameters are trainable even while another adapter is active, as in HF PEFT.
        """
        folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        config = PeftConfig.from_pretrained(folder)
        config.inference_mode = not is_trainable
        object.__setattr__(config, "_user_modules_to_save", False)
        state = adapter_io.read_adapter_weights(folder, allow_pickle=allow_pickle)
        if adapter_name in self.peft_config:
            present = self.peft_config[adapter_name].peft_type
            if present != config.peft_type:
                raise adapter_io.AdapterLoadError(
                    f"adapter {adapter_name!r} is of method {present} and {folder!r} holds one of method "
                    f"{config.peft_type}; load it under another adapter_name (a model holds adapters of one method)")
            result = _load_weights(self, state, adapter_name, folder, strict)  # checks everything before copying
        else:
            with _adapter_that_does_not_fit(folder, self.get_base_model(), config, beside_others=True):
                self.add_adapter(adapter_name, config, _init_weights=False)
            try:
                result = _load_weights(self, state, adapter_name, folder, strict)
            except BaseException:
                self.delete_adapter(adapter_name)  # leave the model as it was
                raise
        if not is_trainable:
            self.eval()
        elif adapter_name != self.active_adapter and hasattr(self.base_model, "train_inactive_adapter"):
            self.base_model.train_inactive_adapter(adapter_name)  # trainable, as HF PEFT leaves it
        return result


@contextlib.contextmanager
def _adapter_that_does_not_fit(folder: str, model: nn.Module, config: PeftConfig,
                               beside_others: bool = False) -> Iterator[None]:
    """Errors grafting the adapter saved in ``folder`` onto ``model`` become an AdapterLoadError that
    names the folder and, where the adapter does not fit the model, the base it was made for.

    ``beside_others``: the model holds adapters already, so a ValueError may be about them (two
    methods, a module one of them adapts) rather than about the architecture.
    """
    try:
        yield
    except NotComputedError as err:
        raise adapter_io.AdapterLoadError(f"adapter {folder!r} cannot be loaded: {err}. tsugiki does not "
                                          "compute this; HF PEFT may") from err
    except ValueError as err:
        if beside_others and not isinstance(err, TargetsNotFoundError):
            raise adapter_io.AdapterLoadError(f"adapter {folder!r} cannot be loaded beside the adapters this "
                                              f"model holds: {err}") from err
        raise adapter_io.AdapterLoadError(
            f"adapter {folder!r} does not fit {type(model).__name__}: {err}. It was made for "
            f"{config.base_model_name_or_path or 'another model'}; load it onto that architecture"
        ) from err


def _defined_in(function: Any) -> str:
    """The module a function's code was written in (``__module__`` can be copied by functools.wraps)."""
    return getattr(getattr(function, "__func__", function), "__globals__", {}).get("__name__", "")


def _load_weights(peft_model: PeftModel, state: dict[str, torch.Tensor], adapter_name: str, folder: str,
                  strict: bool) -> adapter_io.IncompatibleKeys:
    """Copy file tensors into the adapter; a tuner whose file keys are not its parameter names
    (prompt learning: ``prompt_embeddings``) loads them itself with ``load_adapter_state_dict``."""
    tuner = peft_model.base_model
    if hasattr(type(tuner), "load_adapter_state_dict"):
        return tuner.load_adapter_state_dict(state, adapter_name, folder, strict=strict)
    return adapter_io.load_adapter_weights(peft_model, state, adapter_name, tuner.adapter_attr_names(), folder,
                                           strict=strict)


def _peft_model(model: nn.Module) -> PeftModel:
    """``model``, or the PeftModel inside its ``torch.compile`` wrapper; TypeError for anything else."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a PeftModel (from get_peft_model or PeftModel.from_pretrained), "
                        f"got {type(model).__name__}")
    return model


def _injected_model(model: nn.Module) -> Optional[nn.Module]:
    """``model`` (unwrapped from ``torch.compile``) when :func:`inject_adapter_in_model` grafted
    adapters into it directly, without a PeftModel around it; else None."""
    model = getattr(model, "_orig_mod", model)
    configs = getattr(model, "peft_config", None)
    if isinstance(model, PeftModel) or not isinstance(configs, dict) or not configs:
        return None
    return model if all(isinstance(c, PeftConfig) for c in configs.values()) else None


def _adapter_config(model: nn.Module, adapter_name: str, what: str) -> PeftConfig:
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r} {what}; the model has {list(model.peft_config)}")
    return model.peft_config[adapter_name]


def get_peft_model_state_dict(model: PeftModel, state_dict: Optional[dict[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: Union[str, bool] = "auto") -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed as ``adapter_model.safetensors`` stores them (HF PEFT's function).

    The keys carry no adapter name (``base_model.model.<module>.lora_A.weight``);
    the values are the live tensors, detached, not copies. ``state_dict``: a full
    state dict of ``model`` to take them from (for example one gathered from
    sharded ranks), or one already in file form (this function's output); default
    the model's own (its class's ``state_dict``, even when a script has replaced the
    instance's, as alpaca-lora's does). ``unwrap_compiled`` is accepted for HF PEFT's
    sake (a compiled model is always unwrapped); ``save_embedding_layers=True`` is not
    supported (the full embedding matrix is never saved) and says so in a warning.
    """
    if save_embedding_layers is True:
        warnings.warn("get_peft_model_state_dict: save_embedding_layers=True is not supported; the full "
                      "embedding matrix is not included (load the adapter onto the same base)", stacklevel=2)
    injected = _injected_model(model)
    model = injected if injected is not None else _peft_model(model)
    config = _adapter_config(model, adapter_name, "in the model")
    # An injected model's keys are relative to the model itself, as HF PEFT writes them for one.
    attrs = (_tuner_for(config) if injected is not None else model.base_model).adapter_attr_names()
    state = adapter_io.adapter_state_dict(model, adapter_name, attrs, getattr(config, "bias", "none"),
                                          state=state_dict)
    if injected is None:
        state = model.base_model.adapter_state_to_save(adapter_name, state)
    if not state and state_dict is not None:  # already in file form, as this function returns it?
        file_keys = get_peft_model_state_dict(model, adapter_name=adapter_name).keys()
        if file_keys <= state_dict.keys():
            state = {key: state_dict[key].detach() for key in file_keys}
    if not state:  # never an empty adapter file
        given = "the state_dict given" if state_dict is not None else "the model's state_dict()"
        example = next((n for n, p in model.named_parameters() if p.requires_grad), None)
        raise ValueError(f"{given} holds none of adapter {adapter_name!r}'s tensors (its keys name the adapter, "
                         f"e.g. {example!r}); pass the model's full state dict, with adapter names, or none")
    return state


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> adapter_io.IncompatibleKeys:
    """Copy tensors keyed as :func:`get_peft_model_state_dict` returns them into an existing adapter.

    Not strict, as in HF PEFT: keys that fit no tensor of the adapter and adapter
    tensors without a value are returned as ``(missing_keys, unexpected_keys)``
    and the rest is loaded. A tensor whose shape does not fit is an error, raised
    before anything is copied, unless ``ignore_mismatched_sizes``: then it is left
    out, keeps its current value, and is named in a warning. ``low_cpu_mem_usage``
    is accepted for HF PEFT's sake (the adapter exists already, nothing is allocated).
    """
    injected = _injected_model(model)
    model = injected if injected is not None else _peft_model(model)
    config = _adapter_config(model, adapter_name, "to load into (add_adapter, load_adapter or "
                                                  "inject_adapter_in_model creates one)")
    if ignore_mismatched_sizes:
        current = get_peft_model_state_dict(model, adapter_name=adapter_name)
        mismatched = [k for k, v in peft_model_state_dict.items() if k in current and v.shape != current[k].shape]
        if mismatched:
            warnings.warn(f"set_peft_model_state_dict: {len(mismatched)} tensor(s) of another shape left out "
                          f"(ignore_mismatched_sizes=True), e.g. {', '.join(mismatched[:3])}", stacklevel=2)
            peft_model_state_dict = {k: v for k, v in peft_model_state_dict.items() if k not in mismatched}
    if injected is not None:
        return adapter_io.load_adapter_weights(model, peft_model_state_dict, adapter_name,
                                               _tuner_for(config).adapter_attr_names(), "the given state dict",
                                               strict=False)
    return _load_weights(model, peft_model_state_dict, adapter_name, "the given state dict", strict=False)


def _card_settings(config: PeftConfig) -> dict[str, Any]:
    """The method's settings worth showing: target modules plus every field not at its default."""
    skip = {f.name for f in dataclasses.fields(PeftConfig)}
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in skip or f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value in (None, [], {}) or (value == default and f.name != "target_modules"):
            continue
        shown[f.name] = value
    for key in ("r", "lora_alpha"):  # the defining numbers, even when left at their defaults
        if hasattr(config, key):
            shown.setdefault(key, getattr(config, key))
    return dict(sorted(shown.items()))


def _write_model_card(folder: str, config: PeftConfig, state: dict[str, torch.Tensor]) -> None:
    """A short README.md so the folder is ready to publish; never replaces a user's own card."""
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            if CARD_MARKER not in fh.read():
                return
    n_params = sum(t.numel() for t in state.values())
    settings = _card_settings(config)
    front = ["---", "library_name: tsugiki"]
    if config.base_model_name_or_path:
        front.append(f"base_model: {config.base_model_name_or_path}")
    lines = [
        *front,
        "tags: [peft, tsugiki, " + config.peft_type.lower() + "]",
        "---",
        CARD_MARKER,
        f"# {config.peft_type} adapter",
        "",
        f"- Base model: `{config.base_model_name_or_path or 'unknown'}`",
        f"- Method: {config.peft_type}" + (f", task {config.task_type}" if config.task_type else ""),
        f"- Adapter parameters: {n_params:,d}",
        *[f"- `{k}`: `{v}`" for k, v in settings.items()],
        "",
        "Load it with tsugiki or HF PEFT:",
        "",
        "```python",
        "from tsugiki import PeftModel  # or: from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this folder>\")",
        "```",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


class _TransformersInputs(PeftModel):
    """A wrapper of a transformers model, whose ``forward`` names the model's usual inputs.

    Tools read them from the signature: transformers' Trainer keeps only the dataset
    columns ``forward`` names (it looks inside HF PEFT's class, which this is not).
    Inputs left at None are not passed; positions stay positions.
    """

    def forward(self, input_ids: Any = None, attention_mask: Any = None, *args: Any, inputs_embeds: Any = None,
                labels: Any = None, position_ids: Any = None, token_type_ids: Any = None,
                decoder_input_ids: Any = None, decoder_attention_mask: Any = None, start_positions: Any = None,
                end_positions: Any = None, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        named = dict(inputs_embeds=inputs_embeds, labels=labels, position_ids=position_ids,
                     token_type_ids=token_type_ids, decoder_input_ids=decoder_input_ids,
                     decoder_attention_mask=decoder_attention_mask, start_positions=start_positions,
                     end_positions=end_positions)
        kwargs.update((k, v) for k, v in named.items() if v is not None)
        if args:
            args = (input_ids, attention_mask, *args)
        else:  # transformers models take both by name
            kwargs.update((k, v) for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask))
                          if v is not None)
        return super().forward(*args, adapter_names=adapter_names, **kwargs)


class PeftModelForCausalLM(_TransformersInputs):
    """Causal LM: ``forward(input_ids, labels=...)`` gives a loss; ``generate`` works."""


class PeftModelForSeq2SeqLM(_TransformersInputs):
    """Encoder-decoder LM (T5, BART, ...)."""


class PeftModelForSequenceClassification(_TransformersInputs):
    """Classifier: the head (``classifier``/``score``) trains in full and is saved with the adapter."""


class PeftModelForTokenClassification(_TransformersInputs):
    """Token classifier: the head trains in full and is saved with the adapter."""


class PeftModelForFeatureExtraction(_TransformersInputs):
    """Encoder producing hidden states (embeddings)."""


class PeftModelForQuestionAnswering(_TransformersInputs):
    """Extractive QA (span start/end logits): the head (``qa_outputs``) trains in full and is saved."""


TASK_MODELS: dict[Optional[str], type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
}


def _warn_fp32_adapters(caller: str) -> None:
    warnings.warn(f"{caller}: autocast_adapter_dtype=False is not supported; the adapter's parameters are fp32 "
                  "whatever the base's dtype", stacklevel=3)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   **kwargs: Any) -> PeftModel:
    """Graft the adapter described by ``peft_config`` onto ``model`` (in place) and wrap it.

    ``revision``: the base model's revision, recorded in the config (and so in
    ``adapter_config.json``) for loading the base again, as HF PEFT does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError("this model already carries adapters; use model.add_adapter(name, config) instead")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a tsugiki config such as LoraConfig, got {type(peft_config).__name__}")
    if mixed:
        warnings.warn("get_peft_model: mixed=True is not supported (tsugiki has no PeftMixedModel): the model "
                      "holds adapters of one method, one active at a time", stacklevel=2)
    if not autocast_adapter_dtype:
        _warn_fp32_adapters("get_peft_model")
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"get_peft_model: revision={revision!r} replaces the config's {peft_config.revision!r}",
                          stacklevel=2)
        peft_config.revision = revision
    cls = TASK_MODELS.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Graft the adapter's layers into ``model`` in place and return ``model`` itself, not wrapped
    (HF PEFT's function): no ``save_pretrained`` or adapter switching, only the layers, with
    their parameters trainable and every other parameter frozen. Not for prompt-learning
    methods, which live in the wrapper; ``low_cpu_mem_usage`` is accepted for HF PEFT's sake
    (the layers are created directly), a ``state_dict`` is not used and says so."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a tsugiki config such as LoraConfig, got {type(peft_config).__name__}")
    if peft_config.is_prompt_learning:
        raise ValueError(f"inject_adapter_in_model: {peft_config.peft_type} adds virtual tokens in the wrapper, "
                         "not layers in the model; use get_peft_model")
    if state_dict is not None:
        warnings.warn("inject_adapter_in_model: state_dict is not used (the targets come from the config; "
                      "load weights with set_peft_model_state_dict)", stacklevel=2)
    tuner = _tuner_for(peft_config)(model, _prepare_config(peft_config, model), adapter_name)
    tuner.set_adapter(adapter_name, inference_mode=False)
    # As HF PEFT does: the configs ride on the model, so that get_peft_model_state_dict and
    # set_peft_model_state_dict find its adapters.
    tuner.model.peft_config = tuner.peft_config
    return tuner.model


def load_peft_weights(model_id: str | os.PathLike, device: Optional[str] = None, **kwargs: Any) -> dict:
    """The tensors of a saved adapter folder, under their file keys (HF PEFT's function); pickle
    ``adapter_model.bin`` files only with ``allow_pickle=True``."""
    state = adapter_io.read_adapter_weights(os.fspath(model_id), allow_pickle=kwargs.pop("allow_pickle", False))
    return {k: v.to(device) for k, v in state.items()} if device is not None else state


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of the method ``config_dict["peft_type"]`` names (HF PEFT's function)."""
    return PeftConfig.from_dict(config_dict)


__all__ = [
    "LoraConfig", "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "get_peft_model",
    "inject_adapter_in_model", "load_peft_weights", "get_peft_config",
]

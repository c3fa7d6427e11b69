"""Adapter configs and their JSON form (HF PEFT's ``adapter_config.json``).

Every method's config is a dataclass deriving from :class:`PeftConfig`. The
JSON file holds every dataclass field plus ``peft_type``; a file written by
another PEFT version may hold keys this version does not know: they are
ignored, so adapters keep loading across versions, with a warning that names
those set to something other than empty or HF PEFT's default.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

from .fileio import atomic_write_text


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """An adapter folder or file that is not there. Also a ``ValueError``, which is what HF PEFT
    raises for it, so ``except ValueError`` in code written for PEFT still catches it."""


class NotComputedError(ValueError):
    """A setting tsugiki does not compute (e.g. DoRA on an embedding): the model is not at fault."""


CONFIG_NAME = "adapter_config.json"


def adapters_in_subfolders(folder: str | os.PathLike) -> list[str]:
    """Names of the adapters saved in subfolders of ``folder`` (``save_pretrained`` of several
    adapters puts every one but ``default`` there), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))


# HF PEFT writes every option of its config; these of its keys tsugiki lacks have a default that is not
# empty, so a file holding that value asks for nothing tsugiki ignores. The metadata keys describe the file.
_PEFT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
_METADATA_KEYS = {"peft_version"}
# HF PEFT settings that change what an adapter computes (not only how it starts or runs):
# without them the weights would load and give other outputs, so such a file is refused.
_CHANGES_OUTPUTS = {
    "alora_invocation_tokens": "Activated LoRA: the update applies from the invocation tokens on",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA: a learned singular-value diagonal and a truncated base",
    "layer_replication": "layers stacked again from the base's",
    "monteclora_config": "MonteCLoRA's sampled updates",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "trainable_token_indices": "trained rows of the embedding",
    "use_bdlora": "block-diagonal LoRA factors",
    "use_qalora": "QALoRA's pooled inputs",
}


def _left_at_default(key: str, value: Any) -> bool:
    """Whether an ``adapter_config.json`` key tsugiki does not know is unset (None, False, empty) or at
    HF PEFT's default: ignoring it then changes nothing, so it needs no warning."""
    if key in _METADATA_KEYS or value is None or value is False or value in ({}, [], ""):
        return True
    return key in _PEFT_DEFAULTS and _PEFT_DEFAULTS[key] == value


class NameEnum(str, enum.Enum):
    """A name that is also its string, as HF PEFT's enums are (``config.peft_type.value``,
    ``== "LORA"``, a dict key for ``"LORA"``); printed, formatted and repr'd as the plain string,
    so messages and configs read the same whichever form was given."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)


class PeftType(NameEnum):
    """Method names as written in ``adapter_config.json`` (``peft_type``; HF PEFT's names)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    BOTTLENECK = "BOTTLENECK"  # tsugiki's own: series / parallel bottleneck adapters


class TaskType(NameEnum):
    """What the wrapped model does; decides the wrapper class and its extras."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    QUESTION_ANS = "QUESTION_ANS"


# peft_type -> config class; filled by each method module on import.
CONFIG_REGISTRY: dict[str, type["PeftConfig"]] = {}


def register_config(cls: type["PeftConfig"]) -> type["PeftConfig"]:
    CONFIG_REGISTRY[cls.peft_type_name] = cls
    _accept_hf_peft_keywords(cls)
    return cls


def _accept_hf_peft_keywords(cls: type["PeftConfig"]) -> None:
    """Let ``cls(**hf_peft_config.to_dict())`` work, as it does in HF PEFT: ``peft_type`` (when it
    names this class) and HF PEFT fields left at their defaults are accepted and dropped."""
    init = cls.__init__
    fields = set(inspect.signature(init).parameters) - {"self"}  # InitVar arguments too

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        foreign = {k: kwargs.pop(k) for k in list(kwargs) if k not in fields}
        peft_type = foreign.pop("peft_type", None)
        if peft_type is not None and getattr(peft_type, "value", peft_type) != cls.peft_type_name:
            raise ValueError(f"peft_type={getattr(peft_type, 'value', peft_type)!r} is not {cls.__name__}'s "
                             f"({cls.peft_type_name!r}); PeftConfig.from_dict(d) picks the class from it")
        _refuse_settings_that_change_outputs(foreign)
        for key, value in foreign.items():
            if not _left_at_default(key, value):
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                raise TypeError(f"{cls.__name__} got an unexpected keyword argument {key!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
        init(self, *args, **kwargs)

    cls.__init__ = __init__


def _refuse_settings_that_change_outputs(settings: dict[str, Any]) -> None:
    unsupported = [k for k in sorted(settings) if k in _CHANGES_OUTPUTS and not _left_at_default(k, settings[k])]
    if unsupported:
        what = "; ".join(f"{k}={settings[k]!r} ({_CHANGES_OUTPUTS[k]})" for k in unsupported)
        raise ValueError(f"adapter config sets {what}, which tsugiki does not compute: loaded without it, "
                         "the adapter would give other outputs than it was trained to. Use HF PEFT for this "
                         "adapter")


# training-job method name (``method:`` in a train config / ``--method``) ->
# builder(train_config, base_model_name) -> PeftConfig. Filled by the method modules.
METHOD_BUILDERS: dict[str, Callable[[Any, str], "PeftConfig"]] = {}
# training-job method name -> the adapter keys of the train config its builder reads
ADAPTER_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
METHOD_READS: dict[str, tuple[str, ...]] = {"full": ()}


def register_method(*names: str, reads: tuple[str, ...] = ADAPTER_KEYS):
    """Function decorator: ``@register_method("ia3")`` lets ``tsugiki train --method ia3`` build the config.

    The builder receives the :class:`~tsugiki.train.TrainConfig` (its ``method_args``
    mapping holds the method's own hyperparameters) and the base model's name.
    ``reads`` names the train config's adapter keys it uses (default: all of
    :data:`ADAPTER_KEYS`, as LoRA does); a job that sets another one is warned.
    """
    def wrap(fn: Callable[[Any, str], "PeftConfig"]) -> Callable[[Any, str], "PeftConfig"]:
        for name in names:
            METHOD_BUILDERS[name] = fn
            METHOD_READS[name] = tuple(reads)
        return fn
    return wrap


# Names people give the rank, alpha and dropout (tsugiki train's own keys among them), which string
# similarity would match with the wrong option (lora_r -> lora_bias).
_OPTION_ALIASES = {"lora_r": "r", "rank": "r", "lora_rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


# A method option the training job sets from its own key: method_args may not set it to something else.
TRAIN_KEY_OF_OPTION = {"r": "lora_r", "init_r": "lora_r", "lora_alpha": "lora_alpha", "alpha": "lora_alpha",
                       "lora_dropout": "lora_dropout", "target_modules": "target_modules"}


def config_from_method_args(cls: type["PeftConfig"], method_args: Optional[dict], **fixed: Any) -> "PeftConfig":
    """``cls(**fixed, **method_args)``, naming unknown keys with the closest valid one.

    An option ``fixed`` takes from a training key (:data:`TRAIN_KEY_OF_OPTION`: ``r`` from
    ``lora_r``, ...) is refused in ``method_args`` when the two differ: the saved
    ``train_config.yaml`` would say one thing and the adapter the other.
    """
    import difflib

    args = dict(method_args or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for key in args:
        if key not in known:
            alias = _OPTION_ALIASES.get(key)
            close = [alias] if alias in known else difflib.get_close_matches(key, sorted(known), n=1)
            train_key = TRAIN_KEY_OF_OPTION.get(close[0]) if close and close[0] in fixed else None
            if train_key:  # the job sets that option from its own key: point there, not at method_args
                raise ValueError(f"method_args: {key!r} is not an option of {cls.__name__}; the job sets its "
                                 f"{close[0]!r} from {train_key}: set {train_key} instead")
            raise ValueError(f"method_args: {key!r} is not an option of {cls.__name__}"
                             + (f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(sorted(known))}"))
        train_key = TRAIN_KEY_OF_OPTION.get(key)
        if key == "target_modules" and isinstance(args[key], str):  # as the job's key reads it: a regex
            args[key] = train_targets([t.strip() for t in args[key].split(",") if t.strip()])  # or names
        if train_key and fixed.get(key) is not None and args[key] != fixed[key]:
            raise ValueError(f"method_args: {key}={args[key]!r} conflicts with the job's {train_key} "
                             f"({fixed[key]!r}); set {train_key} instead")
    return cls(**{**fixed, **args})


_REGEX_CHARACTERS = set("*+?[](){}|^$\\")


def train_targets(targets: Optional[Sequence[str]]) -> Union[None, str, list[str]]:
    """A training job's ``target_modules`` list as an adapter config takes it: None (the architecture's
    default), ``"all-linear"``, one regular expression (``'.*\\.(q|v)_proj'``), or module names."""
    if not targets:
        return None
    if len(targets) == 1 and (targets[0] == "all-linear" or _REGEX_CHARACTERS & set(targets[0])):
        return targets[0]
    return list(targets)


@dataclass
class PeftConfig:
    """Fields every adapter config has.

    Args:
        task_type: a :class:`TaskType` name or ``None`` for a bare module.
        base_model_name_or_path: where the base came from; written to the file
            so ``AutoPeftModelForCausalLM`` can load the base again.
        revision: the base model's revision, if any.
        inference_mode: ``True`` when the adapter is loaded for inference only
            (its parameters are frozen).
        auto_mapping: for an adapter without ``task_type``, the base model's class
            (``{"base_model_class": ..., "parent_library": ...}``), written by
            ``save_pretrained`` so ``AutoPeftModel`` can load that class again.
    """

    peft_type_name: ClassVar[str] = ""

    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            if self.task_type not in TaskType.__members__:
                raise ValueError(
                    f"task_type={self.task_type!r} is not known; use one of "
                    f"{', '.join(TaskType.__members__)} (or None for a plain module)"
                )
            self.task_type = TaskType(self.task_type)
        # Module lists may arrive as sets or tuples (HF PEFT accepts both); store sorted lists.
        for key in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, key, None)
            if isinstance(value, (set, tuple)):
                setattr(self, key, sorted(value))
        if isinstance(getattr(self, "modules_to_save", None), str):  # one name, not its letters
            self.modules_to_save = [self.modules_to_save]
        if getattr(self, "modules_to_save", None) is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def peft_type(self) -> PeftType:
        return PeftType(self.peft_type_name)

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # -- JSON round trip --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value  # plain JSON/YAML strings
        out["peft_type"] = self.peft_type_name
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the config named by ``data["peft_type"]`` (or ``cls``), ignoring unknown keys."""
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.peft_type_name
        target_cls = CONFIG_REGISTRY.get(peft_type) if cls is PeftConfig else cls
        if target_cls is None:
            raise ValueError(
                f"adapter method peft_type={peft_type!r} is not supported; "
                f"supported: {', '.join(sorted(CONFIG_REGISTRY))}"
            )
        known = {f.name for f in dataclasses.fields(target_cls)}
        _refuse_settings_that_change_outputs({k: v for k, v in data.items() if k not in known})
        ignored = [f"{k}={data[k]!r}" for k in sorted(set(data) - known) if not _left_at_default(k, data[k])]
        if ignored:
            warnings.warn(f"ignoring adapter config settings this version does not support: {', '.join(ignored)}",
                          stacklevel=2)
        return target_cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "PeftConfig":
        """The config of the method ``kwargs["peft_type"]`` names, built from ``kwargs`` (HF PEFT's)."""
        if "peft_type" not in kwargs:
            raise TypeError("from_peft_type needs peft_type=..., e.g. peft_type='LORA'")
        return PeftConfig.from_dict(kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object in ``path_json_file``, as a dict (HF PEFT's: not a config; ``from_dict`` makes one)."""
        with open(path_json_file, encoding="utf-8") as fh:
            return json.load(fh)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        atomic_write_text(
            os.path.join(save_directory, CONFIG_NAME),
            json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n",
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: Optional[str] = None) -> "PeftConfig":
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        path = os.fspath(path)
        if subfolder:
            path = os.path.join(path, subfolder)
        file = path if path.endswith(".json") else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            if not os.path.exists(path):
                raise AdapterNotFoundError(f"adapter folder {path!r} does not exist")
            inside = adapters_in_subfolders(path)
            hint = (f"; it holds adapters in the subfolders {inside} (saved with several adapters): give "
                    f"{os.path.join(path, inside[0])!r}, or subfolder={inside[0]!r}") if inside else ""
            whole = next((f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
                          if os.path.isfile(os.path.join(path, f))), None)
            if whole and not hint and os.path.isfile(os.path.join(path, "config.json")):
                hint = (f"; it holds a whole model ({whole} and config.json: a full fine-tune or a merged "
                        "model): load it as the model itself (--model, or from_pretrained), with no adapter")
            elif whole and not hint:
                hint = (f"; it holds a whole model's weights ({whole}), as transformers' Trainer saves a tsugiki "
                        "model in its checkpoints and save_model: save the adapter with "
                        "model.save_pretrained(folder) after training, or load such a checkpoint into the same "
                        "PeftModel with model.load_state_dict(safetensors.torch.load_file(...), strict=False)")
            raise AdapterNotFoundError(
                f"{file!r} not found: {path!r} is not an adapter folder "
                f"(expected {CONFIG_NAME} and adapter_model.safetensors){hint}"
            )
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def module_spec_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a valid module spec (None, a list of names, or a regex string), else None."""
    if value is None:
        return None
    if isinstance(value, list):
        return None if all(isinstance(v, str) for v in value) else "every entry must be a module name (string)"
    if not isinstance(value, str):
        return "give a list of module names, a regex string, or 'all-linear'"
    try:
        re.compile(value)
    except re.error as err:
        return f"not a valid regular expression ({err})"
    return None


def field_list(default: Any = None) -> Any:
    """A dataclass field whose default is a fresh copy of a mutable value."""
    if default is None:
        return field(default=None)
    return field(default_factory=lambda: type(default)(default))

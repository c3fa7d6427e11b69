"""HF PEFT's ``peft.utils`` names, for code that imports them from there
(``from peft.utils import get_peft_model_state_dict`` becomes ``from tsugiki.utils import ...``).

Each is tsugiki's own object under HF PEFT's name; the functions are documented where they live.
"""

from __future__ import annotations

from typing import Any

from .adapter_io import PICKLE_WEIGHTS_NAME as WEIGHTS_NAME, WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME
from .config import CONFIG_NAME, PeftType, TaskType
from .inject import DEFAULT_TARGETS as TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from .model import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .tuner import ModulesToSaveWrapper

__all__ = [
    "CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "PeftType", "TaskType", "ModulesToSaveWrapper", "get_peft_model_state_dict", "set_peft_model_state_dict",
    "load_peft_weights", "infer_device",
]


def infer_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"`` (the devices tsugiki trains on)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def __getattr__(name: str) -> Any:
    if name == "prepare_model_for_kbit_training":  # loads bitsandbytes' helpers only when asked for
        from .quant import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training
    raise AttributeError(f"module 'tsugiki.utils' has no attribute {name!r}")

"""tsugiki (接ぎ木, "grafting"): parameter-efficient fine-tuning of large language models.

The public names follow HF PEFT, so existing code runs by changing the import::

    from tsugiki import LoraConfig, get_peft_model, PeftModel
"""

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig, PeftType, TaskType
from .inject import find_all_linear_names
from .methods.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from .methods.adalora import AdaLoraConfig, AdaLoraModel
from .methods.bottleneck import BottleneckConfig, BottleneckModel
from .methods.ia3 import IA3Config, IA3Model
from .methods.loha import LoHaConfig, LoHaModel
from .methods.lokr import LoKrConfig, LoKrModel
from .methods.lora import LoraConfig, LoraModel
from .methods.prefix import PrefixTuningConfig, PrefixTuningModel
from .methods.prompt import (
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningModel,
    PromptEncoderConfig,
    PromptEncoderModel,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    PromptTuningModel,
)
from .methods.prompt_base import PromptLearningConfig
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__version__ = "0.1.0"

# Heavier parts load on first use: ``tsugiki.train(config)`` and ``tsugiki.plan(...)`` are
# callable modules; the loaders and k-bit helpers are plain functions.
_LAZY = {
    "train": ("tsugiki.train", None),
    "plan": ("tsugiki.plan", None),
    "data": ("tsugiki.data", None),
    "tuners": ("tsugiki.tuners", None),
    "utils": ("tsugiki.utils", None),
    "load_model": ("tsugiki.models", "load_model"),
    "load_tokenizer": ("tsugiki.models", "load_tokenizer"),
    "prepare_model_for_kbit_training": ("tsugiki.quant", "prepare_model_for_kbit_training"),
    "quantize_model": ("tsugiki.quant", "quantize_model"),
    "TrainConfig": ("tsugiki.train.config", "TrainConfig"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tsugiki' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)

__all__ = [
    "AdaptionPromptConfig", "AdaptionPromptModel", "BottleneckConfig", "BottleneckModel",
    "IA3Config", "IA3Model",
    "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
    "AdaLoraConfig", "AdaLoraModel",
    "MultitaskPromptTuningConfig", "MultitaskPromptTuningModel", "PrefixTuningConfig", "PrefixTuningModel",
    "PromptEncoderConfig", "PromptEncoderModel", "PromptEncoderReparameterizationType", "PromptLearningConfig",
    "PromptTuningConfig", "PromptTuningInit", "PromptTuningModel",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "LoraConfig", "LoraModel", "PeftConfig", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "PeftType", "TaskType", "TrainConfig", "TunerLayerStatus", "TunerModelStatus", "find_all_linear_names",
    "get_layer_status", "get_model_status", "get_peft_config", "get_peft_model",
    "get_peft_model_state_dict", "inject_adapter_in_model", "load_model", "load_peft_weights",
    "load_tokenizer", "plan", "prepare_model_for_kbit_training", "quantize_model", "set_peft_model_state_dict", "train",
]

"""``AutoPeftModel*``: load the base named in ``adapter_config.json``, then the adapter."""

from __future__ import annotations

import os
from typing import Any, Optional

from .config import PeftConfig
from .model import PeftModel


class _AutoPeftModel:
    task_type: Optional[str] = None
    auto_class_name = "AutoModel"

    @classmethod
    def from_pretrained(cls, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **model_kwargs: Any) -> PeftModel:
        """Read the adapter's config, load its base model, and graft the adapter onto it.

        ``model_kwargs`` go to the base loader (e.g. ``torch_dtype``, ``quantization_config``).
        """
        config = PeftConfig.from_pretrained(adapter_dir)
        base_path = config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"{adapter_dir}: adapter_config.json has no base_model_name_or_path; load the base "
                "model yourself and call PeftModel.from_pretrained(base, adapter_dir)"
            )
        base = cls._load_base(base_path, config.revision, **model_kwargs)
        return PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)

    @classmethod
    def _load_base(cls, base_path: str, revision: Optional[str], **model_kwargs: Any):
        import transformers

        from .models import DEFAULT_MODEL, load_model

        if base_path == DEFAULT_MODEL or str(base_path).endswith(".gguf"):
            return load_model(base_path, task=cls.task_type or "causal_lm", **model_kwargs)
        auto = getattr(transformers, cls.auto_class_name)
        if revision:
            model_kwargs.setdefault("revision", revision)
        return auto.from_pretrained(base_path, **model_kwargs)


class AutoPeftModel(_AutoPeftModel):
    auto_class_name = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    task_type = "causal_lm"
    auto_class_name = "AutoModelForCausalLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_class_name = "AutoModel"

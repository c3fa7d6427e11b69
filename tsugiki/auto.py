"""``AutoPeftModel*``: load the base named in ``adapter_config.json``, then the adapter."""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from .config import PeftConfig
from .model import TASK_MODELS, PeftModel


class _AutoPeftModel:
    loader_task: Optional[str] = None  # tsugiki.load_model's task, for a GGUF base or the default model
    peft_task_type: Optional[str] = None  # the adapter's task_type this class loads (None: AutoPeftModel)
    auto_class_name = "AutoModel"

    @classmethod
    def from_pretrained(cls, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **model_kwargs: Any) -> PeftModel:
        """Read the adapter's config, load its base model, and graft the adapter onto it.

        ``model_kwargs`` go to the base loader (e.g. ``torch_dtype``, ``quantization_config``).
        """
        config = PeftConfig.from_pretrained(adapter_dir)
        cls._check_task_type(adapter_dir, config.task_type)
        base_path = config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"{adapter_dir}: adapter_config.json has no base_model_name_or_path; load the base "
                "model yourself and call PeftModel.from_pretrained(base, adapter_dir)"
            )
        base = cls._load_base(base_path, config.revision, cls._base_class(adapter_dir, config), **model_kwargs)
        _fit_vocabulary(base, adapter_dir)
        # This class's wrapper (AutoPeftModelForCausalLM: PeftModelForCausalLM), whatever task_type the file has.
        wrapper = TASK_MODELS.get(cls.peft_task_type, PeftModel)
        return wrapper.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable)

    @classmethod
    def _base_class(cls, adapter_dir: str | os.PathLike, config: PeftConfig) -> Any:
        """The transformers class to load the base with: this class's, or for ``AutoPeftModel`` and an
        adapter without a task type, the one its ``auto_mapping`` records (a transformers class only)."""
        import transformers

        mapping = config.auto_mapping
        if cls.peft_task_type is not None or config.task_type is not None or not mapping:
            return getattr(transformers, cls.auto_class_name)
        library, name = mapping.get("parent_library", ""), mapping.get("base_model_class", "")
        if library != "transformers" and not library.startswith("transformers."):
            raise ValueError(f"{adapter_dir}: auto_mapping names {library}.{name}, not a transformers class; "
                             "load the base model yourself and use PeftModel.from_pretrained(base, adapter_dir)")
        found = getattr(importlib.import_module(library), name, None) or getattr(transformers, name, None)
        if found is None or not hasattr(found, "from_pretrained"):
            raise ValueError(f"{adapter_dir}: auto_mapping names {library}.{name}, which this transformers "
                             "version lacks; load the base yourself and use PeftModel.from_pretrained")
        return found

    @classmethod
    def _check_task_type(cls, adapter_dir: str | os.PathLike, task_type: Optional[str]) -> None:
        """Refuse an adapter made for another task: its head would be missing or left at random."""
        if task_type is None or task_type == cls.peft_task_type:
            return
        right = next((c.__name__ for c in _AutoPeftModel.__subclasses__() if c.peft_task_type == task_type), None)
        fix = f"use {right}.from_pretrained" if right else "load the base yourself and use PeftModel.from_pretrained"
        raise ValueError(f"{adapter_dir}: the adapter's task_type is {task_type!r}, which {cls.__name__} does "
                         f"not load; {fix}")

    @classmethod
    def _load_base(cls, base_path: str, revision: Optional[str], base_class: Any, **model_kwargs: Any):
        from .models import DEFAULT_MODEL, load_model

        if base_path == DEFAULT_MODEL or str(base_path).endswith(".gguf"):
            return load_model(base_path, task=cls.loader_task or "causal_lm", **model_kwargs)
        if revision:
            model_kwargs.setdefault("revision", revision)
        return base_class.from_pretrained(base_path, **model_kwargs)


def _fit_vocabulary(base: Any, adapter_dir: str | os.PathLike) -> None:
    """Grow the base's embeddings to the tokenizer saved with the adapter, as HF PEFT's AutoPeftModel does:
    training that added tokens resized them, and the adapter's embedding tensors have those rows."""
    if not os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) or \
            not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    rows = base.get_input_embeddings().weight.shape[0]
    size = len(AutoTokenizer.from_pretrained(adapter_dir))
    if size > rows:  # never shrink: a padded embedding matrix may hold more rows than the tokenizer
        base.resize_token_embeddings(size)


class AutoPeftModel(_AutoPeftModel):
    auto_class_name = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    peft_task_type = "CAUSAL_LM"
    loader_task = "causal_lm"
    auto_class_name = "AutoModelForCausalLM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    peft_task_type = "SEQ_CLS"
    auto_class_name = "AutoModelForSequenceClassification"


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    peft_task_type = "TOKEN_CLS"
    auto_class_name = "AutoModelForTokenClassification"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    peft_task_type = "SEQ_2_SEQ_LM"
    auto_class_name = "AutoModelForSeq2SeqLM"


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    peft_task_type = "FEATURE_EXTRACTION"
    auto_class_name = "AutoModel"


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    peft_task_type = "QUESTION_ANS"
    auto_class_name = "AutoModelForQuestionAnswering"

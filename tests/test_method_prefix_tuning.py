"""Prefix tuning: per-layer key/value prefixes given to the model as a pre-filled DynamicCache."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import tsugiki
from test_method_prompt_tuning import (check_generate_left_padding, check_interop, check_round_trip, check_trains,
                                       logits, randomize_prompt, train_cli)
from tiny_models import tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.prefix import PrefixTuningConfig


def _config(**kw):
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kw)


@pytest.mark.parametrize("projection", [False, True])
def test_trains_only_the_prefix(projection):
    check_trains(tsugiki.get_peft_model(tiny_llama(), _config(prefix_projection=projection, encoder_hidden_size=8)))


def test_grouped_query_dims_match_hf_peft():
    ours = tsugiki.get_peft_model(tiny_llama(), _config()).peft_config["default"]
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs = theirs.peft_config["default"]
    assert (ours.token_dim, ours.num_attention_heads, ours.num_layers) == (
        theirs.token_dim, theirs.num_attention_heads, theirs.num_layers) == (8, 1, 2)


@pytest.mark.parametrize("make, projection", [(tiny_llama, False), (tiny_gpt2, True)])
def test_round_trip_and_generate_left_padding(make, projection, tmp_path):
    model = tsugiki.get_peft_model(make(), _config(prefix_projection=projection))
    randomize_prompt(model)
    check_round_trip(model, make, tmp_path)
    check_generate_left_padding(model)
    ids = token_batch()
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(make(), ids))


@pytest.mark.parametrize("make, projection", [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, False)])
def test_interop_with_hf_peft(make, projection, tmp_path):
    check_interop(make, _config(prefix_projection=projection),
                  peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection),
                  tmp_path)


@pytest.mark.parametrize("multi_query", [True, False])
def test_falcon_multi_query_attention_takes_one_key_value_head(multi_query):
    from tiny_models import tiny_falcon
    from transformers import FalconForCausalLM

    base = tiny_falcon()
    base.config.multi_query = multi_query  # Falcon-7B's setting: True
    base = FalconForCausalLM(base.config).eval()
    model = tsugiki.get_peft_model(base, _config())
    assert model.peft_config["default"].num_attention_heads == (1 if multi_query else 4)
    check_trains(model)
    check_generate_left_padding(model)


def test_zero_init_prefix_is_attended_but_carries_nothing():
    model = tsugiki.get_peft_model(tiny_llama(), _config(init_weights="zero"))
    assert all((p == 0).all() for n, p in model.named_parameters() if p.requires_grad)


def test_cli_train(tmp_path):
    out = train_cli(tmp_path, "prefix_tuning", {"num_virtual_tokens": 3})
    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert config["peft_type"] == "PREFIX_TUNING" and config["token_dim"] == 16 and config["num_attention_heads"] == 2


def test_gradient_checkpointing_is_refused():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=token_batch())


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_weights="ones"), "init_weights"),
    (dict(encoder_hidden_size=0), "encoder_hidden_size"),
    (dict(num_virtual_tokens=-1), "num_virtual_tokens"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuningConfig(task_type="CAUSAL_LM", **{"num_virtual_tokens": 2, **kwargs})


def test_other_task_types_are_refused():
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        tsugiki.get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))


@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
def test_get_prompt_and_word_embeddings_equal_hf_pefts(kind, tmp_path):
    """HF PEFT's PeftModel.get_prompt(batch_size): the virtual tokens as the model receives them."""
    theirs_cls = peft.PrefixTuningConfig if kind == "PREFIX_TUNING" else peft.PromptTuningConfig
    theirs = peft.get_peft_model(tiny_llama(), theirs_cls(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    theirs.save_pretrained(str(tmp_path))
    ours = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert ours.word_embeddings is ours.get_base_model().get_input_embeddings()
    with torch.no_grad():
        mine, reference = ours.get_prompt(2), theirs.get_prompt(2)
    if kind == "PREFIX_TUNING":
        assert len(mine.layers) == len(reference.layers)
        for a, b in zip(mine.layers, reference.layers):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
    else:
        assert mine.shape == (2, 3, 16)
        torch.testing.assert_close(mine, reference)

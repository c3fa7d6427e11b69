"""P-tuning: virtual tokens from an MLP or LSTM prompt encoder."""

from __future__ import annotations

import peft
import pytest
import torch

import tsugiki
from test_method_prompt_tuning import (check_generate_left_padding, check_interop, check_round_trip, check_trains,
                                       logits, randomize_prompt, train_cli)
from tiny_models import tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.prompt import PromptEncoderConfig


def _config(**kw):
    return PromptEncoderConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 8, **kw})


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_trains_only_the_encoder(kind):
    model = tsugiki.get_peft_model(tiny_llama(), _config(encoder_reparameterization_type=kind))
    names = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}
    assert names == ({"embedding", "mlp_head"} | ({"lstm_head"} if kind == "LSTM" else set()))
    check_trains(model)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_round_trip_folds_the_encoder_and_generates(kind, tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), _config(encoder_reparameterization_type=kind))
    randomize_prompt(model)
    check_round_trip(model, tiny_llama, tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "base_model.prompt_encoder.default.embedding.weight"]
    check_generate_left_padding(model)


@pytest.mark.parametrize("make, kind", [(tiny_llama, "MLP"), (tiny_llama, "LSTM"), (tiny_gpt2, "MLP")])
def test_interop_with_hf_peft(make, kind, tmp_path):
    check_interop(make, _config(encoder_reparameterization_type=kind),
                  peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8,
                                           encoder_reparameterization_type=kind), tmp_path)


def test_cli_train(tmp_path):
    train_cli(tmp_path, "p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16})


@pytest.mark.parametrize("kwargs, message", [
    (dict(encoder_reparameterization_type="GRU"), "encoder_reparameterization_type"),
    (dict(encoder_dropout=1.5), "encoder_dropout"),
    (dict(encoder_num_layers=0), "encoder_num_layers"),
    (dict(encoder_hidden_size=-1), "encoder_hidden_size"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


def test_mlp_options_it_cannot_honour_are_refused():
    for kw in (dict(encoder_num_layers=3), dict(encoder_dropout=0.1)):
        with pytest.raises(ValueError, match="MLP prompt encoder"):
            tsugiki.get_peft_model(tiny_llama(), _config(**kw))
    model = tsugiki.get_peft_model(tiny_llama(), _config(encoder_reparameterization_type="LSTM", encoder_dropout=0.1))
    assert torch.isfinite(logits(model, token_batch())).all()


def test_the_prompt_embedding_to_save_is_what_hf_peft_gives_for_the_same_weights():
    ours = tsugiki.get_peft_model(tiny_llama(), _config())
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                         encoder_hidden_size=8))
    randomize_prompt(ours)
    weights = {k.removeprefix("base_model."): v for k, v in ours.state_dict().items() if "prompt_encoder" in k}
    assert not theirs.load_state_dict(weights, strict=False).unexpected_keys  # every prompt weight went across
    expected = theirs.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(ours.get_prompt_embedding_to_save("default"), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        ours.get_prompt_embedding_to_save("other")
    lora = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not a prompt-learning method"):
        lora.get_prompt_embedding_to_save("default")

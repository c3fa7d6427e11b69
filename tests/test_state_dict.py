"""get_peft_model_state_dict / set_peft_model_state_dict, and load_adapter into an existing name."""

from __future__ import annotations

import os
import stat

import peft
import pytest
import torch
from safetensors.torch import load_file

import tsugiki
from tsugiki.adapter_io import AdapterLoadError
from tiny_models import randomize_adapters, tiny_llama, token_batch

LORA = dict(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_values(model, name="default"):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k and "lora_" in k}


def test_state_dict_is_what_save_pretrained_writes(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model)
    state = tsugiki.get_peft_model_state_dict(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(state) == sorted(saved)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key


def test_state_dict_keys_match_hf_peft_and_load_both_ways():
    ids = token_batch()
    ours = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    randomize_adapters(theirs, seed=11)
    their_state = peft.get_peft_model_state_dict(theirs)
    assert sorted(tsugiki.get_peft_model_state_dict(ours)) == sorted(their_state)

    result = tsugiki.set_peft_model_state_dict(ours, their_state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-5, rtol=0)

    randomize_adapters(ours, seed=12)
    peft.set_peft_model_state_dict(theirs, tsugiki.get_peft_model_state_dict(ours))
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)


def test_state_dict_of_a_named_adapter_and_from_a_given_state():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    model.add_adapter("other", tsugiki.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    other = tsugiki.get_peft_model_state_dict(model, adapter_name="other")
    assert all(".q_proj." in k for k in other) and len(other) == 2 * 2  # A and B in each of 2 layers
    assert torch.equal(other["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"],
                       model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["other"].weight)
    # From a separately held full state dict (e.g. gathered from shards): its values, not the live ones.
    full = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    shifted = tsugiki.get_peft_model_state_dict(model, state_dict=full, adapter_name="other")
    for key in other:
        torch.testing.assert_close(shifted[key], other[key] + 1)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        tsugiki.get_peft_model_state_dict(model, adapter_name="nope")
    with pytest.raises(TypeError, match="expected a PeftModel .* got LlamaForCausalLM"):
        tsugiki.get_peft_model_state_dict(tiny_llama())


def test_set_state_dict_reports_missing_and_unexpected_keys():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model)
    state = {k: v.clone() for k, v in tsugiki.get_peft_model_state_dict(model).items()}
    dropped = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    del state[dropped]
    state["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 16)
    kept = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    state[kept] = torch.full_like(state[kept], 0.5)
    result = tsugiki.set_peft_model_state_dict(model, state)
    assert result.missing_keys == ["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"]
    assert result.unexpected_keys == ["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"]
    assert torch.all(model.base_model.model.model.layers[1].self_attn.v_proj.lora_A["default"].weight == 0.5)
    with pytest.raises(ValueError, match="no adapter named 'x' to load into"):
        tsugiki.set_peft_model_state_dict(model, state, adapter_name="x")


def test_set_state_dict_with_a_bad_shape_changes_nothing():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model)
    before = _lora_values(model)
    state = {k: torch.zeros_like(v) for k, v in tsugiki.get_peft_model_state_dict(model).items()}
    state["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = torch.zeros(3, 32)
    with pytest.raises(AdapterLoadError, match=r"down_proj.*shape \(3, 32\) in the file but \(4, 32\)"):
        tsugiki.set_peft_model_state_dict(model, state)
    after = _lora_values(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prompt_tuning_state_dict_round_trips():
    config = tsugiki.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    source = tsugiki.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for p in source.prompt_encoder["default"].parameters():
            p.normal_()
    state = tsugiki.get_peft_model_state_dict(source)
    assert list(state) == ["prompt_embeddings"]
    target = tsugiki.get_peft_model(tiny_llama(), tsugiki.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=4))
    result = tsugiki.set_peft_model_state_dict(target, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids = token_batch()
    torch.testing.assert_close(_logits(target, ids), _logits(source, ids), atol=0, rtol=0)


def test_load_adapter_into_an_existing_name_replaces_its_weights(tmp_path):
    ids = token_batch()
    trained = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(trained, seed=21)
    trained.save_pretrained(tmp_path / "a")

    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model, seed=22)
    config_before = model.peft_config["default"]
    model.load_adapter(tmp_path / "a", adapter_name="default")
    assert model.peft_config["default"] is config_before
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids), atol=0, rtol=0)


def test_load_adapter_leaves_the_model_in_eval_mode_unless_it_is_to_train(tmp_path):
    tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA)).save_pretrained(tmp_path / "a")
    for trainable, training_after in ((False, False), (True, True)):
        for library in (tsugiki, peft):
            model = library.get_peft_model(tiny_llama(), library.LoraConfig(**{**LORA, "lora_dropout": 0.1}))
            model.train()
            model.load_adapter(str(tmp_path / "a"), adapter_name="other", is_trainable=trainable)
            assert model.training is training_after, library.__name__
            assert any(m.training for m in model.modules()) is training_after, library.__name__


@pytest.mark.parametrize("extra", [{}, {"modules_to_save": ["lm_head"]}])
def test_load_adapter_to_train_marks_the_same_parameters_trainable_as_hf_peft(tmp_path, extra):
    """A second adapter loaded with is_trainable=True is trainable beside the active one, not frozen."""
    tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA, **extra)).save_pretrained(tmp_path / "a")
    trainable = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(**LORA, **extra))
        model.load_adapter(str(tmp_path / "a"), adapter_name="other", is_trainable=True)
        trainable[library] = {n for n, p in model.named_parameters() if p.requires_grad}
        assert model.active_adapter == "default"
    assert any(".other." in n for n in trainable[tsugiki])
    assert trainable[tsugiki] == trainable[peft]


def test_adapters_loaded_to_train_stay_trainable_when_more_are_loaded_or_added(tmp_path):
    """HF PEFT keeps each adapter's trainable flag as more adapters arrive; code training two at
    once builds its optimizer after loading them all."""
    tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA)).save_pretrained(tmp_path / "a")
    trainable = {}
    for library in (tsugiki, peft):
        model = library.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), is_trainable=True)
        model.load_adapter(str(tmp_path / "a"), adapter_name="b", is_trainable=True)
        model.load_adapter(str(tmp_path / "a"), adapter_name="frozen")
        model.add_adapter("added", library.LoraConfig(r=2, target_modules=["q_proj"]))
        model.load_adapter(str(tmp_path / "a"), adapter_name="b2", is_trainable=True)
        trainable[library] = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable[tsugiki] == {"default", "b", "b2"} == trainable[peft]


def test_load_adapter_into_an_existing_name_that_does_not_fit_changes_nothing(tmp_path):
    wider = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**{**LORA, "r": 8}))
    wider.save_pretrained(tmp_path / "r8")
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model)
    before = _lora_values(model)
    with pytest.raises(AdapterLoadError, match=r"shape \(8, \d+\) in the file but \(4, \d+\) in the model"):
        model.load_adapter(tmp_path / "r8", adapter_name="default")
    after = _lora_values(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert list(model.peft_config) == ["default"]


def test_saved_files_get_the_permissions_any_new_file_gets(tmp_path):
    # Written to a private temporary name and renamed, they must not stay private (0600).
    old = os.umask(0o022)
    try:
        tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2)).save_pretrained(tmp_path)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == modes["plain.txt"] == 0o644


def _alpaca_lora_style(library, model):
    """alpaca-lora's finetune.py: model.state_dict replaced by one returning the adapter's file keys."""
    whole = model.state_dict
    model.state_dict = (lambda self, *_, **__: library.get_peft_model_state_dict(self, whole())).__get__(
        model, type(model))
    return model


def test_a_state_dict_replaced_as_alpaca_lora_does_saves_the_same_adapter_as_hf_peft(tmp_path):
    files = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(**LORA))
        randomize_adapters(model, seed=3)
        plain = model.state_dict()
        _alpaca_lora_style(library, model).save_pretrained(tmp_path / library.__name__)
        files[library] = load_file(tmp_path / library.__name__ / "adapter_model.safetensors")
        # The file-form dict handed back as save_pretrained's state_dict is taken as it is.
        model.save_pretrained(tmp_path / f"{library.__name__}-given", state_dict=model.state_dict())
        again = load_file(tmp_path / f"{library.__name__}-given" / "adapter_model.safetensors")
        assert again.keys() == files[library].keys() and all(torch.equal(again[k], files[library][k]) for k in again)
        assert any(".lora_A.default." in k for k in plain)
    assert files[tsugiki].keys() == files[peft].keys() and len(files[tsugiki]) == 12  # 3 targets x 2 layers x A, B
    assert all(torch.equal(files[tsugiki][k], files[peft][k]) for k in files[peft])


def test_a_state_dict_without_the_adapter_is_refused_and_nothing_is_written(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    with pytest.raises(ValueError, match=r"holds none of adapter 'default''s tensors .*lora_A\.default\.weight"):
        model.save_pretrained(tmp_path / "out", state_dict={"some.other.weight": torch.zeros(2)})
    assert not (tmp_path / "out").exists()


def test_hf_peft_keyword_arguments_of_the_state_dict_functions_and_load_adapter(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    randomize_adapters(model, seed=4)
    state = tsugiki.get_peft_model_state_dict(model, unwrap_compiled=True, save_embedding_layers=False)
    other = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    result = tsugiki.set_peft_model_state_dict(other, state, low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []

    # A tensor of another shape: an error that loads nothing, or left out with a warning when asked.
    key = next(k for k in state if k.endswith("lora_A.weight"))
    bad = {**state, key: torch.zeros(7, 3)}
    fresh = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**LORA))
    with pytest.raises(AdapterLoadError, match=r"has shape \(7, 3\) in the file"):
        tsugiki.set_peft_model_state_dict(fresh, bad)
    before = tsugiki.get_peft_model_state_dict(fresh)[key].clone()
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of another shape left out"):
        tsugiki.set_peft_model_state_dict(fresh, bad, ignore_mismatched_sizes=True)
    loaded = tsugiki.get_peft_model_state_dict(fresh)
    assert torch.equal(loaded[key], before)
    assert all(torch.equal(loaded[k], state[k]) for k in state if k != key)

    model.save_pretrained(tmp_path / "a")
    result = other.load_adapter(tmp_path / "a", adapter_name="second")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])


def test_a_config_rebuilds_from_its_own_or_hf_peft_s_dict():
    """`LoraConfig(**config.to_dict())` and `LoraConfig(**json of an HF PEFT adapter_config)` work as in HF PEFT."""
    ours = tsugiki.LoraConfig(**LORA)
    assert tsugiki.LoraConfig(**ours.to_dict()) == ours
    from_theirs = tsugiki.LoraConfig(**peft.LoraConfig(**LORA).to_dict())  # (a set of targets: stored sorted)
    assert from_theirs == tsugiki.LoraConfig(**{**LORA, "target_modules": sorted(LORA["target_modules"])})
    with pytest.raises(ValueError, match="peft_type='LOHA' is not LoraConfig's"):
        tsugiki.LoraConfig(**{**ours.to_dict(), "peft_type": "LOHA"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_rnak'"):
        tsugiki.LoraConfig(lora_rnak=8)

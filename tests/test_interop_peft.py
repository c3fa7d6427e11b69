"""Adapters move between tsugiki and HF PEFT in both directions with the same logits."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import tsugiki
from tiny_models import (randomize_adapters, tiny_bert_classifier, tiny_bert_question_answering, tiny_gpt2,
                         tiny_llama, tiny_roberta_classifier, token_batch)

ATOL = 1e-5

CASES = {
    "llama-default": (tiny_llama, dict(r=4, lora_alpha=8, task_type="CAUSAL_LM")),
    "llama-all-linear-rslora-patterns": (tiny_llama, dict(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear", use_rslora=True,
        rank_pattern={"o_proj": 2, "model.layers.1.mlp.up_proj": 6}, alpha_pattern={"down_proj": 3})),
    "llama-modules-to-save-embedding": (tiny_llama, dict(
        r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "embed_tokens"],
        modules_to_save=["lm_head"])),
    "llama-layers": (tiny_llama, dict(
        r=3, lora_alpha=6, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
        layers_to_transform=[1], layers_pattern="layers")),
    "llama-regex": (tiny_llama, dict(
        r=3, lora_alpha=6, task_type="CAUSAL_LM", target_modules=r".*layers\.0\..*(q_proj|up_proj)",
        exclude_modules=["model.layers.0.mlp.up_proj"])),
    "gpt2-default": (tiny_gpt2, dict(r=4, lora_alpha=8, task_type="CAUSAL_LM")),
    "bert-classifier": (tiny_bert_classifier, dict(r=4, lora_alpha=8, task_type="SEQ_CLS")),
    "roberta-classifier": (tiny_roberta_classifier, dict(r=4, lora_alpha=8, task_type="SEQ_CLS")),
    "roberta-classifier-all-linear": (tiny_roberta_classifier, dict(r=4, task_type="SEQ_CLS",
                                                                    target_modules="all-linear")),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _nudge(model, marker, seed, scale):
    """Add seeded noise to the parameters whose names contain ``marker``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _randomize_heads(model, seed=5):
    # modules_to_save copies start equal to the original: change them so the test sees them.
    _nudge(model, ".modules_to_save.", seed, 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tsugiki_adapter_loads_in_hf_peft(case, tmp_path):
    make, kwargs = CASES[case]
    ids = token_batch()
    model = tsugiki.get_peft_model(make(), tsugiki.LoraConfig(**kwargs))
    randomize_adapters(model)
    _randomize_heads(model)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(make(), ids), expected, atol=1e-4), "adapter had no effect"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_peft_adapter_loads_in_tsugiki(case, tmp_path):
    make, kwargs = CASES[case]
    ids = token_batch()
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    randomize_adapters(theirs)
    _randomize_heads(theirs)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path))

    ours = tsugiki.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)


def test_a_question_answering_adapter_trains_and_saves_its_head_as_hf_peft_does(tmp_path):
    kwargs = dict(r=4, task_type="QUESTION_ANS", target_modules=["query", "value"])
    ours = tsugiki.get_peft_model(tiny_bert_question_answering(), tsugiki.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_bert_question_answering(), peft.LoraConfig(**kwargs))
    assert ours.peft_config["default"].modules_to_save == ["qa_outputs"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize_adapters(ours)
    _randomize_heads(ours)
    ids = token_batch()
    with torch.no_grad():
        expected = ours(input_ids=ids).start_logits
    ours.save_pretrained(tmp_path)
    assert "base_model.model.qa_outputs.weight" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = peft.PeftModel.from_pretrained(tiny_bert_question_answering(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).start_logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_hf_peft_adapter_with_an_init_tsugiki_lacks_loads_but_cannot_be_created(init, tmp_path):
    ids = token_batch()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    randomize_adapters(theirs)
    base_logits = _logits(tiny_llama(), ids)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path))
    ours = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, base_logits, atol=1e-4)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is an HF PEFT initialisation tsugiki does not"):
        tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, init_lora_weights=init))


def test_all_linear_leaves_a_trained_head_whole_as_hf_peft_does():
    config = dict(r=4, task_type="SEQ_CLS", target_modules="all-linear")
    ours = tsugiki.get_peft_model(tiny_roberta_classifier(), tsugiki.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_roberta_classifier(), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert not [n for n in ours.targeted_module_names if n.startswith("classifier")]


def test_hf_peft_config_keys_at_their_defaults_load_without_a_warning(tmp_path, recwarn):
    for kind, config in (("lora", peft.LoraConfig(r=4)), ("loha", peft.LoHaConfig(r=4))):
        peft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / kind))
        tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / kind)
    assert not [w for w in recwarn if "adapter config" in str(w.message)]
    path = tmp_path / "lora" / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "option_of_a_later_version": [[0, 2]], "qalora_group_size": 32}))
    with pytest.warns(UserWarning, match=r"does not support: option_of_a_later_version=\[\[0, 2\]\], "
                                         r"qalora_group_size=32$"):
        tsugiki.PeftConfig.from_pretrained(tmp_path / "lora")


def test_an_hf_peft_adapter_computing_what_tsugiki_does_not_is_refused(tmp_path):
    """An Activated LoRA applies its update only from its invocation tokens on: loaded as a plain
    LoRA it would answer differently, so it is refused, naming the setting."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                             task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 6\] \(Activated LoRA.*Use HF PEFT"):
        tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unload_keeps_the_trained_head_as_hf_peft_does(tmp_path):
    ids = token_batch()
    theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(r=4, task_type="SEQ_CLS"))
    randomize_adapters(theirs)
    _randomize_heads(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = tsugiki.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    expected = _logits(theirs.unload(), ids)
    assert not torch.allclose(expected, _logits(tiny_bert_classifier(), ids), atol=1e-4)  # the head is trained
    torch.testing.assert_close(_logits(ours.unload(), ids), expected, atol=ATOL, rtol=0)


def test_second_named_adapter_both_ways(tmp_path):
    ids = token_batch()
    ours = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, task_type="CAUSAL_LM"))
    ours.add_adapter("other", tsugiki.LoraConfig(r=2, lora_alpha=16, target_modules=["k_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    randomize_adapters(ours)
    expect_default = _logits(ours, ids)
    ours.set_adapter("other")
    expect_other = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours" / "other")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    theirs.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    torch.testing.assert_close(_logits(theirs, ids), expect_default, atol=ATOL, rtol=0)
    theirs.set_adapter("other")
    torch.testing.assert_close(_logits(theirs, ids), expect_other, atol=ATOL, rtol=0)

    # And back: HF PEFT saves both, tsugiki loads both.
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    back.load_adapter(tmp_path / "theirs" / "other", adapter_name="other")
    torch.testing.assert_close(_logits(back, ids), expect_default, atol=ATOL, rtol=0)
    back.set_adapter("other")
    torch.testing.assert_close(_logits(back, ids), expect_other, atol=ATOL, rtol=0)


def test_file_form_matches_hf_peft(tmp_path):
    kwargs = dict(r=4, lora_alpha=8, task_type="SEQ_CLS")
    ours = tsugiki.get_peft_model(tiny_bert_classifier(), tsugiki.LoraConfig(**kwargs))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(str(tmp_path / "theirs"))

    ours_w = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_w = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_w) == sorted(theirs_w)
    assert {k: v.shape for k, v in ours_w.items()} == {k: v.shape for k, v in theirs_w.items()}
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in ours_w
    assert "base_model.model.classifier.weight" in ours_w

    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "modules_to_save",
                "inference_mode", "base_model_name_or_path", "revision", "bias", "use_rslora"):
        a, b = ours_cfg[key], theirs_cfg[key]
        if isinstance(a, list):
            a, b = sorted(a), sorted(b)
        assert a == b, key


def test_default_targets_are_hf_pefts_where_it_has_them():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs
    from tsugiki.inject import DEFAULT_TARGETS

    differ = {t: (sorted(DEFAULT_TARGETS[t]), sorted(theirs[t])) for t in DEFAULT_TARGETS
              if t in theirs and not isinstance(theirs[t], str) and sorted(DEFAULT_TARGETS[t]) != sorted(theirs[t])}
    assert differ == {}


def _trained_in_place(model, seed=4):
    # Stand in for training: move every adapter weight away from its PiSSA/OLoRA start.
    _nudge(model, "lora_", seed, 0.05)


FACTORED = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("made_by, loaded_by", [(peft, tsugiki), (tsugiki, peft), (tsugiki, tsugiki)])
def test_pissa_and_olora_adapters_load_onto_the_original_base(init, made_by, loaded_by, tmp_path):
    """They were trained on W - s B0 A0: loading recomputes that residual from the original W."""
    ids = token_batch()
    model = made_by.get_peft_model(tiny_llama(), made_by.LoraConfig(init_lora_weights=init, **FACTORED))
    _trained_in_place(model)
    trained = _logits(model, ids)
    model.save_pretrained(str(tmp_path / "a"))
    loaded = loaded_by.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    torch.testing.assert_close(_logits(loaded, ids), trained, atol=ATOL, rtol=0)
    assert (trained - _logits(tiny_llama(), ids)).abs().max() > 1e-2  # the adapter does change the answer


def test_a_seeded_randomized_pissa_start_repeats_on_load(tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(init_lora_weights="pissa_niter_2", **FACTORED))
    _trained_in_place(model)
    model.save_pretrained(tmp_path / "a")
    torch.manual_seed(123)  # another global RNG state: the start does not depend on it
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init, options", [("pissa", {}), ("olora", {"rank_pattern": {"v_proj": 2}}),
                                           ("pissa", {"use_rslora": True, "alpha_pattern": {"q_proj": 3}})])
def test_a_converted_pissa_or_olora_adapter_is_plain_lora_for_the_original_base(init, options, tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(init_lora_weights=init, **FACTORED, **options))
    model.save_pretrained(tmp_path / "start")
    _trained_in_place(model)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "start")
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    loaders = (tsugiki,) if options.get("use_rslora") else (tsugiki, peft)  # PEFT refuses rsLoRA with patterns
    for library in loaders:
        loaded = library.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "plain"))
        torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=ATOL, rtol=0)
    # HF PEFT's own conversion writes the same adapter.
    if not options.get("use_rslora"):
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=init, **FACTORED, **options))
        theirs.save_pretrained(str(tmp_path / "theirs_start"))
        _trained_in_place(theirs)
        theirs.save_pretrained(str(tmp_path / "theirs"), path_initial_model_for_weight_conversion=str(tmp_path / "theirs_start"))
        ours_w, theirs_w = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "theirs"))
        assert sorted(ours_w) == sorted(theirs_w)
        for key in ours_w:
            torch.testing.assert_close(ours_w[key], theirs_w[key], atol=1e-5, rtol=0)


def test_conversion_is_refused_where_it_cannot_hold(tmp_path):
    plain = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**FACTORED))
    plain.save_pretrained(tmp_path / "start")
    with pytest.raises(ValueError, match="converts PiSSA/OLoRA adapters; this one has init_lora_weights=True"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "start")
    pissa = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(init_lora_weights="pissa", **{**FACTORED, "r": 2}))
    with pytest.raises(ValueError, match=r"start: base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight is of shape \(4, 16\), not \(2, 16\); give the folder where this adapter was saved right after get_peft_model"):
        pissa.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "start")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="path_initial_model_for_weight_conversion=.*holds no adapter"):
        pissa.save_pretrained(tmp_path / "out2", path_initial_model_for_weight_conversion=tmp_path / "nowhere")
    assert not (tmp_path / "out2").exists()  # nothing written


def test_dora_parameters_have_hf_pefts_names():
    """Code that reaches for ``lora_magnitude_vector[name].weight``, or filters parameters by name, runs on both."""
    config = dict(r=2, use_dora=True, target_modules=["q_proj", "v_proj"])
    ours = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    names = {lib: sorted(n for n, p in m.named_parameters() if p.requires_grad)
             for lib, m in (("ours", ours), ("theirs", theirs))}
    assert names["ours"] == names["theirs"]
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].weight.shape == (layer.out_features,)


def test_a_second_adapter_beside_a_pissa_one_is_warned_about(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(init_lora_weights="pissa", **FACTORED))
    with pytest.warns(UserWarning, match=r"\['default'\] \(PiSSA/OLoRA\) changed the base weights"):
        model.add_adapter("other", tsugiki.LoraConfig(**FACTORED))


def test_an_hf_peft_classifier_adapter_with_every_bias_trained_loads_strictly(tmp_path):
    """bias="all" on a SEQ_CLS model: HF PEFT's file also holds the head's biases under
    ``classifier.modules_to_save.bias`` and ``classifier.original_module.bias``."""
    ids = token_batch()
    config = dict(r=2, task_type="SEQ_CLS", bias="all")
    theirs = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(**config))
    randomize_adapters(theirs)
    _nudge(theirs, "bias", 7, 0.1)
    theirs.save_pretrained(str(tmp_path))
    assert "base_model.model.classifier.original_module.bias" in load_file(tmp_path / "adapter_model.safetensors")
    ours = tsugiki.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-6, rtol=0)
    fresh = tsugiki.get_peft_model(tiny_bert_classifier(), tsugiki.LoraConfig(**config))
    assert fresh.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # not the frozen head's bias


def test_hf_peft_helper_names_behave_as_hf_peft_s(tmp_path):
    ids = token_batch()
    results = {}
    for library in (tsugiki, peft):
        torch.manual_seed(0)  # both draw A and B the same way, so the random starts agree
        config = library.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        model = library.inject_adapter_in_model(config, tiny_llama())
        results[library] = (type(model), sorted(n for n, p in model.named_parameters() if p.requires_grad),
                            _logits(model, ids))
        assert library.get_peft_config({"peft_type": "LORA", "r": 3}).r == 3
        prompt = library.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                            prompt_tuning_init=library.PromptTuningInit.SAMPLE_VOCAB)
        assert prompt.prompt_tuning_init == "SAMPLE_VOCAB" and isinstance(prompt, library.PromptLearningConfig)
        encoder = library.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8,
                                              encoder_reparameterization_type=library.PromptEncoderReparameterizationType.LSTM)
        assert encoder.encoder_reparameterization_type == "LSTM"
    assert results[tsugiki][:2] == results[peft][:2]
    torch.testing.assert_close(results[tsugiki][2], results[peft][2], atol=1e-6, rtol=0)

    saved = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(saved)
    saved.save_pretrained(str(tmp_path))
    ours, theirs = tsugiki.load_peft_weights(tmp_path), peft.load_peft_weights(str(tmp_path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ValueError, match="use get_peft_model"):
        tsugiki.inject_adapter_in_model(tsugiki.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                                        tiny_llama())


def test_state_dict_functions_take_a_model_with_injected_adapters_as_hf_peft_s():
    """HF PEFT's low-level API: inject_adapter_in_model, then get/set_peft_model_state_dict on the plain model."""
    ids = token_batch()
    states, logits = {}, {}
    for library in (tsugiki, peft):
        config = library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        trained = library.inject_adapter_in_model(config, tiny_llama())
        randomize_adapters(trained)
        states[library] = library.get_peft_model_state_dict(trained)
        fresh = library.inject_adapter_in_model(config, tiny_llama())
        result = library.set_peft_model_state_dict(fresh, states[library])
        assert not result.unexpected_keys
        logits[library] = (_logits(trained, ids), _logits(fresh, ids))
    assert sorted(states[tsugiki]) == sorted(states[peft])  # "model.layers.0.self_attn.q_proj.lora_A.weight", ...
    torch.testing.assert_close(logits[tsugiki][1], logits[tsugiki][0], atol=0, rtol=0)
    # HF PEFT's tensors load into tsugiki's injected model and compute what HF PEFT's does.
    ours = tsugiki.inject_adapter_in_model(tsugiki.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tiny_llama())
    tsugiki.set_peft_model_state_dict(ours, states[peft])
    torch.testing.assert_close(_logits(ours, ids), logits[peft][0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        tsugiki.get_peft_model_state_dict(ours, adapter_name="other")


def test_layer_and_model_status_equal_hf_pefts():
    import dataclasses

    statuses = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_bert_classifier(), library.LoraConfig(
            r=2, task_type="SEQ_CLS", target_modules=["query", "value"]))
        model.add_adapter("other", library.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))
        model.merge_adapter()  # merged in the LoRA layers, not in the head: "irregular" over the model
        layers = [dataclasses.asdict(s) for s in model.get_layer_status()]
        for layer in layers:
            layer.pop("module_type")  # the classes' own names
        statuses[library] = (layers, dataclasses.asdict(model.get_model_status()), model.modules_to_save,
                             model.base_model_torch_dtype)
    assert statuses[tsugiki] == statuses[peft]
    assert statuses[tsugiki][1]["merged_adapters"] == "irregular"
    assert statuses[tsugiki][1]["requires_grad"] == {"default": True, "other": False}


def test_merged_adapters_on_different_modules_are_reported_as_hf_peft_does():
    merged = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                       adapter_name="a")
        model.add_adapter("b", library.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "down_proj"]))
        model.merge_adapter()
        after_a = model.get_model_status().merged_adapters
        model.merge_adapter(["b"])
        merged[library] = (after_a, model.get_model_status().merged_adapters)
    assert merged[tsugiki] == merged[peft] == (["a"], ["a", "b"])


def test_config_names_are_enums_as_in_hf_peft(tmp_path):
    for library in (tsugiki, peft):
        config = library.LoraConfig(task_type=library.TaskType.CAUSAL_LM)  # HF PEFT keeps a string given as one
        assert isinstance(config.peft_type, library.PeftType) and isinstance(config.task_type, library.TaskType)
        assert (config.peft_type.value, config.peft_type.name, config.task_type.value) == ("LORA", "LORA", "CAUSAL_LM")
        assert config.peft_type == "LORA" and config.task_type == library.TaskType.CAUSAL_LM
    assert tsugiki.LoraConfig(task_type="CAUSAL_LM").task_type.value == "CAUSAL_LM"
    # ... and written as plain strings, read back as enums.
    tsugiki.LoraConfig(task_type=tsugiki.TaskType.SEQ_CLS).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"]) == ("LORA", "SEQ_CLS")
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).task_type == peft.TaskType.SEQ_CLS
    assert tsugiki.PeftConfig.from_pretrained(tmp_path).task_type.value == "SEQ_CLS"


def test_hf_peft_submodule_imports_work_with_the_package_name_changed(tmp_path):
    """Tutorial lines such as ``from peft.utils import ...`` and ``from peft.tuners.lora import LoraLayer``."""
    import importlib

    for library in (tsugiki, peft):
        utils = importlib.import_module(f"{library.__name__}.utils")
        lora = importlib.import_module(f"{library.__name__}.tuners.lora")
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        embed = model.base_model.model.model.embed_tokens
        assert isinstance(q_proj, lora.LoraLayer) and isinstance(q_proj, lora.Linear)
        assert isinstance(embed, lora.Embedding) and isinstance(model.base_model, lora.LoraModel)
        assert utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"] == ["q_proj", "v_proj"]
        assert (utils.CONFIG_NAME, utils.SAFETENSORS_WEIGHTS_NAME, utils.WEIGHTS_NAME) == (
            "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
        assert utils.get_peft_model_state_dict(model).keys() == library.get_peft_model_state_dict(model).keys()
        assert callable(utils.prepare_model_for_kbit_training) and utils.infer_device() == peft.utils.infer_device()
        config = library.PeftConfig.from_peft_type(peft_type="LORA", r=3)
        assert type(config).__name__ == "LoraConfig" and config.r == 3
        config.save_pretrained(str(tmp_path / library.__name__))
        loaded = library.LoraConfig.from_json_file(str(tmp_path / library.__name__ / "adapter_config.json"))
        assert isinstance(loaded, dict) and loaded["r"] == 3 and loaded["peft_type"] == "LORA"


def test_layer_base_and_on_off_switch_behave_as_hf_peft_s():
    ids = token_batch()
    results = {}
    for library in (tsugiki, peft):
        torch.manual_seed(0)
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=2, target_modules=["q_proj"],
                                                                         init_lora_weights=False))
        layers = [m for m in model.modules() if isinstance(m, library.tuners.lora.LoraLayer)]
        adapted, switches = _logits(model, ids), []
        for enabled in (False, True):
            for layer in layers:
                layer.enable_adapters(enabled)
            switches.append((_logits(model, ids), layers[0].disable_adapters,
                             {p.requires_grad for n, p in model.named_parameters() if "lora_" in n}))
        results[library] = (type(layers[0].get_base_layer()), adapted, switches)
    for library, (base_type, adapted, ((off, disabled, frozen), (on, enabled, trainable))) in results.items():
        assert base_type is torch.nn.Linear and (disabled, frozen, enabled, trainable) == (True, {False}, False, {True})
        torch.testing.assert_close(on, adapted, atol=0, rtol=0)
    torch.testing.assert_close(results[tsugiki][2][0][0], results[peft][2][0][0], atol=1e-6, rtol=0)  # off = base
    torch.testing.assert_close(results[tsugiki][1], results[peft][1], atol=1e-6, rtol=0)


# -- layer API beside HF PEFT's: scaling, merging ----------------------------------------------
def _twins(make=tiny_llama, **config):
    """The same base with the same random LoRA weights, in tsugiki and in HF PEFT, in eval mode."""
    models = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(make(), library.LoraConfig(**config))
        randomize_adapters(model)
        models[library] = model.eval()
    return models


def _lora_layers(model, library):
    return [m for m in model.modules() if isinstance(m, library.tuners.lora.LoraLayer)]


def _assert_same_outputs(models, ids, grad=False):
    """Logits equal HF PEFT's, on the inference path (no autograd) or the training one (autograd on)."""
    with torch.set_grad_enabled(grad):
        ours, theirs = (models[library](input_ids=ids).logits.detach() for library in (tsugiki, peft))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    return ours


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_scale_scale_layer_and_unscale_layer_give_hf_pefts_outputs(use_rslora):
    ids = token_batch()
    models = _twins(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["q_proj", "v_proj", "down_proj"])
    before = _assert_same_outputs(models, ids)
    steps = [("set_scale", ("default", 0.5)), ("scale_layer", (3,)), ("unscale_layer", (3,)),
             ("scale_layer", (2.5,)), ("unscale_layer", ())]
    seen = []
    for method, args in steps:
        for library, model in models.items():
            for layer in _lora_layers(model, library):
                getattr(layer, method)(*args)
        scalings = [[layer.scaling["default"] for layer in _lora_layers(models[lib], lib)] for lib in (tsugiki, peft)]
        assert scalings[0] == pytest.approx(scalings[1], rel=1e-12), method
        seen.append(_assert_same_outputs(models, ids))
        _assert_same_outputs(models, ids, grad=True)
    assert not torch.allclose(seen[0], before, atol=1e-4), "set_scale(0.5) had no effect"
    assert not torch.allclose(seen[1], seen[0], atol=1e-4), "scale_layer(3) had no effect"
    torch.testing.assert_close(seen[2], seen[0], atol=ATOL, rtol=0)  # unscale_layer(3) undoes scale_layer(3)
    torch.testing.assert_close(seen[4], before, atol=ATOL, rtol=0)  # unscale_layer() restores alpha / r


def test_generate_after_set_scale_gives_hf_pefts_tokens():
    ids = token_batch(batch=1)
    models = _twins(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    scores = {}
    for library, model in models.items():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # builds tsugiki's cached state
        for layer in _lora_layers(model, library):
            layer.set_scale("default", 4.0)
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        scores[library] = torch.stack(out.scores)
    torch.testing.assert_close(scores[tsugiki], scores[peft], atol=ATOL, rtol=0)


def test_set_scale_on_an_embedding_adapter_gives_hf_pefts_outputs():
    ids = token_batch()
    models = _twins(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    before = _assert_same_outputs(models, ids)
    for library, model in models.items():
        for layer in _lora_layers(model, library):
            layer.set_scale("default", 3.0)
    assert not torch.allclose(_assert_same_outputs(models, ids), before, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_layer_merge_and_unmerge_without_names_give_hf_pefts_weights(use_dora):
    ids = token_batch()
    models = _twins(r=4, lora_alpha=8, use_dora=use_dora, target_modules=["q_proj", "v_proj"])
    for library, model in models.items():
        model.add_adapter("other", library.LoraConfig(r=2, lora_alpha=6, use_dora=use_dora,
                                                      target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, seed=9)
        model.base_model.set_adapter("other")
    active = _assert_same_outputs(models, ids)
    weights = {}
    for library, model in models.items():
        for layer in _lora_layers(model, library):
            layer.merge(safe_merge=True)
        weights[library] = [layer.get_base_layer().weight.detach().clone() for layer in _lora_layers(model, library)]
        assert {tuple(layer.merged_adapters) for layer in _lora_layers(model, library)} == {("other",)}
    for ours, theirs in zip(weights[tsugiki], weights[peft]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(_assert_same_outputs(models, ids), active, atol=ATOL, rtol=0)
    for library, model in models.items():
        for layer in _lora_layers(model, library):
            layer.unmerge()
        assert not any(layer.merged for layer in _lora_layers(model, library))
    torch.testing.assert_close(_assert_same_outputs(models, ids), active, atol=ATOL, rtol=0)


def test_layer_merge_of_two_named_adapters_gives_hf_pefts_weights():
    models = _twins(r=4, lora_alpha=8, target_modules=["q_proj"])
    for library, model in models.items():
        model.add_adapter("other", library.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj"]))
        randomize_adapters(model, seed=9)
        for layer in _lora_layers(model, library):
            layer.merge(adapter_names=["default", "other"])
    for ours, theirs in zip(*([layer.get_base_layer().weight for layer in _lora_layers(models[library], library)]
                              for library in (tsugiki, peft))):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# -- model API beside HF PEFT's: has_active_enabled_adapter, set_requires_grad, add_weighted_adapter --
def test_has_active_enabled_adapter_follows_disable_adapter_as_in_hf_peft():
    for library, model in _twins(r=2, target_modules=["q_proj"]).items():
        assert model.has_active_enabled_adapter is True, library.__name__
        with model.disable_adapter():
            assert model.has_active_enabled_adapter is False, library.__name__
        assert model.has_active_enabled_adapter is True, library.__name__


def test_has_active_enabled_adapter_is_false_with_layers_disabled_or_no_adapter_left():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.disable_adapter_layers()
    assert model.has_active_enabled_adapter is False
    model.base_model.enable_adapter_layers()
    assert model.has_active_enabled_adapter is True
    model.delete_adapter("default")
    assert model.has_active_enabled_adapter is False


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_set_requires_grad_changes_the_same_parameters_as_hf_pefts():
    trainable = {}
    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_bert_classifier(), library.LoraConfig(r=2, task_type="SEQ_CLS"))
        model.add_adapter("other", library.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["key"]))
        steps = [_trainable(model)]
        model.set_requires_grad("other")
        steps.append(_trainable(model))
        model.set_requires_grad(["default", "other"], requires_grad=False)
        steps.append(_trainable(model))
        model.set_requires_grad(["default"], True)
        steps.append(_trainable(model))
        trainable[library] = (steps, model.active_adapter)
    assert trainable[tsugiki] == trainable[peft]
    steps, active = trainable[tsugiki]
    assert active == "default" and any(".other." in n for n in steps[1]) and not steps[2]  # each step did something


def test_set_requires_grad_refuses_unknown_adapters_and_prompt_methods():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _trainable(model)
    with pytest.raises(ValueError, match="'typo'.*have: default"):
        model.set_requires_grad(["default", "typo"], False)
    assert _trainable(model) == before  # nothing changed
    prompt = tsugiki.get_peft_model(tiny_llama(), tsugiki.PromptTuningConfig(num_virtual_tokens=2,
                                                                                task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="prompt-learning"):
        prompt.set_requires_grad("default")


def test_base_model_add_weighted_adapter_gives_hf_pefts_combination():
    ids = token_batch()
    models = _twins(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for library, model in models.items():
        model.add_adapter("other", library.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, seed=9)
        model.base_model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", combination_type="cat")
        model.set_adapter("mix")
    assert models[tsugiki].peft_config["mix"].r == models[peft].peft_config["mix"].r == 6
    combined = _assert_same_outputs(models, ids)
    for model in models.values():
        model.set_adapter("default")
    assert not torch.allclose(_assert_same_outputs(models, ids), combined, atol=1e-4)


# -- several active LoRA adapters ---------------------------------------------------------------
def _two_active(**other):
    models = _twins(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    for library, model in models.items():
        model.add_adapter("other", library.LoraConfig(r=2, lora_alpha=6, **other))
        randomize_adapters(model, seed=9)
        with torch.no_grad():
            model(input_ids=token_batch())  # tsugiki keeps state for one active adapter: it must not stay
        model.base_model.set_adapter(["default", "other"])
    return models


def test_several_active_adapters_add_up_as_in_hf_peft():
    ids = token_batch()
    models = _two_active(target_modules=["q_proj", "down_proj"])
    both = _assert_same_outputs(models, ids)
    _assert_same_outputs(models, ids, grad=True)
    assert _trainable(models[tsugiki]) == _trainable(models[peft])
    assert models[tsugiki].active_adapters == models[peft].active_adapters == ["default", "other"]
    scores = {}
    for library, model in models.items():
        out = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0)
        scores[library] = torch.stack(out.scores)
    torch.testing.assert_close(scores[tsugiki], scores[peft], atol=ATOL, rtol=0)
    for library, model in models.items():
        model.base_model.set_adapter("default")
    alone = _assert_same_outputs(models, ids)
    assert not torch.allclose(alone, both, atol=1e-4), "the second adapter had no effect"


def test_merging_several_active_adapters_merges_both_as_in_hf_peft():
    ids = token_batch()
    models = _two_active(target_modules=["q_proj"])
    both = _assert_same_outputs(models, ids)
    for model in models.values():
        model.merge_adapter()
    for library, model in models.items():
        carrying_both = [m for m in _lora_layers(model, library) if "other" in m.r]
        assert carrying_both and {tuple(m.merged_adapters) for m in carrying_both} == {("default", "other")}
    torch.testing.assert_close(_assert_same_outputs(models, ids), both, atol=ATOL, rtol=0)


def test_deleting_one_of_several_active_adapters_keeps_the_other_active_as_in_hf_peft():
    ids = token_batch()
    models = _two_active(target_modules=["q_proj"])
    for model in models.values():
        model.delete_adapter("default")
    assert models[tsugiki].base_model.active_adapters == models[peft].base_model.active_adapters == ["other"]
    _assert_same_outputs(models, ids)


def test_several_active_adapters_are_refused_where_they_cannot_add_up():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("dora", tsugiki.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA.*'dora'"):
        model.base_model.set_adapter(["default", "dora"])
    with pytest.raises(ValueError, match="'typo'.*have: default, dora"):
        model.base_model.set_adapter(["default", "typo"])
    assert model.active_adapters == ["default"]
    heads = tsugiki.get_peft_model(tiny_bert_classifier(), tsugiki.LoraConfig(r=2, task_type="SEQ_CLS"))
    heads.add_adapter("b", tsugiki.LoraConfig(r=2, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="modules_to_save"):
        heads.base_model.set_adapter(["default", "b"])
    ia3 = tsugiki.get_peft_model(tiny_llama(), tsugiki.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.add_adapter("b", tsugiki.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(TypeError, match="one adapter at a time"):
        ia3.base_model.set_adapter(["default", "b"])

"""(IA)^3: scaling rule, training, files, merging, HF PEFT interop, CLI, config errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import tsugiki
from tsugiki.methods.ia3 import IA3Config, IA3Linear
from tiny_models import TinyMLP, tiny_gpt2, tiny_llama, token_batch

ATOL = 1e-5


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_layer_scales_output_or_input_and_merges_exactly(feedforward, conv1d):
    torch.manual_seed(0)
    base = Conv1D(5, 6) if conv1d else nn.Linear(6, 5)
    if conv1d:
        nn.init.normal_(base.bias)
    layer = IA3Linear(base, is_feedforward=feedforward, fan_in_fan_out=conv1d)
    layer.update_layer("default", init=False)
    layer.set_adapter("default")
    x = torch.randn(3, 6)
    l = layer.ia3_l["default"].flatten()
    assert layer.ia3_l["default"].shape == ((1, 6) if feedforward else (5, 1))  # HF PEFT's shapes
    expected = base(x * l) if feedforward else base(x) * l
    torch.testing.assert_close(layer(x), expected)

    with torch.no_grad():
        layer.ia3_l["default"].view(-1)[1] = 0.0  # a zero scale: unmerge must still restore the base
    expected = layer(x).detach()
    before_w, before_b = base.weight.detach().clone(), base.bias.detach().clone()
    layer.merge("default")
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    layer.unmerge("default")
    torch.testing.assert_close(base.weight, before_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(base.bias, before_b, atol=1e-6, rtol=0)


def test_defaults_follow_hf_and_start_as_a_no_op():
    ids = token_batch()
    base = _logits(tiny_llama(), ids)
    model = tsugiki.get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    cfg = model.peft_config["default"]
    assert sorted(cfg.target_modules) == ["down_proj", "k_proj", "v_proj"] and cfg.feedforward_modules == ["down_proj"]
    layers = model.base_model.model.model.layers[0]
    assert layers.mlp.down_proj.is_feedforward and not layers.self_attn.k_proj.is_feedforward
    torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * (8 + 8 + 32)  # k, v: out 8 each (1 kv head x 8); down_proj: in 32


def test_only_vectors_train_base_unchanged_and_loss_falls():
    model = tsugiki.get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" not in n}
    assert all(("ia3_l" in n) == p.requires_grad for n, p in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)
    ids = token_batch(batch=4, length=8)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_save_load_merge_generate(tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    _randomize(model)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())

    loaded.merge_adapter()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=ATOL, rtol=0)
    loaded.unmerge_adapter()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=ATOL, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded, ids), _logits(tiny_llama(), ids), atol=ATOL, rtol=0)
    out = loaded.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 7)

    plain = loaded.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), expected, atol=ATOL, rtol=0)


def test_two_adapters_and_mixed_batch():
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("other", IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]))
    _randomize(model)
    first = _logits(model, ids)
    model.set_adapter("other")
    second = _logits(model, ids)
    mixed = model(input_ids=ids, adapter_names=["default", "other"]).logits.detach()
    torch.testing.assert_close(mixed[0], first[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], second[1], atol=ATOL, rtol=0)


HF_CASES = {
    "llama-default": (tiny_llama, dict(task_type="CAUSAL_LM")),
    "llama-regex-ff": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=r".*\.(q_proj|o_proj|gate_proj)",
                                        feedforward_modules=r".*gate_proj", modules_to_save=["lm_head"])),
    "llama-layers": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"],
                                      feedforward_modules=["down_proj"], layers_to_transform=[1])),
    "gpt2-default": (tiny_gpt2, dict(task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_interop_with_hf_peft_both_ways(case, tmp_path):
    make, kwargs = HF_CASES[case]
    ids = token_batch()
    ours = tsugiki.get_peft_model(make(), IA3Config(**kwargs))
    _randomize(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1)
    expected = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(make(), ids), expected, atol=1e-4)

    hf_kwargs = {k: v for k, v in kwargs.items() if k not in ("layers_to_transform",)}
    if "layers_to_transform" in kwargs:  # HF's IA3Config has no layer option: name the modules
        hf_kwargs["target_modules"] = ours.peft_config["default"].target_modules
        hf_kwargs["feedforward_modules"] = ours.peft_config["default"].feedforward_modules
    theirs = peft.get_peft_model(make(), peft.IA3Config(**hf_kwargs))
    _randomize(theirs, seed=7)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = tsugiki.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, ids), expected, atol=ATOL, rtol=0)


def test_layers_to_transform_selects_and_records_exact_names():
    model = tsugiki.get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"], layers_to_transform=1))
    cfg = model.peft_config["default"]
    assert cfg.target_modules == ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    assert cfg.feedforward_modules == ["model.layers.1.mlp.down_proj"]
    assert not isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, IA3Linear)


def test_any_module_with_explicit_targets():
    model = tsugiki.get_peft_model(TinyMLP(), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"]))
    x = torch.randint(0, 20, (3, 4))
    assert model(x).shape == (3, 4)
    assert model.base_model.model.lin1.is_feedforward


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "subset of the targets"),
    (dict(init_ia3_weights="yes"), "init_ia3_weights"),
    (dict(target_modules=3), "target_modules"),
    (dict(target_modules="(["), "not a valid regular expression"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_pattern="layers"), "only applies together"),
])
def test_invalid_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**kwargs)


def test_unsupported_targets_and_unknown_architecture_are_clear_errors():
    with pytest.raises(ValueError, match="only linear layers"):
        tsugiki.get_peft_model(tiny_llama(), IA3Config(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="no default .* target_modules"):
        tsugiki.get_peft_model(TinyMLP(), IA3Config())


def test_config_json_round_trip_and_hf_keys(tmp_path):
    cfg = IA3Config(target_modules=["k_proj"], feedforward_modules=[], task_type="CAUSAL_LM")
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3" and "layers_to_transform" not in data
    assert tsugiki.PeftConfig.from_pretrained(tmp_path) == cfg


def test_train_method_ia3(tmp_path):
    from helpers_data import make_chat_tokenizer, tiny_llama as chat_llama

    model_dir = tmp_path / "model"
    chat_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"word {i % 3}"})
                              for i in range(8)) + "\n")
    result = tsugiki.train({"model": str(model_dir), "data": str(data), "output_dir": str(tmp_path / "run"),
                            "method": "ia3", "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2,
                            "dtype": "fp32", "tensorboard": False}, progress=False)
    assert result.metrics["steps"] == 2
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    loaded = tsugiki.PeftModel.from_pretrained(chat_llama(), tmp_path / "run")
    assert isinstance(loaded.base_model.model.model.layers[0].mlp.down_proj, IA3Linear)

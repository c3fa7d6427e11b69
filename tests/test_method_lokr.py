"""LoKr: delta_W = kron(W1, W2) * alpha / r, W2 (and with decompose_both W1) optionally low-rank."""

from __future__ import annotations

import peft
import pytest
import torch

import tsugiki
from helpers_adapters import (check_generate, check_interop, check_merge, check_save_load_exact, logits,
                              randomize, train_and_check, train_tiny_cli)
from tiny_models import TinyConvNet, tiny_falcon, tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.lokr import LoKrConfig, LoKrLayer, factorization

MARKERS = ("lokr_",)


def _model(**kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "k_proj", "up_proj"])
    kwargs.setdefault("r", 2)
    return tsugiki.get_peft_model(tiny_llama(), LoKrConfig(alpha=4, task_type="CAUSAL_LM", **kwargs))


@pytest.mark.parametrize("dim, factor, split", [
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)), (128, 3, (2, 64)),
    (16, -1, (4, 4)), (8, -1, (2, 4)), (96, 16, (16, 6)),
])
def test_factorization_matches_hf_peft(dim, factor, split):
    from peft.tuners.lokr.layer import factorization as hf_factorization

    assert factorization(dim, factor) == split == hf_factorization(dim, factor)


def test_factor_shapes_follow_hf_rules():
    model = _model(target_modules=["q_proj", "k_proj", "up_proj"])
    layers = model.base_model.model.model.layers[0]
    q, k, up = layers.self_attn.q_proj, layers.self_attn.k_proj, layers.mlp.up_proj
    # q_proj 16 -> 16: (4, 4) x (4, 4); r=2 >= 4/2, so W2 is one full matrix.
    assert q.lokr_w1["default"].shape == (4, 4) and q.lokr_w2["default"].shape == (4, 4)
    # k_proj 16 -> 8: out 8 = 2 * 4, in 16 = 4 * 4.
    assert k.lokr_w1["default"].shape == (2, 4) and k.lokr_w2["default"].shape == (4, 4)
    # up_proj 16 -> 32: out 32 = 4 * 8; r=2 < 8/2, so W2 = W2a W2b.
    assert up.lokr_w1["default"].shape == (4, 4)
    assert up.lokr_w2_a["default"].shape == (8, 2) and up.lokr_w2_b["default"].shape == (2, 4)
    assert not q.lokr_w1["default"].any()  # W1 starts at zero: a no-op
    torch.testing.assert_close(logits(model, token_batch()), logits(tiny_llama(), token_batch()), atol=0, rtol=0)

    both = _model(target_modules=["up_proj"], r=1, decompose_both=True)
    up = both.base_model.model.model.layers[0].mlp.up_proj
    assert up.lokr_w1_a["default"].shape == (4, 1) and up.lokr_w1_b["default"].shape == (1, 4)
    assert not up.lokr_w1_a["default"].any()


def test_delta_weight_is_the_kronecker_product():
    model = _model(target_modules=["up_proj"])
    randomize(model, MARKERS)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    expected = torch.kron(layer.lokr_w1["default"], w2) * 2.0
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-6, rtol=0)


def test_lycoris_init_zeroes_w2_instead():
    model = _model(target_modules=["up_proj", "q_proj"], init_weights="lycoris")
    layers = model.base_model.model.model.layers[0]
    assert layers.self_attn.q_proj.lokr_w1["default"].any() and not layers.self_attn.q_proj.lokr_w2["default"].any()
    assert not layers.mlp.up_proj.lokr_w2_b["default"].any()
    torch.testing.assert_close(logits(model, token_batch()), logits(tiny_llama(), token_batch()), atol=0, rtol=0)


def test_only_lokr_trains_and_loss_falls():
    train_and_check(_model())


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model(decompose_both=True, r=1, rank_pattern={"q_proj": 3}, alpha_pattern={"k_proj": 2})
    randomize(model, MARKERS)
    check_save_load_exact(model, tiny_llama, tmp_path)


def test_merge_unmerge_and_merge_and_unload():
    model = _model()
    randomize(model, MARKERS)
    check_merge(model, LoKrLayer)


def test_generate():
    model = _model()
    randomize(model, MARKERS)
    check_generate(model)


@pytest.mark.parametrize("kwargs", [
    dict(r=2, alpha=4, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"]),
    dict(r=1, alpha=3, target_modules="all-linear", decompose_both=True, decompose_factor=2,
         rank_pattern={"o_proj": 4}, modules_to_save=["lm_head"]),
    dict(r=2, alpha=2, target_modules=["v_proj", "gate_proj"], layers_to_transform=0, init_weights="lycoris"),
])
def test_interop_with_hf_peft(kwargs, tmp_path):
    check_interop(tiny_llama, LoKrConfig(task_type="CAUSAL_LM", **kwargs),
                  peft.LoKrConfig(task_type="CAUSAL_LM", **kwargs), MARKERS + ("modules_to_save",), tmp_path)


@pytest.mark.parametrize("kwargs", [dict(r=1), dict(r=1, use_effective_conv2d=True), dict(r=4)])
def test_conv2d_matches_hf_peft_and_merges(kwargs, tmp_path):
    kwargs = dict(alpha=4, target_modules=["features.0", "fc"], **kwargs)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = tsugiki.get_peft_model(TinyConvNet(), LoKrConfig(**kwargs))
    randomize(ours, MARKERS)
    with torch.no_grad():
        expected = ours(x)
    assert not torch.allclose(expected, TinyConvNet()(x), atol=1e-3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TinyConvNet(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=0)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_rank_dropout_drops_output_rows_in_training_only():
    model = _model(target_modules=["up_proj"], rank_dropout=0.5, rank_dropout_scale=True)
    randomize(model, MARKERS)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 16)
    layer.eval()
    full = (layer(x) - layer.base_layer(x)).detach()
    layer.train()
    torch.manual_seed(0)
    dropped = (layer(x) - layer.base_layer(x)).detach()
    zero_rows = (dropped.abs().sum(0) == 0)
    assert 0 < int(zero_rows.sum()) < 32
    kept = ~zero_rows
    ratio = dropped[:, kept] / full[:, kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 32 / int(kept.sum())), atol=1e-4, rtol=1e-4)


def test_train_cli_method_lokr(tmp_path):
    saved = train_tiny_cli(tmp_path, "lokr", {"decompose_both": True, "decompose_factor": 4})
    assert saved["peft_type"] == "LOKR" and saved["r"] == 4 and saved["alpha"] == 16.0
    assert saved["decompose_both"] is True and saved["decompose_factor"] == 4


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(r=-2), "r=-2"),
    (dict(alpha=0), "alpha=0"),
    (dict(rank_dropout=2), "rank_dropout=2"),
    (dict(decompose_factor=0), "decompose_factor=0"),
    (dict(decompose_both="yes"), "decompose_both='yes'"),
    (dict(init_weights="gaussian"), "init_weights='gaussian'"),
    (dict(target_modules=[3]), "target_modules=[3]"),
    (dict(alpha_pattern={"q_proj": -1}), "alpha_pattern['q_proj']=-1"),
])
def test_invalid_config_values_are_rejected(kwargs, culprit):
    with pytest.raises(ValueError) as info:
        LoKrConfig(**kwargs)
    assert culprit in str(info.value)


def test_unsupported_layers_are_named():
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is Conv1D"):
        tsugiki.get_peft_model(tiny_gpt2(), LoKrConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="cannot mix LOKR with LORA"):
        model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(target_modules=["q_proj"]))
        model.add_adapter("kron", LoKrConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="mixed=True is not supported"):  # HF PEFT's PeftMixedModel
        tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(target_modules=["q_proj"]), mixed=True)


def test_linear_subclasses_are_targets_as_in_hf_peft(tmp_path):
    kwargs = dict(r=2, alpha=4, target_modules=["query_key_value", "dense_4h_to_h"])  # FalconLinear layers
    check_interop(tiny_falcon, LoKrConfig(task_type="CAUSAL_LM", **kwargs),
                  peft.LoKrConfig(task_type="CAUSAL_LM", **kwargs), MARKERS, tmp_path)

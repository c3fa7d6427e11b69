"""LoRA layers: the update, its scaling and init, dropout, merge/unmerge, any nn.Module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import tsugiki
from tsugiki.methods.lora import LoraEmbedding, LoraLinear
from tiny_models import TinyConvNet, TinyMLP, randomize_adapters, tiny_gpt2, tiny_llama, token_batch


def _wrap_linear(r=4, alpha=8, rslora=False, init=True, dropout=0.0, base=None):
    torch.manual_seed(0)
    base = base or nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.update_layer("default", r, alpha, dropout, init, rslora)
    layer.set_adapter("default")
    return layer


def test_linear_update_is_scaled_low_rank_product():
    layer = _wrap_linear(r=4, alpha=8, init=False)
    x = torch.randn(3, 6)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x @ A.T @ B.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    assert _wrap_linear(r=16, alpha=8, rslora=True).scaling["default"] == pytest.approx(8 / math.sqrt(16))
    assert _wrap_linear(r=16, alpha=8).scaling["default"] == pytest.approx(0.5)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_b_starts_at_zero_so_the_layer_equals_its_base(init):
    layer = _wrap_linear(init=init)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_gaussian_init_has_std_one_over_r():
    layer = LoraLinear(nn.Linear(4000, 5))
    layer.update_layer("default", 4, 8, 0.0, "gaussian", False)
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)


def test_dropout_applies_only_in_training():
    layer = _wrap_linear(init=False, dropout=0.5)
    x = torch.randn(64, 6)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def _started_from_the_base(init):
    """A LoRA r=3, alpha=6 started with ``init`` on a 12 -> 10 linear; it must not change the output."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 12)
    before = base(x)
    layer = LoraLinear(base)
    layer.update_layer("default", 3, 6, 0.0, init, False)
    layer.set_adapter("default")
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    return layer, w0


def test_pissa_init_keeps_output_and_uses_top_singular_vectors():
    layer, w0 = _started_from_the_base("pissa")
    S = torch.linalg.svdvals(w0)
    residual = torch.linalg.svdvals(layer.base_layer.weight.detach())
    torch.testing.assert_close(residual[:7], S[3:], atol=1e-5, rtol=0)  # top 3 moved to B A
    assert residual[7:].abs().max() < 1e-5


def test_olora_init_keeps_output_and_starts_from_qr():
    layer, w0 = _started_from_the_base("olora")
    Q, R = torch.linalg.qr(w0)
    torch.testing.assert_close(layer.lora_B["default"].weight, Q[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, R[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w0 - 2.0 * Q[:, :3] @ R[:3], atol=1e-6, rtol=0)


def test_merge_unmerge_exact_and_idempotent():
    layer = _wrap_linear(init=False)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 6)
    unmerged = layer(x)
    layer.merge("default")
    layer.merge("default")  # a second merge changes nothing
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
    expected_w = w0 + layer.get_delta_weight("default")
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected_w, atol=1e-7, rtol=0)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)


def test_bf16_merge_computes_the_delta_in_fp32():
    base = nn.Linear(64, 64).to(torch.bfloat16)
    layer = _wrap_linear(init=False, base=base)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters stay fp32
    w0 = base.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float32
    layer.merge("default")
    expected = (w0.float() + delta).to(torch.bfloat16)
    assert torch.equal(base.weight.detach(), expected)


def test_safe_merge_refuses_nan_and_leaves_weights_alone():
    layer = _wrap_linear(init=False)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf.*'default'|'default'.*NaN/Inf"):
        layer.merge(safe_merge=True)  # HF PEFT's form: the active adapter
    assert torch.equal(layer.base_layer.weight.detach(), w0)
    assert not layer.merged


def test_embedding_lora_matches_definition_and_merges():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    layer = LoraEmbedding(emb)
    layer.update_layer("default", 2, 4, 0.0, False, False)
    layer.set_adapter("default")
    ids = torch.tensor([[1, 2, 9]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = emb(ids) + (A.T[ids] @ B.T) * 2.0
    torch.testing.assert_close(layer(ids), expected)
    layer.merge("default")
    torch.testing.assert_close(layer(ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale_kind", ["buffer", "float"])
def test_a_scaled_embeddings_update_is_scaled_as_its_merge_is(scale_kind):
    class ScaledEmbedding(nn.Embedding):  # Gemma 3's (a buffer) and BART's (a float) multiply inside
        def __init__(self):
            super().__init__(10, 4)
            if scale_kind == "buffer":
                self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)
            else:
                self.embed_scale = 2.0

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    layer = LoraEmbedding(ScaledEmbedding())
    layer.update_layer("default", 2, 4, 0.0, False, False)
    layer.set_adapter("default")
    ids = torch.tensor([[1, 2, 9]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    expected = (layer.base_layer.weight[ids] + (A.T[ids] @ B.T) * 2.0) * 2.0
    torch.testing.assert_close(layer(ids), expected)
    layer.merge("default")
    torch.testing.assert_close(layer(ids), expected, atol=1e-6, rtol=0)


def test_embedding_default_init_is_a_no_op():
    emb = nn.Embedding(10, 4)
    layer = LoraEmbedding(emb)
    layer.update_layer("default", 2, 4, 0.0, True, False)
    layer.set_adapter("default")
    ids = torch.tensor([[1, 2, 9]])
    torch.testing.assert_close(layer(ids), emb(ids), rtol=0, atol=0)


def test_conv1d_uses_fan_in_fan_out_and_merges_exactly():
    torch.manual_seed(0)
    conv = Conv1D(9, 6)  # nf=9 outputs, nx=6 inputs; weight (6, 9)
    with torch.no_grad():
        conv.bias.normal_()
    layer = LoraLinear(conv, fan_in_fan_out=True)
    layer.update_layer("default", 2, 2, 0.0, False, False)
    layer.set_adapter("default")
    assert (layer.in_features, layer.out_features) == (6, 9)
    x = torch.randn(2, 3, 6)
    out = layer(x)
    layer.merge("default")
    torch.testing.assert_close(layer(x), out, atol=1e-6, rtol=0)


def test_gpt2_conv1d_targets_get_fan_in_fan_out():
    with pytest.warns(UserWarning, match="Conv1D"):
        model = tsugiki.get_peft_model(tiny_gpt2(), tsugiki.LoraConfig(r=2))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert model.peft_config["default"].fan_in_fan_out is True


def test_any_module_custom_mlp():
    base = TinyMLP()
    x = torch.randint(0, 20, (3, 5))
    ref = base(x)
    model = tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=2, target_modules=["lin0", "emb"]))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert isinstance(model.base_model.model.lin0, LoraLinear)
    assert isinstance(model.base_model.model.emb, LoraEmbedding)
    # Trains: loss falls and only the adapter changes.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn(3, 4)
    losses = []
    for _ in range(5):
        loss = ((model(x) - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_any_module_vision_classifier_all_linear_and_head_saved(tmp_path):
    base = TinyConvNet()
    model = tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=2, target_modules="all-linear",
                                                            modules_to_save=["head"]))
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert names == ["base_model.model.fc"]  # the head trains in full, so it gets no LoRA
    randomize_adapters(model)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    model.save_pretrained(tmp_path)
    again = tsugiki.PeftModel.from_pretrained(TinyConvNet(), tmp_path)
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_merge_and_unload_matches_unmerged_outputs_llama():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        merged = model(ids).logits
        model.unmerge_adapter()
        again = model(ids).logits
        model.merge_adapter()
        remerged = model(ids).logits
        plain = model.merge_and_unload()
        final = plain(ids).logits
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    for other in (merged, again, remerged, final):
        torch.testing.assert_close(other, unmerged, atol=1e-5, rtol=0)


# -- set_scale / scale_layer / unscale_layer ---------------------------------------------------
def _embedding_layer(r=4, alpha=8):
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(10, 6))
    layer.update_layer("default", r, alpha, 0.0, True, False)
    layer.set_adapter("default")
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    return layer


@pytest.mark.parametrize("make, x", [(lambda: _wrap_linear(init=False), torch.randn(3, 6)),
                                     (_embedding_layer, torch.tensor([[1, 4, 7]]))])
def test_scale_layer_multiplies_the_update_and_unscale_layer_restores_it(make, x):
    layer = make()
    base = layer.base_layer(x)
    update = layer(x) - base
    layer.scale_layer(3)
    assert layer.scaling["default"] == pytest.approx(3 * 8 / 4)
    with torch.no_grad():  # the eval-time path, which keeps s * B^T between calls
        torch.testing.assert_close(layer.eval()(x) - base, 3 * update)
    layer.unscale_layer()
    assert layer.scaling["default"] == pytest.approx(8 / 4)
    torch.testing.assert_close(layer(x) - base, update)


def test_set_scale_is_relative_to_the_initial_scaling_with_rslora_too():
    layer = _wrap_linear(r=16, alpha=8, rslora=True)
    layer.scale_layer(5)
    layer.set_scale("default", 0.5)  # replaces, does not multiply the scaled value
    assert layer.scaling["default"] == pytest.approx(0.5 * 8 / math.sqrt(16))


def test_scaling_calls_leave_other_adapters_and_absent_adapters_alone():
    layer = _wrap_linear()
    layer.update_layer("other", 2, 6, 0.0, True, False)
    layer.set_scale("not-here", 7.0)  # one loop may go over layers that lack an adapter, as in HF PEFT
    layer.scale_layer(2)  # the active adapter only
    assert layer.scaling == {"default": pytest.approx(4.0), "other": pytest.approx(3.0)}
    layer.set_scale("other", 2)
    assert layer.scaling["other"] == pytest.approx(6.0)


@pytest.mark.parametrize("call", [lambda layer: layer.set_scale("default", "2"),
                                  lambda layer: layer.scale_layer(float("nan")),
                                  lambda layer: layer.unscale_layer(0),
                                  lambda layer: layer.scale_layer(True)])
def test_bad_scales_are_refused_with_the_reason(call):
    layer = _wrap_linear()
    with pytest.raises(ValueError, match="scale"):
        call(layer)
    assert layer.scaling["default"] == pytest.approx(2.0)


def test_a_dora_layer_reads_a_changed_scaling_on_the_eval_path():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    randomize_adapters(model)
    model.eval()
    ids = token_batch()
    with torch.no_grad():
        model(input_ids=ids)  # builds the kept plan
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.set_scale("default", 3.0)
        fast = model(input_ids=ids).logits
    reference = model(input_ids=ids).logits.detach()  # autograd on: the general path, computed afresh
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


# -- merge() / unmerge() in HF PEFT's form -----------------------------------------------------
def test_merge_without_names_merges_the_active_adapter_only():
    layer = _wrap_linear(init=False)
    layer.update_layer("other", 2, 4, 0.0, False, False)
    layer.set_adapter("other")
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ["other"]
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0 + layer.get_delta_weight("other"))
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base_layer.weight.detach(), w0, atol=1e-6)


def test_merge_of_several_names_is_all_or_nothing_and_skips_absent_ones():
    layer = _wrap_linear(init=False)
    layer.update_layer("other", 2, 4, 0.0, False, False)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["other"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'other'"):
        layer.merge(safe_merge=True, adapter_names=["default", "other"])
    assert not layer.merged  # "default" was merged, then taken out again
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    layer.merge(adapter_names=["not-in-this-layer", "default"])  # as in HF PEFT, a loop may pass any layer's names
    assert layer.merged_adapters == ["default"]


def test_a_name_where_safe_merge_goes_is_one_adapter_as_before():
    layer = _wrap_linear(init=False)
    layer.update_layer("other", 2, 4, 0.0, False, False)
    layer.merge("other")
    assert layer.merged_adapters == ["other"]
    with pytest.raises(TypeError, match="adapter_names"):
        layer.merge("default", adapter_names=["default"])

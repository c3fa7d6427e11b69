"""LoHa: delta_W = (W1a W1b) * (W2a W2b) * alpha / r on Linear and Conv2d layers."""

from __future__ import annotations

import peft
import pytest
import torch

import tsugiki
from helpers_adapters import (check_generate, check_interop, check_merge, check_save_load_exact, logits,
                              randomize, train_and_check, train_tiny_cli)
from tiny_models import TinyConvNet, tiny_falcon, tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.loha import LoHaConfig, LoHaLayer

MARKERS = ("hada_",)


def _model(**kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return tsugiki.get_peft_model(tiny_llama(), LoHaConfig(r=4, alpha=8, task_type="CAUSAL_LM", **kwargs))


def test_starts_as_a_no_op_with_hf_shapes():
    model = _model()
    torch.testing.assert_close(logits(model, token_batch()), logits(tiny_llama(), token_batch()), atol=0, rtol=0)
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # Linear(32 -> 16)
    assert isinstance(layer, LoHaLayer)
    assert layer.hada_w1_a["default"].shape == (16, 4) and layer.hada_w1_b["default"].shape == (4, 32)
    assert layer.hada_w2_a["default"].shape == (16, 4) and not layer.hada_w2_b["default"].any()
    assert layer.scaling["default"] == 2.0


def test_delta_weight_is_the_hadamard_product():
    model = _model(target_modules=["q_proj"])
    randomize(model, MARKERS)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    p = {k: getattr(layer, k)["default"] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    expected = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 2.0
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-6, rtol=0)


def test_only_loha_trains_and_loss_falls():
    train_and_check(_model())


def test_save_load_round_trip_is_exact(tmp_path):
    model = _model(rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    randomize(model, MARKERS)
    check_save_load_exact(model, tiny_llama, tmp_path)


def test_merge_unmerge_and_merge_and_unload():
    model = _model()
    randomize(model, MARKERS)
    check_merge(model, LoHaLayer)


def test_generate():
    model = _model()
    randomize(model, MARKERS)
    check_generate(model)


@pytest.mark.parametrize("kwargs", [
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=2, alpha=4, target_modules="all-linear", rank_pattern={"o_proj": 3}, alpha_pattern={"up_proj": 5},
         modules_to_save=["lm_head"]),
    dict(r=3, alpha=6, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
])
def test_interop_with_hf_peft(kwargs, tmp_path):
    check_interop(tiny_llama, LoHaConfig(task_type="CAUSAL_LM", **kwargs),
                  peft.LoHaConfig(task_type="CAUSAL_LM", **kwargs), MARKERS + ("modules_to_save",), tmp_path)


@pytest.mark.parametrize("effective", [False, True])
def test_conv2d_matches_hf_peft_and_merges(effective, tmp_path):
    kwargs = dict(r=2, alpha=4, target_modules=["features.0", "fc"], use_effective_conv2d=effective)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = tsugiki.get_peft_model(TinyConvNet(), LoHaConfig(**kwargs))
    conv = ours.base_model.model.features[0]
    assert ("default" in conv.hada_t1) == effective
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


def test_dropouts_act_only_in_training():
    model = _model(rank_dropout=0.5, module_dropout=0.5)
    randomize(model, MARKERS)
    model.eval()
    ids = token_batch()
    expected = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    outs = [logits(model, ids) for _ in range(4)]
    assert any(not torch.allclose(o, expected) for o in outs)


def test_mixed_adapter_batch_uses_each_rows_adapter():
    model = _model(target_modules=["q_proj", "v_proj"])
    model.add_adapter("other", LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, MARKERS)
    ids = token_batch(batch=3)
    mixed = model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits.detach()
    want = [logits(model, ids[:1])]
    model.set_adapter("other")
    want.append(logits(model, ids[1:2]))
    with model.disable_adapter():
        want.append(logits(model, ids[2:]))
    torch.testing.assert_close(mixed, torch.cat(want), atol=1e-5, rtol=0)


def test_train_cli_method_loha(tmp_path):
    saved = train_tiny_cli(tmp_path, "loha", {"rank_dropout": 0.1})
    assert saved["peft_type"] == "LOHA" and saved["r"] == 4 and saved["alpha"] == 16.0
    assert saved["rank_dropout"] == 0.1


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(r=0), "r=0"),
    (dict(alpha=-1), "alpha=-1"),
    (dict(rank_dropout=1.0), "rank_dropout=1.0"),
    (dict(module_dropout=-0.1), "module_dropout=-0.1"),
    (dict(init_weights="lycoris"), "init_weights='lycoris'"),
    (dict(target_modules="q_proj("), "target_modules='q_proj('"),
    (dict(layers_pattern="layers"), "layers_pattern='layers'"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']=0"),
])
def test_invalid_config_values_are_rejected(kwargs, culprit):
    with pytest.raises(ValueError) as info:
        LoHaConfig(**kwargs)
    assert culprit in str(info.value)


def test_unsupported_layers_are_named():
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is Conv1D"):
        tsugiki.get_peft_model(tiny_gpt2(), LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="embed_tokens is Embedding"):
        tsugiki.get_peft_model(tiny_llama(), LoHaConfig(target_modules=["embed_tokens"]))


def test_linear_subclasses_are_targets_as_in_hf_peft(tmp_path):
    kwargs = dict(r=2, alpha=4, target_modules=["query_key_value", "dense_4h_to_h"])  # FalconLinear layers
    check_interop(tiny_falcon, LoHaConfig(task_type="CAUSAL_LM", **kwargs),
                  peft.LoHaConfig(task_type="CAUSAL_LM", **kwargs), MARKERS, tmp_path)


@pytest.mark.parametrize("config", [LoHaConfig(r=4, alpha=8, target_modules=["lin"]),
                                    tsugiki.LoKrConfig(r=4, alpha=8, target_modules=["lin"])])
def test_a_bf16_forward_keeps_only_the_cast_update_and_matches_the_fp32_reference(config):
    """The full-size update is remade in backward, so a forward keeps it once, at the compute dtype
    (not LoHa's two fp32 Hadamard factors and an fp32 copy of the input)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.lin = torch.nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
    model = tsugiki.get_peft_model(net, config)
    layer = model.base_model.model.lin
    factors = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in factors:
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(8, 64, dtype=torch.bfloat16)

    saved = {}
    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    kept = sum(saved.values())
    assert kept <= 96 * 64 * 2 + 8 * 64 * 2 + sum(p.numel() * 4 for p in factors), kept

    out.float().pow(2).sum().backward()
    grads = [p.grad.clone() for p in factors]
    for p in factors:
        p.grad = None
    reference = x.float() @ (net.lin.weight.float() + layer.get_delta_weight("default")).T
    reference.pow(2).sum().backward()
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, [p.grad for p in factors]):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())

"""DoRA (LoraConfig(use_dora=True)): W' = m * (W0 + s B A) / ||W0 + s B A||, the norm taken per output row."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import tsugiki
from helpers_adapters import (check_generate, check_interop, check_merge, check_save_load_exact, logits,
                              randomize, saved_bytes, train_and_check, train_tiny_cli)
from tiny_models import tiny_gpt2, tiny_llama, token_batch
from tsugiki.adapter_io import AdapterLoadError
from tsugiki.methods.lora import LoraConfig, LoraLinear

MARKERS = ("lora_",)


def _model(make=tiny_llama, **kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"] if make is tiny_llama else None)
    return tsugiki.get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM",
                                                     **kwargs))


def _dora_reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The formula written out: m / ||W + sBA||_rows (a constant) times (W + sBA) x, plus the bias."""
    W = layer.base_layer.weight
    W = W.T if layer.fan_in_fan_out else W  # (out, in)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    adapted = W + layer.scaling["default"] * B @ A
    norm = torch.linalg.norm(adapted, dim=1).detach()
    out = x @ (layer.lora_magnitude_vector["default"].weight[:, None] * adapted / norm[:, None]).T
    bias = layer.base_layer.bias
    return out if bias is None else out + bias


def test_magnitude_starts_at_the_row_norm_and_changes_nothing():
    model = _model()
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # Linear(32 -> 16)
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (16,) and m.requires_grad
    torch.testing.assert_close(m, torch.linalg.norm(layer.base_layer.weight, dim=1))
    torch.testing.assert_close(logits(model, token_batch()), logits(tiny_llama(), token_batch()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, path", [(tiny_llama, "model.layers.1.self_attn.q_proj"),
                                        (tiny_gpt2, "transformer.h.0.attn.c_attn")])
def test_output_and_gradients_follow_the_formula(make, path):
    model = _model(make)
    randomize(model, MARKERS)
    layer = model.base_model.model.get_submodule(path)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight]
    out = layer(x)
    ref = _dora_reference(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)  # the norm is detached, as in the DoRA paper
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_only_dora_trains_and_loss_falls():
    model = _model()
    train_and_check(model)
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.requires_grad for p in magnitudes)


def test_save_load_round_trip_is_exact_with_hf_keys(tmp_path):
    model = _model(target_modules="all-linear", rank_pattern={"o_proj": 2})
    randomize(model, MARKERS)
    check_save_load_exact(model, tiny_llama, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"
    assert saved[key].shape == (16,)
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == 14  # 7 linear layers x 2 blocks


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_merge_and_unload(make):
    model = _model(make)
    randomize(model, MARKERS)
    check_merge(model, LoraLinear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_after_merge_unmerge_cycles_are_those_of_a_fresh_model(dtype):
    """Merging rewrites the base weight through .data; a new storage at a freed address once hid
    that from the eval forward's kept DoRA factors (the old outputs came back after unmerging)."""
    model = _model().to(dtype).eval()
    randomize(model, MARKERS)
    ids = token_batch()
    for cycles in range(8):
        for _ in range(2):
            model.merge_adapter()
            logits(model, ids)  # an eval forward on the merged weights
            model.unmerge_adapter()
            for _ in range(cycles):
                model.merge_adapter()
                model.unmerge_adapter()
            fresh = tsugiki.get_peft_model(tiny_llama(), model.peft_config["default"]).to(dtype).eval()
            fresh.load_state_dict(model.state_dict())
            torch.testing.assert_close(logits(model, ids), logits(fresh, ids), atol=0, rtol=0)


def test_dora_merges_alone():
    model = _model(target_modules=["q_proj"])
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter(["plain"])
    with pytest.raises(ValueError, match="DoRA adapter .'default'. is merged alone"):
        model.merge_adapter(["default"])


def test_a_refused_merge_leaves_no_layer_merged():
    # 'plain' on q_proj and v_proj, DoRA 'default' on v_proj only: q_proj could merge both, v_proj cannot.
    model = _model(target_modules=["v_proj"])
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(model, MARKERS)
    ids = token_batch()
    before = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="is merged alone"):
        model.merge_adapter(["plain", "default"])
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLinear))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if "base_layer" in n)
    assert torch.equal(logits(model, ids), before)


def test_generate():
    model = _model()
    randomize(model, MARKERS)
    check_generate(model)


@pytest.mark.parametrize("make, kwargs", [
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    (tiny_llama, dict(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                      rank_pattern={"o_proj": 3}, modules_to_save=["lm_head"])),
    (tiny_gpt2, dict(r=4, lora_alpha=8)),
])
def test_interop_with_hf_peft(make, kwargs, tmp_path):
    kwargs = dict(kwargs, use_dora=True, task_type="CAUSAL_LM")
    check_interop(make, LoraConfig(**kwargs), peft.LoraConfig(**kwargs), MARKERS + ("modules_to_save",), tmp_path)


def test_training_mode_dropout_matches_hf_peft(tmp_path):
    # With dropout, both W and B A see the dropped-out input (the base call does not).
    model = _model(lora_dropout=0.3)
    randomize(model, MARKERS)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    ids = token_batch()
    model.train()
    theirs.train()
    torch.manual_seed(0)
    ours_out = model(input_ids=ids).logits
    torch.manual_seed(0)
    torch.testing.assert_close(ours_out, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_mixed_adapter_batch():
    model = _model(target_modules=["q_proj", "v_proj"])
    model.add_adapter("other", LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "v_proj"]))
    randomize(model, MARKERS)
    ids = token_batch(batch=3)
    mixed = model(input_ids=ids, adapter_names=["other", "default", "__base__"]).logits.detach()
    want = [None, logits(model, ids[1:2]), None]
    model.set_adapter("other")
    want[0] = logits(model, ids[:1])
    with model.disable_adapter():
        want[2] = logits(model, ids[2:])
    torch.testing.assert_close(mixed, torch.cat(want), atol=1e-5, rtol=0)


def test_kbit_base():
    quant = pytest.importorskip("tsugiki.quant")
    pytest.importorskip("bitsandbytes")
    base = quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=4,
                                compute_dtype=torch.float32)
    model = tsugiki.get_peft_model(base, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    randomize(model, MARKERS)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    norm = torch.linalg.norm(quant.dequantize_weight(layer.base_layer) + s * B @ A, dim=1)
    factor = layer.lora_magnitude_vector["default"].weight / norm
    # W x through the 4-bit kernel itself (it rounds differently from a dequantized matmul)
    expected = factor * (layer.base_layer(x) + s * x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_train_cli_method_dora(tmp_path):
    saved = train_tiny_cli(tmp_path, "dora", {"use_rslora": True})
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is True and saved["use_rslora"] is True


def test_clear_errors():
    with pytest.raises(ValueError, match="DoRA is not available for embedding layers .model.embed_tokens."):
        _model(target_modules=["q_proj", "embed_tokens"])
    model = _model(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'default' is a DoRA adapter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
    with pytest.raises(ValueError, match="use_dora='yes'"):
        LoraConfig(use_dora="yes")
    from types import SimpleNamespace

    from tsugiki.config import METHOD_BUILDERS

    cfg = SimpleNamespace(method_args={"use_dora": False}, target_modules=None, lora_r=4, lora_alpha=8,
                          lora_dropout=0.0)
    with pytest.raises(ValueError, match="use_dora must stay True"):
        METHOD_BUILDERS["dora"](cfg, "base")


def _dora_layer(bias: bool, dropout: float, dtype: torch.dtype) -> LoraLinear:
    layer = LoraLinear(torch.nn.Linear(48, 40, bias=bias))
    layer.update_layer("default", r=4, alpha=8, dropout=dropout, init=True, use_rslora=False, use_dora=True)
    with torch.no_grad():  # a trained-looking adapter: B and m away from their initial values
        layer.lora_B["default"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.7, 1.3, 40))
    layer.base_layer.to(dtype).requires_grad_(False)
    return layer.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fused_dora_forward_equals_the_reference_path(bias, dropout, dtype):
    """The training path (fused LoRA add, ``b + f * z``) against ``base + _adapter_out``: values and gradients."""
    layer = _dora_layer(bias, dropout, dtype)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    x0 = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for forward in (layer.forward, layer.additive_forward):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same dropout mask on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = forward(x)
        results.append((out, *torch.autograd.grad(out, [x, *params], g)))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    for name, got, want in zip(("out", "x", "A", "B", "m"), *results):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **tol, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_fused_dora_forward_keeps_less_for_backward(dropout):
    layer = _dora_layer(bias=True, dropout=dropout, dtype=torch.bfloat16)
    x = torch.randn(4, 64, 48, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, reference = saved_bytes(lambda: layer(x)), saved_bytes(lambda: layer.additive_forward(x))
    # fused: x (and d(x)), A x and z at bf16 a token (2 x 48 (x 2) + 2 x 4 + 2 x 40), plus the weights
    # (under 8 KiB); the reference keeps W x in fp32 instead of z (2 x 40 more) and s B A x (2 x 40)
    tokens = 4 * 64
    assert fused <= tokens * (2 * 48 * (2 if dropout else 1) + 2 * 4 + 2 * 40) + 8192
    assert reference - fused >= tokens * 4 * 40 - 2048


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d-layout"])
def test_expanded_row_norm_equals_the_norm_of_the_formed_weight(dtype, fan_in_fan_out):
    """||W + s B A|| per row from ||W||^2, W A^T and A A^T equals the norm of the weight formed in fp32."""
    base = torch.nn.Linear(300, 70, bias=False)
    if fan_in_fan_out:
        base.weight = torch.nn.Parameter(base.weight.detach().t().contiguous())  # stored (in, out)
    layer = LoraLinear(base.to(dtype), fan_in_fan_out=fan_in_fan_out)
    layer.update_layer("default", r=8, alpha=16, dropout=0.0, init=True, use_rslora=False, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = layer.base_layer.weight.float()
    W = W.t() if fan_in_fan_out else W
    want = torch.linalg.norm(W + layer.scaling["default"] * B @ A, dim=1)
    # bf16: W A^T is rounded to bf16 (a relative 2^-9 of a term much smaller than ||W||^2)
    torch.testing.assert_close(layer._dora_norm("default", torch.float32), want,
                               rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=0)


def _formed_norm(layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return torch.linalg.norm(weight.float() + layer.scaling["default"] * B @ A, dim=1)


def test_kept_row_squares_follow_every_change_of_the_base_weight():
    """||W||^2 is kept between forwards; each way the base weight changes makes the norm see the new weight."""
    layer = LoraLinear(torch.nn.Linear(48, 40))
    layer.update_layer("default", r=4, alpha=8, dropout=0.0, init=True, use_rslora=False, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))

    def check():
        torch.testing.assert_close(layer._dora_norm("default", torch.float32),
                                   _formed_norm(layer, layer.base_layer.weight), rtol=1e-5, atol=0)

    check()
    with torch.no_grad():
        layer.base_layer.weight.mul_(3)  # in place: the version counter moves
    check()
    layer.base_layer.weight.data = torch.randn(40, 48)  # storage replaced
    check()
    layer.base_layer.weight = torch.nn.Parameter(torch.randn(40, 48))  # a new parameter
    check()
    layer.base_layer.weight.data.add_(1.0)  # behind autograd's back: train()/eval() drop what is kept
    layer.eval()
    check()
    layer.to(torch.float64)
    torch.testing.assert_close(layer._dora_norm("default", torch.float64),
                               _formed_norm(layer, layer.base_layer.weight).double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_row_norm_in_bf16_equals_the_norm_of_the_dequantized_weight(bits):
    """A 4-bit base takes W A^T from bitsandbytes' own product, an 8-bit one from the dequantized weight;
    both equal the norm of the dequantized weight plus s B A (to bf16 rounding of the r-wide term)."""
    quant = pytest.importorskip("tsugiki.quant")
    pytest.importorskip("bitsandbytes")
    base = quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=bits,
                                compute_dtype=torch.bfloat16)
    model = tsugiki.get_peft_model(base, LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"]))
    randomize(model, MARKERS)
    model.train()
    ids = token_batch(2, 6)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]

    def check():
        for layer in layers:
            for _ in range(2):  # computed, then kept
                torch.testing.assert_close(layer._dora_norm("default", torch.float32),
                                           _formed_norm(layer, quant.dequantize_weight(layer.base_layer)),
                                           rtol=2e-3, atol=0)

    model(input_ids=ids).logits.float().sum().backward()
    check()
    model.eval()
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights here on AVX512-BF16 CPUs
        model(input_ids=ids)
    check()


def test_an_hf_peft_dora_adapter_on_an_embedding_is_refused_as_not_computed(tmp_path):
    """HF PEFT has DoRA for embeddings; the error says tsugiki lacks it, not that the model is wrong."""
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, use_dora=True,
                                                               target_modules=["embed_tokens", "q_proj"]))
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError) as err:
        tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "cannot be loaded: use_dora=True: DoRA is not available for embedding layers" in str(err.value)
    assert "another model" not in str(err.value)

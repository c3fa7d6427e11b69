"""The fused RMSNorm and SiLU gate against the modules they stand in for: forward, gradients, saved bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import tsugiki
from helpers_adapters import saved_bytes
from tsugiki.kernels.block_fused import FusedRMSNorm, FusedSiluMul, fused_blocks


def _norm(x_dtype, w_dtype, width=48):
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(2)) * 0.3 + 1)
    norm.to(w_dtype)
    x = (torch.randn(3, 7, width, generator=torch.Generator().manual_seed(1)) * 2).to(x_dtype)
    return norm, x


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32w"])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fused_rms_norm_equals_the_module(x_dtype, w_dtype, train_weight):
    results = []
    for fused in (False, True):
        norm, x = _norm(x_dtype, w_dtype)
        norm.weight.requires_grad_(train_weight)
        x.requires_grad_(True)
        out = FusedRMSNorm.apply(x, norm.weight, norm.variance_epsilon) if fused else norm(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype))
        results.append((out.detach(), x.grad, norm.weight.grad))
    (ref, ref_dx, ref_dw), (got, dx, dw) = results
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref)  # the same operations in the same order
    tol = dict(atol=1e-5, rtol=1e-5) if x_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx.float(), ref_dx.float(), **tol)
    if train_weight:
        torch.testing.assert_close(dw.float(), ref_dw.float(), **tol)
    else:
        assert dw is None and ref_dw is None


def test_fused_rms_norm_keeps_a_third_of_the_bytes_in_bf16():
    norm, x = _norm(torch.bfloat16, torch.bfloat16, width=256)
    x.requires_grad_(True)
    reference = saved_bytes(lambda: norm(x))
    fused = saved_bytes(lambda: FusedRMSNorm.apply(x, norm.weight, norm.variance_epsilon))
    # The module keeps an fp32 copy of x and the bf16 normalised x (6 bytes per element); fused keeps x (2).
    assert fused < 0.4 * reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul_gradients_are_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    results = []
    for fused in (False, True):
        gate = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
        up = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_(True)
        out = FusedSiluMul.apply(gate, up) if fused else torch.nn.functional.silu(gate) * up
        out.backward(torch.randn(out.shape, generator=g.manual_seed(3)).to(dtype))
        results.append((out.detach(), gate.grad, up.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_silu_mul_with_mixed_dtypes_matches_autograd():
    """bf16 gate, fp32 up: the fp32 product is kept (nothing written in place into a bf16 buffer)."""
    gate = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_(True)
    up = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    grad = torch.randn(4, 9, 40, generator=torch.Generator().manual_seed(3))
    out = FusedSiluMul.apply(gate, up)
    out.backward(grad)
    ref_gate, ref_up = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.silu(ref_gate) * ref_up
    reference.backward(grad)
    assert out.dtype == torch.float32 and gate.grad.dtype == torch.bfloat16 and up.grad.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(up.grad, ref_up.grad, rtol=0, atol=0)
    torch.testing.assert_close(gate.grad.float(), ref_gate.grad.float(), rtol=1e-2, atol=1e-2)


def test_fused_silu_mul_keeps_two_of_three_tensors():
    gate = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    reference = saved_bytes(lambda: torch.nn.functional.silu(gate) * up)
    fused = saved_bytes(lambda: FusedSiluMul.apply(gate, up))
    assert fused == pytest.approx(reference * 2 / 3)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _grafted(base):
    """``base`` with LoRA on every linear, lora_B random (so adapters change the output), in train mode."""
    model = tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(5))
    return model.train()


def _loss_fn(model):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss
    return forward


def _assert_trains_alike(results):
    """Same loss; adapter gradients within bf16 rounding of the summed input gradients (~1e-3 of the largest)."""
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    for name in grads_ref:
        assert (grads[name] - grads_ref[name]).abs().max() <= 3e-2 * grads_ref[name].abs().max(), name


def _adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_whole_model_under_fused_blocks_trains_like_the_modules(make):
    results = []
    for fused in (False, True):
        model = _grafted(make())
        with fused_blocks(model, enabled=fused) as switched:
            loss = _loss_fn(model)()
            loss.backward()
        assert switched == (2 * 2 + 1 + 2 if fused else 0)  # 2 norms + 1 MLP per layer, the final norm
        results.append((loss.detach(), _adapter_grads(model)))
        assert not any("forward" in m.__dict__ for m in model.modules())  # the modules' own forwards are back
    _assert_trains_alike(results)


def test_modules_of_other_shapes_are_left_alone():
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, hidden_act="gelu"))
    with fused_blocks(mlp) as switched:
        assert switched == 0


def test_fp32_norm_weights_under_autocast_feed_plain_linears_the_same_values_in_bf16():
    """k-bit bases keep norms in fp32; the fused norm hands the linear layers after it bf16 directly."""
    results, saved = [], []
    for fused in (False, True):
        model = _grafted(_llama().to(torch.bfloat16))
        for p in model.parameters():
            if p.dim() == 1:
                p.data = p.data.float()  # what the k-bit dtype policy does to the norms
        with fused_blocks(model, enabled=fused):
            forward = _loss_fn(model)
            saved.append(saved_bytes(forward))
            loss = forward()
            loss.backward()
        results.append((loss.detach(), _adapter_grads(model)))
    _assert_trains_alike(results)
    assert saved[1] < saved[0]


def test_on_a_kbit_base_the_activations_stay_16_bit():
    pytest.importorskip("bitsandbytes")
    from tsugiki import quant
    from tsugiki.train.loop import apply_dtype_policy
    from tiny_models import tiny_llama

    losses, saved = [], []
    for fused in (False, True):
        base = quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=4,
                                    compute_dtype=torch.bfloat16)
        model = _grafted(quant.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False))
        apply_dtype_policy(model, torch.bfloat16)  # norms fp32, as for every k-bit base
        with fused_blocks(model, enabled=fused):
            forward = _loss_fn(model)
            saved.append(saved_bytes(forward))
            losses.append(forward().item())
    assert saved[1] < 0.75 * saved[0]  # bitsandbytes layers return fp32 after an fp32 norm
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)  # bf16 instead of fp32 activations

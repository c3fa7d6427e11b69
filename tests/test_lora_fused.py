"""The fused LoRA path against the plain composition it replaces: forward and gradients on random inputs."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tsugiki import LoraConfig, get_peft_model
from tsugiki.kernels.lora_fused import (DropoutMask, FusedLoraAdd, dropout_rate, dropped_positions, keep_mask,
                                        lora_add, reference_lora_add)


def _inputs(dtype=torch.float32, seed=0, out_features=24, in_features=16, r=4, rows=(3, 5)):
    torch.manual_seed(seed)
    x = torch.randn(*rows, in_features, dtype=dtype, requires_grad=True)
    W = torch.randn(out_features, in_features, dtype=dtype) / 4
    A = nn.Parameter(torch.randn(r, in_features) / 4)
    B = nn.Parameter(torch.randn(out_features, r) / 4)
    return x, W, A, B


def _grads(out, *tensors, seed=1):
    torch.manual_seed(seed)
    out.backward(torch.randn_like(out))
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("p,size", [(0.0, {}), (0.3, {}),
                                    (0.05, dict(rows=(4, 64), in_features=64))])  # 16384 elements: dropped positions
def test_fused_equals_the_composition_forward_and_gradients_fp32(p, size):
    seed = 1234
    x, W, A, B = _inputs(**size)
    fused = FusedLoraAdd.apply(x @ W.t(), x, A, B, 2.0, p, seed)
    got = [fused.detach()] + _grads(fused, x, A, B)

    x2, W2, A2, B2 = _inputs(**size)
    mask = DropoutMask(x2.shape, p, seed, x2.device) if p else None
    assert mask is None or (mask.keep is None) == (p == 0.05)
    ref = reference_lora_add(x2 @ W2.t(), x2, A2, B2, 2.0, mask)
    want = [ref.detach()] + _grads(ref, x2, A2, B2)
    for name, a, b in zip(("output", "dx", "dA", "dB"), got, want):
        # fp32 sums in another order (the kernels' blocking differs between CPUs): ~1e-7 of the scale
        torch.testing.assert_close(a, b, atol=2e-6 * b.abs().max().item(), rtol=1e-5, msg=name)


def test_fused_under_bf16_autocast_matches_the_composition():
    seed = 7
    x, W, A, B = _inputs(torch.bfloat16, rows=(4, 64), in_features=64)  # 16384 elements: dropped positions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = FusedLoraAdd.apply(x @ W.t(), x, A, B, 2.0, 0.2, seed)
    got = [fused.detach().float()] + [g.float() for g in _grads(fused, x, A, B)]
    x2, W2, A2, B2 = _inputs(torch.bfloat16, rows=(4, 64), in_features=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_lora_add(x2 @ W2.t(), x2, A2, B2, 2.0, DropoutMask(x2.shape, 0.2, seed, x2.device))
    want = [ref.detach().float()] + [g.float() for g in _grads(ref, x2, A2, B2)]
    assert fused.dtype == torch.bfloat16 and A.grad.dtype == torch.float32
    for name, a, b in zip(("output", "dx", "dA", "dB"), got, want):
        # bf16 rounds in different places (the keep scale multiplies A x, not x): ~1% of the scale
        assert (a - b).abs().max() <= 1e-2 * b.abs().max(), name


def test_dense_mask_rate_scale_and_determinism():
    p = 0.3
    keep = keep_mask(torch.Size([1000, 1000]), p, 99, torch.device("cpu"))
    assert torch.equal(keep, keep_mask(torch.Size([1000, 1000]), p, 99, torch.device("cpu")))
    assert not torch.equal(keep, keep_mask(torch.Size([1000, 1000]), p, 100, torch.device("cpu")))
    assert dropout_rate(p) == pytest.approx(p, abs=1 / 65536)
    dropped = 1 - keep.float().mean().item()
    assert dropped == pytest.approx(dropout_rate(p), abs=2e-3)  # 1e6 draws: std ~5e-4
    mask = DropoutMask(torch.Size([1000, 1000]), p, 99, torch.device("cpu"))
    assert mask.keep is not None and mask.rate == dropout_rate(p)
    # The keep scale uses the rate actually drawn, so drop(x) is unbiased.
    d = mask.zeroed(torch.ones(1000, 1000)) * mask.keep_scale
    assert d.mean().item() == pytest.approx(1.0, abs=3e-3)


@pytest.mark.parametrize("p", [0.05, 0.001, 0.25])
def test_dropped_positions_are_an_iid_bernoulli_mask(p):
    n = 2_000_000
    pos = dropped_positions(n, p, 7, torch.device("cpu"))
    assert torch.equal(pos, dropped_positions(n, p, 7, torch.device("cpu")))
    assert not torch.equal(pos[:50], dropped_positions(n, p, 8, torch.device("cpu"))[:50])
    assert pos.dtype == torch.int64 and int(pos[0]) >= 0 and int(pos[-1]) < n
    assert bool((pos[1:] > pos[:-1]).all())  # sorted, no position twice
    std = (p * (1 - p) / n) ** 0.5
    assert len(pos) / n == pytest.approx(p, abs=5 * std)
    keep = torch.ones(n, dtype=torch.bool)
    keep[pos] = False
    dropped = ~keep
    # independence of neighbours: P(both dropped) = p^2; and of the two halves
    pair = (dropped[1:] & dropped[:-1]).double().mean().item()
    assert pair == pytest.approx(p * p, abs=5 * (p * p / n) ** 0.5 + 1e-7)
    halves = dropped.view(2, -1).double().mean(1)
    assert (halves - p).abs().max().item() < 5 * std * 2 ** 0.5
    mask = DropoutMask(torch.Size([1000, 2000]), p, 7, torch.device("cpu"))
    assert mask.keep is None and mask.rate == p
    assert DropoutMask(torch.Size([16, 64]), p, 7, torch.device("cpu")).keep is not None  # small: dense
    assert torch.equal(mask.keep_tensor().view(-1), keep)
    x = torch.randn(1000, 2000)
    torch.testing.assert_close(mask.zeroed(x), torch.where(keep.view(1000, 2000), x, 0.0), atol=0, rtol=0)


def test_no_grad_path_adds_in_place_and_equals_the_composition():
    x, W, A, B = _inputs()
    with torch.no_grad():
        base = x @ W.t()
        want = reference_lora_add(base.clone(), x, A, B, 0.5)
        got = lora_add(base, x, A, B, 0.5, p=0.3, training=False)  # eval: no dropout
    assert got.data_ptr() == base.data_ptr()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def _lora_b_nonzero(model):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [_tiny_llama, lambda: (torch.manual_seed(0), GPT2LMHeadModel(
    GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)))[1]], ids=["llama", "gpt2-conv1d"])
def test_layer_fast_path_equals_reference_path_in_a_model(make, device):
    """Whole-model loss and adapter gradients: the fused LoraLinear.forward vs additive_forward (no dropout)."""
    results = []
    for fused in (True, False):
        model = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).to(device)
        _lora_b_nonzero(model)
        model.train()
        if not fused:
            for module in model.modules():
                if hasattr(module, "additive_forward") and hasattr(module, "lora_A"):
                    module.forward = module.additive_forward
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_f, g_f), (loss_r, g_r) = results
    tol = dict(atol=1e-6, rtol=1e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-4)  # GPU summation order
    torch.testing.assert_close(loss_f, loss_r, **tol)
    assert g_f.keys() == g_r.keys() and g_f
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], msg=name, **tol)


@pytest.mark.parametrize("p,ids_shape", [(0.3, (2, 12)), (0.05, (8, 64))])  # dense mask; dropped positions
def test_dropout_recompute_under_gradient_checkpointing_matches_a_plain_backward(p, ids_shape):
    """Checkpointing replays the forward; the replayed mask must be the one the plain backward uses."""
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(_tiny_llama(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=p))
        _lora_b_nonzero(model)
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 64, ids_shape, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(11)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)

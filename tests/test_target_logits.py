"""The target-positions-only output layer equals the full-logits reference: loss and gradients."""

from __future__ import annotations

import pytest
import torch

import tsugiki
from tsugiki.kernels.target_logits import full_logits_loss_sum, split_causal_lm, target_logits_loss_sum
from tiny_models import randomize_adapters, tiny_bert_classifier, tiny_gpt2, tiny_llama


def _batch(seed=0, batch=3, length=11, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[1, 8:] = -100  # a padded row
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make, config", [
    (tiny_llama, dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])),
    (tiny_gpt2, dict(r=4)),
])
def test_loss_and_gradients_equal_the_full_logits_reference(make, config):
    model = tsugiki.get_peft_model(make(), tsugiki.LoraConfig(**config))
    randomize_adapters(model)
    inputs, labels = _batch()
    parts = split_causal_lm(model)
    assert parts is not None

    reference = full_logits_loss_sum(model(**inputs).logits, labels)
    reference.backward()
    expected = _grads(model)
    model.zero_grad()
    fast = target_logits_loss_sum(*parts, inputs, labels)
    fast.backward()
    got = _grads(model)

    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-6)
    assert set(got) == set(expected) and len(got) >= 4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_packed_rows_never_score_a_sequence_start():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
    labels = ids.clone()
    inputs = {"input_ids": ids, "position_ids": position_ids}
    reference = full_logits_loss_sum(model(**inputs).logits, labels, position_ids)
    fast = target_logits_loss_sum(*split_causal_lm(model), inputs, labels)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-6)


def test_models_without_a_plain_head_use_the_reference():
    assert split_causal_lm(tiny_bert_classifier()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_full_logits_forward_and_gradient(monkeypatch, dtype):
    from tsugiki.kernels import target_logits as tl

    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows of a 50-word vocabulary per chunk
    torch.manual_seed(0)
    weight = torch.randn(50, 16, dtype=dtype)
    targets = torch.randint(0, 50, (10,))
    hidden = torch.randn(10, 16, dtype=dtype, requires_grad=True)
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        fast = tl.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, tl.compute_dtype(hidden, hidden.dtype))
        ref = torch.nn.functional.cross_entropy((hidden_ref @ weight.t()).float(), targets, reduction="sum")
    (fast * 0.5).backward()
    (ref * 0.5).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(hidden.grad.float(), hidden_ref.grad.float(), **tol)


def test_chunked_cross_entropy_gradient_comes_from_the_forward(monkeypatch):
    """The forward computes dL/dh with the logits at hand: backward multiplies, it runs no product with W;
    and without a gradient to compute (evaluation) the forward returns the same loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsugiki.kernels import target_logits as tl

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.products = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default, torch.ops.aten.addmm.default):
                self.products += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 4 * 50)
    torch.manual_seed(1)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (10,))
    hidden = torch.randn(10, 16, requires_grad=True)
    loss = tl.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, torch.float32)
    with CountProducts() as counter:
        (loss * 3.0).backward()
    assert counter.products == 0
    frozen = tl.ChunkedLinearCrossEntropy.apply(hidden.detach(), weight, targets, torch.float32)
    torch.testing.assert_close(frozen, loss.detach(), rtol=0, atol=0)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    (torch.nn.functional.cross_entropy(ref_hidden @ weight.t(), targets, reduction="sum") * 3.0).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=1e-5, rtol=1e-5)

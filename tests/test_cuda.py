"""The fast paths and the k-bit path on a CUDA GPU, each against its reference (skipped without a GPU).

The whole-model fast path (tests/test_lora_fused.py) and the HF PEFT interop on a
transformers 4-bit base (tests/test_lora_kbit.py) take a ``cuda`` parameter there.

The CPU tests cover the same code; these check what only a GPU runs: CUDA random
draws for the dropout mask, bf16 autocast on CUDA, bitsandbytes' CUDA kernels and
the trainer moving batches to the device.
"""

from __future__ import annotations

import pytest
import torch

import tsugiki
from tsugiki.kernels import target_logits as tl
from tsugiki.kernels.lora_fused import DropoutMask, FusedLoraAdd, keep_mask, reference_lora_add
from tiny_models import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _lora_inputs(dtype, seed=0, tokens=(4, 33), in_features=64, out_features=96, r=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_features, generator=g).to(CUDA, dtype).requires_grad_(True)
    W = (torch.randn(out_features, in_features, generator=g) / 8).to(CUDA, dtype)
    A = (torch.randn(r, in_features, generator=g) / 8).to(CUDA).requires_grad_(True)
    B = (torch.randn(out_features, r, generator=g) / 8).to(CUDA).requires_grad_(True)
    return x, W, A, B


def _backward(out, *tensors):
    g = torch.Generator().manual_seed(5)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return [t.grad.float() for t in tensors]


@pytest.mark.parametrize("dtype, p", [(torch.float32, 0.0), (torch.float32, 0.3), (torch.bfloat16, 0.05)])
def test_fused_lora_on_cuda_equals_the_composition(dtype, p):
    results = []
    for fused in (True, False):
        x, W, A, B = _lora_inputs(dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if fused:
                out = FusedLoraAdd.apply(x @ W.t(), x, A, B, 2.0, p, 1234)
            else:
                mask = DropoutMask(x.shape, p, 1234, x.device) if p else None
                out = reference_lora_add(x @ W.t(), x, A, B, 2.0, mask)
        results.append([out.detach().float()] + _backward(out, x, A, B))
    for name, got, want in zip(("output", "dx", "dA", "dB"), *results):
        tol = (1e-2 if dtype == torch.bfloat16 else 1e-5) * want.abs().max()
        assert (got - want).abs().max() <= tol, name


def test_cuda_dropout_mask_is_seeded_and_has_the_rate():
    shape = torch.Size([1000, 1000])
    keep = keep_mask(shape, 0.1, 7, CUDA)
    assert keep.device.type == "cuda"
    assert torch.equal(keep, keep_mask(shape, 0.1, 7, CUDA))
    assert not torch.equal(keep, keep_mask(shape, 0.1, 8, CUDA))
    assert 1 - keep.float().mean().item() == pytest.approx(0.1, abs=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_on_cuda_equals_full_logits(monkeypatch, dtype):
    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 7 * 300)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=g).to(CUDA, dtype)
    targets = torch.randint(0, 300, (40,), generator=g).to(CUDA)
    hidden = torch.randn(40, 32, generator=g).to(CUDA, dtype).requires_grad_(True)
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fast = tl.ChunkedLinearCrossEntropy.apply(hidden, weight, targets, tl.compute_dtype(hidden, hidden.dtype))
        logits = (hidden_ref @ weight.t()).float()
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    fast.backward()
    ref.backward()
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(fast.float(), ref.float(), **tol)
    torch.testing.assert_close(hidden.grad.float(), hidden_ref.grad.float(), **tol)


def test_trainer_on_cuda_matches_the_cpu_run(tmp_path):
    """A few fp32 optimizer steps on the GPU give the adapter the CPU gives (same rows, no dropout)."""
    from test_train_loop import make_config, random_examples, tiny_model
    from tsugiki.train.loop import Trainer

    examples = random_examples(12)
    adapters = []
    for device in ("cpu", "cuda"):
        model = tiny_model().to(device)
        trainer = Trainer(model, make_config(tmp_path / device, max_steps=3, batch_size=4), examples, progress=False)
        summary = trainer.train()
        adapters.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
    assert summary.metrics["peak_memory_kind"] == "cuda_max_allocated"
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_cuda_kbit_base_trains_saves_and_reloads(bits, tmp_path):
    quant = pytest.importorskip("tsugiki.quant")

    def base():
        return quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA), bits=bits,
                                    compute_dtype=torch.bfloat16)

    model = tsugiki.get_peft_model(base(), tsugiki.LoraConfig(r=4, target_modules="all-linear",
                                                              task_type="CAUSAL_LM")).to(CUDA)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(4, 10).to(CUDA)
    losses = []
    model.train()
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(base(), tmp_path).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
        merged = loaded.merge_and_unload(dequantize=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # merged layers in the embeddings' dtype
            merged_logits = merged(ids).logits
        assert (merged_logits.float() - expected.float()).abs().max().item() < 0.1


def test_auto_forward_budget_on_cuda_follows_the_free_device_memory():
    from tsugiki.train.loop import auto_forward_tokens

    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    on_cpu = auto_forward_tokens(model, torch.bfloat16, torch.device("cpu"))
    on_gpu = auto_forward_tokens(model.to(CUDA), torch.bfloat16, CUDA)
    free, total = torch.cuda.mem_get_info(CUDA)
    ours = min(total, free + torch.cuda.memory_reserved(CUDA))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    # Same rule, another reference size (the per-token estimate differs a little by device: the attention kernel).
    assert on_gpu == pytest.approx(on_cpu * ours / frozen, rel=0.15)


def test_activation_offloading_moves_the_layer_inputs_to_host_memory(tmp_path):
    """Checkpointing with the layers' inputs in pinned host memory: the same gradients, less held on the device."""
    from tsugiki.train.loop import enable_gradient_checkpointing

    layers, rows, length, hidden = 6, 4, 256, 128
    ids = token_batch(rows, length).to(CUDA)
    held, grads = {}, {}
    for offload in (False, True):
        base = tiny_llama(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=256,
                          max_position_embeddings=length)
        model = tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=4, target_modules="all-linear")).to(CUDA)
        enable_gradient_checkpointing(model, offload=offload)
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held[offload] = torch.cuda.memory_allocated() - before  # what the forward leaves for backward
        loss.backward()
        grads[offload] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    layer_inputs = layers * rows * length * hidden * 4  # fp32 hidden states kept by checkpointing
    assert held[False] - held[True] >= 0.9 * layer_inputs
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-7, rtol=1e-5, msg=name)


def test_trainer_with_activation_offloading_on_cuda_gives_the_checkpointed_adapter(tmp_path):
    from test_train_loop import make_config, random_examples, tiny_model
    from tsugiki.train.loop import Trainer

    examples = random_examples(8)
    adapters = []
    for offload in (False, True):
        model = tiny_model().to(CUDA)
        config = make_config(tmp_path / str(offload), max_steps=2, batch_size=4, gradient_checkpointing=True,
                             activation_offloading=offload)
        Trainer(model, config, examples, progress=False).train()
        adapters.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], atol=1e-7, rtol=1e-5, msg=name)

"""One-row bf16 linear layers through the CPU's fastest kernel (tsugiki.kernels.decode) against F.linear."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsugiki
from tsugiki.kernels import decode
from tsugiki.kernels.decode import is_single_row, single_row_decoding
from tsugiki.methods.lora import LoraLinear
from tiny_models import TinyMLP, randomize_adapters, tiny_llama, token_batch


def _operands(rows, in_features=96, out_features=80, bias=True, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, in_features, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return x, w, b


KERNELS = sorted(decode.ROW_KERNELS)


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Each row kernel in turn, whichever this CPU would choose."""
    monkeypatch.setattr(decode, "ROW_KERNEL", request.param)
    return request.param


def _counting(monkeypatch, name):
    """Count the calls of row kernel ``name``; returns the list the calls are appended to."""
    calls = []
    real = decode.ROW_KERNELS[name]
    monkeypatch.setitem(decode.ROW_KERNELS, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("rows", [(1, 1), (1,), ()])
@pytest.mark.parametrize("bias", [False, True])
def test_one_bf16_row_equals_f_linear_to_rounding(kernel, rows, bias):
    x, w, b = _operands(rows, bias=bias)
    assert is_single_row(x, w)
    got, want = decode.linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    # both accumulate in fp32 and round once to bf16: each is within half a bf16 step of the exact value
    step = exact.abs().clamp(min=1e-3) * 2.0 ** -7
    assert ((got.double() - exact).abs() <= step).all()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", ["two rows", "fp32", "fp16", "needs grad"])
def test_other_inputs_go_through_f_linear_unchanged(monkeypatch, case):
    x, w, b = _operands((2, 1) if case == "two rows" else (1, 1),
                        dtype={"fp32": torch.float32, "fp16": torch.float16}.get(case, torch.bfloat16))
    if case == "needs grad":
        w.requires_grad_(True)
    assert not is_single_row(x, w)
    for name in KERNELS:
        monkeypatch.setitem(decode.ROW_KERNELS, name, mock.Mock(side_effect=AssertionError(f"{name} used")))
    got = decode.linear(x, w, b)
    assert torch.equal(got, F.linear(x, w, b))
    if case == "needs grad":
        got.sum().backward()
        assert w.grad is not None


def test_a_strided_multi_row_input_does_not_copy_the_weight():
    """The first token's logits come from hidden[:, -1:, :]: matmul would copy the weight once per row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    hidden, w, b = _operands((4, 7))
    x = hidden[:, -1:, :]  # (4, 1, 96), rows 7 * 96 elements apart
    assert not x.is_contiguous()
    with torch.inference_mode(), LargestOutput() as seen:
        got = decode.linear(x, w, b)
    assert seen.largest < w.numel() * 2  # with the strided view, matmul made a (4, 96, 80) copy of w
    assert torch.equal(got, F.linear(x.contiguous(), w, b))
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-2, rtol=1e-2)


def test_the_native_kernel_switches_onednn_off_for_its_product_only(monkeypatch):
    x, w, b = _operands((1, 1))
    seen = []
    real_linear = F.linear

    def spy(*args):
        seen.append(torch._C._get_mkldnn_enabled())
        return real_linear(*args)

    monkeypatch.setattr(decode, "ROW_KERNEL", "native")
    before = torch._C._get_mkldnn_enabled()
    with mock.patch.object(F, "linear", side_effect=spy):
        decode.linear(x, w, b)
    assert seen == [False] and torch._C._get_mkldnn_enabled() == before
    with mock.patch.object(F, "linear", side_effect=RuntimeError("boom")), pytest.raises(RuntimeError):
        decode.linear(x, w, b)
    assert torch._C._get_mkldnn_enabled() == before  # restored after an error too


def test_threads_decoding_at_once_leave_onednn_as_they_found_it(monkeypatch):
    import threading

    x, w, b = _operands((1, 1))
    monkeypatch.setattr(decode, "ROW_KERNEL", "native")
    before = torch._C._get_mkldnn_enabled()
    start = threading.Barrier(4)

    def decode_rows():
        start.wait()
        for _ in range(1000):
            decode.linear(x, w, b)

    threads = [threading.Thread(target=decode_rows) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch._C._get_mkldnn_enabled() == before  # each saving and restoring its own left it off


def _stacked_operands(bias, out_features=1536, in_features=576, r=16, seed=0):
    """x, [W; A], [b; 0] (or None), U as the column-major view stacked_row takes, and the fp64 W x + b + U A x."""
    x, w, b = _operands((1, 1), in_features, out_features, bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    A = (torch.randn(r, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16)
    U = (0.3 * torch.randn(out_features, r, generator=g) / r ** 0.5).to(torch.bfloat16)
    stack = torch.cat([w, A])
    b_row = None if b is None else torch.cat([b, torch.zeros(r, dtype=torch.bfloat16)])
    update = U.t().contiguous().t()
    xd = x.double()
    want = xd @ w.double().T + (xd @ A.double().T) @ U.double().T
    return x, stack, b_row, update, (want if b is None else want + b.double())


@pytest.mark.parametrize("bias", [True, False])
def test_stacked_row_adds_the_low_rank_update_to_the_stacked_product(kernel, bias):
    x, stack, b_row, update, want = _stacked_operands(bias)
    out = want.shape[-1]
    got = decode.stacked_row(x, stack, b_row, [out, stack.shape[0] - out], update)
    assert got.shape == (*x.shape[:-1], out) and got.dtype == torch.bfloat16 and got.is_contiguous()
    # bf16 y, z and U: a few roundings of the output, far below the update's own size
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max() <= 2 ** -7 * scale
    no_update = F.linear(x, stack[:out], None if b_row is None else b_row[:out]).double()
    assert (no_update - want).abs().max() > 8 * 2 ** -7 * scale


def test_stacked_row_switches_onednn_off_and_back(monkeypatch):
    x, stack, b_row, update, want = _stacked_operands(True, out_features=80, in_features=96, r=4)
    seen = []
    real_addmv = torch.Tensor.addmv_

    def spy(self, *args):
        seen.append(torch._C._get_mkldnn_enabled())
        return real_addmv(self, *args)

    for kernel_name in KERNELS:
        monkeypatch.setattr(decode, "ROW_KERNEL", kernel_name)
        before = torch._C._get_mkldnn_enabled()
        with mock.patch.object(torch.Tensor, "addmv_", spy):
            decode.stacked_row(x, stack, b_row, [80, 4], update)
        assert seen[-1] is False and torch._C._get_mkldnn_enabled() == before
        with mock.patch.object(torch.Tensor, "addmv_", side_effect=RuntimeError("boom")), pytest.raises(RuntimeError):
            decode.stacked_row(x, stack, b_row, [80, 4], update)
        assert torch._C._get_mkldnn_enabled() == before  # restored after an error too


@pytest.mark.parametrize("amx,choice", [(True, "mv"), (False, "native")])
def test_the_row_kernel_follows_the_cpu(monkeypatch, amx, choice):
    """torch.mv measured fastest with AMX (a Xeon); oneDNN switched off without it (an AMD EPYC)."""
    import importlib

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    try:
        assert importlib.reload(decode).ROW_KERNEL == choice
    finally:
        monkeypatch.undo()
        importlib.reload(decode)


def test_single_row_decoding_routes_plain_linears_and_restores_them():
    model = TinyMLP().to(torch.bfloat16)
    hooked = nn.Linear(4, 4, dtype=torch.bfloat16)
    hooked.forward = lambda x: x  # a replaced forward (as accelerate's hooks do) is left alone
    model.extra = hooked
    model.sub = type("Sub", (nn.Linear,), {})(4, 4, dtype=torch.bfloat16)  # subclasses (k-bit layers) too
    model.fp32 = nn.Linear(4, 4)  # routed too (a strided batch must not copy its weight), but F.linear at one row
    model.meta = nn.Linear(4, 4, device="meta")  # another device: left alone
    with single_row_decoding(model) as routed:
        assert routed == 3
        assert decode.routed(model.lin0) and decode.routed(model.lin1)
        assert decode.routed(model.fp32) and not decode.routed(model.meta)
        assert not decode.routed(model.sub) and hooked.forward(7) == 7
        with single_row_decoding(model) as inner:
            assert inner == 0  # already routed: the outer block owns them
        assert decode.routed(model.lin0)
    assert "forward" not in model.lin0.__dict__ and "forward" not in model.lin1.__dict__
    assert hooked.forward(7) == 7
    with pytest.raises(RuntimeError):
        with single_row_decoding(model):
            raise RuntimeError("boom")
    assert not decode.routed(model.lin0)
    with single_row_decoding(model, enabled=False) as routed:
        assert routed == 0 and not decode.routed(model.lin0)


def _decode_step_logits(model, ids, routed):
    with torch.inference_mode(), single_row_decoding(model, enabled=routed):
        out = model(input_ids=ids[:, :-1], use_cache=True)
        return model(input_ids=ids[:, -1:], cache=out.past_key_values).logits


@pytest.mark.parametrize("adapter", [False, True])
def test_a_decode_step_matches_the_plain_model(monkeypatch, kernel, adapter):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    if adapter:
        model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
        model.eval()
    model = model.to(torch.bfloat16)
    ids = token_batch(batch=1, length=6)
    calls = _counting(monkeypatch, kernel)
    fast = _decode_step_logits(model, ids, routed=True)
    plain = _decode_step_logits(model, ids, routed=False)
    # every linear layer of the one-token step took the path (2 blocks x 7 linears + the head); the
    # 5-token prefill did not
    assert len(calls) == 15
    torch.testing.assert_close(fast, plain, atol=3e-2, rtol=3e-2)
    if adapter:
        with torch.inference_mode(), model.disable_adapter():
            bare = model(input_ids=ids).logits[:, -1:]
        assert (bare - fast).abs().max() > 0.1  # the adapter's update is in the fast result
        plans = [m.__dict__.get("_inference_plan") for m in model.modules() if isinstance(m, LoraLinear)]
        assert plans and all(p is not None and p.scaled_B_t is not None for p in plans)


def test_peft_generate_routes_and_gives_the_plain_tokens():
    model = tsugiki.get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128),
                                   tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    model = model.eval().to(torch.bfloat16)
    ids = token_batch(batch=1, length=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode(), mock.patch.object(decode, "linear", wraps=decode.linear) as spy:
        fast = model.generate(input_ids=ids, **kw)
    assert spy.call_count > 0
    assert not any(decode.routed(m) for m in model.modules())
    with torch.inference_mode():
        plain = model.base_model.generate(input_ids=ids, **kw)  # the transformers model's own generate
    # the first new token's scores (later ones follow each stack's own greedy choices)
    torch.testing.assert_close(fast.scores[0], plain.scores[0], atol=3e-2, rtol=3e-2)
    assert fast.sequences.shape == plain.sequences.shape


def test_tsugiki_generation_routes_a_bare_base_too(monkeypatch):
    from tsugiki import generation

    model = tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    kw = dict(input_ids=token_batch(batch=1, length=5), max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls = _counting(monkeypatch, decode.ROW_KERNEL)
    with torch.inference_mode():
        out = generation._generate(model, kw)
    assert calls and out.shape == (1, 8)
    assert not any(decode.routed(m) for m in model.modules())

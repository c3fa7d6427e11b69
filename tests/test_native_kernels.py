"""The C kernel for LoRA's update on a few bf16 rows (tsugiki.kernels.native) against torch, and its fallbacks."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
import torch

import tsugiki
from tsugiki.kernels import native
from tsugiki.kernels.decode import single_row_decoding
from tsugiki.methods.lora import LoraLinear, decoding_forwards
from tiny_models import randomize_adapters, tiny_llama

CAN_BUILD = (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
             and (shutil.which("cc") or shutil.which("gcc")) is not None)
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="the kernel needs AVX-512 and a C compiler")


@pytest.fixture
def kernel():
    built = native.lowrank_rows_kernel()
    assert built is not None, "AVX-512 and a compiler are here, yet the kernel was not built (see the INFO log)"
    return built


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """lowrank_rows_kernel() as on a first call, building into an empty cache folder."""
    monkeypatch.setenv("TSUGIKI_CACHE_DIR", str(tmp_path / "cache"))
    native.lowrank_rows_kernel.cache_clear()
    yield tmp_path / "cache"
    native.lowrank_rows_kernel.cache_clear()


def _operands(rows, inputs, outputs, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=g).to(torch.bfloat16)
    y = torch.randn(rows, outputs, generator=g).to(torch.bfloat16)
    A = torch.randn(rank, inputs, generator=g) / inputs ** 0.5
    scaled_B_t = torch.randn(rank, outputs, generator=g)
    return x, y, A, scaled_B_t


def _torch_update(y, x, A, scaled_B_t):
    """The reference: torch's fp32 products from the same bf16-rounded weights, added and rounded once."""
    A, U = A.to(torch.bfloat16).float(), scaled_B_t.to(torch.bfloat16).float()
    return y.float().add(x.float() @ A.t() @ U).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("rows,inputs,outputs,rank", [
    (1, 8, 16, 4),        # one row, one column block
    (7, 37, 45, 5),       # a short row block, a column tail, padded ranks
    (8, 576, 192, 16),    # SmolLM2's k/v projection at batch 8
    (9, 64, 33, 17),      # a second row block of one row, two rank blocks
    (64, 100, 1536, 64),  # the most rows and the highest rank the kernel takes
])
def test_kernel_equals_torch_to_the_rounding(kernel, rows, inputs, outputs, rank):
    x, y, A, scaled_B_t = _operands(rows, inputs, outputs, rank)
    want = _torch_update(y, x, A, scaled_B_t)
    got = y.clone()
    assert native.LowRankRows(kernel, A, scaled_B_t).add_(got, x)
    # fp32 sums in another order: equal after rounding, bar a rare neighbour
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5 * want.abs().max().item())
    assert (got.float() - y.float()).abs().max() > 0.1  # the update is there


@needs_kernel
def test_kernel_rounds_to_nearest_even_like_torch(kernel):
    """Sums that fall exactly between two bf16 values, and one past the largest bf16 value."""
    y = torch.tensor([[1.0, 1.0, 1.0, 3.0, -1.0, 3.3e38]], dtype=torch.bfloat16)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    A = torch.ones(1, 1)
    update = torch.tensor([[2 ** -8, 3 * 2 ** -8, 2 ** -9, 2 ** -7, -(2 ** -8), 3e37]])
    got = y.clone()
    native.LowRankRows(kernel, A, update).add_(got, x)
    want = (y.float() + update).to(torch.bfloat16)  # torch's rounding of the exact fp32 sums
    assert torch.equal(got, want)
    assert got[0, 0] == 1.0 and got[0, 1] == 1 + 2 ** -6 and torch.isinf(got[0, 5])


@needs_kernel
def test_nan_and_infinity_propagate_per_row(kernel):
    x, y, A, scaled_B_t = _operands(3, 16, 20, 4)
    x[1, 3] = float("nan")
    y[2, 5] = float("inf")
    got = y.clone()
    native.LowRankRows(kernel, A, scaled_B_t).add_(got, x)
    assert torch.isnan(got[1]).all()
    assert torch.isinf(got[2, 5]) and torch.isfinite(got[2, :5]).all()
    clean = _torch_update(y[:1], x[:1], A, scaled_B_t)
    torch.testing.assert_close(got[:1].float(), clean.float(), rtol=2 ** -7, atol=1e-3)


@needs_kernel
def test_inputs_that_are_not_its_case_are_refused_untouched(kernel):
    x, y, A, scaled_B_t = _operands(4, 16, 20, 4)
    update = native.LowRankRows(kernel, A, scaled_B_t)
    for out, inp in [(y.clone(), x.float()),                               # fp32 input
                     (y.clone(), torch.cat([x, x], 1)[:, :16])]:           # rows not adjacent
        before = out.clone()
        assert not update.add_(out, inp)
        assert torch.equal(out, before)
    assert native.LowRankRows.build(torch.randn(native.MAX_RANK + 1, 16), torch.randn(native.MAX_RANK + 1, 20)) is None


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_prompts_many_rows_are_split_across_threads(kernel, threads):
    rows = 301  # over SPLIT_ROWS; 3 threads: blocks of 104, 104 and 93 rows
    assert rows > native.SPLIT_ROWS
    x, y, A, scaled_B_t = _operands(rows, 48, 40, 8)
    want = _torch_update(y, x, A, scaled_B_t)
    got = y.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert native.LowRankRows(kernel, A, scaled_B_t).add_(got, x)
    finally:
        torch.set_num_threads(before)
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5 * want.abs().max().item())


@needs_kernel
def test_the_build_is_cached_and_keyed_by_the_source(fresh_loader, monkeypatch, tmp_path):
    assert native.lowrank_rows_kernel() is not None
    libraries = list(fresh_loader.iterdir())
    assert len(libraries) == 1 and libraries[0].suffix == ".so"
    stamp = libraries[0].stat().st_mtime_ns
    native.lowrank_rows_kernel.cache_clear()
    assert native.lowrank_rows_kernel() is not None
    assert list(fresh_loader.iterdir()) == libraries and libraries[0].stat().st_mtime_ns == stamp  # not rebuilt
    edited = tmp_path / "lowrank_rows.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    native.lowrank_rows_kernel.cache_clear()
    assert native.lowrank_rows_kernel() is not None
    assert len(list(fresh_loader.iterdir())) == 2  # another source, another library


@needs_kernel
def test_a_new_build_deletes_builds_of_other_sources_a_month_old(fresh_loader):
    stale, recent = fresh_loader / "lowrank_rows-0000000000000000.so", fresh_loader / "lowrank_rows-1111111111111111.so"
    other = fresh_loader / "notes.txt"
    fresh_loader.mkdir()
    for path in (stale, recent, other):
        path.write_text("x")
    month = time.time() - native.STALE_BUILD_SECONDS - 60
    os.utime(stale, (month, month))
    os.utime(other, (month, month))
    assert native.lowrank_rows_kernel() is not None
    left = sorted(p.name for p in fresh_loader.iterdir())
    assert stale.name not in left and recent.name in left and other.name in left and len(left) == 3


@pytest.mark.parametrize("how,reason", [
    ("disabled", "TSUGIKI_NATIVE_KERNELS=0"),
    ("no compiler", "No such file"),
    ("broken source", "exited with"),
])
def test_without_the_kernel_torch_keeps_the_update(how, reason, fresh_loader, monkeypatch, tmp_path, caplog):
    if how == "disabled":
        monkeypatch.setenv("TSUGIKI_NATIVE_KERNELS", "0")
    elif how == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:
        if not CAN_BUILD:
            pytest.skip("the kernel needs AVX-512 and a C compiler")
        broken = tmp_path / "lowrank_rows.c"
        broken.write_text("this is not C\n")
        monkeypatch.setattr(native, "SOURCE", broken)
    if how != "disabled" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        reason = "AVX-512"
    with caplog.at_level(logging.INFO, logger="tsugiki.kernels"):
        assert native.lowrank_rows_kernel() is None
    assert reason in caplog.text
    # nothing half-built is left behind
    assert not fresh_loader.exists() or not [p for p in fresh_loader.iterdir()]
    # an adapted bf16 model still decodes several rows, through torch
    model = tsugiki.get_peft_model(tiny_llama().to(torch.bfloat16),
                                   tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 64, (8, 1))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with single_row_decoding(model), decoding_forwards(model):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)  # the same torch products as the general inference path


@needs_kernel
@pytest.mark.parametrize("routed", [True, False])
def test_adapted_layers_take_the_kernel_for_a_decoding_batch(kernel, routed, monkeypatch):
    model = tsugiki.get_peft_model(tiny_llama().to(torch.bfloat16),
                                   tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.3)
    model.eval()
    calls = []
    real_add = native.LowRankRows.add_

    def counting_add(self, out, x):
        taken = real_add(self, out, x)
        calls.append(taken)
        return taken

    monkeypatch.setattr(native.LowRankRows, "add_", counting_add)
    step = torch.randint(0, 64, (8, 1))  # one new token for each of 8 sequences
    with torch.inference_mode():
        want = model(input_ids=step).logits  # the general inference path: torch's fp32 products
        with model.disable_adapter():
            bare = model(input_ids=step).logits
        with single_row_decoding(model, enabled=routed), decoding_forwards(model):
            got = model(input_ids=step).logits
    assert calls == [True] * 14  # every adapted linear of the 2 blocks, once
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert not any("forward" in m.__dict__ for m in layers)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert (got.float() - bare.float()).abs().max() > 0.1  # the adapter acts


@needs_kernel
def test_a_biased_layer_keeps_its_bias_in_a_decoding_batch(kernel):
    from tiny_models import TinyMLP

    model = tsugiki.get_peft_model(TinyMLP().to(torch.bfloat16),
                                   tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    randomize_adapters(model, scale=0.3)
    model.eval()
    layer = model.base_model.model.lin0
    x = torch.randn(5, 1, 8).to(torch.bfloat16)
    with torch.inference_mode(), single_row_decoding(model), decoding_forwards(model):
        got = layer(x)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    exact = x.double() @ W.T + b + layer.scaling["default"] * (x.double() @ A.T) @ B.T
    assert got.shape == (5, 1, 16) and got.is_contiguous()
    # bf16 A and s B, one rounding of the output: within a few bf16 steps of the exact value
    assert (got.double() - exact).abs().max() <= 2 ** -6 * exact.abs().max()
    assert (got.double() - (x.double() @ W.T + b)).abs().max() > 2 ** -4 * exact.abs().max()  # update there

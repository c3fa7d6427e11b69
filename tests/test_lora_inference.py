"""LoRA's inference path (eval mode, no autograd) against the training-time path, and its cache's freshness.

``LoraLinear._inference_forward`` keeps ``s * B^T`` as a copy; these tests
check that every way of changing an adapter (an optimizer step, an in-place
edit, a reassigned ``.data``, loading, switching, deleting) is seen by the
next call, and that the cases it does not handle still reach the general path.
"""

from __future__ import annotations

import pytest
import torch

import tsugiki
from tsugiki import adapter_io
from tsugiki.kernels.decode import single_row_decoding
from tsugiki.methods.lora import LoraLinear, decoding_forwards
from tiny_models import randomize_adapters, tiny_gpt2, tiny_llama, token_batch


def _grafted(model, **config):
    config.setdefault("target_modules", "all-linear")
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, lora_alpha=8, **config))
    randomize_adapters(peft_model)
    return peft_model.eval()


def _reference(model, ids):
    """Logits through the training-time path: autograd on, so the inference path is not taken."""
    with torch.enable_grad():
        return model(input_ids=ids).logits.detach()


def _fast(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _plans(model):
    return [m.__dict__.get("_inference_plan") for m in model.modules() if isinstance(m, LoraLinear)]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("make,dtype", [(tiny_llama, torch.float32), (tiny_llama, torch.bfloat16),
                                        (tiny_gpt2, torch.float32)])
def test_inference_path_equals_the_training_path(make, dtype, dora):
    model = _grafted(make().to(dtype), use_dora=dora)  # GPT-2: biases and Conv1D's (in, out) layout
    ids = token_batch()
    fast = _fast(model, ids)
    plans = _plans(model)
    assert plans and all(p is not None and p.scaled_B_t is not None for p in plans), "inference path not taken"
    assert all((p.factor is not None) == dora for p in plans)
    want = _reference(model, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast, want, atol=tol, rtol=tol)
    # it really adds the adapter: the bare base differs
    with model.disable_adapter():
        assert (_fast(model, ids) - fast).abs().max() > 10 * tol


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bits", [4, 8])
def test_inference_path_on_a_kbit_base(bits, dora):
    pytest.importorskip("bitsandbytes")
    quant = pytest.importorskip("tsugiki.quant")
    base = quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=bits,
                                compute_dtype=torch.float32)
    model = _grafted(base, use_dora=dora)
    ids = token_batch()
    torch.testing.assert_close(_fast(model, ids), _reference(model, ids), atol=1e-4, rtol=1e-4)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m._direct_base_linear() is None for m in layers)  # bnb layers are called as modules
    with decoding_forwards(model) as count:
        assert count == 0


def _edits():
    """Ways of changing lora_B of one layer, each a function of the layer."""

    def optimizer_step(layer):
        B = layer.lora_B["default"].weight
        opt = torch.optim.SGD([B], lr=0.5)
        B.grad = torch.ones_like(B)
        opt.step()

    def in_place_no_grad(layer):
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(-3.0)

    def data_reassigned(layer):
        B = layer.lora_B["default"].weight
        B.data = torch.randn_like(B)

    def parameter_replaced(layer):
        B = layer.lora_B["default"].weight
        layer.lora_B["default"].weight = torch.nn.Parameter(torch.randn_like(B))

    def data_edit_then_eval(layer):
        layer.lora_B["default"].weight.data.mul_(-3.0)  # moves no version counter...
        layer.eval()  # ...so the documented way to drop the plan

    return [optimizer_step, in_place_no_grad, data_reassigned, parameter_replaced, data_edit_then_eval]


def _dora_edits():
    """Ways of changing a tensor DoRA's factor m / ||W + s B A|| depends on, each a function of the layer."""

    def a_in_place(layer):
        with torch.no_grad():
            layer.lora_A["default"].weight.mul_(-3.0)

    def magnitude_replaced(layer):
        m = layer.lora_magnitude_vector["default"].weight
        layer.lora_magnitude_vector["default"].weight = torch.nn.Parameter(torch.randn_like(m))

    def base_weight_in_place(layer):
        with torch.no_grad():
            layer.base_layer.weight.mul_(2.0)

    def base_weight_data_reassigned(layer):
        w = layer.base_layer.weight
        w.data = torch.randn_like(w)

    return [a_in_place, magnitude_replaced, base_weight_in_place, base_weight_data_reassigned]


@pytest.mark.parametrize("edit", _dora_edits(), ids=lambda f: f.__name__)
def test_a_changed_dora_factor_is_seen_by_the_next_inference_call(edit):
    model = _grafted(tiny_llama(), use_dora=True)
    ids = token_batch()
    before = _fast(model, ids)
    edit(model.base_model.model.model.layers[0].self_attn.q_proj)
    after = _fast(model, ids)
    torch.testing.assert_close(after, _reference(model, ids), atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-4  # DoRA renormalises rows: a scaled W changes little


def test_a_changed_base_bias_is_seen_by_a_dora_layers_next_inference_call():
    model = _grafted(tiny_llama(attention_bias=True), use_dora=True)
    ids = token_batch()
    before = _fast(model, ids)
    with torch.no_grad():  # DoRA scales the base output, bias included: the plan keeps (1 - m/n) b
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.add_(1.0)
    after = _fast(model, ids)
    torch.testing.assert_close(after, _reference(model, ids), atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_a_changed_adapter_is_seen_by_the_next_inference_call(edit):
    model = _grafted(tiny_llama())
    ids = token_batch()
    before = _fast(model, ids)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    edit(layer)
    after = _fast(model, ids)
    torch.testing.assert_close(after, _reference(model, ids), atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3


def test_load_switch_and_delete_adapters(tmp_path):
    model = _grafted(tiny_llama())
    model.add_adapter("second", tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=11)  # both adapters
    ids = token_batch()
    first = _fast(model, ids)
    torch.testing.assert_close(first, _reference(model, ids), atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # the active adapter, "default"

    model.set_adapter("second")
    second = _fast(model, ids)
    torch.testing.assert_close(second, _reference(model, ids), atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 1e-3

    model.set_adapter("default")
    torch.testing.assert_close(_fast(model, ids), first, atol=1e-6, rtol=0)
    randomize_adapters(model, seed=12)  # changes both adapters in place
    assert (_fast(model, ids) - first).abs().max() > 1e-3
    # what load_adapter does once the adapter exists: copy the file's tensors into the parameters
    adapter_io.load_adapter_weights(model, adapter_io.read_adapter_weights(str(tmp_path)), "default",
                                    model.base_model.adapter_attr_names(), str(tmp_path))
    torch.testing.assert_close(_fast(model, ids), first, atol=1e-6, rtol=0)

    model.set_adapter("second")
    model.delete_adapter("default")
    torch.testing.assert_close(_fast(model, ids), _reference(model, ids), atol=1e-5, rtol=1e-5)


def test_a_hook_on_the_base_layer_still_runs():
    model = _grafted(tiny_llama())
    ids = token_batch()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    calls = []

    def shift(module, args, output):
        calls.append(1)
        return output + 1.0

    handle = layer.base_layer.register_forward_hook(shift)
    try:
        fast = _fast(model, ids)
        assert calls
        torch.testing.assert_close(fast, _reference(model, ids), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    assert (fast - _fast(model, ids)).abs().max() > 1e-3


def test_a_global_module_hook_still_sees_the_base_layers():
    model = _grafted(tiny_llama())
    bases = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLinear)}
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.add(id(m)))
    try:
        _fast(model, token_batch())
    finally:
        handle.remove()
    assert bases <= seen


def test_cases_the_inference_path_leaves_to_the_general_one():
    ids = token_batch()
    model = _grafted(tiny_llama())
    with torch.inference_mode(), model.disable_adapter():
        bare = model(input_ids=ids).logits
    base = tiny_llama()
    torch.testing.assert_close(bare, _fast(base, ids), atol=1e-6, rtol=0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _fast(model, ids)  # autocast: the general path, in bf16
    torch.testing.assert_close(auto.float(), _reference(model, ids), atol=5e-2, rtol=5e-2)

    model.merge_adapter()
    merged = _fast(model, ids)
    model.unmerge_adapter()
    torch.testing.assert_close(merged, _fast(model, ids), atol=1e-5, rtol=1e-5)


def test_training_after_inference_uses_the_training_path():
    model = _grafted(tiny_llama())
    ids = token_batch()
    _fast(model, ids)
    model.train()
    assert all(p is None for p in _plans(model))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- decoding_forwards: per-layer forwards made for one generate call ------------------------------------

def _installed(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear) and "forward" in m.__dict__]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype,routed", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_decoding_forwards_compute_what_the_inference_path_computes(dtype, routed, dora):
    from tsugiki.kernels.decode import single_row_decoding

    model = _grafted(tiny_llama().to(dtype), use_dora=dora)
    ids = token_batch(batch=1)
    step = ids[:, -1:]  # one row, as a decode step; routed layers then take torch.mv
    want_all, want_step = _fast(model, ids), _fast(model, step)
    with single_row_decoding(model, enabled=routed), decoding_forwards(model) as count:
        assert count == 14 and len(_installed(model)) == 14  # 2 blocks x 7 linears
        got_all, got_step = _fast(model, ids), _fast(model, step)
    assert not _installed(model)
    if dtype is torch.float32:  # the same products in the same order as _inference_forward: equal bit for bit
        assert torch.equal(got_all, want_all) and torch.equal(got_step, want_step)
    else:  # bf16 A and s B: the C kernel for several rows (native.LowRankRows, where it builds) and,
        # routed, the [W; A] stack for one row (decode.stacked_row): within bf16 rounding
        torch.testing.assert_close(got_all, want_all, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(got_step, want_step, atol=3e-2, rtol=3e-2)


def test_decoding_forwards_fall_back_when_the_call_needs_the_general_path():
    model = _grafted(tiny_llama())
    ids = token_batch()
    want = _reference(model, ids)
    with decoding_forwards(model) as count:
        assert count == 14
        assert torch.equal(_reference(model, ids), want)  # autograd on: the general path
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
        with torch.inference_mode():
            names = ["default", "__base__"] * (ids.shape[0] // 2)
            mixed = model(input_ids=ids, adapter_names=names).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = model(input_ids=ids).logits
    with torch.inference_mode():
        torch.testing.assert_close(mixed, model(input_ids=ids, adapter_names=names).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(auto.float(), _reference(model, ids), atol=5e-2, rtol=5e-2)


def test_decoding_forwards_skip_layers_that_need_the_general_path():
    ids = token_batch()
    model = _grafted(tiny_llama())
    hooked = model.base_model.model.model.layers[0].mlp.down_proj
    handle = hooked.base_layer.register_forward_hook(lambda m, a, out: out + 1.0)
    try:
        with decoding_forwards(model) as count:
            assert count == 13 and hooked not in _installed(model)
            torch.testing.assert_close(_fast(model, ids), _reference(model, ids), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    with model.disable_adapter(), decoding_forwards(model) as count:
        assert count == 0
    model.merge_adapter()
    with decoding_forwards(model) as count:
        assert count == 0
    model.unmerge_adapter()
    model.train()
    with decoding_forwards(model) as count:
        assert count == 0
    model.eval()
    with pytest.raises(RuntimeError), decoding_forwards(model):
        raise RuntimeError("boom")
    assert not _installed(model)


def test_peft_generate_runs_with_decoding_forwards():
    from unittest import mock

    from tsugiki.methods import lora

    model = _grafted(tiny_llama())
    ids = token_batch(batch=1)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        with mock.patch.object(LoraLinear, "_decoding_forward", autospec=True,
                               side_effect=lora.LoraLinear._decoding_forward) as made:
            fast = model.generate(input_ids=ids, **kw)
        plain = model.base_model.model.generate(input_ids=ids, **kw)  # transformers' own loop, no forwards made
    assert made.call_count == 14 and not _installed(model)
    assert torch.equal(fast, plain)


def test_a_hook_on_the_adapted_layer_runs_around_its_decoding_forward():
    model = _grafted(tiny_llama())
    ids = token_batch()
    layer = model.base_model.model.model.layers[1].self_attn.o_proj
    want = _fast(model, ids)
    handle = layer.register_forward_hook(lambda m, a, out: out * 2.0)
    try:
        with decoding_forwards(model) as count:
            assert count == 14 and "forward" in layer.__dict__
            hooked = _fast(model, ids)
        torch.testing.assert_close(hooked, _fast(model, ids), atol=1e-6, rtol=0)  # the same hook, class forward
    finally:
        handle.remove()
    assert (hooked - want).abs().max() > 1e-3


def test_a_non_contiguous_base_output_gets_the_update_in_its_own_dtype():
    model = _grafted(tiny_llama().to(torch.bfloat16))
    ids = token_batch()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    seen = []

    def strided(module, args, output):  # same values, laid out column-major
        out = output.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not out.is_contiguous()
        return out

    handle = layer.base_layer.register_forward_hook(strided)
    up = layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        fast = _fast(model, ids)
        want = _reference(model, ids)
    finally:
        handle.remove()
        up.remove()
    assert seen[0] == torch.bfloat16
    torch.testing.assert_close(fast, want, atol=2e-2, rtol=2e-2)


# -- one-row decoding from the [W; A] stack -------------------------------------------------------------

def _stacked_mlp(kernel_name, monkeypatch, bias=True):
    """TinyMLP in bf16 with LoRA on both linears (a bias on each), decoding through ``kernel_name``."""
    from tiny_models import TinyMLP
    from tsugiki.kernels import decode

    monkeypatch.setattr(decode, "ROW_KERNEL", kernel_name)
    base = TinyMLP().to(torch.bfloat16)
    if not bias:
        base.lin0.bias = None
    model = tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    randomize_adapters(model, scale=0.3)
    return model.eval(), model.base_model.model.lin0


def _exact(layer, x):
    """``x W^T + b + s (x A^T) B^T`` in fp64, from the weights as stored (the adapter's fp32 A and B)."""
    name = layer.active_adapter
    W = layer.base_layer.weight.double()
    A, B = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    out = x.double() @ W.T + layer.scaling[name] * (x.double() @ A.T) @ B.T
    return out if layer.base_layer.bias is None else out + layer.base_layer.bias.double()


def _decode_row(model, layer, x):
    from tsugiki.kernels.decode import single_row_decoding

    with torch.inference_mode(), single_row_decoding(model), decoding_forwards(model):
        return layer(x)


@pytest.mark.parametrize("kernel_name", ["mv", "native"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_takes_the_update_from_the_stacked_product(kernel_name, bias, monkeypatch):
    model, layer = _stacked_mlp(kernel_name, monkeypatch, bias)
    x = torch.randn(1, 1, 8).to(torch.bfloat16)
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    got = _decode_row(model, layer, x)
    stack = layer.__dict__["_decode_stack"]
    # the stack is [W; A]: the weight lives in its first rows, the adapter's A (in bf16) in the rest
    assert stack.shape == (16 + 4, 8) and weight.data_ptr() == stack.data_ptr()
    assert torch.equal(weight, before) and torch.equal(stack[16:], layer.lora_A["default"].weight.to(torch.bfloat16))
    want = _exact(layer, x)
    with torch.inference_mode():
        general = layer._inference_forward(x)  # fp32 A, fp32 products
    # the same accuracy as the general path: within the bf16 rounding of the output
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max() <= 2 ** -7 * scale
    assert (got.double() - general.double()).abs().max() <= 2 ** -7 * scale
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 16) and got.is_contiguous()
    with model.disable_adapter(), torch.inference_mode():
        bare = layer(x)
    assert (got.double() - bare.double()).abs().max() > 20 * 2 ** -7 * scale  # the update is really there


def test_a_stack_built_under_inference_mode_leaves_the_weight_usable_outside_it(monkeypatch):
    model, layer = _stacked_mlp("native", monkeypatch)
    x = torch.randn(1, 1, 8).to(torch.bfloat16)
    _decode_row(model, layer, x)  # under torch.inference_mode(), as generate_answers runs
    assert "_decode_stack" in layer.__dict__ and not layer.base_layer.weight.is_inference()
    with torch.no_grad(), single_row_decoding(model), decoding_forwards(model):
        layer(x)  # the stack takes the adapter's A again, outside inference mode
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs a bf16 base
        out = layer(x)
    out.float().sum().backward()  # the weight can be saved for backward
    assert layer.lora_A["default"].weight.grad is not None


def test_the_stack_follows_the_adapter_and_lets_go_of_replaced_weights(monkeypatch):
    model, layer = _stacked_mlp("native", monkeypatch)
    x = torch.randn(1, 1, 8).to(torch.bfloat16)
    _decode_row(model, layer, x)
    stack = layer.__dict__["_decode_stack"]
    # a trained A is seen by the next generate call, in the same stack
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(-2.0)
    got = _decode_row(model, layer, x)
    assert layer.__dict__["_decode_stack"] is stack
    want = _exact(layer, x)
    assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max()
    # merging replaces the weight: the stack goes with it, and the merged layer computes W + s B A
    model.merge_adapter()
    assert "_decode_stack" not in layer.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).double(), want, atol=5e-2, rtol=5e-2)
    model.unmerge_adapter()
    got = _decode_row(model, layer, x)
    assert layer.__dict__["_decode_stack"] is not stack
    assert layer.base_layer.weight.data_ptr() == layer.__dict__["_decode_stack"].data_ptr()
    # another rank: the stack is made again with that many rows
    model.add_adapter("wide", tsugiki.LoraConfig(r=6, lora_alpha=6, target_modules=["lin0", "lin1"]))
    model.set_adapter("wide")
    randomize_adapters(model, seed=5, scale=0.3)
    got = _decode_row(model, layer, x)
    assert layer.__dict__["_decode_stack"].shape == (16 + 6, 8)
    want = _exact(layer, x)
    assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max()
    # a dtype change moves every weight out of its stack: the stack is dropped, fp32 decodes without one
    model.float()
    assert "_decode_stack" not in layer.__dict__
    got = _decode_row(model, layer, x.float())
    assert "_decode_stack" not in layer.__dict__
    torch.testing.assert_close(got.double(), _exact(layer, x.float()), atol=1e-5, rtol=1e-5)


def test_a_stacked_weight_saves_loads_and_copies_as_itself(monkeypatch, tmp_path):
    import copy

    from safetensors.torch import load_file, save_file

    model, layer = _stacked_mlp("native", monkeypatch)
    x = torch.randn(1, 1, 8).to(torch.bfloat16)
    want = _decode_row(model, layer, x)
    state = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    save_file(state, tmp_path / "base.safetensors")
    loaded = load_file(tmp_path / "base.safetensors")
    key = next(k for k in loaded if k.endswith("lin0.base_layer.weight"))
    assert loaded[key].shape == (16, 8) and torch.equal(loaded[key], layer.base_layer.weight)
    twin = copy.deepcopy(model)
    twin_layer = twin.base_model.model.lin0
    assert torch.equal(_decode_row(twin, twin_layer, x), want)
    with torch.no_grad():
        twin_layer.base_layer.weight.zero_()
    assert layer.base_layer.weight.abs().sum() > 0  # the copy does not share the original's stack


def test_weights_over_the_size_limit_keep_the_two_product_path(monkeypatch):
    from tsugiki.methods import lora

    model, lin0 = _stacked_mlp("native", monkeypatch)
    lin1 = model.base_model.model.lin1
    monkeypatch.setattr(lora, "ROW_STACK_MAX_ELEMENTS", 100)  # lin0's 16 x 8 weight is over it, lin1's 4 x 16 not
    x = torch.randn(1, 1, 8).to(torch.bfloat16)
    before = lin0.base_layer.weight.data_ptr()
    got = _decode_row(model, lin0, x)
    assert "_decode_stack" not in lin0.__dict__ and lin0.base_layer.weight.data_ptr() == before
    assert "_decode_stack" in lin1.__dict__
    want = _exact(lin0, x)
    assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max()

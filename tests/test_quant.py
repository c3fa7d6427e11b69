"""k-bit quantization of an in-memory model, k-bit training preparation, and the merge helpers."""

import copy
import importlib
import logging

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tsugiki import quant  # noqa: E402

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(dtype=torch.float32, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype)


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def quantized_linears(model):
    return {name: m for name, m in model.named_modules() if quant.is_quantized_linear(m)}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_4bit_swaps_linears_keeps_head_and_stays_close(fp32_model, ids, quant_type, double_quant):
    model = quant.quantize_model(copy.deepcopy(fp32_model), bits=4, quant_type=quant_type, double_quant=double_quant)
    found = quantized_linears(model)
    assert len(found) == 2 * len(LINEAR_NAMES)
    for layer in found.values():
        assert isinstance(layer, bnb.nn.Linear4bit)
        assert layer.weight.quant_type == quant_type
        assert layer.weight.compress_statistics is double_quant
        assert layer.weight.quant_state.nested is double_quant
        assert layer.compute_dtype == torch.bfloat16
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, fp32_model.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, fp32_model.model.embed_tokens.weight)
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    record = model.config.quantization_config
    assert record.load_in_4bit and record.bnb_4bit_quant_type == quant_type
    assert record.bnb_4bit_use_double_quant is double_quant and record.llm_int8_skip_modules == ["lm_head"]
    with torch.no_grad():
        expected, got = fp32_model(ids).logits, model(ids).logits
    assert got.dtype == torch.float32  # Linear4bit casts back to the input dtype
    assert (got - expected).abs().max() < 0.3
    assert (got - expected).abs().mean() < 0.05


def test_quantize_8bit_swaps_linears_and_stays_close(fp32_model, ids):
    model = quant.quantize_model(copy.deepcopy(fp32_model), bits=8)
    found = quantized_linears(model)
    assert len(found) == 2 * len(LINEAR_NAMES)
    assert all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in found.values())
    assert all(m.state.threshold == 6.0 and not m.state.has_fp16_weights for m in found.values())
    assert type(model.lm_head) is nn.Linear
    assert model.is_loaded_in_8bit and not model.is_loaded_in_4bit
    assert model.config.quantization_config.load_in_8bit
    with torch.no_grad():
        assert (model(ids).logits - fp32_model(ids).logits).abs().max() < 0.05


def test_skip_modules_keeps_named_layers_in_full_precision(fp32_model):
    model = quant.quantize_model(copy.deepcopy(fp32_model), skip_modules=["down_proj", "model.layers.0.self_attn.q_proj"])
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is bnb.nn.Linear4bit
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert "lm_head" in model.config.quantization_config.llm_int8_skip_modules


def test_quantize_rejects_bad_arguments(fp32_model):
    with pytest.raises(ValueError, match="bits=3"):
        quant.quantize_model(copy.deepcopy(fp32_model), bits=3)
    with pytest.raises(ValueError, match="'int4'"):
        quant.quantize_model(copy.deepcopy(fp32_model), quant_type="int4")


def test_quantize_meta_weights_names_the_module():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*meta device"):
        quant.quantize_model(model)


def test_unsupported_quantization_is_reraised_with_device_and_module(fp32_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this backend")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", refuse)
    with pytest.raises(RuntimeError, match=r"'model\.layers\.0\.self_attn\.q_proj' on device 'cpu'.*no 4-bit kernel"):
        quant.quantize_model(copy.deepcopy(fp32_model))


def test_require_bitsandbytes_says_how_to_install(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=r'pip install "tsugiki\[bnb\]".*pip install bitsandbytes'):
        quant.require_bitsandbytes()
    assert not quant.is_quantized_linear(nn.Linear(2, 2))


def test_command_line_drops_only_bitsandbytes_hub_kernel_notice(tmp_path, caplog):
    from tsugiki import cli

    bnb_cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb_cpu_logger.filters.clear()
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "plan", "--model", str(tmp_path / "missing")])
    assert bnb_cpu_logger.filters == []  # --debug keeps every library message

    assert cli.main(["plan", "--model", str(tmp_path / "missing")]) == 2
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        bnb_cpu_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                               "you already `pip install kernels`", ModuleNotFoundError("No module named 'kernels'"))
        bnb_cpu_logger.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
    quant.quiet_hub_kernel_notice()
    assert len(bnb_cpu_logger.filters) == 1
    bnb_cpu_logger.filters.clear()


# --- dequantize / requantize: what merging into a quantized base uses -------------------------


def blockwise_absmax(weight, blocksize=64):
    flat = weight.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
    return flat.expand(-1, blocksize).reshape(weight.shape)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_dequantize_is_within_nf4_tolerance(fp32_model, double_quant):
    model = quant.quantize_model(copy.deepcopy(fp32_model), double_quant=double_quant)
    original = fp32_model.model.layers[0].mlp.up_proj.weight.detach()
    restored = quant.dequantize_weight(model.model.layers[0].mlp.up_proj)
    assert restored.dtype == torch.float32 and restored.shape == original.shape
    # NF4's widest gap is between -1 and -0.696: rounding error <= ~0.152 * block absmax
    # (+1% for the 8-bit block scales of double quantization).
    assert ((restored - original).abs() <= 0.16 * blockwise_absmax(original) + 1e-6).all()
    assert (restored - original).abs().mean() < 0.1 * original.abs().mean()


def test_requantize_then_dequantize_round_trip(fp32_model):
    model = quant.quantize_model(copy.deepcopy(fp32_model), quant_type="nf4", double_quant=True)
    layer = model.model.layers[1].self_attn.o_proj
    new_weight = torch.randn(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(3)) * 0.05
    quant.requantize_like(layer, new_weight)
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.quant_state is layer.weight.quant_state
    assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested
    restored = quant.dequantize_weight(layer)
    # Exactly what quantizing new_weight from scratch with the same settings gives.
    fresh = quant.quantize_model(nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 1)))[0]
    quant.requantize_like(fresh, new_weight)
    assert torch.equal(quant.dequantize_weight(fresh), restored)
    assert ((restored - new_weight).abs() <= 0.16 * blockwise_absmax(new_weight) + 1e-6).all()
    with pytest.raises(ValueError, match=r"shape \(64, 32\).*\(64, 64\)"):
        quant.requantize_like(layer, torch.zeros(64, 32))


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_survives_cpu_inference_repacking(fp32_model, ids, double_quant):
    # On AVX512-BF16 CPUs, an eval forward without grad repacks 4-bit weights in place,
    # with bf16 block scales in a transposed layout.
    model = quant.quantize_model(copy.deepcopy(fp32_model), double_quant=double_quant).eval()
    layer = model.model.layers[0].mlp.down_proj  # two blocks per row: the scales' order matters
    before = quant.dequantize_weight(layer)
    with torch.no_grad():
        model(ids)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU does not repack 4-bit weights (no AVX512-BF16)")
    after = quant.dequantize_weight(layer)
    # Only the block scales' bf16 rounding (a relative 2^-9) separates the two.
    assert ((after - before).norm() / before.norm()).item() < 2 ** -9
    # ... and the repacked layer computes with exactly the weight dequantize_weight gives.
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x).float()
    want = x.float() @ after.t()
    assert ((got - want).norm() / want.norm()).item() < 4e-3  # bf16 output rounding and summation order
    quant.requantize_like(layer, before)
    with torch.no_grad():
        model(ids)


def test_int8_dequantize_and_requantize(fp32_model, ids):
    model = quant.quantize_model(copy.deepcopy(fp32_model), bits=8)
    layer = model.model.layers[0].self_attn.v_proj
    original = fp32_model.model.layers[0].self_attn.v_proj.weight.detach()
    row_step = original.abs().amax(dim=1, keepdim=True) / 127
    # Half an int8 step, plus the fp16 rounding bitsandbytes applies before quantizing.
    assert ((quant.dequantize_weight(layer) - original).abs() <= 0.56 * row_step).all()
    with torch.no_grad():
        model(ids)  # moves CB/SCB from the weight into layer.state
    assert ((quant.dequantize_weight(layer) - original).abs() <= row_step).all()
    doubled = original * 2
    quant.requantize_like(layer, doubled)
    assert ((quant.dequantize_weight(layer) - doubled).abs() <= 2 * 0.56 * row_step).all()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = layer(x)
    assert (out - x @ doubled.T).abs().max() < 0.05
    assert layer.state.threshold == 6.0


def test_dequantize_rejects_plain_linear():
    with pytest.raises(TypeError, match="got Linear"):
        quant.dequantize_weight(nn.Linear(4, 4))


def test_nf4_bits_per_parameter_matches_qlora_arithmetic():
    plain = quant.nf4_bits_per_parameter(double_quant=False, shape=(1024, 1024))
    nested = quant.nf4_bits_per_parameter(double_quant=True, shape=(1024, 1024))
    assert plain == pytest.approx(4 + 32 / 64, abs=0.01)  # fp32 absmax per 64 weights
    assert nested == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)  # int8 absmax, fp32 per 256 blocks
    assert quant.nf4_bits_per_parameter(double_quant=False, blocksize=128, shape=(1024, 1024)) < plain


# --- prepare_model_for_kbit_training ----------------------------------------------------------


def is_checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def add_trainable_bias(model):
    """A tiny trainable parameter on layer 0's MLP output (stands in for an adapter)."""
    bias = nn.Parameter(torch.zeros(model.config.hidden_size))
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out + bias)
    return bias


def test_prepare_freezes_upcasts_and_checkpointed_backward_reaches_adapter(ids):
    model = quant.quantize_model(tiny_llama(torch.bfloat16))
    assert model.model.norm.weight.dtype == torch.bfloat16
    quant.prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # small: under the upcast limit
    assert all(m.weight.dtype == torch.uint8 for m in quantized_linears(model).values())
    assert is_checkpointing(model) and model.config.use_cache is False
    assert model.model.embed_tokens(ids).requires_grad  # input grads enabled on a frozen embedding

    bias = add_trainable_bias(model)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    quant.check_trainable_on_quantized(model)


def test_prepare_keeps_huge_embeddings_16bit_and_still_runs(monkeypatch, ids):
    monkeypatch.setattr(quant, "FP32_UPCAST_LIMIT_BYTES", 0)
    model = quant.prepare_model_for_kbit_training(quant.quantize_model(tiny_llama(torch.bfloat16)))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    bias = add_trainable_bias(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert bias.grad.abs().sum() > 0


def test_prepare_passes_checkpointing_kwargs_and_can_skip_it(monkeypatch):
    model = quant.quantize_model(tiny_llama())
    seen = {}
    method = "activation_checkpointing_enable"  # transformers >= 5; older ones: gradient_checkpointing_enable
    if not hasattr(model, method):
        method = "gradient_checkpointing_enable"
    monkeypatch.setattr(model, method, lambda **kwargs: seen.update(*kwargs.values()))
    quant.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"preserve_rng_state": False})
    assert seen == {"use_reentrant": False, "preserve_rng_state": False}

    other = quant.prepare_model_for_kbit_training(quant.quantize_model(tiny_llama()), use_gradient_checkpointing=False)
    assert not is_checkpointing(other) and other.config.use_cache is True


def test_prepare_plain_module_without_checkpointing_support_is_named():
    # (The last linear layer is kept as the output head.)
    model = quant.quantize_model(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 64), nn.Linear(64, 8)))
    assert quant.is_quantized_linear(model[1])
    with pytest.raises(ValueError, match="Sequential.*use_gradient_checkpointing=False"):
        quant.prepare_model_for_kbit_training(model)
    quant.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model[0](torch.tensor([[1, 2]])).requires_grad  # the embedding hook gives a graph to backprop


def test_prepare_on_an_unquantized_model_only_freezes_and_upcasts_as_hf_peft_does():
    import peft

    for library in (quant, peft):
        model = library.prepare_model_for_kbit_training(tiny_llama(torch.bfloat16))
        assert not is_checkpointing(model) and model.config.use_cache is True, library.__name__
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert not model.model.embed_tokens(torch.tensor([[1, 2]])).requires_grad


def test_full_finetuning_of_quantized_weight_is_refused_naming_module(fp32_model):
    # A float storage dtype (used for FSDP) is the case where a packed weight can require grad.
    model = quant.quantize_model(copy.deepcopy(fp32_model), quant_storage=torch.bfloat16)
    quant.check_trainable_on_quantized(model)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is a 4-bit quantized weight"):
        quant.check_trainable_on_quantized(model)


def test_prepare_without_matrix_upcast_gives_the_trainers_weights_without_the_fp32_copy(ids):
    # The trainer's dtype policy returns frozen matrices to the compute dtype, so upcasting them first
    # only costs a transient fp32 copy; skipping it must leave the same weights once the policy has run.
    from tsugiki.train.loop import apply_dtype_policy

    base = quant.quantize_model(tiny_llama(torch.bfloat16))
    upcast = quant.prepare_model_for_kbit_training(copy.deepcopy(base), use_gradient_checkpointing=False)
    kept = quant.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False, upcast_matrices=False)
    assert upcast.model.embed_tokens.weight.dtype == torch.float32
    assert kept.model.embed_tokens.weight.dtype == torch.bfloat16 and kept.lm_head.weight.dtype == torch.bfloat16
    assert kept.model.norm.weight.dtype == torch.float32  # vectors are still upcast
    kept.train()
    assert torch.isfinite(kept(ids, labels=ids).loss)  # the head's pre-hook hands it 16-bit hidden states
    for model in (upcast, kept):
        apply_dtype_policy(model, torch.bfloat16)
    a, b = upcast.state_dict(), kept.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name

"""LoRA on bitsandbytes 4-bit and 8-bit linear layers (CPU; the HF PEFT interop also on a GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

import tsugiki
from tsugiki.methods.lora import LoraLinear
from tiny_models import randomize_adapters, tiny_llama, token_batch

bnb = pytest.importorskip("bitsandbytes")
quant = pytest.importorskip("tsugiki.quant")


def kbit_llama():
    # bitsandbytes' CPU 4-bit kernel needs out_features divisible by 32.
    return tiny_llama(hidden_size=64, intermediate_size=128)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_kbit_layer_adds_the_low_rank_update(bits):
    model = quant.quantize_model(kbit_llama(), bits=bits, compute_dtype=torch.float32)
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    assert isinstance(layer.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert (layer.in_features, layer.out_features) == (64, 64)
    randomize_adapters(peft_model)
    x = torch.randn(2, 3, 64)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x @ A.T @ B.T) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_kbit_base_trains_saves_and_reloads(bits, tmp_path):
    model = quant.quantize_model(kbit_llama(), bits=bits, compute_dtype=torch.float32)
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
    ids = token_batch(4, 10)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    losses = []
    peft_model.train()
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    with torch.no_grad():  # bitsandbytes picks its kernel by grad mode: compare like with like
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    again = quant.quantize_model(kbit_llama(), bits=bits, compute_dtype=torch.float32)
    loaded = tsugiki.PeftModel.from_pretrained(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)
    out = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def _trained_kbit(bits):
    """A LoRA-wrapped k-bit tiny Llama, and how far k-bit rounding moves the bare base's logits."""
    ids = token_batch(2, 8)
    with torch.no_grad():
        full = kbit_llama()(ids).logits
    model = quant.quantize_model(kbit_llama(), bits=bits, compute_dtype=torch.float32)
    with torch.no_grad():
        quant_error = (model(ids).logits - full).abs().max().item()
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(peft_model, scale=0.05)
    return peft_model, ids, quant_error


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_into_quantized_base_requantizes_with_a_warning(bits):
    peft_model, ids, quant_error = _trained_kbit(bits)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        with pytest.warns(UserWarning, match="quantized again"):
            merged = peft_model.merge_and_unload()
        assert any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
        error = (merged(ids).logits - unmerged).abs().max().item()
    # Re-quantizing rounds the merged weights about as much as quantizing the base did.
    assert 0 < error < 2 * quant_error


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_dequantize_gives_a_plain_model_transformers_loads(bits, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model, ids, quant_error = _trained_kbit(bits)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload(dequantize=True)
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
        # Only bitsandbytes' low-precision matmul (bf16/fp16 inside) separates the two.
        assert (merged(ids).logits - unmerged).abs().max().item() < quant_error
    assert not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prepared", [True, False])
def test_dequantized_merge_of_a_bf16_qlora_base_runs_in_the_models_dtype(prepared):
    """Compute dtype bf16; embeddings fp32 once prepared for training, else bf16: the merged layers follow them."""
    ids = token_batch(2, 8)
    model = quant.quantize_model(kbit_llama().to(torch.bfloat16), bits=4, compute_dtype=torch.bfloat16)
    if prepared:
        model = tsugiki.prepare_model_for_kbit_training(model)
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(peft_model, scale=0.05)
    with torch.no_grad():
        unmerged = peft_model(ids).logits.float()
        merged = peft_model.merge_and_unload(dequantize=True)
        want = torch.float32 if prepared else torch.bfloat16
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == want
        assert (merged(ids).logits.float() - unmerged).abs().max().item() < 0.05
    fp32 = tsugiki.get_peft_model(quant.quantize_model(kbit_llama().to(torch.bfloat16), bits=4),
                                  tsugiki.LoraConfig(r=4)).merge_and_unload(dequantize=True, dtype=torch.float32)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # the whole model, so that it runs
    with torch.no_grad():
        fp32(ids)


@pytest.mark.parametrize("device, compute_dtype, atol", [
    ("cpu", torch.float32, 1e-4),
    pytest.param("cuda", torch.bfloat16, 1e-3,
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])
def test_adapter_on_transformers_4bit_base_loads_in_hf_peft(tmp_path, device, compute_dtype, atol):
    """The QLoRA path exactly as users write it, and interop with HF PEFT on the same 4-bit base."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kbit_llama().save_pretrained(tmp_path / "base")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype)
    placement = {"device_map": {"": 0}} if device == "cuda" else {}

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config, **placement)

    model = quant.prepare_model_for_kbit_training(load_base(), use_gradient_checkpointing=False)
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=4, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
    ids = token_batch(4, 10).to(device)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(ids).logits
        theirs = peft.PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter"))
        torch.testing.assert_close(theirs(ids).logits, expected, atol=atol, rtol=0)


def test_training_dtype_policy_keeps_kbit_norms_fp32():
    from tsugiki.train.loop import apply_dtype_policy

    model = quant.quantize_model(kbit_llama(), bits=4, compute_dtype=torch.bfloat16)
    model = quant.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = tsugiki.get_peft_model(model, tsugiki.LoraConfig(r=2))
    apply_dtype_policy(peft_model, torch.bfloat16)
    base = peft_model.base_model.model
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert base.model.norm.weight.dtype == torch.float32
    lora_a = base.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and lora_a.requires_grad


def _grads_of_first_adapter(model, ids):
    model.zero_grad()
    model.train()
    with torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    return layer.lora_A["default"].weight.grad.clone()


def test_training_after_an_eval_forward_still_reaches_every_adapter():
    """bitsandbytes repacks 4-bit weights on an eval forward without grad (AVX512-BF16 CPUs) into a layout
    that computes without autograd; model.train() restores the trainable one, so the first block's
    adapter gets the same gradient as before the eval (to the bf16 rounding of the block scales)."""
    model = tsugiki.get_peft_model(quant.quantize_model(kbit_llama(), bits=4, compute_dtype=torch.bfloat16),
                                   tsugiki.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    ids = token_batch(2, 8)
    before = _grads_of_first_adapter(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        pytest.skip("this CPU does not repack 4-bit weights (no AVX512-BF16)")
    after = _grads_of_first_adapter(model, ids)
    assert not any(m.weight.quant_state.packing_format_for_cpu for m in layers)
    assert ((after - before).norm() / before.norm()).item() < 0.05  # repacked layers gave no gradient at all
    model.eval()
    with torch.no_grad():  # and inference repacks again
        model(input_ids=ids)
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)


def test_qlora_training_with_evaluation_every_step_follows_training_without(tmp_path):
    """The trainer's evaluations (eval mode, no grad) must not change what later steps learn."""
    import json

    from helpers_data import make_chat_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=400).save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 3}"} for i in range(16)]
    for name, part in (("train", rows[:12]), ("eval", rows[12:])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")
    losses = {}
    for eval_steps in (0, 1):
        out = tmp_path / f"run{eval_steps}"
        tsugiki.train({"model": str(model_dir), "data": str(tmp_path / "train.jsonl"),
                       "eval_data": str(tmp_path / "eval.jsonl"), "output_dir": str(out), "method": "qlora",
                       "max_steps": 4, "batch_size": 4, "lora_r": 4, "logging_steps": 1, "eval_steps": eval_steps,
                       "learning_rate": 1e-2, "tensorboard": False}, progress=False)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[eval_steps] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    # The trainer keeps bitsandbytes from repacking the weights while it evaluates: the steps after an
    # evaluation compute exactly what they would without it. (When the repacked layout stayed, the loss
    # stalled after the first evaluation: 5.94 -> 5.91 against 5.77.)
    assert losses[1] == losses[0]

"""LLaMA-Adapter (adaption prompts): hand-computed reference, training, files, KV cache, HF interop, CLI, errors."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

import tsugiki
from tsugiki.methods.adaption_prompt import AdaptedAttention, AdaptionPromptConfig
from tiny_models import TinyMLP, tiny_gpt2, tiny_llama, token_batch

ATOL = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _set_gates(model, value=0.7):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                p.fill_(value)


def _reference_prompt_attention(attn, prompt, gate, x, cos, sin):
    """The paper's gated prompt attention, head by head, written independently of the library."""
    cfg = attn.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    bsz, T, _ = x.shape
    q = attn.q_proj(x).view(bsz, T, heads, d)
    half = d // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    q = q * cos[:, :, None, :] + rotated * sin[:, :, None, :]  # rope on the queries only
    k = attn.k_proj(prompt[0]).view(-1, kv_heads, d)  # (L, kv, d): the prompt has no position
    v = attn.v_proj(prompt[0]).view(-1, kv_heads, d)
    out = torch.zeros(bsz, T, heads, d)
    for h in range(heads):
        kv = h // (heads // kv_heads)
        weights = torch.softmax(torch.einsum("btd,ld->btl", q[:, :, h], k[:, kv]) / math.sqrt(d), dim=-1)
        out[:, :, h] = gate * torch.einsum("btl,ld->btd", weights, v[:, kv])
    return out.reshape(bsz, T, heads * d) @ attn.o_proj.weight.T


def test_matches_a_hand_computed_reference():
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    _set_gates(model, 0.9)
    adapted = model.base_model.model.model.layers[1].self_attn
    assert isinstance(adapted, AdaptedAttention)
    seen = {}

    def grab(module, args, kwargs, output):
        seen.update(x=kwargs["hidden_states"], rope=kwargs["position_embeddings"], out=output[0])

    handle = adapted.register_forward_hook(grab, with_kwargs=True)
    _logits(model, ids)
    handle.remove()
    base_out, _ = adapted.base_layer(hidden_states=seen["x"], position_embeddings=seen["rope"], attention_mask=None)
    cos, sin = seen["rope"]
    with torch.no_grad():
        expected = base_out + _reference_prompt_attention(
            adapted.base_layer, adapted.adaption_prompt["default"], 0.9, seen["x"], cos, sin)
    torch.testing.assert_close(seen["out"], expected, atol=ATOL, rtol=0)


def test_zero_gate_is_a_no_op_even_with_an_o_proj_bias():
    def make():
        model = tiny_llama(attention_bias=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
        return model

    ids = token_batch()
    base = _logits(make(), ids)
    model = tsugiki.get_peft_model(make(), AdaptionPromptConfig(adapter_len=4, task_type="CAUSAL_LM"))
    torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    assert model.peft_config["default"].adapter_layers == 2  # None means every layer; resolved and saved


def test_only_prompts_and_gates_train_base_unchanged_and_loss_falls():
    model = tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    is_adapter = lambda n: ".adaption_prompt." in n or ".adaption_gate." in n
    assert all(is_adapter(n) == p.requires_grad for n, p in model.named_parameters())
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 16 + 1)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter(n)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_batch(batch=4, length=8)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_save_load_generate_with_cache_unload_and_no_merge(tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=2,
                                                                      init_weights=False, task_type="CAUSAL_LM"))
    expected = _logits(model, ids)
    base = _logits(tiny_llama(), ids)
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded, ids), base, atol=0, rtol=0)

    # The prompt adds nothing to the KV cache: cached greedy decoding equals full recomputation.
    out = loaded.generate(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False)
    seq = ids[:, :4]
    for _ in range(5):
        seq = torch.cat([seq, _logits(loaded, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)

    for merge in (loaded.merge_adapter, loaded.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
    plain = loaded.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), base, atol=0, rtol=0)


def test_two_adapters_and_mixed_batch():
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=2,
                                                                      init_weights=False))
    model.add_adapter("top", AdaptionPromptConfig(adapter_len=2, adapter_layers=1, init_weights=False))
    first = _logits(model, ids)
    model.set_adapter("top")
    second = _logits(model, ids)
    mixed = model(input_ids=ids, adapter_names=["top", "default"]).logits.detach()
    torch.testing.assert_close(mixed[0], second[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], first[1], atol=ATOL, rtol=0)
    model.delete_adapter("top")  # the wrapped attention's own float ``scaling`` is not an adapter table
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(_logits(model, ids), first, atol=0, rtol=0)


def test_interop_with_hf_peft_both_ways(tmp_path):
    # HF PEFT 0.21.2's adaption prompt works with transformers 5.x Llama (checked against the reference above).
    ids = token_batch()
    ours = tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                     task_type="CAUSAL_LM"))
    _set_gates(ours, 0.8)
    expected = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)

    theirs = peft.get_peft_model(tiny_llama(), peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2,
                                                                         task_type="CAUSAL_LM"))
    _set_gates(theirs, -0.6)
    expected = _logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "adapter_len=None is invalid: it is required"),
    (dict(adapter_len=0), "adapter_len"),
    (dict(adapter_len=2, adapter_layers=-1), "adapter_layers"),
    (dict(adapter_len=2, target_modules=["self_attn"]), "target_modules"),
    (dict(adapter_len=2, init_weights="zero"), "init_weights"),
])
def test_invalid_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptionPromptConfig(**kwargs)


def test_unsupported_models_and_too_many_layers_are_clear_errors():
    with pytest.raises(ValueError, match="supports model types llama"):
        tsugiki.get_peft_model(tiny_gpt2(), AdaptionPromptConfig(adapter_len=2))
    with pytest.raises(ValueError, match="supports model types"):
        tsugiki.get_peft_model(TinyMLP(), AdaptionPromptConfig(adapter_len=2))
    with pytest.raises(ValueError, match="has only 2"):
        tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ValueError, match="names no module"):
        tsugiki.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, target_modules="attention"))


def test_train_method_llama_adapter(tmp_path):
    from helpers_data import make_chat_tokenizer, tiny_llama as chat_llama

    model_dir = tmp_path / "model"
    chat_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"word {i % 3}"})
                              for i in range(8)) + "\n")
    result = tsugiki.train({"model": str(model_dir), "data": str(data), "output_dir": str(tmp_path / "run"),
                            "method": "llama_adapter", "method_args": {"adapter_layers": 1}, "max_steps": 2,
                            "batch_size": 4, "dtype": "fp32", "tensorboard": False}, progress=False)
    assert result.metrics["steps"] == 2
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["adapter_len"], cfg["adapter_layers"]) == ("ADAPTION_PROMPT", 10, 1)
    loaded = tsugiki.PeftModel.from_pretrained(chat_llama(), tmp_path / "run")
    assert isinstance(loaded.base_model.model.model.layers[1].self_attn, AdaptedAttention)

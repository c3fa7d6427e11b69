"""PEFT methods other than LoRA on a bitsandbytes 4-bit base (LoRA itself: test_lora_kbit.py)."""

from __future__ import annotations

import pytest
import torch

import tsugiki
from tiny_models import tiny_llama, token_batch

bnb = pytest.importorskip("bitsandbytes")
quant = pytest.importorskip("tsugiki.quant")


def four_bit():  # bitsandbytes' CPU 4-bit kernel needs out_features divisible by 32
    return quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=4,
                                compute_dtype=torch.float32)


def train_steps(model, ids, steps):
    """A few AdamW steps on a fixed batch; returns the losses (the model ends in eval mode)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return losses


@pytest.mark.parametrize("config", [
    tsugiki.LoHaConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    tsugiki.LoKrConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
], ids=["loha", "lokr"])
def test_on_a_4bit_base(config, tmp_path):
    model = tsugiki.get_peft_model(four_bit(), config)
    ids = token_batch(4, 10)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, ids, 4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    with torch.no_grad():
        unmerged = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(four_bit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, unmerged, atol=1e-5, rtol=0)
        merged = loaded.merge_and_unload(dequantize=True)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
        # Only bitsandbytes' low-precision 4-bit matmul separates the merged fp32 model from it.
        assert (merged(ids).logits - unmerged).abs().max() < 0.02 * unmerged.abs().max()


@pytest.mark.parametrize("config", [
    tsugiki.IA3Config(task_type="CAUSAL_LM"),
    tsugiki.BottleneckConfig(adapter_type="series", bottleneck_size=8, task_type="CAUSAL_LM"),
    tsugiki.BottleneckConfig(adapter_type="parallel", bottleneck_size=8, task_type="CAUSAL_LM"),
    tsugiki.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    tsugiki.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    tsugiki.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"),
], ids=["ia3", "series", "parallel", "prompt_tuning", "prefix_tuning", "llama_adapter"])
def test_methods_that_leave_base_weights_alone_train_and_generate_on_4bit(config):
    model = tsugiki.get_peft_model(four_bit(), config)
    ids = token_batch(2, 8)
    losses = train_steps(model, ids, 3)
    assert losses[-1] < losses[0]
    out = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)

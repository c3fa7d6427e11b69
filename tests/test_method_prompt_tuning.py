"""Prompt tuning; the ``check_*`` helpers here are shared by the other prompt-learning test files."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import tsugiki
from tiny_models import VOCAB, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.prompt import PromptTuningConfig
from tsugiki.train.loop import token_loss_sum


# ---------------------------------------------------------------------------- shared checks

def randomize_prompt(model, seed: int = 3, scale: float = 0.5) -> None:
    """Move every prompt-encoder parameter (tsugiki's or HF PEFT's) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prompt_encoder" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def check_trains(model, steps: int = 10, lr: float = 0.3, **kw) -> None:
    """Only prompt parameters train, the base stays bit-identical, and the loss falls on a fixed batch."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".prompt_encoder." in n for n in trainable), trainable
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    ids = token_batch(batch=2, length=8, seed=11)
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        assert out.logits.shape[:2] == ids.shape  # virtual positions are not in the logits
        loss = token_loss_sum(out.logits, ids) / (ids.numel() - ids.shape[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 1e-3, losses  # a tiny random base: near-uniform logits move slowly
    after = model.get_base_model().state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


def check_round_trip(model, make, tmp_path, **kw) -> None:
    """save_pretrained -> PeftModel.from_pretrained gives the same logits, bit for bit."""
    ids = token_batch()
    expected = logits(model, ids, **kw)
    model.save_pretrained(tmp_path / "saved")
    loaded = tsugiki.PeftModel.from_pretrained(make(), tmp_path / "saved")
    assert torch.equal(logits(loaded, ids, **kw), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_generate_left_padding(model, task_ids=None) -> None:
    """A left-padded batch of mixed lengths generates, with and without the KV cache, what each row does alone."""
    rows = [[5, 9, 13, 2, 7, 30], [41, 3, 8]]
    ids, mask = _left_pad(rows)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batch = {}
    for use_cache in (True, False):
        extra = {} if task_ids is None else {"task_ids": torch.tensor(task_ids)}
        out = model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, **kw, **extra)
        assert torch.equal(out[:, :ids.shape[1]], ids)
        batch[use_cache] = out[:, ids.shape[1]:]
    assert torch.equal(batch[True], batch[False])
    for i, row in enumerate(rows):
        extra = {} if task_ids is None else {"task_ids": torch.tensor([task_ids[i]])}
        one = torch.tensor([row])
        alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw, **extra)[0, len(row):]
        # a row that ends early (end-of-sequence) is padded in the batch
        assert torch.equal(alone, batch[True][i, :len(alone)]), (i, alone, batch[True])
        assert (batch[True][i, len(alone):] == 0).all()


def check_interop(make, ours_config, theirs_config, tmp_path, **kw) -> None:
    """tsugiki -> HF PEFT and HF PEFT -> tsugiki with the same logits (HF's cover the virtual tokens too)."""
    ids = token_batch()
    ours = tsugiki.get_peft_model(make(), ours_config)
    randomize_prompt(ours)
    expected = logits(ours, ids, **kw)
    assert not torch.allclose(expected, logits(make(), ids), atol=1e-3), "the prompt had no effect"
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(theirs, ids, **kw)[:, -ids.shape[1]:], expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(make(), theirs_config)
    randomize_prompt(theirs, seed=7)
    expected = logits(theirs, ids, **kw)[:, -ids.shape[1]:]
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = tsugiki.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids, **kw), expected, atol=1e-5, rtol=0)


def train_cli(tmp_path, method: str, method_args: dict | None = None) -> str:
    """One tiny ``tsugiki train --method <method>`` run; returns the output folder after a generate check."""
    from helpers_data import make_chat_tokenizer, tiny_llama as tiny_chat_llama

    model_dir = tmp_path / "model"
    tiny_chat_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 3}"} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    result = tsugiki.train({"model": str(model_dir), "data": str(data), "output_dir": str(out), "method": method,
                            "method_args": method_args, "max_steps": 3, "batch_size": 4, "learning_rate": 5e-2,
                            "dtype": "fp32", "tensorboard": False, "save_steps": 0}, progress=False)
    assert result.metrics["steps"] == 3 and result.metrics["train_loss"] > 0
    assert os.path.isfile(out / "adapter_model.safetensors")
    loaded = tsugiki.AutoPeftModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7]])
    assert loaded.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    return str(out)


# ---------------------------------------------------------------------------- prompt tuning

def _config(**kw):
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kw)


def test_trains_only_the_prompt():
    check_trains(tsugiki.get_peft_model(tiny_llama(), _config()))


def test_round_trip_and_generate_left_padding(tmp_path):
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    randomize_prompt(model)
    check_round_trip(model, tiny_llama, tmp_path)
    check_generate_left_padding(model)
    with model.disable_adapter():
        assert torch.equal(logits(model, token_batch()), logits(tiny_llama(), token_batch()))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_interop_with_hf_peft(make, tmp_path):
    check_interop(make, _config(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)


def test_seq_cls_head_is_saved_and_loads_in_hf_peft(tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_bert_classifier(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    randomize_prompt(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3)
    expected = logits(model, ids)
    assert expected.shape == (2, 3)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path))
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=0)
    assert torch.equal(logits(tsugiki.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path), ids), expected)


def test_text_init_uses_the_token_embeddings():
    class Tok:  # any callable returning input_ids works as the tokenizer
        def __call__(self, text):
            return {"input_ids": [7, 8, 9]}

    base = tiny_llama()
    table = base.get_input_embeddings().weight.detach().clone()
    model = tsugiki.get_peft_model(base, _config(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer=Tok()))
    prompt = model.base_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, table[[7, 8, 9, 7]])
    assert "tokenizer" not in model.peft_config["default"].to_dict()


def test_train_text_init_takes_the_runs_tokenizer(monkeypatch):
    # The default model and GGUF files have no tokenizer folder to name: the run's own tokenizer is used.
    from tsugiki import models
    from tsugiki.config import METHOD_BUILDERS
    from tsugiki.train.config import TrainConfig

    asked = []

    class Tok:
        def __call__(self, text):
            return {"input_ids": [5, 6]}

    monkeypatch.setattr(models, "load_tokenizer", lambda model: asked.append(model) or Tok())
    cfg = TrainConfig.load(None, {"method": "prompt_tuning", "method_args": {
        "num_virtual_tokens": 3, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}})
    config = METHOD_BUILDERS["prompt_tuning"](cfg, "smollm2-135m-instruct")
    assert asked == [None] and config.tokenizer_name_or_path == "smollm2-135m-instruct"
    base = tiny_llama()
    table = base.get_input_embeddings().weight.detach().clone()
    prompt = tsugiki.get_peft_model(base, config).base_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt, table[[5, 6, 5]])


def test_adapters_switch_and_delete():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    model.add_adapter("other", _config())
    randomize_prompt(model)
    ids = token_batch()
    first = logits(model, ids)
    model.set_adapter("other")
    assert not torch.equal(logits(model, ids), first)
    assert all("other" in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("other")
    assert torch.equal(logits(model, ids), first)
    with pytest.raises(ValueError, match="mixed"):
        model(input_ids=ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="nothing to merge"):
        model.merge_and_unload()


def test_cli_train(tmp_path):
    out = train_cli(tmp_path, "prompt_tuning", {"num_virtual_tokens": 4})
    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4 and config["token_dim"] == 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(num_virtual_tokens=None), "num_virtual_tokens"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "prompt_tuning_init_text"),
    (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x"), "tokenizer"),
    (dict(num_virtual_tokens=2, num_transformer_submodules=2), "num_transformer_submodules"),
])
def test_invalid_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(task_type="CAUSAL_LM", **kwargs)


def test_invalid_use():
    with pytest.raises(ValueError, match="task_type"):
        tsugiki.get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    ids = token_batch()
    with pytest.raises(ValueError, match="packing"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 2))
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=ids, task_ids=torch.tensor([0, 0]))
    assert VOCAB > int(ids.max())

"""Checks every graft method's tests repeat: training touches only the adapter, save/load, merge, interop."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

import tsugiki
from tiny_models import VOCAB, token_batch


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: nn.Module, markers: tuple[str, ...], seed: int = 3, scale: float = 0.3) -> None:
    """Random values for every parameter whose name holds one of ``markers`` (a non-zero update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in markers):
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "magnitude" in name else 0.0))


def train_and_check(model: nn.Module, steps: int = 8, lr: float = 1e-2) -> None:
    """A few AdamW steps on one batch: the loss falls, the base stays bit-identical, the adapter moves."""
    ids = token_batch(batch=4, length=12)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"base parameter {n} changed"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


def check_save_load_exact(model: nn.Module, make, tmp_path) -> None:
    ids = token_batch()
    model.eval()  # as from_pretrained leaves the loaded one: both take the same forward path
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    mine, theirs = (m.peft_config["default"].to_dict() for m in (model, loaded))
    assert {**theirs, "inference_mode": False} == {**mine, "inference_mode": False}


def check_merge(model: nn.Module, layer_type: type, atol: float = 1e-5) -> None:
    """merge == unmerged outputs; unmerge restores; merge_and_unload gives a plain model with the same outputs."""
    ids = token_batch()
    expected = logits(model, ids)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, atol=atol, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, atol=atol, rtol=0)
    for n, p in model.named_parameters():
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, layer_type) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), expected, atol=atol, rtol=0)


def check_generate(model: nn.Module) -> None:
    """Greedy generation runs through the adapter: its first new token is the adapted model's argmax."""
    prompt = torch.tensor([[1, 5, 9]])
    out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and 3 < out.shape[1] <= 7 and int(out.max()) < VOCAB  # may stop at EOS
    assert torch.equal(out[:, :3], prompt)
    assert int(out[0, 3]) == int(logits(model, prompt)[0, -1].argmax())


def check_interop(make, ours_config, theirs_config, markers, tmp_path) -> None:
    """tsugiki -> HF PEFT and HF PEFT -> tsugiki give the same logits (fp32, atol 1e-5)."""
    import peft

    ids = token_batch()
    ours = tsugiki.get_peft_model(make(), ours_config)
    randomize(ours, markers)
    expected = logits(ours, ids)
    assert not torch.allclose(expected, logits(make(), ids), atol=1e-3), "adapter had no effect"
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(theirs, ids), expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(make(), theirs_config)
    randomize(theirs, markers, seed=7)
    expected = logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = tsugiki.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)


def train_tiny_cli(tmp_path, method: str, method_args: dict | None = None) -> dict:
    """``tsugiki train --method <method>`` (through ``tsugiki.train``) on a tiny model folder; the saved config."""
    from helpers_data import make_chat_tokenizer, tiny_llama as tiny_chat_llama

    model_dir = tmp_path / "model"
    tiny_chat_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 3}"} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    result = tsugiki.train({"model": str(model_dir), "data": str(data), "output_dir": str(out), "method": method,
                            "method_args": method_args, "max_steps": 2, "batch_size": 4, "lora_r": 4,
                            "dtype": "fp32", "tensorboard": False}, progress=False)
    assert result.metrics["steps"] == 2
    assert os.path.isfile(out / "adapter_model.safetensors")
    return json.loads((out / "adapter_config.json").read_text())

"""Bottleneck adapters (series and parallel): formula, placement, training, files, no merge, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tsugiki
from tsugiki.methods.bottleneck import BottleneckConfig, BottleneckLayer
from tiny_models import TinyMLP, tiny_gpt2, tiny_llama, token_batch

ATOL = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _layer(adapter_type, scaling=1.0, act="relu"):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = BottleneckLayer(base, 6, 5)
    layer.update_layer("default", BottleneckConfig(adapter_type=adapter_type, bottleneck_size=3, scaling=scaling,
                                                   non_linearity=act), init=False)
    layer.set_adapter("default")
    return layer


@pytest.mark.parametrize("act, fn", [("relu", torch.relu), ("tanh", torch.tanh)])
def test_series_adds_to_the_output_and_parallel_reads_the_input(act, fn):
    x = torch.randn(2, 4, 6)
    series = _layer("series", act=act)
    down, up = series.adapter_down["default"], series.adapter_up["default"]
    h = series.base_layer(x)
    torch.testing.assert_close(series(x), h + up(fn(down(h))))

    parallel = _layer("parallel", scaling=0.5, act=act)
    down, up = parallel.adapter_down["default"], parallel.adapter_up["default"]
    assert down.in_features == 6 and up.out_features == 5
    torch.testing.assert_close(parallel(x), parallel.base_layer(x) + 0.5 * up(fn(down(x))))


@pytest.mark.parametrize("adapter_type, wrapped, layers", [
    ("series", ["self_attn.o_proj", "mlp.down_proj"], "both"),
    ("parallel", ["mlp"], "ffn"),
])
def test_default_placement_starts_as_a_no_op(adapter_type, wrapped, layers):
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), BottleneckConfig(adapter_type=adapter_type, bottleneck_size=4,
                                                                  task_type="CAUSAL_LM"))
    names = sorted(n.split("layers.0.", 1)[1] for n, m in model.named_modules()
                   if isinstance(m, BottleneckLayer) and "layers.0." in n)
    assert names == sorted(wrapped)
    assert model.peft_config["default"].adapter_layers == layers  # resolved and saved
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids), atol=0, rtol=0)


@pytest.mark.parametrize("adapter_type", ["series", "parallel"])
def test_only_adapters_train_base_unchanged_and_loss_falls(adapter_type):
    model = tsugiki.get_peft_model(tiny_llama(), BottleneckConfig(adapter_type=adapter_type, bottleneck_size=8,
                                                                  adapter_layers="both", adapter_dropout=0.1))
    is_adapter = lambda n: ".adapter_down." in n or ".adapter_up." in n
    assert all(is_adapter(n) == p.requires_grad for n, p in model.named_parameters())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter(n)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, length=8)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("make, adapter_type", [(tiny_llama, "series"), (tiny_llama, "parallel"),
                                                 (tiny_gpt2, "series"), (tiny_gpt2, "parallel")])
def test_save_load_generate_unload_and_no_merge(make, adapter_type, tmp_path):
    ids = token_batch()
    model = tsugiki.get_peft_model(make(), BottleneckConfig(adapter_type=adapter_type, bottleneck_size=4,
                                                            adapter_layers="both", init_weights=False))
    expected = _logits(model, ids)
    base = _logits(make(), ids)
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".adapter_down." in k or ".adapter_up." in k for k in keys) and len(keys) == 2 * 2 * 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"

    loaded = tsugiki.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded, ids), base, atol=0, rtol=0)
    # greedy generation with the KV cache equals step-by-step recomputation without it
    out = loaded.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False)
    seq = ids[:, :3]
    for _ in range(4):
        seq = torch.cat([seq, _logits(loaded, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)

    for merge in (loaded.merge_adapter, loaded.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            merge()
    plain = loaded.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), base, atol=0, rtol=0)


def test_two_adapters_mixed_batch_and_delete():
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=4, init_weights=False))
    model.add_adapter("par", BottleneckConfig(adapter_type="parallel", bottleneck_size=2, init_weights=False))
    first = _logits(model, ids)
    model.set_adapter("par")
    second = _logits(model, ids)
    mixed = model(input_ids=ids, adapter_names=["default", "par"]).logits.detach()
    torch.testing.assert_close(mixed[0], first[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], second[1], atol=ATOL, rtol=0)
    model.delete_adapter("par")
    torch.testing.assert_close(_logits(model, ids), first, atol=0, rtol=0)
    assert not any(isinstance(m, BottleneckLayer) for n, m in model.named_modules() if n.endswith(".mlp"))


def test_explicit_targets_on_any_module_and_layers_to_transform():
    model = tsugiki.get_peft_model(TinyMLP(), BottleneckConfig(target_modules=["lin0"], bottleneck_size=2))
    assert isinstance(model.base_model.model.lin0, BottleneckLayer)
    assert model(torch.randint(0, 20, (3, 4))).shape == (3, 4)
    model = tsugiki.get_peft_model(tiny_llama(), BottleneckConfig(adapter_type="parallel", layers_to_transform=[1]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]
    assert wrapped == ["base_model.model.model.layers.1.mlp"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter_type="sequential"), "adapter_type"),
    (dict(bottleneck_size=0), "bottleneck_size"),
    (dict(non_linearity="swish"), "non_linearity"),
    (dict(adapter_dropout=1.0), "adapter_dropout"),
    (dict(scaling="big"), "scaling"),
    (dict(adapter_layers="mlp"), "adapter_layers"),
    (dict(adapter_layers="ffn", target_modules=["mlp"]), "leave it None"),
    (dict(target_modules="all-linear"), "all-linear"),
    (dict(target_modules=["all-linear"]), "'all-linear' is for LoRA-like methods"),  # as `tsugiki train` passes it
    (dict(layers_pattern="layers"), "only applies together"),
])
def test_invalid_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


def test_unknown_architecture_needs_targets():
    with pytest.raises(ValueError, match="no default bottleneck placement"):
        tsugiki.get_peft_model(TinyMLP(), BottleneckConfig())


@pytest.mark.parametrize("method", ["series_adapter", "parallel_adapter"])
def test_train_methods(method, tmp_path):
    from helpers_data import make_chat_tokenizer, tiny_llama as chat_llama

    model_dir = tmp_path / "model"
    chat_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"word {i % 3}"})
                              for i in range(8)) + "\n")
    result = tsugiki.train({"model": str(model_dir), "data": str(data), "output_dir": str(tmp_path / "run"),
                            "method": method, "method_args": {"bottleneck_size": 8}, "max_steps": 2,
                            "batch_size": 4, "dtype": "fp32", "tensorboard": False}, progress=False)
    assert result.metrics["steps"] == 2
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["adapter_type"] == method.split("_")[0] and cfg["bottleneck_size"] == 8
    loaded = tsugiki.PeftModel.from_pretrained(chat_llama(), tmp_path / "run")
    assert any(isinstance(m, BottleneckLayer) for m in loaded.modules())

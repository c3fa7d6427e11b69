"""AdaLoRA: SVD-form layers, the rank budget schedule, the orthogonality penalty, files and HF PEFT interop."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file

import tsugiki
from tiny_models import randomize_adapters, tiny_gpt2, tiny_llama, token_batch
from tsugiki.methods.adalora import AdaLoraConfig, AdaLoraLinear, budget_schedule, orthogonality_penalty

ATOL = 1e-5
LAYERS = 4  # q_proj and v_proj of the tiny Llama's two layers (HF's AdaLoRA default targets)


def _config(**kw):
    base = dict(init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, lora_alpha=8, task_type="CAUSAL_LM")
    base.update(kw)
    return AdaLoraConfig(**base)


def _train(model, steps, update, lr=1e-2, seed=0):
    """A few optimizer steps on one fixed batch; ``update(step)`` after each (gradients still there)."""
    ids = token_batch(seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        update(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_tsugiki(cfg=None, steps=8):
    model = tsugiki.get_peft_model(tiny_llama(), cfg or _config())
    _train(model, steps, lambda s: model.on_optimizer_step(s, steps))
    return model


def _kept(model):
    return {k: sum(v) for k, v in model.peft_config["default"].rank_pattern.items()}


def test_only_adalora_parameters_train_and_loss_falls():
    model = tsugiki.get_peft_model(tiny_llama(), _config(total_step=12))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * LAYERS and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B", "lora_E")
                                                for n in trainable)
    losses = _train(model, 12, lambda s: model.update_and_allocate(s), lr=3e-2)
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_new_adapter_is_a_no_op_and_has_hf_init():
    ids = token_batch()
    base = tiny_llama()
    expected = _logits(base, ids)
    model = tsugiki.get_peft_model(base, _config())
    torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaLoraLinear)
    assert torch.count_nonzero(layer.lora_E["default"]) == 0
    assert 0.01 < float(layer.lora_A["default"].detach().std()) < 0.03 and layer.ranknum["default"] == 6.0


@pytest.mark.parametrize("init_b, target_b, tinit, tfinal, total, delta", [
    (24, 8, 1, 2, 8, 1), (48, 16, 0, 0, 10, 1), (100, 40, 5, 10, 60, 3), (12, 12, 0, 1, 5, 2)])
def test_budget_schedule_follows_the_cubic_formula(init_b, target_b, tinit, tfinal, total, delta):
    for step in range(0, total + 3):
        budget, mask = budget_schedule(step, init_b, target_b, tinit, tfinal, total, delta)
        if step <= tinit:
            assert (budget, mask) == (init_b, False)
        elif step > total - tfinal:
            assert (budget, mask) == (target_b, True)
        else:
            frac = (step - tinit) / (total - tfinal - tinit)
            assert budget == math.floor((init_b - target_b) * (1 - frac) ** 3 + target_b)
            assert mask == (step % delta == 0)
    # hand-computed points: 24 -> 8 over steps 1..6 (tinit=1, tfinal=2, total=8)
    assert [budget_schedule(s, 24, 8, 1, 2, 8, 1)[0] for s in range(1, 7)] == [24, 16, 11, 9, 8, 8]


def test_kept_ranks_follow_the_budget_then_settle_at_target():
    cfg = _config(total_step=10, tinit=2, tfinal=3, deltaT=2)
    model = tsugiki.get_peft_model(tiny_llama(), cfg)
    seen = {}

    def update(step):
        model.on_optimizer_step(step, 10)
        pattern = model.peft_config["default"].rank_pattern
        seen[step] = None if pattern is None else sum(sum(v) for v in pattern.values())
        layers = [m for m in model.modules() if isinstance(m, AdaLoraLinear)]
        nonzero = sum(int(torch.count_nonzero(m.lora_E["default"])) for m in layers)
        if pattern is not None and step % 2 == 0 or step >= 7:
            assert nonzero <= seen[step]

    _train(model, 10, update)
    init_b, target_b = 6 * LAYERS, 2 * LAYERS
    assert seen[1] is None and seen[2] is None  # warm-up: nothing masked
    assert seen[4] == budget_schedule(4, init_b, target_b, 2, 3, 10, 2)[0] == 11
    assert seen[6] == budget_schedule(6, init_b, target_b, 2, 3, 10, 2)[0] == 8
    assert seen[7] == seen[10] == target_b  # fixed from total_step - tfinal on
    final = model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in final.values()) == target_b
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLinear):
            kept = torch.tensor(final[f"{name}.lora_E"])
            assert torch.count_nonzero(module.lora_E["default"].view(-1)[~kept]) == 0


def test_regularizer_matches_its_definition():
    torch.manual_seed(0)
    pairs = [(torch.randn(3, 5), torch.randn(4, 3)), (torch.randn(2, 6), torch.randn(7, 2))]
    expected = sum(float(torch.sqrt(((Q @ Q.T - torch.eye(Q.shape[0])) ** 2).sum()))
                   + float(torch.sqrt(((P.T @ P - torch.eye(P.shape[1])) ** 2).sum())) for Q, P in pairs) / 4
    assert float(orthogonality_penalty(pairs)) == pytest.approx(expected, rel=1e-6)

    model = tsugiki.get_peft_model(tiny_llama(), _config(orth_reg_weight=0.3))
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLinear)]
    pairs = [(m.lora_A["default"], m.lora_B["default"]) for m in layers]
    reg = model.training_regularizer()
    assert float(reg) == pytest.approx(0.3 * float(orthogonality_penalty(pairs)), rel=1e-6)
    reg.backward()
    assert all(m.lora_A["default"].grad is not None for m in layers)
    # forward adds it to a computed loss while training (HF PEFT's behaviour), not in eval
    ids = token_batch()
    plain = model(input_ids=ids, labels=ids).loss  # eval mode
    model.train()
    with_reg = model(input_ids=ids, labels=ids).loss
    assert float(with_reg - plain) == pytest.approx(float(reg), rel=1e-4)


def test_save_load_round_trip_with_pruned_ranks(tmp_path):
    model = _trained_tsugiki()
    ids = token_batch()
    expected = _logits(model, ids)
    kept = _kept(model)
    model.save_pretrained(tmp_path / "a")
    saved_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved_cfg["peft_type"] == "ADALORA" and saved_cfg["total_step"] == 8
    assert {k: sum(v) for k, v in saved_cfg["rank_pattern"].items()} == kept
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert not any("ranknum" in k for k in weights)
    for key, r in kept.items():
        prefix = "base_model.model." + key[: -len(".lora_E")]
        assert weights[f"{prefix}.lora_E"].shape == (r, 1)
        assert weights[f"{prefix}.lora_A"].shape[0] == r and weights[f"{prefix}.lora_B"].shape[1] == r

    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == \
        kept["model.layers.0.self_attn.q_proj.lora_E"]
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=ATOL, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.save_pretrained(tmp_path / "b")  # saving the loaded adapter again gives the same file
    again = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(again) == sorted(weights) and all(torch.equal(again[k], weights[k]) for k in weights)


def test_merge_unmerge_and_unload_are_equivalent():
    ids = token_batch()
    model = tsugiki.get_peft_model(tiny_gpt2(), _config(target_r=2))
    randomize_adapters(model, scale=0.3)
    expected = _logits(model, ids)
    weight = model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), expected, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight, weight,
                               atol=1e-6, rtol=0)
    with model.disable_adapter():
        assert not torch.allclose(_logits(model, ids), expected, atol=1e-4)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaLoraLinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), expected, atol=ATOL, rtol=0)


def test_generate_works():
    model = _trained_tsugiki()
    out = model.generate(input_ids=token_batch(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_tsugiki_adapter_loads_in_hf_peft(make, tmp_path):
    model = tsugiki.get_peft_model(make(), _config())
    _train(model, 8, lambda s: model.update_and_allocate(s))
    assert any(sum(v) < 6 for v in model.peft_config["default"].rank_pattern.values())
    ids = token_batch()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(make(), ids), expected, atol=1e-4), "adapter had no effect"


def test_file_form_matches_hf_peft(tmp_path):
    kw = dict(init_r=4, target_r=2, total_step=10, lora_alpha=16, task_type="CAUSAL_LM")
    tsugiki.get_peft_model(tiny_llama(), AdaLoraConfig(**kw)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**kw)).save_pretrained(str(tmp_path / "theirs"))
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(theirs_cfg)
    for key in ("peft_type", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "rank_pattern", "lora_alpha", "r", "bias", "init_lora_weights"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])


def test_hf_peft_adapter_loads_in_tsugiki(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
        init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, lora_alpha=8, task_type="CAUSAL_LM"))
    _train(theirs, 8, lambda s: theirs.base_model.update_and_allocate(s))
    ids = token_batch()
    expected = _logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sum(sum(v) for v in saved["rank_pattern"].values()) == 2 * LAYERS

    ours = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    layer = ours.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.r["default"] == sum(saved["rank_pattern"]["model.layers.1.self_attn.v_proj.lora_E"])


def test_train_job_with_method_adalora(tmp_path):
    from helpers_data import make_chat_tokenizer
    from helpers_data import tiny_llama as tiny_llama_for_data

    folder = tmp_path / "model"
    tiny_llama_for_data().save_pretrained(folder)
    make_chat_tokenizer().save_pretrained(folder)
    rows = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 5}"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    result = tsugiki.train({"model": str(folder), "data": str(data), "output_dir": str(out), "method": "adalora",
                            "max_steps": 4, "lora_r": 6, "batch_size": 4, "learning_rate": 1e-2,
                            "dtype": "fp32", "tensorboard": False, "save_steps": 0,
                            "method_args": {"tinit": 1, "tfinal": 1}}, progress=False)
    assert result.metrics["steps"] == 4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 4 and cfg["total_step"] == 4
    assert cfg["rank_pattern"] and all(sum(v) <= 6 for v in cfg["rank_pattern"].values())
    assert sum(sum(v) for v in cfg["rank_pattern"].values()) == 4 * len(cfg["rank_pattern"])
    reloaded = tsugiki.PeftModel.from_pretrained(tiny_llama_for_data(), out)
    assert isinstance(reloaded.base_model.model.model.layers[0].self_attn.q_proj, AdaLoraLinear)


def test_train_job_needs_total_steps():
    from tsugiki.config import METHOD_BUILDERS
    from tsugiki.train.config import TrainConfig

    build = METHOD_BUILDERS["adalora"]
    with pytest.raises(ValueError, match="set max_steps, or give method_args: {total_step: N}"):
        build(TrainConfig(), "m")
    cfg = build(TrainConfig(max_steps=-1, method_args={"total_step": 50, "target_r": 3}), "m")
    assert (cfg.total_step, cfg.init_r, cfg.target_r) == (50, 8, 3)
    with pytest.raises(ValueError, match="'tinit_steps' is not an option of AdaLoraConfig"):
        build(TrainConfig(max_steps=5, method_args={"tinit_steps": 1}), "m")
    # init_r is the job's lora_r: method_args may not say otherwise (it trained init_r, ignoring lora_r).
    with pytest.raises(ValueError, match="method_args: init_r=8 conflicts with the job's lora_r \\(16\\); set lora_r"):
        build(TrainConfig(max_steps=5, lora_r=16, method_args={"init_r": 8}), "m")
    assert build(TrainConfig(max_steps=5, lora_r=16, method_args={"init_r": 16}), "m").init_r == 16


@pytest.mark.parametrize("kw, message", [
    (dict(total_step=None), "total_step=None is invalid: AdaLoRA needs the run's total number"),
    (dict(total_step=0), "total_step=0 is invalid"),
    (dict(tinit=5, tfinal=5), "tinit (5) + tfinal (5) must be smaller than total_step"),
    (dict(deltaT=0), "deltaT=0 is invalid"),
    (dict(beta1=1.0), "beta1=1.0 is invalid"),
    (dict(orth_reg_weight=-1), "orth_reg_weight=-1 is invalid"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is invalid"),
    (dict(rank_pattern={"x.lora_E": [1, 2]}), "rank_pattern['x.lora_E'] must be a list of booleans"),
])
def test_invalid_values_are_rejected_clearly(kw, message):
    base = dict(total_step=10)
    base.update(kw)
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(**base)
    assert message in str(err.value)


def test_one_trainable_adapter_and_unknown_rank_pattern_keys():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    with pytest.raises(ValueError, match="trains one adapter at a time"):
        model.add_adapter("other", _config())
    model.add_adapter("frozen", _config(inference_mode=True))
    with pytest.raises(ValueError, match="rank_pattern names modules that are not adapted"):
        tsugiki.get_peft_model(tiny_llama(), _config(rank_pattern={"model.nowhere.lora_E": [True] * 6}))
    with pytest.warns(UserWarning, match="r is not used by AdaLoRA"):
        _config(r=4)


def test_adalora_on_a_4bit_base_trains_prunes_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tsugiki import quant

    def four_bit():  # bitsandbytes' CPU 4-bit kernel needs out_features divisible by 32
        return quant.quantize_model(tiny_llama(hidden_size=64, intermediate_size=128), bits=4,
                                    compute_dtype=torch.float32)

    model = tsugiki.get_peft_model(four_bit(), tsugiki.AdaLoraConfig(
        init_r=6, target_r=2, total_step=6, tinit=1, tfinal=1, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = token_batch(4, 10)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(1, 7):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
    model.eval()
    assert losses[-1] < losses[0]
    assert model.peft_config["default"].rank_pattern  # the budget was fixed
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(four_bit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- resume in the trainer
def _trainer_run(out, rows, callbacks=()):
    """An AdaLoRA run of the trainer on every linear layer: masking from step 2, the pattern fixed at step 6 of 8,
    a checkpoint every 2 steps."""
    from tsugiki.train import Trainer, TrainConfig

    cfg = _config(total_step=8, init_r=4, target_r=2, target_modules="all-linear")
    model = tsugiki.get_peft_model(tiny_llama(), cfg)
    config = TrainConfig(output_dir=str(out), dtype="fp32", tensorboard=False, max_steps=8, save_steps=2,
                         batch_size=2, learning_rate=1e-2, lora_dropout=0.0, seed=3)
    Trainer(model, config, rows, callbacks=callbacks, progress=False).train()


def _saved_adapter(folder):
    return (load_file(str(folder / "adapter_model.safetensors")),
            json.loads((folder / "adapter_config.json").read_text())["rank_pattern"])


def test_trainer_resume_gives_the_adapter_of_an_uninterrupted_run(tmp_path):
    """The importance averages and the rank pattern travel in checkpoints: a crash, or re-running a finished
    run, changes nothing in the adapter."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 64, (12, 9), generator=g).tolist()]
    _trainer_run(tmp_path / "straight", rows)
    straight_weights, straight_pattern = _saved_adapter(tmp_path / "straight")
    assert straight_pattern and sum(sum(v) for v in straight_pattern.values()) == 2 * len(straight_pattern)

    def crash_at_5(trainer, record):  # after the budget started shrinking, before the final allocation
        if record["step"] == 5:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _trainer_run(tmp_path / "crashy", rows, callbacks=[crash_at_5])
    _trainer_run(tmp_path / "crashy", rows)  # resumes from checkpoint-4
    weights, pattern = _saved_adapter(tmp_path / "crashy")
    assert pattern == straight_pattern
    assert weights.keys() == straight_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, straight_weights[name]), name

    _trainer_run(tmp_path / "straight", rows)  # the finished run again: resumes at step 8 of 8, trains nothing
    weights, pattern = _saved_adapter(tmp_path / "straight")
    assert pattern == straight_pattern
    assert all(torch.equal(t, straight_weights[n]) for n, t in weights.items())


def test_a_final_rank_above_the_starting_rank_warns_and_prunes_nothing():
    """HF PEFT accepts the config (init_r=4 beside the default target_r=8); its adapters must load here."""
    with pytest.warns(UserWarning, match="target_r=8 is above init_r=4: the rank budget never shrinks"):
        config = AdaLoraConfig(init_r=4, total_step=6, tinit=1, tfinal=1, target_modules=["q_proj"],
                               task_type="CAUSAL_LM")
    model = tsugiki.get_peft_model(tiny_llama(), config)
    _train(model, 6, model.base_model.update_and_allocate)
    pattern = model.peft_config["default"].rank_pattern
    assert len(pattern) == 2 and all(kept == [True] * 4 for kept in pattern.values())


def test_set_scale_is_relative_to_adaloras_own_initial_scaling():
    model = tsugiki.get_peft_model(tiny_llama(), _config())
    randomize_adapters(model)
    ids = token_batch()
    before = _logits(model, ids)
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLinear)]
    for layer in layers:
        layer.set_scale("default", 1.0)  # the scale it was made with: lora_alpha, not lora_alpha / r
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)
    for layer in layers:
        layer.set_scale("default", 2.0)
    assert layers[0].scaling["default"] == 16.0

"""The training loop on a tiny in-process Llama: accumulation, determinism, resume, checkpoints, OOM, records."""

import json
import math
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tsugiki import LoraConfig, get_peft_model
from tsugiki.train import checkpoint as ckpt
from tsugiki.train import schedules
from tsugiki.train.config import ConfigError, TrainConfig
from tsugiki.data import Collator
from tsugiki.train.loop import Trainer, split_rows, token_loss_sum
from tsugiki.train.records import read_metrics

VOCAB = 101


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = LlamaForCausalLM(config)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=dropout))


def random_examples(n, seed=1, lo=5, hi=24):
    """Rows of random lengths; the first k tokens are prompt (-100), the rest trained on."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        k = rng.randint(1, length - 2)
        rows.append({"input_ids": ids, "labels": [-100] * k + ids[k:]})
    return rows


def make_config(out, **kw):
    base = dict(output_dir=str(out), dtype="fp32", tensorboard=False, logging_steps=1, save_steps=0,
                learning_rate=1e-2, lr_scheduler="cosine", warmup_steps=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_all_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def run(out, examples, model=None, callbacks=(), **kw):
    model = model if model is not None else tiny_model()
    trainer = Trainer(model, make_config(out, **kw), examples, callbacks=callbacks, progress=False)
    return trainer, trainer.train()


# ---------------------------------------------------------------------- loss and accumulation
def test_accumulation_weights_every_target_token_equally(tmp_path):
    rows = random_examples(4, seed=5)
    rows[0] = {"input_ids": rows[0]["input_ids"][:6], "labels": [-100] * 3 + rows[0]["input_ids"][3:6]}
    grads = {}
    for name, (bs, accum) in {"4x1": (4, 1), "2x2": (2, 2), "1x4": (1, 4)}.items():
        trainer = Trainer(tiny_model(), make_config(tmp_path / name, batch_size=bs, grad_accum=accum, max_steps=1),
                          rows, progress=False)
        trainer.prepare()
        _loss, targets, _tokens = trainer.accumulate_gradients(rows)
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert targets == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    for n in grads["4x1"]:
        torch.testing.assert_close(grads["2x2"][n], grads["4x1"][n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads["1x4"][n], grads["4x1"][n], rtol=1e-4, atol=1e-6)

    # A mean of per-row means would weigh the short row far more: it must differ.
    model = tiny_model()
    collate = Collator(0)
    loss = 0
    for r in rows:
        b = collate([r])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = loss + token_loss_sum(out.logits, b["labels"]) / sum(t != -100 for t in r["labels"][1:]) / 4
    loss.backward()
    name = next(n for n in grads["4x1"] if "lora_B" in n)
    mean_of_means = dict(model.named_parameters())[name].grad
    assert not torch.allclose(mean_of_means, grads["4x1"][name], rtol=1e-3, atol=1e-6)


def test_packed_rows_score_like_separate_rows():
    model = tiny_model()
    rows = random_examples(3, seed=9)
    with torch.no_grad():
        separate = sum(float(token_loss_sum(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"]))
                       for b in (Collator(0)([r]) for r in rows))
    ids = torch.tensor([sum((r["input_ids"] for r in rows), [])])
    labels = torch.tensor([sum((r["labels"] for r in rows), [])])
    position_ids = torch.tensor([sum((list(range(len(r["input_ids"]))) for r in rows), [])])
    with torch.no_grad():
        packed = token_loss_sum(model(input_ids=ids, position_ids=position_ids, use_cache=False).logits,
                                labels, position_ids)
    assert float(packed) == pytest.approx(separate, rel=1e-4)


def test_packing_trains_on_packs_and_evaluates_unpacked(tmp_path):
    rows = random_examples(12)
    seen = []
    model = tiny_model()
    real_forward = model.forward

    def forward(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("attention_mask", "position_ids", "use_cache")} | {"shape": tuple(kwargs["input_ids"].shape)})
        return real_forward(*args, **kwargs)

    model.forward = forward
    trainer, result = run(tmp_path / "p", rows, model, packing=True, max_length=48, batch_size=2, max_steps=2,
                          target_logits_only=False)  # the spy sits on forward(), which the fast loss skips
    assert all(len(p["input_ids"]) <= 48 for p in trainer.train_examples) and len(trainer.train_examples) < 12
    train_calls = [c for c in seen if c["position_ids"] is not None]
    assert train_calls and all(c["shape"][0] == 1 and c["attention_mask"] is None and c["use_cache"] is False
                               for c in train_calls)  # one padding-free row of two packs
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["train_loss"])


# ---------------------------------------------------------------------- determinism and resume
def test_same_seed_same_weights(tmp_path):
    rows = random_examples(8)
    kw = dict(batch_size=2, grad_accum=2, max_steps=3, lora_dropout=0.1, neftune_alpha=5.0)
    results = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        trainer, _ = run(tmp_path / name, rows, tiny_model(dropout=0.1), **{**kw, "seed": seed})
        results.append(trainable(trainer.model))
    first = results[0]
    assert_all_equal(first, results[1])
    assert not trainer.model.get_input_embeddings()._forward_hooks  # NEFTune is removed after training
    assert any(not torch.equal(first[n], results[2][n]) for n in first)  # the seed matters
    assert any(not torch.equal(first[n], p) for n, p in trainable(tiny_model(dropout=0.1)).items())  # it trained


class Crash(Exception):
    pass


def test_resume_after_crash_is_bitwise_identical(tmp_path):
    rows = random_examples(12)
    # 3 steps per epoch: the crash at step 4 falls inside the second epoch.
    kw = dict(batch_size=2, grad_accum=2, max_steps=5, save_steps=2, save_total_limit=2, lora_dropout=0.1,
              neftune_alpha=5.0, dtype="bf16", group_by_length=True, weight_decay=0.01)
    straight, _ = run(tmp_path / "straight", rows, tiny_model(dropout=0.1), **kw)

    def crash_at_4(trainer, record):
        if record["step"] == 4:
            raise Crash()

    with pytest.raises(Crash):
        run(tmp_path / "crashy", rows, tiny_model(dropout=0.1), callbacks=[crash_at_4], **kw)
    assert ckpt.latest_checkpoint(str(tmp_path / "crashy")).endswith("checkpoint-4")
    resumed, result = run(tmp_path / "crashy", rows, tiny_model(dropout=0.1), **kw)
    assert result.metrics["resumed_from"].endswith("checkpoint-4")
    assert_all_equal(trainable(straight.model), trainable(resumed.model))
    # The records read as one run: every step once, the same losses as the straight run.
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "crashy" / "metrics.jsonl"))]
    assert steps == list(range(1, 6))
    losses = lambda d: [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl"))]
    assert losses(tmp_path / "crashy") == losses(tmp_path / "straight")


def test_resume_refuses_a_different_run_but_may_extend_it(tmp_path):
    rows = random_examples(8)
    run(tmp_path / "r", rows, batch_size=2, max_steps=2, save_steps=2)
    with pytest.raises(ValueError, match="lora_r: 8 -> 16"):
        run(tmp_path / "r", rows, batch_size=2, max_steps=4, save_steps=2, lora_r=16)
    _, result = run(tmp_path / "r", rows, batch_size=2, max_steps=4, save_steps=2)
    assert result.metrics["resumed_from"].endswith("checkpoint-2")
    lines = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # Step 3 follows the new 4-step schedule, not the finished 2-step one (which ended at 0).
    assert lines[2]["lr"] == pytest.approx(1e-2 * schedules.cosine(2, 1, 4))


def test_a_fraction_of_an_epoch_ends_the_last_pass_part_way(tmp_path):
    rows = random_examples(8)  # batch 2: 4 steps an epoch
    _, result = run(tmp_path / "e", rows, batch_size=2, max_steps=-1, num_epochs=1.5)
    assert (result.metrics["steps"], result.metrics["epochs"]) == (6, 1.5)
    _, result = run(tmp_path / "q", rows, batch_size=2, max_steps=-1, num_epochs=0.3)  # 1.2 steps: rounded up
    assert result.metrics["steps"] == 2
    with pytest.raises(ConfigError, match="num_epochs=0.0: must be a number of passes > 0"):
        make_config(tmp_path / "z", max_steps=-1, num_epochs=0.0)


# ---------------------------------------------------------------------- checkpoints
def test_rotation_keeps_the_newest(tmp_path):
    run(tmp_path / "r", random_examples(8), batch_size=2, max_steps=5, save_steps=1, save_total_limit=2)
    found = ckpt.list_checkpoints(str(tmp_path / "r"))
    assert [s for s, _ in found] == [4, 5]
    names = set(os.listdir(found[-1][1]))
    assert {"COMPLETE", "adapter_model.safetensors", "adapter_config.json", "trainable.safetensors",
            "trainer_state.pt", "train_config.yaml"} <= names
    state = torch.load(os.path.join(found[-1][1], "trainer_state.pt"), weights_only=False)
    assert (state["step"], state["epoch"], state["batch_index"]) == (5, 1, 1)  # 4 steps per epoch
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    # Stopped after checkpoint-5 was written but before checkpoint-3 was deleted: the same command again
    # (nothing left to train) keeps the limit.
    import shutil

    shutil.copytree(found[0][1], tmp_path / "r" / "checkpoint-3")
    _, result = run(tmp_path / "r", random_examples(8), batch_size=2, max_steps=5, save_steps=1, save_total_limit=2)
    assert result.metrics["resumed_from"].endswith("checkpoint-5")
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "r"))] == [4, 5]


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "r"
    calls = {"n": 0}
    real_save = torch.save

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        run(out, random_examples(8), batch_size=2, max_steps=6, save_steps=2)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-2")
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    # Leftovers of a killed process: a tmp folder with a marker, a checkpoint folder without one.
    (out / ".checkpoint-8.tmp").mkdir()
    (out / ".checkpoint-8.tmp" / "COMPLETE").write_text("8\n")
    (out / "checkpoint-6").mkdir()
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-2")
    _, result = run(out, random_examples(8), batch_size=2, max_steps=6, save_steps=2)
    assert result.metrics["resumed_from"].endswith("checkpoint-2") and result.metrics["steps"] == 6
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-4", "checkpoint-6"]


def test_output_dir_rules(tmp_path):
    rows = random_examples(4)
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*overwrite: true"):
        run(user_dir, rows, max_steps=1)
    run(user_dir, rows, max_steps=1, overwrite=True)
    assert (user_dir / "notes.txt").read_text() == "keep me"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run(a_file, rows, max_steps=1)

    run(tmp_path / "done", rows, max_steps=1, save_steps=1)
    with pytest.raises(FileExistsError, match="resume is false"):
        run(tmp_path / "done", rows, max_steps=1, resume=False)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run(tmp_path / "other", rows, max_steps=1, resume=str(tmp_path / "nowhere"))


def test_overwrite_never_replaces_a_users_files(tmp_path):
    rows = random_examples(4)
    out = tmp_path / "u1"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "tokenizer_config.json").write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match=r"holds tokenizer_config\.json, which this run would write.*"
                                              r"move or delete it, or choose another output_dir"):
        run(out, rows, max_steps=1, overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "tokenizer_config.json"]  # refused before writing anything
    (out / "tokenizer_config.json").unlink()
    run(out, rows, max_steps=2, save_steps=1, overwrite=True)
    assert (out / "README.md").read_text() == "my notes"  # the user's card stays; ours is not written
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    # Going on with that run in its folder, or starting it over, keeps the user's README too.
    _, result = run(out, rows, max_steps=3, save_steps=1)
    assert result.metrics["resumed_from"].endswith("checkpoint-2")
    run(out, rows, max_steps=1, overwrite=True)
    assert (out / "README.md").read_text() == "my notes"
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-")]


def test_final_save_keeps_a_users_file_under_an_unusual_tokenizer_name(tmp_path, capsys):
    class Tokenizer:  # saves a file name no check knows beforehand
        pad_token_id = eos_token_id = 0

        def save_pretrained(self, folder):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "odd.tok"), "w") as fh:
                fh.write("ours")

    out = tmp_path / "odd"
    out.mkdir()
    (out / "odd.tok").write_text("mine")
    trainer = Trainer(tiny_model(), make_config(out, max_steps=1, overwrite=True), random_examples(4),
                      tokenizer=Tokenizer(), progress=False)
    trainer.train()
    assert (out / "odd.tok").read_text() == "mine"
    assert "odd.tok saved with the tokenizer was not written" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").exists()
    trainer = Trainer(tiny_model(), make_config(tmp_path / "fresh", max_steps=1), random_examples(4),
                      tokenizer=Tokenizer(), progress=False)
    trainer.train()
    assert (tmp_path / "fresh" / "odd.tok").read_text() == "ours"


def test_resume_from_a_path_into_another_folder_follows_the_fresh_start_rules(tmp_path):
    rows = random_examples(8)
    run(tmp_path / "a1", rows, batch_size=2, max_steps=2, save_steps=2)
    checkpoint = str(tmp_path / "a1" / "checkpoint-2")
    u2 = tmp_path / "u2"
    u2.mkdir()
    (u2 / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty and is not the folder of checkpoint"):
        run(u2, rows, batch_size=2, max_steps=4, save_steps=2, resume=checkpoint)
    assert os.listdir(u2) == ["README.md"]
    _, result = run(u2, rows, batch_size=2, max_steps=4, save_steps=2, resume=checkpoint, overwrite=True)
    assert result.metrics["resumed_from"] == checkpoint and (u2 / "README.md").read_text() == "mine"
    _, result = run(tmp_path / "new", rows, batch_size=2, max_steps=4, save_steps=2, resume=checkpoint)
    assert result.metrics["resumed_from"] == checkpoint
    # The new folder's records cover the whole run: the earlier run's steps, then its own.
    steps = [r["step"] for r in read_metrics(str(tmp_path / "new")) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    # Into its own folder the run simply goes on, past the newer checkpoints there.
    _, result = run(tmp_path / "a1", rows, batch_size=2, max_steps=4, save_steps=2, resume=checkpoint)
    assert result.metrics["resumed_from"] == checkpoint


def test_overwrite_removes_an_earlier_runs_final_outputs(tmp_path):
    """A full fine-tune over a LoRA run: the old adapter must go, or loaders would read base + old LoRA."""
    rows = random_examples(4)
    out = tmp_path / "ow"
    run(out, rows, max_steps=1, save_steps=1)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "checkpoint-1"} <= set(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    full = tiny_model().base_model.model
    for p in full.parameters():
        p.requires_grad_(True)
    run(out, rows, model=full, max_steps=1, method="full", overwrite=True)
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "train_config.yaml", "notes.txt"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "README.md", "checkpoint-1"}


def test_overwrite_keeps_a_model_the_user_saved_beside_the_adapter(tmp_path):
    """Files named as a run's outputs are the run's only when it wrote them (its outputs.json says which)."""
    rows = random_examples(4)
    out = tmp_path / "merged"
    run(out, rows, max_steps=1)
    assert json.loads((out / "outputs.json").read_text()) == ["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"]
    model = tiny_model().base_model.model
    model.save_pretrained(out)  # e.g. merge_and_unload() saved into the run's folder
    saved = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}
    run(out, rows, max_steps=1, overwrite=True)
    assert {name: (out / name).read_bytes() for name in saved} == saved
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))


def test_resume_refuses_changes_to_the_rows_their_order_or_the_adapter(tmp_path):
    rows = random_examples(8)
    run(tmp_path / "r", rows, batch_size=2, max_steps=2, save_steps=2, max_rows=20)
    checkpoint = str(tmp_path / "r" / "checkpoint-2")
    saved = make_config(tmp_path / "r", batch_size=2, max_steps=2, save_steps=2, max_rows=20)
    for change, message in [({"max_rows": 40}, "max_rows: 20 -> 40"),
                            ({"eval_split": 0.5}, r"eval_split \(rows held out of data.*\): 0.0 -> 0.5"),
                            ({"shuffle": False}, "shuffle: True -> False"),
                            ({"group_by_length": True}, "group_by_length: False -> True"),
                            ({"lora_dropout": 0.3}, "lora_dropout: 0.05 -> 0.3"),
                            ({"neftune_alpha": 5.0}, "neftune_alpha: None -> 5.0"),
                            ({"weight_decay": 0.1}, "weight_decay: 0.0 -> 0.1"),
                            ({"max_grad_norm": 0.5}, "max_grad_norm: 1.0 -> 0.5")]:
        with pytest.raises(ValueError, match=f"cannot resume from .*{message}"):
            ckpt.check_resume_compatible(checkpoint, saved.replace(**change))
    # Not a change: eval_split with eval_data given (nothing is held out either way), NEFTune 0 (off), max_steps.
    ckpt.check_resume_compatible(checkpoint, saved.replace(eval_data="eval.jsonl", eval_split=0.5, neftune_alpha=0,
                                                           max_steps=10, dtype="bf16"))
    with pytest.raises(ValueError, match="shuffle: True -> False"):  # the trainer asks before it trains
        run(tmp_path / "r", rows, batch_size=2, max_steps=4, save_steps=2, max_rows=20, shuffle=False)


# ---------------------------------------------------------------------- OOM, dtype, records
def test_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path):
    rows = random_examples(16)
    model = tiny_model()
    real_forward = model.forward
    seen = []

    def forward(*args, **kwargs):
        rows_in = kwargs["input_ids"].shape[0]
        seen.append(rows_in)
        if rows_in > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    model.forward = forward
    trainer, result = run(tmp_path / "oom", rows, model, batch_size=4, grad_accum=2, max_steps=2,
                          target_logits_only=False,  # the fake OOM sits on forward(), which the fast loss skips
                          max_forward_tokens=0)  # forwards of batch_size rows, not split by a token budget
    assert (trainer.micro_batch_size, trainer.grad_accum, trainer.examples_per_step) == (2, 4, 8)
    assert seen == [4, 2, 2, 2, 2, 2, 2, 2, 2]  # one failed try, then 4 micro-batches per step
    assert result.metrics["micro_batch_size"] == 2

    reference, _ = run(tmp_path / "ref", rows, batch_size=2, grad_accum=4, max_steps=2, target_logits_only=False,
                       max_forward_tokens=0)
    assert_all_equal(trainable(trainer.model), trainable(reference.model))


def test_target_logits_only_trains_like_full_logits(tmp_path):
    rows = random_examples(8)
    fast, _ = run(tmp_path / "fast", rows, batch_size=4, max_steps=2, target_logits_only=True)
    full, _ = run(tmp_path / "full", rows, batch_size=4, max_steps=2, target_logits_only=False)
    a, b = trainable(fast.model), trainable(full.model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_bf16_policy_and_fused_adamw(tmp_path):
    trainer = Trainer(tiny_model(), make_config(tmp_path / "r", dtype="bf16", max_steps=1), random_examples(4),
                      progress=False)
    trainer.prepare()
    params = dict(trainer.model.named_parameters())
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in params.values())
    assert trainer.optimizer.defaults.get("fused") is True
    trainer.train()
    states = [s for s in trainer.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_records_written(tmp_path):
    out = tmp_path / "r"
    model = tiny_model()
    trainer = Trainer(model, make_config(out, batch_size=2, max_steps=4, eval_steps=2, tensorboard=True,
                                         gradient_checkpointing=True),
                      random_examples(8), eval_examples=random_examples(3, seed=7), progress=False)
    result = trainer.train()
    assert model.base_model.model.is_activation_checkpointing
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[0]["lr"] == pytest.approx(1e-2 * 0.5)  # the rate step 1 used: warm-up (0 + 1) / (1 + 1)
    for r in lines:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == result.metrics["steps"] == 4
    assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert summary["peak_memory_bytes"] > 0 and summary["tokens_per_s"] > 0
    assert summary["adapter_size_bytes"] == os.path.getsize(out / "adapter_model.safetensors") + \
        os.path.getsize(out / "adapter_config.json") + os.path.getsize(out / "README.md")
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainConfig.load(str(out / "train_config.yaml")) == trainer.config
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "runs"))


# ---------------------------------------------------------------------- forward token budget and order
def test_split_rows_keeps_order_and_the_token_budget():
    rows = [{"input_ids": [0] * n} for n in (5, 7, 3, 20, 2, 2)]
    groups = split_rows(rows, max_rows=3, max_tokens=16)
    assert [len(r["input_ids"]) for g in groups for r in g] == [5, 7, 3, 20, 2, 2]
    assert [len(g) for g in groups] == [2, 1, 1, 2]  # 2x7 fits 16, 3x7 does not; 20 goes alone
    assert all(len(g) * max(len(r["input_ids"]) for r in g) <= 16 for g in groups if len(g) > 1)
    assert [len(g) for g in split_rows(rows, max_rows=4, max_tokens=0)] == [4, 2]
    # Rows padded to a multiple of 8 take 8 or 24 tokens each: the budget counts what the forward holds.
    padded = split_rows(rows, max_rows=3, max_tokens=16, pad_to_multiple_of=8)
    assert [len(g) for g in padded] == [2, 1, 1, 2]
    assert all(len(g) * -(-max(len(r["input_ids"]) for r in g) // 8) * 8 <= 16 for g in padded if len(g) > 1)
    forty = [{"input_ids": [0] * 40} for _ in range(6)]  # 3 x 40 = 120 fits 128, but 3 x 64 padded does not
    assert [len(g) for g in split_rows(forty, max_rows=6, max_tokens=128)] == [3, 3]
    assert [len(g) for g in split_rows(forty, max_rows=6, max_tokens=128, pad_to_multiple_of=64)] == [2, 2, 2]


def test_splitting_forwards_by_tokens_does_not_change_the_adapter(tmp_path):
    rows = random_examples(16, seed=4)
    whole, _ = run(tmp_path / "whole", rows, batch_size=4, grad_accum=2, max_steps=3, max_forward_tokens=0)
    split, _ = run(tmp_path / "split", rows, batch_size=4, grad_accum=2, max_steps=3, max_forward_tokens=30)
    assert split._micro_batches(rows[:4]) != whole._micro_batches(rows[:4])
    a, b = trainable(whole.model), trainable(split.model)
    for name in a:  # float summation order only (Adam's first steps magnify it to ~2e-6 here)
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_auto_forward_tokens_follows_the_weights_and_the_shape():
    from tsugiki.train.loop import auto_forward_tokens

    model = tiny_model()
    budget = auto_forward_tokens(model, torch.float32)
    assert budget >= 1
    for p in model.parameters():  # twice the frozen bytes, about twice the budget
        if not p.requires_grad:
            p.data = torch.cat([p.data.reshape(-1)] * 2)
    assert auto_forward_tokens(model, torch.float32) in (2 * budget, 2 * budget + 1)
    assert auto_forward_tokens(torch.nn.Linear(4, 4), torch.float32) == 0  # no config: no limit


def test_the_trainers_auto_budget_counts_full_logits_when_the_loss_takes_them(tmp_path):
    """With the chunked output layer the loss holds no full logits; the model's own loss holds 3 fp32 copies."""
    from tsugiki import plan
    from tsugiki.train.loop import auto_forward_tokens

    rows = random_examples(4)
    budgets = {}
    for chunked in (True, False):
        trainer = Trainer(tiny_model(), make_config(tmp_path / str(chunked), max_steps=1, target_logits_only=chunked),
                          rows, progress=False)
        trainer.prepare()
        budgets[chunked] = trainer.forward_tokens
    assert budgets[True] == auto_forward_tokens(tiny_model(), torch.float32)
    assert budgets[False] == auto_forward_tokens(tiny_model(), torch.float32, full_logits=plan.LOGITS_FP32_COPIES)
    assert budgets[False] < budgets[True]


def test_auto_forward_tokens_of_a_dora_model_count_what_its_layers_keep():
    """DoRA layers keep z and, with dropout, their dropped inputs: the same share of memory holds fewer tokens,
    the number the memory plan gives for method dora."""
    from tsugiki import plan
    from tsugiki.train.loop import auto_forward_tokens

    def dora_model(dropout):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   lora_dropout=dropout, use_dora=True))

    lora = auto_forward_tokens(tiny_model(), torch.float32)
    shape = plan.model_shape(plan.load_config(tiny_model().config))
    frozen = sum(p.numel() * 4 for p in tiny_model().parameters() if not p.requires_grad)
    for dropout in (0.0, 0.1):
        dora = auto_forward_tokens(dora_model(dropout), torch.float32)
        assert dora == plan.auto_forward_budget(shape, 4, frozen, "cpu", dora=True, dora_dropout=dropout)
        assert dora < lora
    assert auto_forward_tokens(dora_model(0.1), torch.float32) < auto_forward_tokens(dora_model(0.0), torch.float32)


def test_auto_forward_tokens_on_cuda_counts_the_memory_this_process_can_have(monkeypatch):
    """Free device memory plus what torch holds, at most the total: another process's memory is not ours."""
    from tsugiki import plan
    from tsugiki.plan import AUTO_ACTIVATION_SHARE
    from tsugiki.train.loop import auto_forward_tokens

    model = tiny_model()
    shape = plan.model_shape(plan.load_config(model.config))
    adapted = {lin.name for lin in shape.linears}
    block = plan.block_activation_bytes(shape, 2, full=False, adapted=adapted, lora_r=16, lora_dropout=0.0,
                                        device="cuda")
    gib = 1 << 30
    memory = {"free": 10 * gib, "total": 80 * gib, "reserved": 2 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], memory["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    cuda = torch.device("cuda", 0)
    # A GPU shared with another job: 12 GiB of its 80 are this process's to use.
    assert auto_forward_tokens(model, torch.bfloat16, cuda) == int(AUTO_ACTIVATION_SHARE * 12 * gib
                                                                   // (shape.layers * block))
    memory.update(free=79 * gib, reserved=3 * gib)  # alone on the card: the total bounds it
    assert auto_forward_tokens(model, torch.bfloat16, cuda) == int(AUTO_ACTIVATION_SHARE * 80 * gib
                                                                   // (shape.layers * block))


def test_auto_forward_tokens_under_checkpointing_counts_block_inputs_and_one_block():
    from tsugiki import plan
    from tsugiki.plan import AUTO_ACTIVATION_SHARE
    from tsugiki.train.loop import auto_forward_tokens

    model = tiny_model()
    shape = plan.model_shape(plan.load_config(model.config))
    adapted = {lin.name for lin in shape.linears}
    block = plan.block_activation_bytes(shape, 4, full=False, adapted=adapted, lora_r=16, lora_dropout=0.0,
                                        device="cpu")
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    plain = auto_forward_tokens(model, torch.float32)
    checkpointed = auto_forward_tokens(model, torch.float32, gradient_checkpointing=True)
    assert plain == max(1, int(AUTO_ACTIVATION_SHARE * frozen // (shape.layers * block)))
    assert checkpointed == max(1, int(AUTO_ACTIVATION_SHARE * frozen // (shape.layers * shape.hidden * 4 + block)))
    assert checkpointed > plain  # fewer bytes kept a token: longer forwards


def test_the_trainer_sizes_forwards_for_checkpointing(tmp_path):
    from tsugiki.train.loop import auto_forward_tokens

    budgets = {}
    for on in (False, True):
        trainer = Trainer(tiny_model(), make_config(tmp_path / str(on), gradient_checkpointing=on, max_steps=1),
                          random_examples(2), progress=False)
        trainer.prepare()
        budgets[on] = trainer.forward_tokens
    assert budgets[True] > budgets[False]
    assert budgets[True] == auto_forward_tokens(tiny_model(), torch.float32, gradient_checkpointing=True)


def test_shuffle_false_keeps_the_file_order(tmp_path):
    rows = random_examples(8)
    seen = []
    trainer = Trainer(tiny_model(), make_config(tmp_path / "o", batch_size=2, max_steps=4, shuffle=False), rows,
                      progress=False)
    real = trainer.accumulate_gradients
    trainer.accumulate_gradients = lambda examples, *a: (seen.extend(examples), real(examples, *a))[1]
    trainer.train()
    assert seen == rows


@pytest.mark.parametrize("value", ["abc", "-5", "1.5"])
def test_bad_max_forward_tokens_names_the_key_and_what_is_allowed(tmp_path, value):
    from tsugiki.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"max_forward_tokens=.*expected 'auto', 0 \(no limit\)"):
        TrainConfig.load(None, {"max_forward_tokens": value})
    assert TrainConfig.load(None, {"max_forward_tokens": "300"}).max_forward_tokens == 300


def test_auto_forward_tokens_with_offloaded_block_inputs_counts_one_block():
    from tsugiki import plan
    from tsugiki.plan import AUTO_ACTIVATION_SHARE
    from tsugiki.train.loop import auto_forward_tokens

    model = tiny_model()
    shape = plan.model_shape(plan.load_config(model.config))
    block = plan.block_activation_bytes(shape, 4, full=False, adapted={lin.name for lin in shape.linears},
                                        lora_r=16, lora_dropout=0.0, device="cpu")
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    offloaded = auto_forward_tokens(model, torch.float32, gradient_checkpointing=True, offload=True)
    assert offloaded == max(1, int(AUTO_ACTIVATION_SHARE * frozen // block))
    assert offloaded > auto_forward_tokens(model, torch.float32, gradient_checkpointing=True)


def test_activation_offloading_on_a_cpu_says_so_and_trains_as_plain_checkpointing(tmp_path, capsys):
    adapters, budgets = [], []
    for offload in (False, True):
        model = tiny_model()
        trainer = Trainer(model, make_config(tmp_path / str(offload), gradient_checkpointing=True,
                                             activation_offloading=offload, max_steps=2, batch_size=2),
                          random_examples(4), progress=False)
        trainer.train()
        adapters.append(trainable(model))
        budgets.append(trainer.forward_tokens)
    assert "activation_offloading: ignored on cpu" in capsys.readouterr().out
    assert budgets[0] == budgets[1]  # nothing left the device, so forwards are sized as without it
    assert_all_equal(*adapters)


def test_offloading_hands_each_layer_input_to_save_on_cpu_and_keeps_the_gradients(monkeypatch):
    """What enable_gradient_checkpointing(offload=True) moves off the device: each decoder layer's input only.

    A CPU has no pinned-memory allocator, so the hook runs unpinned here (tests/test_cuda.py checks the device side).
    """
    from torch.autograd import graph

    from tsugiki.train.loop import enable_gradient_checkpointing

    packed = []
    init = graph.save_on_cpu.__init__

    def counting_init(self, pin_memory=False, device_type="cuda"):
        init(self, pin_memory=False, device_type=device_type)
        pack = self.pack_hook
        self.pack_hook = lambda t: (packed.append(tuple(t.shape)), pack(t))[1]

    monkeypatch.setattr(graph.save_on_cpu, "__init__", counting_init)
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    grads = []
    for offload in (False, True):
        model = tiny_model()
        enable_gradient_checkpointing(model, offload=offload)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    config = model.base_model.model.config
    assert packed == [(3, 20, config.hidden_size)] * config.num_hidden_layers
    assert_all_equal(*grads)


def test_a_diverged_step_stops_the_run_before_it_writes_nan_weights(tmp_path):
    from tsugiki.train.loop import TrainingDiverged

    out = tmp_path / "nan"
    model = tiny_model()
    trainer = Trainer(model, make_config(out, batch_size=2, max_steps=3, learning_rate=1e30, dtype="fp32",
                                         max_grad_norm=0.0),
                      random_examples(8), progress=False)
    with pytest.raises(TrainingDiverged, match="training diverged at step 2: .* gradient norm nan"):
        trainer.train()
    assert not (out / "adapter_model.safetensors").exists()  # no NaN adapter presented as the result
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)  # step 2 not taken


def test_a_callback_returning_false_stops_the_run_which_saves_as_at_its_end(tmp_path):
    out = tmp_path / "stopped"
    model = tiny_model()
    model.config.use_cache = True
    seen = []

    def stop_at_two(trainer, record):
        seen.append(trainer.state["step"])
        return trainer.state["step"] < 2

    result = Trainer(model, make_config(out, batch_size=2, max_steps=6), random_examples(16), progress=False,
                     callbacks=[stop_at_two]).train()
    assert seen == [1, 2] and result.metrics["steps"] == 2
    assert (out / "adapter_model.safetensors").exists()
    assert model.config.use_cache is True  # the model is handed back as it came


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [1, 2, 3]}, r"train_examples\[2\] has no 'labels'.*a copy of input_ids trains on every token"),
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, r"train_examples\[2\]: 'input_ids' has 3 tokens but 'labels' 2"),
])
def test_rows_the_trainer_cannot_batch_are_named(tmp_path, bad, message):
    rows = random_examples(4)
    rows[2] = bad
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_model(), make_config(tmp_path / "out", max_steps=1), rows)


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tsugiki.train"):
        Trainer(tiny_model(), make_config(tmp_path / "long", max_steps=4, warmup_steps=4), random_examples(4),
                progress=False).prepare()
    assert "warmup_steps=4 is not below the run's 4 steps: the learning rate never reaches" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tsugiki.train"):
        Trainer(tiny_model(), make_config(tmp_path / "short", max_steps=4, warmup_steps=3), random_examples(4),
                progress=False).prepare()
    assert "warmup_steps" not in caplog.text


def test_a_dora_checkpoint_from_before_the_magnitude_became_a_module_resumes(tmp_path):
    """Earlier releases saved DoRA's magnitude as ``...lora_magnitude_vector.default`` (no ``.weight``)."""
    from safetensors.torch import load_file, save_file

    def dora_model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                   use_dora=True))

    rows = random_examples(8)
    run(tmp_path / "a", rows, model=dora_model(), batch_size=2, max_steps=2, save_steps=1)
    path = tmp_path / "a" / "checkpoint-1" / ckpt.TRAINABLE_FILE
    saved = load_file(path)
    save_file({k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v for k, v in saved.items()}, path)
    assert any(k.endswith("lora_magnitude_vector.default") for k in load_file(path))
    trainer = Trainer(dora_model(), make_config(tmp_path / "a", batch_size=2, max_steps=2, save_steps=1,
                                                resume=str(tmp_path / "a" / "checkpoint-1")), rows, progress=False)
    trainer.prepare()
    magnitude = next(p for n, p in trainer.model.named_parameters() if "lora_magnitude_vector" in n)
    expected = next(v for k, v in saved.items() if "lora_magnitude_vector" in k)
    assert torch.equal(magnitude.detach(), expected)


def test_the_peak_memory_is_this_processs_not_the_one_it_was_started_from():
    """ru_maxrss carries the parent's RSS into a child: a notebook running `!tsugiki train` reported its own."""
    import subprocess
    import sys

    held = bytearray(1536 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # resident, in this (the parent) process
    code = "import torch; from tsugiki.train.records import peak_memory_bytes; print(peak_memory_bytes(torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    child_peak = int(done.stdout.split()[-1])
    assert 50 * 2**20 < child_peak < 1024 * 2**20, child_peak  # torch's import, not the parent's 1.5 GiB
    del held


# ---------------------------------------------------------------------- keep_best and early stopping
def _run_recording_evals(out, **kw):
    """A run that evaluates every step; returns the trainer, its result, and each step's eval loss and weights."""
    losses, weights = {}, {}

    def record_eval(trainer, record):
        if "eval_loss" in record:
            losses[record["step"]] = record["eval_loss"]
            weights[record["step"]] = trainable(trainer.model)

    model = tiny_model()
    config = make_config(out, batch_size=4, max_steps=12, eval_steps=1, learning_rate=0.1, **kw)
    trainer = Trainer(model, config, random_examples(8, seed=1), random_examples(8, seed=2),
                      callbacks=[record_eval], progress=False)
    return trainer, trainer.train(), losses, weights


def test_keep_best_saves_the_weights_of_the_lowest_eval_loss(tmp_path):
    from safetensors.torch import load_file

    from tsugiki import get_peft_model_state_dict

    trainer, result, losses, weights = _run_recording_evals(tmp_path, keep_best=True)
    best = min(losses, key=losses.get)
    assert best < 12  # the eval loss rose after its low point: the last step's weights are not the best
    assert_all_equal(trainable(trainer.model), weights[best])
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert_all_equal(saved, {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()})
    assert (result.metrics["best_step"], result.metrics["saved_step"]) == (best, best)
    assert result.metrics["eval_loss"] == losses[best] and result.metrics["steps"] == 12
    # Without keep_best the same run ends with the last step's weights, and says which step was best.
    plain_trainer, plain, _, plain_weights = _run_recording_evals(tmp_path / "plain")
    assert_all_equal(trainable(plain_trainer.model), plain_weights[12])
    assert plain.metrics["best_step"] is None  # not tracked without keep_best or early stopping


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_new_low(tmp_path, capsys):
    _, result, losses, _ = _run_recording_evals(tmp_path, early_stopping_patience=3)
    low, since, expected_stop = float("inf"), 0, None
    for step in sorted(losses):
        low, since = (losses[step], 0) if losses[step] < low else (low, since + 1)
        if since == 3:
            expected_stop = step
            break
    assert expected_stop is not None and expected_stop < 12
    assert result.metrics["steps"] == expected_stop == max(losses)
    assert result.metrics["best_step"] == min(losses, key=losses.get)


def test_a_rerun_of_an_early_stopped_run_trains_no_further_unless_the_patience_is_raised(tmp_path):
    trainer, result, _, _ = _run_recording_evals(tmp_path, early_stopping_patience=3, save_steps=50)
    stopped = result.metrics["steps"]
    assert stopped < 12 and os.path.isdir(tmp_path / f"checkpoint-{stopped}")  # saved where it stopped
    again, rerun, losses, _ = _run_recording_evals(tmp_path, early_stopping_patience=3, save_steps=50)
    assert rerun.metrics["resumed_from"].endswith(f"checkpoint-{stopped}")
    assert rerun.metrics["steps"] == stopped and not losses  # no step trained, no evaluation run
    assert_all_equal(trainable(again.model), trainable(trainer.model))
    _, patient, _, _ = _run_recording_evals(tmp_path, early_stopping_patience=30, save_steps=50)
    assert patient.metrics["steps"] == 12


def test_keep_best_survives_a_resume(tmp_path):
    straight, straight_result, _, _ = _run_recording_evals(tmp_path / "straight", keep_best=True, save_steps=1)

    def crash_at_7(trainer, record):
        if record["step"] == 7:
            raise Crash()

    config = make_config(tmp_path / "crashy", batch_size=4, max_steps=12, eval_steps=1, learning_rate=0.1,
                         keep_best=True, save_steps=1)
    with pytest.raises(Crash):
        Trainer(tiny_model(), config, random_examples(8, seed=1), random_examples(8, seed=2),
                callbacks=[crash_at_7], progress=False).train()
    resumed = Trainer(tiny_model(), config, random_examples(8, seed=1), random_examples(8, seed=2), progress=False)
    result = resumed.train()
    assert result.metrics["resumed_from"].endswith("checkpoint-7")
    assert straight_result.metrics["best_step"] < 7  # the best came before the crash: only the checkpoint held it
    assert result.metrics["saved_step"] == straight_result.metrics["saved_step"]
    assert_all_equal(trainable(resumed.model), trainable(straight.model))


@pytest.mark.parametrize("settings, message", [
    (dict(keep_best=True), "keep_best=True: compares evaluations during the run: set eval_steps"),
    (dict(early_stopping_patience=2), "early_stopping_patience=2: compares evaluations"),
    (dict(early_stopping_patience=-1, eval_steps=5), "early_stopping_patience=-1: must be >= 0"),
    (dict(keep_best=True, eval_steps=5, fsdp=True), "keep_best=True: is not available with fsdp"),
    (dict(keep_best=True, eval_steps=5, method="adalora"), "keep_best=True: is not available with method adalora"),
])
def test_keep_best_and_early_stopping_need_evaluations_during_the_run(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **settings)

"""FSDP (fsdp: true): 2 processes holding half the weights each give the adapter of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tsugiki import LoraConfig, get_peft_model
from tsugiki.cli import main
from tsugiki.kernels.target_logits import split_causal_lm
from tsugiki.train import fsdp
from tsugiki.data import Collator, IGNORE_INDEX
from helpers_data import tiny_llama
from test_train_distributed import data_file, metrics, torchrun  # noqa: F401 - fixtures (model_dir: conftest)

ADAPTER = "adapter_model.safetensors"


def fsdp_args(model_dir, data_file, out, batch_size, grad_accum, max_steps=5):
    # 15 train rows in steps of 4: step 4 holds 3, so under FSDP (micro-batch 1, grad_accum 2) rank 1 has
    # one micro-batch to rank 0's two and must pad. 5 eval rows split 3/2: eval pads rank 1 as well.
    return ["train", "--model", model_dir, "--data", data_file, "--output_dir", out, "--batch_size", str(batch_size),
            "--grad_accum", str(grad_accum), "--max_steps", str(max_steps), "--dtype", "fp32", "--lora_dropout", "0",
            "--lora_r", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "5",
            "--eval_split", "5", "--tensorboard", "false"]


def assert_same_adapter(a_dir, b_dir):
    a, b = load_file(os.path.join(a_dir, ADAPTER)), load_file(os.path.join(b_dir, ADAPTER))
    assert sorted(a) == sorted(b) and a
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return a


def test_fsdp_two_processes_match_one_process_and_resume(model_dir, data_file, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    torchrun(fsdp_args(model_dir, data_file, two, batch_size=1, grad_accum=2) + ["--fsdp", "true"])
    assert main(fsdp_args(model_dir, data_file, one, batch_size=4, grad_accum=1)) == 0

    adapter = assert_same_adapter(two, one)
    assert any(float(t.abs().max()) > 0 for n, t in adapter.items() if "lora_B" in n)  # it trained

    rows_two, rows_one = metrics(two), metrics(one)
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5]
    for r2, r1 in zip(rows_two, rows_one):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)  # clipping saw the global norm
    assert rows_two[-1]["eval_loss"] == pytest.approx(rows_one[-1]["eval_loss"], rel=1e-5)

    # Rank 0 alone wrote, and wrote the same files as one process; nothing half-written is left.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert not [n for n in os.listdir(two) if n.startswith(".")]
    summary = json.loads(open(os.path.join(two, "summary.json")).read())
    assert (summary["fsdp"], summary["world_size"], summary["effective_batch"]) == (True, 2, 4)
    # Each rank keeps about half of the parameter bytes; one process keeps them all.
    full, local = summary["param_bytes"], summary["local_param_bytes"]
    assert len(local) == 2 and all(0.45 * full <= b <= 0.55 * full for b in local), (full, local)
    single = json.loads(open(os.path.join(one, "summary.json")).read())
    assert (single["fsdp"], single["local_param_bytes"]) == (False, [single["param_bytes"]])
    assert single["param_bytes"] == full

    # The checkpoint holds whole tensors, exactly those of the final adapter state at step 5.
    saved = load_file(os.path.join(two, "checkpoint-5", "trainable.safetensors"))
    assert saved and all(t.shape == load_file(os.path.join(one, "checkpoint-5", "trainable.safetensors"))[n].shape
                         for n, t in saved.items())

    # Resume: the FSDP checkpoint under FSDP, and (a copy) in one process without FSDP, both to step 7,
    # land on the adapter one process reaches from its own checkpoint: weights and optimizer state reloaded.
    plain = str(tmp_path / "plain-resume")
    shutil.copytree(two, plain)
    torchrun(fsdp_args(model_dir, data_file, two, batch_size=1, grad_accum=2, max_steps=7) + ["--fsdp", "true"])
    assert main(fsdp_args(model_dir, data_file, one, batch_size=4, grad_accum=1, max_steps=7)) == 0
    assert main(fsdp_args(model_dir, data_file, plain, batch_size=4, grad_accum=1, max_steps=7)) == 0
    assert [r["step"] for r in metrics(two)] == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads(open(os.path.join(two, "summary.json")).read())["resumed_from"].endswith("checkpoint-5")
    assert_same_adapter(two, one)
    assert_same_adapter(plain, one)


def test_fsdp_saves_a_prompt_its_method_computes_from_sharded_parameters(model_dir, data_file, tmp_path):
    """p-tuning saves its encoder's output: under FSDP it is computed from the whole (gathered) weights."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    method = ["--method", "p_tuning", "--max_steps", "2", "--save_steps", "2"]
    torchrun(fsdp_args(model_dir, data_file, two, batch_size=1, grad_accum=2) + method + ["--fsdp", "true"])
    assert main(fsdp_args(model_dir, data_file, one, batch_size=4, grad_accum=1) + method) == 0
    assert_same_adapter(two, one)
    assert_same_adapter(os.path.join(two, "checkpoint-2"), os.path.join(one, "checkpoint-2"))


def test_fsdp_full_fine_tune_of_a_tied_model_checkpoints_the_shared_weight_once(data_file, tmp_path):
    """SmolLM2 ties its output layer to the embedding: the gathered checkpoint failed ('tensors share memory')."""
    from helpers_data import make_chat_tokenizer, tiny_llama

    model_dir = str(tmp_path / "tied")
    tiny_llama(tie_word_embeddings=True).save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    full = ["--method", "full", "--max_steps", "2", "--save_steps", "2"]
    torchrun(fsdp_args(model_dir, data_file, two, batch_size=1, grad_accum=2) + full + ["--fsdp", "true"])
    assert main(fsdp_args(model_dir, data_file, one, batch_size=4, grad_accum=1) + full) == 0
    for folder in ("checkpoint-2", ""):  # the checkpoint's trained weights, and the final model
        name = "trainable.safetensors" if folder else "model.safetensors"
        a, b = (load_file(os.path.join(run, folder, name)) for run in (two, one))
        assert sorted(a) == sorted(b) and a
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_fsdp_in_one_process_is_refused_before_the_model_loads(model_dir, data_file, tmp_path, capsys, monkeypatch):
    import tsugiki.pipeline

    monkeypatch.setattr(tsugiki.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded first"))
    out = str(tmp_path / "out")
    assert main(fsdp_args(model_dir, data_file, out, batch_size=4, grad_accum=1, max_steps=1) + ["--fsdp", "true"]) == 2
    assert "needs torchrun --nproc_per_node 2+" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "fp16"], "fsdp: true does not support dtype: fp16"),
    (["--method", "adalora"], "fsdp: true does not support method 'adalora'"),
])
def test_fsdp_settings_it_cannot_run_are_refused_before_the_model_loads(model_dir, data_file, tmp_path, capsys,
                                                                        monkeypatch, extra, message):
    import tsugiki.pipeline

    monkeypatch.setattr(tsugiki.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded first"))
    out = tmp_path / "out"
    args = fsdp_args(model_dir, data_file, str(out), batch_size=4, grad_accum=1, max_steps=1)
    assert main(args + ["--fsdp", "true", *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------- helpers, one process
def lora_llama():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def test_decoder_layers_are_the_declared_blocks():
    model = lora_llama()
    layers = fsdp.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert layers[0] is model.get_base_model().model.layers[0]


def test_tied_outside_finds_a_head_tied_to_the_embeddings():
    model = lora_llama()
    body, head = split_causal_lm(model)
    assert fsdp.tied_outside(model, head) == []
    head.weight = body.embed_tokens.weight
    names = fsdp.tied_outside(model, head)
    assert any(n.endswith("lm_head.weight") for n in names) and any(n.endswith("embed_tokens.weight") for n in names)


def test_zero_weight_batch_has_one_token_and_no_target():
    batch = fsdp.zero_weight_batch({"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, Collator(0))
    assert batch["input_ids"].tolist() == [[5]] and batch["labels"].tolist() == [[IGNORE_INDEX]]


def test_helpers_on_an_unsharded_model():
    model = lora_llama()
    assert not fsdp.is_sharded(model)
    local, full = fsdp.param_bytes(model)
    assert local == full == sum(p.numel() * p.element_size() for p in model.parameters())
    state = fsdp.full_trainable_state(model)
    assert state and all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    param = next(p for p in model.parameters() if p.requires_grad)
    fsdp.load_full_into(param, torch.full(param.shape, 0.5))
    assert torch.equal(param.detach(), torch.full(param.shape, 0.5))
    with fsdp.gathered_for_save(model) as gathered:
        assert gathered == {}
    with pytest.raises(RuntimeError, match="needs torchrun --nproc_per_node 2"):
        fsdp.shard_model(model)

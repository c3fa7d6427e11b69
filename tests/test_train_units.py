"""Training engine units: config loading/validation, learning-rate schedules, NEFTune noise."""

import argparse
import math

import pytest
import torch
from torch import nn

from tsugiki.train import schedules
from tsugiki.train.config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from tsugiki.train.neftune import attach_neftune, neftune, neftune_scale


# ---------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_warmup_is_linear_and_never_zero(name):
    # W = 4: (step + 1) / 5 for steps 0..3, then the schedule proper starts at 1.
    values = [schedules.lr_multiplier(name, s, 4, 20) for s in range(5)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_schedule_values_after_warmup():
    w, n = 10, 110  # decay span of 100 steps
    assert schedules.cosine(10, w, n) == pytest.approx(1.0)
    assert schedules.cosine(35, w, n) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedules.cosine(60, w, n) == pytest.approx(0.5)
    assert schedules.cosine(110, w, n) == pytest.approx(0.0)
    assert schedules.cosine(500, w, n) == pytest.approx(0.0)  # clipped past the end
    assert schedules.linear(10, w, n) == pytest.approx(1.0)
    assert schedules.linear(35, w, n) == pytest.approx(0.75)
    assert schedules.linear(109, w, n) == pytest.approx(0.01)
    assert schedules.linear(200, w, n) == 0.0
    assert schedules.constant(10, w, n) == schedules.constant(109, w, n) == 1.0
    assert schedules.cosine(0, 0, 10) == 1.0  # no warm-up: the first step runs at the peak


def test_make_scheduler_drives_the_optimizer():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = schedules.make_scheduler(opt, "cosine", 2, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * schedules.cosine(s, 2, 10) for s in range(10)])
    with pytest.raises(ValueError, match="lr_scheduler='cosin'"):
        schedules.make_scheduler(opt, "cosin", 0, 10)


# ---------------------------------------------------------------------- NEFTune
class _Embedder(nn.Module):
    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.embed(ids)


def test_neftune_noise_scale_and_eval_mode():
    torch.manual_seed(0)
    model = _Embedder(dim=32)
    ids = torch.randint(0, 50, (8, 64))
    clean = model(ids)
    alpha = 5.0
    expected = neftune_scale(alpha, 64, 32)
    assert expected == pytest.approx(alpha / math.sqrt(64 * 32))
    with neftune(model, alpha):
        model.train()
        noise = model(ids) - clean
        # U(-s, s) has mean |x| = s / 2 and max |x| <= s.
        assert noise.abs().mean().item() == pytest.approx(expected / 2, rel=0.03)
        assert noise.abs().max().item() <= expected * (1 + 1e-5)
        model.eval()
        assert torch.equal(model(ids), clean)  # no noise when evaluating
    model.train()
    assert torch.equal(model(ids), clean)  # the hook is gone after the block


def test_neftune_off_and_handle():
    model = _Embedder()
    ids = torch.randint(0, 50, (2, 5))
    with neftune(model, None):
        assert torch.equal(model(ids), model.embed(ids))
    handle = attach_neftune(model, 1.0)
    assert not torch.equal(model(ids), model.embed.weight[ids])
    handle.remove()
    with pytest.raises(TypeError, match="get_input_embeddings"):
        attach_neftune(nn.Linear(2, 2), 1.0)


# ---------------------------------------------------------------------- config
def test_defaults_are_valid_and_documented():
    cfg = TrainConfig()
    assert cfg.lr_scheduler == "cosine" and cfg.max_grad_norm == 1.0 and cfg.resume == "auto"
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    required = ("model data eval_data output_dir method quantization lora_r lora_alpha lora_dropout "
                "target_modules max_steps num_epochs batch_size grad_accum learning_rate lr_scheduler "
                "warmup_steps weight_decay max_length packing neftune_alpha template seed save_steps "
                "save_total_limit eval_steps resume").split()
    assert set(required) <= set(TrainConfig.field_names())


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-3\nbatch_size: 8\nlr_scheduler: linear\npacking: true\n"
                    "target_modules: [q_proj, v_proj]\n")
    cfg = TrainConfig.load(str(path), {"batch_size": "2", "max-steps": "1e3", "neftune_alpha": "none",
                                       "target_modules": "q_proj,k_proj", "packing": "false"})
    assert cfg.learning_rate == 1e-3 and cfg.lr_scheduler == "linear"  # from the file
    assert cfg.batch_size == 2 and cfg.max_steps == 1000  # overrides win, strings coerced
    assert cfg.packing is False and cfg.neftune_alpha is None
    assert cfg.target_modules == ["q_proj", "k_proj"]
    assert TrainConfig.load(overrides={"resume": "false"}).resume is False
    direct = TrainConfig(neftune_alpha=5, packing="yes")
    assert isinstance(direct.neftune_alpha, float) and direct.packing is True
    assert TrainConfig.load(overrides={"resume": "runs/a/checkpoint-10"}).resume == "runs/a/checkpoint-10"


def test_a_key_given_twice_in_the_config_file_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 8\nmethod_args:\n  use_dora: true\n  use_dora: false\n")
    with pytest.raises(ConfigError, match=r"run\.yaml': key 'use_dora' is given twice \(lines 3 and 4\)"):
        TrainConfig.load(str(path))
    path.write_text("lora_r: 8\nmax_steps: 3\nlora_r: 16\n")
    with pytest.raises(ConfigError, match=r"key 'lora_r' is given twice \(lines 1 and 3\)"):
        TrainConfig.load(str(path))


def test_method_args_on_the_command_line_as_pairs_or_as_a_mapping():
    def parsed(text):
        return TrainConfig.load(overrides={"method_args": text}).method_args

    assert parsed("use_rslora=true,r=4") == {"use_rslora": True, "r": 4}
    # A mapping keeps values that hold commas, which the pairs would split.
    want = {"rank_pattern": {"q_proj": 4, "v_proj": 2}, "use_rslora": True}
    assert parsed('{"rank_pattern": {"q_proj": 4, "v_proj": 2}, "use_rslora": true}') == want
    assert parsed("{rank_pattern: {q_proj: 4, v_proj: 2}, use_rslora: true}") == want  # YAML flow style
    with pytest.raises(ConfigError, match=r"method_args=.*expected a mapping such as"):
        parsed('{"num_virtual_tokens": 20')
    with pytest.raises(ConfigError, match="expected key=value pairs"):
        parsed("num_virtual_tokens")


def test_unknown_keys_suggest_the_closest_name(tmp_path):
    with pytest.raises(ConfigError, match="'learning_rat'.*did you mean 'learning_rate'"):
        TrainConfig.load(overrides={"learning_rat": "1e-4"})
    path = tmp_path / "bad.yaml"
    path.write_text("save_total_limt: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'save_total_limit'"):
        TrainConfig.load(str(path))


@pytest.mark.parametrize("hf_name, ours", [("gradient_accumulation_steps", "grad_accum"),
                                           ("num_train_epochs", "num_epochs"), ("optim", "optimizer"),
                                           ("per_device_train_batch_size", "batch_size")])
def test_hugging_face_argument_names_point_to_tsugikis(hf_name, ours, capsys):
    from tsugiki.cli import main

    with pytest.raises(ConfigError, match=f"'{hf_name}' in the settings given; did you mean '{ours}'"):
        TrainConfig.load(overrides={hf_name: "2"})
    assert main(["train", f"--{hf_name}", "2"]) == 2
    assert f"did you mean '--{ours}'" in capsys.readouterr().err


@pytest.mark.parametrize("other_stack, says", [
    ("modules_to_save", "give it in method_args"), ("auto_find_batch_size", "halved and retried"),
    ("use_cache", "turns the model's KV cache off by itself"), ("load_in_4bit", "quantization: 4bit"),
    ("bnb_4bit_use_double_quant", "uses double quantization")])
def test_settings_tsugiki_covers_another_way_say_what_to_do(other_stack, says, capsys):
    from tsugiki.cli import main

    with pytest.raises(ConfigError, match=f"unknown key '{other_stack}' in the settings given: .*{says}"):
        TrainConfig.load(overrides={other_stack: "true"})
    assert main(["train", f"--{other_stack}", "true"]) == 2
    assert f"unknown option '--{other_stack}': " in capsys.readouterr().err


def test_modules_to_save_given_as_one_name_is_that_module_not_its_letters():
    import tsugiki

    assert tsugiki.LoraConfig(modules_to_save="embed_tokens").modules_to_save == ["embed_tokens"]
    cfg = TrainConfig.load(overrides={"method_args": "modules_to_save=embed_tokens"})
    from tsugiki.pipeline import adapter_config

    assert adapter_config(cfg, "base").modules_to_save == ["embed_tokens"]


def test_eval_steps_without_held_out_rows_is_refused(tmp_path):
    import tsugiki

    with pytest.raises(ConfigError, match="eval_steps=5 evaluates held-out rows and there are none"):
        tsugiki.train({"model": str(tmp_path / "no-model"), "data": str(tmp_path / "d.jsonl"), "eval_steps": 5,
                       "output_dir": str(tmp_path / "out")}, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", -1e-4, "learning_rate=-0.0001: must be a finite number > 0"),
    ("lr_scheduler", "cosin", "lr_scheduler='cosin'.*did you mean 'cosine'"),
    ("batch_size", 0, "batch_size=0"),
    ("lora_dropout", 1.5, "lora_dropout=1.5"),
    ("dtype", "float32", "dtype='float32': must be one of auto, bf16, fp32, fp16"),
    ("max_steps", 0, "max_steps=0"),
    ("batch_size", "four", "batch_size='four'.*expected an integer, got the text 'four'"),
    ("learning_rate", "fast", "learning_rate='fast'.*expected a number, got the text 'fast'"),
    ("max_length", 1, "max_length=1: must be >= 2"),
    ("packing", "maybe", "packing='maybe'.*true or false"),
    ("activation_offloading", True, "activation_offloading=True: .*set gradient_checkpointing: true"),
])
def test_invalid_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(overrides={key: value})


def test_save_round_trip_and_cli_arguments(tmp_path):
    cfg = TrainConfig.load(overrides={"lora_r": 16, "target_modules": ["q_proj"], "resume": False})
    saved = cfg.save(str(tmp_path))
    assert saved.endswith("train_config.yaml")
    assert TrainConfig.load(saved) == cfg

    (tmp_path / "base.yaml").write_text("lora_r: 4\nlearning_rate: 0.001\n")
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(tmp_path / "base.yaml"), "--lora-r", "32", "--packing",
                              "--lr_scheduler", "constant"])
    cfg = config_from_args(args)
    assert (cfg.lora_r, cfg.learning_rate, cfg.packing, cfg.lr_scheduler) == (32, 1e-3, True, "constant")
    assert cfg.batch_size == TrainConfig().batch_size  # untouched keys keep their defaults
    assert "Peak learning rate" in parser.format_help()


# ---------------------------------------------------------------------- records without optional packages
def test_loss_curve_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    import sys
    from tsugiki.train.records import plot_loss_curve
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    path, note = plot_loss_curve(str(tmp_path))
    assert path and note is None and (tmp_path / "loss_curve.png").exists()
    (tmp_path / "loss_curve.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now fails
    path, note = plot_loss_curve(str(tmp_path))
    assert path is None and "matplotlib is not installed" in note
    assert not (tmp_path / "loss_curve.png").exists()


@pytest.mark.parametrize("emulated_only, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_auto_dtype_on_cuda_takes_bf16_only_where_the_card_runs_it(monkeypatch, emulated_only, expected):
    # A T4 or V100 reports bf16 "supported" by emulation, several times slower than fp32 there.
    from tsugiki.train.loop import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated_only)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_only_a_gguf_base_whose_weights_all_stay_frozen_loads_in_the_compute_dtype(tmp_path):
    from tsugiki.pipeline import load_dtype

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")

    def dtype(**keys):
        return load_dtype(TrainConfig.load(None, {"model": str(gguf), "dtype": "bf16", **keys}))

    assert dtype() == torch.bfloat16 and dtype(dtype="fp16") == torch.float16
    assert dtype(dtype="fp32") is None  # fp32 compute: the loader's fp32
    assert dtype(method="full") is None
    assert dtype(method="qlora") == torch.bfloat16 and dtype(quantization="8bit") == torch.bfloat16
    assert dtype(method="qlora", dtype="fp32") is None
    assert dtype(method_args={"modules_to_save": ["embed_tokens"]}) is None  # a trained copy starts from fp32
    assert dtype(method_args={"bias": "all"}) is None
    assert dtype(method="ia3") == torch.bfloat16
    assert load_dtype(TrainConfig.load(None, {"model": str(tmp_path / "folder"), "dtype": "bf16"})) is None


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_trainer_state_is_read_without_running_code(tmp_path, capsys):
    from tsugiki.train.checkpoint import load_trainer_state, rng_state

    good = tmp_path / "good.pt"
    torch.save({"step": 3, "rng": rng_state()}, good)  # numpy's RNG state holds an array: allowed
    assert load_trainer_state(str(good))["step"] == 3
    bad = tmp_path / "bad.pt"
    torch.save({"step": 3, "extra": _RunsCodeWhenUnpickled()}, bad)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        load_trainer_state(str(bad))
    assert "this ran" not in capsys.readouterr().out


def test_method_args_may_not_contradict_the_jobs_own_keys():
    from tsugiki.config import train_targets
    from tsugiki.methods.lora import lora_from_train_config

    job = TrainConfig.load(overrides={"lora_r": "4", "method_args": "r=2"})
    with pytest.raises(ValueError, match=r"method_args: r=2 conflicts with the job's lora_r \(4\); set lora_r"):
        lora_from_train_config(job, "base")
    agreeing = TrainConfig.load(overrides={"lora_r": "4", "method_args": "r=4,use_rslora=true"})
    assert lora_from_train_config(agreeing, "base").use_rslora
    # Targets left to the architecture's default may come from method_args (a regex, say).
    regex = TrainConfig.load(overrides={"method_args": {"target_modules": r".*\.(q|v)_proj"}})
    assert lora_from_train_config(regex, "base").target_modules == r".*\.(q|v)_proj"
    assert train_targets([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"  # --target_modules takes one too
    assert train_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"] and train_targets(["all-linear"]) == "all-linear"


def test_in_memory_data_is_refused_with_how_to_pass_it():
    rows = [{"instruction": "say hi", "output": "hi"}] * 20000
    with pytest.raises(ConfigError, match=r"data in the settings given is a list; it must be the path") as err:
        TrainConfig.load(overrides={"data": rows})
    assert len(str(err.value)) < 400  # not the rows' repr
    with pytest.raises(ConfigError, match=r"^lora_r='.{0,40}' in the settings given"):
        TrainConfig.load(overrides={"lora_r": "x" * 10000})


def test_paths_starting_with_a_tilde_mean_the_home_folder(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "job.yaml").write_text("data: ~/train.jsonl\noutput_dir: ~/runs/a\n")
    cfg = TrainConfig.load("~/job.yaml", {"model": "~/models/m"})
    assert (cfg.data, cfg.output_dir, cfg.model) == (os.path.join(str(tmp_path), "train.jsonl"),
                                                     os.path.join(str(tmp_path), "runs/a"),
                                                     os.path.join(str(tmp_path), "models/m"))


_CHANGED_ADAPTER_KEYS = {"lora_r": 4, "lora_alpha": 3.0, "lora_dropout": 0.2, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("method", sorted(__import__("tsugiki.pipeline").pipeline.method_names()))
def test_a_key_the_method_does_not_read_is_warned_and_one_it_reads_changes_its_config(method):
    """Each key warned about leaves the built adapter config as it was; each key not warned about changes it."""
    from tsugiki.pipeline import adapter_config, unused_settings

    def built(**keys):
        cfg = TrainConfig.load(None, {"method": method, "max_steps": 10, **keys})  # AdaLoRA's schedule needs steps
        return None if method == "full" else adapter_config(cfg, "base").to_dict()

    warned = {note.split("=")[0] for note in unused_settings(TrainConfig.load(None, {"method": method,
                                                                                   **_CHANGED_ADAPTER_KEYS}))}
    for key, value in _CHANGED_ADAPTER_KEYS.items():
        assert (built(**{key: value}) == built()) == (key in warned), key


def test_eval_split_beside_eval_data_is_warned_as_ignored():
    from tsugiki.pipeline import unused_settings

    cfg = TrainConfig.load(None, {"eval_data": "held_out.jsonl", "eval_split": 0.1})
    assert unused_settings(cfg) == ["eval_split=0.1 is ignored: eval_data is given, so every row of data trains "
                                    "and the evaluation uses eval_data"]
    assert unused_settings(TrainConfig.load(None, {"eval_split": 0.1})) == []

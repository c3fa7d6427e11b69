"""The command line end to end on a tiny model folder: train, resume, generate, eval, inspect, merge."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import tsugiki
from tsugiki.cli import main
from helpers_data import write_jsonl

ROWS = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 5}"} for i in range(24)]


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def _train_args(model_dir, data_file, out, *extra):
    return ["train", "--model", model_dir, "--data", data_file, "--output_dir", out, "--max_steps", "6",
            "--batch_size", "4", "--learning_rate", "1e-2", "--lora_r", "4", "--save_steps", "3",
            "--logging_steps", "1", "--dtype", "fp32", "--eval_split", "4", "--tensorboard", "false", *extra]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_generate_eval_inspect_merge(model_dir, data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_train_args(model_dir, data_file, out)) == 0
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.yaml", "metrics.jsonl",
            "summary.json", "tsugiki_template.json", "checkpoint-6"} <= files
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["steps"] == 6 and summary["eval_loss"] is not None
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0]
    template = json.loads(open(os.path.join(out, "tsugiki_template.json")).read())
    assert template["kind"] == "chat"

    # An unfinished run resumes: a second call with a larger max_steps continues from checkpoint-6.
    assert main(_train_args(model_dir, data_file, out, "--max_steps", "7")) == 0
    assert json.loads(open(os.path.join(out, "summary.json")).read())["steps"] == 7
    # A max_steps below the newest checkpoint would train nothing: refused, the run's files untouched.
    capsys.readouterr()
    assert main(_train_args(model_dir, data_file, out, "--max_steps", "4")) == 2
    assert "it is at step 7, past this run's 4 steps" in capsys.readouterr().err
    assert json.loads(open(os.path.join(out, "summary.json")).read())["steps"] == 7
    assert "max_steps: 7" in open(os.path.join(out, "train_config.yaml")).read()

    capsys.readouterr()
    assert main(["generate", "--adapter", out, "--prompt", "Say the word number 3.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""

    results = str(tmp_path / "answers.jsonl")
    assert main(["generate", "--adapter", out, "--input", data_file, "--output", results,
                 "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in open(results)]
    assert len(rows) == len(ROWS) and all("generated" in r for r in rows)
    assert main(["generate", "--adapter", out, "--input", data_file, "--output", results]) == 2  # exists

    scores = str(tmp_path / "scores.json")
    assert main(["eval", "--adapter", out, "--data", data_file, "--max-rows", "6", "--max-new-tokens", "3",
                 "--output", scores]) == 0
    report = json.loads(open(scores).read())
    assert report["rows"] == 6 and {"base", "adapter"} <= set(report)
    assert report["adapter"]["loss"] < report["base"]["loss"]
    # Each row's answers come with it, and the scores are their mean.
    assert [r["expected"] for r in report["per_row"]] == [row["output"] for row in ROWS[:6]]
    for side in ("base", "adapter"):
        assert all(isinstance(r[side]["answer"], str) for r in report["per_row"])
        assert sum(r[side]["exact"] for r in report["per_row"]) / 6 == report[side]["exact_match"]
        assert sum(r[side]["contains"] for r in report["per_row"]) / 6 == report[side]["contains_match"]
    printed = capsys.readouterr().out
    assert "exact" in printed and "expected:" in printed

    assert main(["inspect", out]) == 0
    described = capsys.readouterr().out
    assert f"base model:   {model_dir}" in described and "q_proj" in described
    assert main(["inspect", "--data", data_file, "--model", model_dir, "--rows", "1"]) == 0
    assert "[[word 0<|im_end|>" in capsys.readouterr().out

    merged_dir = str(tmp_path / "merged")
    assert main(["merge", "--adapter", out, "--output", merged_dir]) == 0
    # Readable as any new file is (safetensors writes its files private): a server may run as another user.
    assert {oct(os.stat(os.path.join(merged_dir, f)).st_mode & 0o777) for f in os.listdir(merged_dir)} == \
        {oct(0o666 & ~_umask())}
    assert {oct(os.stat(os.path.join(out, f)).st_mode & 0o777) for f in os.listdir(out)
            if os.path.isfile(os.path.join(out, f))} == {oct(0o666 & ~_umask())}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with_adapter = tsugiki.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)


def test_generate_seed_repeats_sampled_answers(model_dir, capsys):
    def sampled(seed):
        argv = ["generate", "--model", model_dir, "--prompt", "Say the word number 3.", "--prompt", "Hello",
                "--max-new-tokens", "12", "--do-sample", "--temperature", "2.0"]
        assert main(argv + (["--seed", str(seed)] if seed is not None else [])) == 0
        return capsys.readouterr().out

    first = sampled(7)
    assert sampled(7) == first
    assert sampled(8) != first  # a random model at temperature 2: a new seed draws other tokens


def test_qlora_trains_on_a_4bit_base_and_its_adapter_generates(model_dir, data_file, tmp_path, capsys):
    bnb = pytest.importorskip("bitsandbytes")
    out = str(tmp_path / "qlora")
    bases = []

    def look(trainer, record):  # the model being trained, once
        if not bases:
            modules = list(trainer.model.modules())
            bases.append((sum(isinstance(m, bnb.nn.Linear4bit) for m in modules),
                          trainer.model.get_input_embeddings().weight.dtype))

    tsugiki.train({"model": model_dir, "data": data_file, "output_dir": out, "method": "qlora", "dtype": "bf16",
                   "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "lora_r": 4, "save_steps": 0,
                   "logging_steps": 1, "tensorboard": False}, progress=False, callbacks=[look])
    layers = AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers
    assert bases == [(7 * layers, torch.bfloat16)]  # every block linear in NF4; the embedding 16-bit
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(losses) == 6 and losses[-1] < losses[0]
    capsys.readouterr()
    assert main(["generate", "--adapter", out, "--prompt", "Say the word number 3.", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_training_on_json_lines_never_imports_datasets(model_dir, data_file, tmp_path):
    # datasets + pyarrow + pandas are ~80 MiB of resident memory: a JSON run must not pay them.
    # A fresh interpreter, because this test process may have imported them already.
    out = str(tmp_path / "run")
    script = (
        "import sys\n"
        "from tsugiki.cli import main\n"
        f"assert main({_train_args(model_dir, data_file, out, '--max_steps', '2')!r}) == 0\n"
        "print(sorted(m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_training_starts_with_the_memory_plan_and_warns_when_it_does_not_fit(model_dir, data_file, tmp_path,
                                                                           capsys, monkeypatch, caplog):
    from tsugiki import plan

    assert main(_train_args(model_dir, data_file, str(tmp_path / "a"), "--max_steps", "1")) == 0
    assert "memory plan: about 0." in capsys.readouterr().out  # the tiny model: the runtime, mostly
    monkeypatch.setattr(plan, "available_ram", lambda: 2**20)
    assert main(_train_args(model_dir, data_file, str(tmp_path / "b"), "--max_steps", "1")) == 0
    out = capsys.readouterr().out
    assert "warning: memory plan:" in out and "1.00 MiB" not in out and "0.00 GiB of RAM available" in out
    assert os.path.exists(tmp_path / "b" / "adapter_model.safetensors")  # a warning, not a refusal
    # The Python API without progress output logs the warning instead.
    with caplog.at_level("WARNING", logger="tsugiki"):
        tsugiki.train({"model": model_dir, "data": data_file, "output_dir": str(tmp_path / "c"), "max_steps": 1,
                       "dtype": "fp32", "tensorboard": False}, progress=False)
    assert any(r.getMessage().startswith("warning: memory plan:") for r in caplog.records)


def test_a_job_the_plan_cannot_size_says_so_and_trains(model_dir, data_file, tmp_path, capsys, monkeypatch):
    from tsugiki import plan

    def unreadable(*args, **kwargs):
        raise ValueError("model_type 'phi3' is not supported")

    monkeypatch.setattr(plan, "training_fit", unreadable)
    assert main(_train_args(model_dir, data_file, str(tmp_path / "a"), "--max_steps", "1")) == 0
    assert "memory plan: none for this job (model_type 'phi3' is not supported)" in capsys.readouterr().out


def test_train_python_api_matches_cli_keys(model_dir, data_file, tmp_path, monkeypatch):
    # The model given relative to the working directory: the adapter records where it is.
    monkeypatch.chdir(os.path.dirname(model_dir))
    result = tsugiki.train({"model": os.path.basename(model_dir), "data": data_file,
                            "output_dir": str(tmp_path / "api"), "max_steps": 2, "dtype": "fp32",
                            "tensorboard": False}, progress=False)
    assert result.output_dir == str(tmp_path / "api")
    assert result.metrics["steps"] == 2 and result.metrics["data"]["train_rows"] == len(ROWS)
    saved = json.loads((tmp_path / "api" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == os.path.abspath(model_dir)


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "missing.jsonl", "--model", "MODEL", "--output_dir", "OUT"], "missing.jsonl"),
    (["train", "--data", "DATA", "--model", "MODEL", "--output_dir", "OUT", "--learning_rat", "1"],
     "unknown option '--learning_rat'; did you mean '--learning_rate'?"),
    (["train", "--data", "DATA", "--model", "MODEL", "--output_dir", "OUT", "--method", "prefix"],
     "method='prefix' is not available"),
    (["train", "--data", "DATA", "--model", "MODEL", "--output_dir", "OUT", "--method", "full",
      "--quantization", "4bit"], "cannot train a 4bit base"),
    (["train", "--model", "MODEL", "--output_dir", "OUT"], "data is not set"),
    (["eval", "--adapter", "nowhere", "--data", "DATA"], "adapter folder 'nowhere' does not exist"),
    (["inspect", "nowhere"], "does not exist"),
    (["generate", "--adapter", "a", "--adapter", "b", "--prompt", "hi"],
     "--adapter was given 2 times; generate uses one adapter (tsugiki eval scores several side by side)"),
    (["eval", "--model", "MODEL", "--data", "DATA", "--no-base"], "--no-base leaves nothing to score without --adapter"),
    (["eval", "--model", "MODEL", "--data", "DATA", "--show", "-1"], "argument --show: must be 0 or more, got -1"),
    (["inspect", "--data", "DATA", "--model", "MODEL", "--rows", "two"],
     "argument --rows: expected a whole number, got 'two'"),
])
def test_cli_errors_are_one_clear_line(argv, message, model_dir, data_file, tmp_path, capsys):
    argv = [a.replace("MODEL", model_dir).replace("DATA", data_file).replace("OUT", str(tmp_path / "o"))
            for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_overwrite_keeps_the_earlier_run_until_the_new_one_can_start(model_dir, data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(_train_args(model_dir, data_file, out, "--max_steps", "2", "--eval_split", "0")) == 0
    before = sorted(os.listdir(out))
    # Refused on the way (a missing data file; targets that match nothing, found once the model is loaded):
    assert main(_train_args(model_dir, str(tmp_path / "typo.jsonl"), out, "--overwrite", "true")) == 2
    assert main(_train_args(model_dir, data_file, out, "--overwrite", "true", "--target_modules", "nope",
                            "--eval_split", "0")) == 2
    assert sorted(os.listdir(out)) == before and "matched no module" in capsys.readouterr().err


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "trainable.safetensors"])
def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_from(model_dir, data_file, tmp_path, capsys, damaged):
    out = str(tmp_path / "run")
    assert main(_train_args(model_dir, data_file, out, "--max_steps", "2", "--save_steps", "1",
                            "--eval_split", "0")) == 0
    path = os.path.join(out, "checkpoint-2", damaged)
    with open(path, "r+b") as fh:
        fh.truncate(40)
    capsys.readouterr()
    assert main(_train_args(model_dir, data_file, out, "--max_steps", "3", "--save_steps", "1",
                            "--eval_split", "0")) == 2
    err = capsys.readouterr().err
    assert f"checkpoint-2 is damaged: {damaged} cannot be read" in err
    assert f"resume: {os.path.join(out, 'checkpoint-1')}" in err and "Traceback" not in err


def test_a_second_run_into_a_folder_in_use_is_refused(model_dir, data_file, tmp_path, capsys):
    import socket

    out = tmp_path / "busy-run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".tsugiki-run.lock").write_text(f"{other.pid} {socket.gethostname()}\n")
        assert main(_train_args(model_dir, data_file, str(out), "--max_steps", "1")) == 2
        assert f"is in use by another tsugiki run (pid {other.pid} on" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    # The same lock left by a process that is gone (killed mid-run) does not block the next run.
    assert main(_train_args(model_dir, data_file, str(out), "--max_steps", "1", "--eval_split", "0")) == 0
    assert not (out / ".tsugiki-run.lock").exists()  # released at the end


def test_resume_finds_the_same_files_however_their_paths_are_spelt(model_dir, data_file, tmp_path, monkeypatch):
    import shutil

    shutil.copy(data_file, tmp_path / "rows.jsonl")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "run")
    assert main(_train_args(model_dir, "rows.jsonl", out, "--max_steps", "2", "--save_steps", "1",
                            "--eval_split", "0")) == 0
    assert f"data: {tmp_path / 'rows.jsonl'}" in open(os.path.join(out, "train_config.yaml")).read()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another folder, another spelling of the same file
    assert main(_train_args(model_dir, "../rows.jsonl", out, "--max_steps", "3", "--save_steps", "1",
                            "--eval_split", "0")) == 0
    assert json.loads(open(os.path.join(out, "summary.json")).read())["steps"] == 3


def test_the_tokenizer_saved_with_the_adapter_keeps_its_padding_side(data_file, tmp_path):
    from helpers_data import make_chat_tokenizer, tiny_llama

    model_dir = tmp_path / "left-padded"
    tiny_llama().save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"  # a model meant for batched generation
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(_train_args(str(model_dir), data_file, str(out), "--max_steps", "1", "--eval_split", "0")) == 0
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["padding_side"] == "left"  # training pads on the right; the saved tokenizer is as it came


def test_non_empty_output_dir_is_refused_before_loading(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_train_args(model_dir, data_file, str(out))) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_chat_streams_answers_and_keeps_the_conversation(model_dir, monkeypatch, capsys):
    typed = iter(["hello there", "/reset", "how are you", "/exit"])
    seen_histories = []
    import tsugiki.generation as generation

    real_stream = generation.stream_answer

    def spy(loaded, row, settings):
        seen_histories.append([dict(m) for m in row["messages"]])
        yield from real_stream(loaded, row, settings)

    monkeypatch.setattr(generation, "stream_answer", spy)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.count("bot> ") == 2
    assert [m["role"] for m in seen_histories[0]] == ["system", "user"]
    # After /reset only the system message survives.
    assert [m["content"] for m in seen_histories[1]] == ["Be brief.", "how are you"]


@pytest.mark.parametrize("command, extra", [("generate", ["--prompt", "hi"]), ("chat", []),
                                            ("eval", ["--data", "DATA"])])
@pytest.mark.parametrize("setting, message", [(["--top-p", "0"], "top_p=0.0 must be in"),
                                              (["--top-k", "-1"], "top_k=-1 must be >= 0"),
                                              (["--max-new-tokens", "0"], "max_new_tokens=0 must be >= 1"),
                                              (["--stop", ""], "stop strings must be non-empty text")])
def test_bad_generation_settings_are_refused_before_the_model_loads(command, extra, setting, message, data_file,
                                                                   monkeypatch, capsys):
    import tsugiki.generation

    monkeypatch.setattr(tsugiki.generation, "load_for_inference", lambda *a, **k: pytest.fail("loaded first"))
    argv = [command, *[data_file if x == "DATA" else x for x in extra], *setting]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_train_cuts_rows_at_a_context_shorter_than_max_length(tmp_path, caplog):
    """GPT-2's position table ends at n_positions: longer rows failed with 'index out of range'."""
    from helpers_data import make_chat_tokenizer
    from tiny_models import tiny_gpt2

    tokenizer = make_chat_tokenizer()
    model = tiny_gpt2()  # 64 positions
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    rows = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "Count.", "output": "word " * 100}] * 4)
    out = tmp_path / "run"
    assert main(_train_args(str(tmp_path / "gpt2"), rows, str(out), "--max_steps", "1", "--eval_split", "0")) == 0
    assert "max_length=1024 is longer than the model's 64-token context" in caplog.text
    import yaml

    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_length"] == 64  # what the run used
    # Prompt tuning's virtual tokens take positions too.
    out = tmp_path / "prompt"
    assert main(_train_args(str(tmp_path / "gpt2"), rows, str(out), "--max_steps", "1", "--eval_split", "0",
                            "--method", "prompt_tuning", "--method_args", "num_virtual_tokens=8")) == 0
    assert "context holds besides the method's 8 virtual tokens: rows are cut at 56 tokens" in caplog.text
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_length"] == 56


def test_eval_scores_several_adapters_of_one_base_each_as_alone(model_dir, data_file, tmp_path, capsys):
    """Each adapter's column equals its own single-adapter eval, with the template it was trained with."""
    runs = {}
    for name, template in (("chatty", "chat"), ("alpaca-run", "alpaca")):
        runs[name] = str(tmp_path / name)
        assert main(_train_args(model_dir, data_file, runs[name], "--max_steps", "3", "--eval_split", "0",
                                "--template", template)) == 0
    common = ["--data", data_file, "--max-rows", "4", "--max-new-tokens", "4", "--overwrite"]
    both = tmp_path / "both.json"
    assert main(["eval", "--adapter", runs["chatty"], "--adapter", runs["alpaca-run"], *common,
                 "--output", str(both)]) == 0
    report = json.loads(both.read_text())
    assert {"base", "chatty", "alpaca-run"} <= set(report)
    for name, folder in runs.items():
        alone = tmp_path / f"{name}.json"
        assert main(["eval", "--adapter", folder, *common, "--no-base", "--output", str(alone)]) == 0
        single = json.loads(alone.read_text())
        assert report[name]["loss"] == pytest.approx(single["adapter"]["loss"], rel=1e-6)
        assert [r[name]["answer"] for r in report["per_row"]] == [r["adapter"]["answer"] for r in single["per_row"]]
    assert report["chatty"]["loss"] != report["alpaca-run"]["loss"]
    assert main(["eval", "--adapter", runs["chatty"], "--adapter", runs["chatty"] + "/", *common]) == 2
    assert f"adapter '{runs['chatty']}/' is given twice" in capsys.readouterr().err


def test_eval_refuses_adapters_of_two_methods_before_the_model_loads(model_dir, data_file, tmp_path, monkeypatch,
                                                                     capsys):
    import tsugiki.generation

    for method in ("lora", "ia3"):
        assert main(_train_args(model_dir, data_file, str(tmp_path / method), "--max_steps", "1",
                                "--eval_split", "0", "--method", method)) == 0
    capsys.readouterr()
    monkeypatch.setattr(tsugiki.generation, "load_for_inference", lambda *a, **k: pytest.fail("loaded first"))
    lora, ia3 = str(tmp_path / "lora"), str(tmp_path / "ia3")
    assert main(["eval", "--adapter", lora, "--adapter", ia3, "--data", data_file]) == 2
    assert f"{lora} is LORA, {ia3} is IA3; score each method's adapters in a run of their own" in capsys.readouterr().err
    assert main(["eval", "--adapter", lora, "--adapter", str(tmp_path / "nope"), "--data", data_file]) == 2
    assert "nope' does not exist" in capsys.readouterr().err


def test_a_folder_of_several_adapters_says_which_one_is_used(model_dir, tmp_path, capsys):
    model = tsugiki.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                   tsugiki.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("second", tsugiki.LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "both")
    assert main(["generate", "--adapter", str(tmp_path / "both"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert (f"{tmp_path / 'both'} also holds the adapters second in subfolders; this uses the one at its top "
            f"(give {tmp_path / 'both' / 'second'} for another)") in capsys.readouterr().err
    model.save_pretrained(tmp_path / "run" / "checkpoint-20", selected_adapters=["default"])  # a run's checkpoint
    model.save_pretrained(tmp_path / "run", selected_adapters=["default"])
    assert main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert "also holds" not in capsys.readouterr().err


def test_warnings_show_as_one_line_and_python_s_format_comes_back():
    code = ("import warnings, tsugiki.cli as cli\n"
            "python_format = warnings.formatwarning\n"
            "cli.cmd_inspect = lambda args: warnings.warn('the base is tied') or 0\n"
            "assert cli.main(['inspect', 'x']) == 0\n"
            "print(warnings.formatwarning is python_format)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: the base is tied\n" in done.stderr and "UserWarning" not in done.stderr
    assert done.stdout == "True\n"


def test_a_gzipped_sharegpt_file_with_weights_is_inspected_generated_from_and_scored(model_dir, tmp_path, capsys):
    rows = [{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there", "weight": 0},
                               {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "fine thanks"}]},
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}]
    path = tmp_path / "chat.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert main(["inspect", "--data", str(path), "--model", model_dir, "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 rows read, format sharegpt" in out
    # The answer of weight 0 is shown unmarked; only the last answer carries loss.
    assert ("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n<|im_start|>user\n"
            "how are you<|im_end|>\n<|im_start|>assistant\n[[fine thanks<|im_end|>\n]]") in out
    answers = str(tmp_path / "answers.jsonl")
    assert main(["generate", "--model", model_dir, "--input", str(path), "--output", answers,
                 "--max-new-tokens", "2"]) == 0
    assert [json.loads(line)["conversations"] for line in open(answers)] == [r["conversations"] for r in rows]
    scores = str(tmp_path / "scores.json")
    assert main(["eval", "--model", model_dir, "--data", str(path), "--max-new-tokens", "2", "--output", scores]) == 0
    report = json.loads(open(scores).read())
    assert [r["expected"] for r in report["per_row"]] == ["fine thanks", "hello"] and report["base"]["loss"] > 0


def test_sigterm_stops_training_as_ctrl_c_does(model_dir, data_file, tmp_path):
    """kill, torchrun and job schedulers send SIGTERM: the run says how to resume and leaves no lock behind."""
    import signal
    import time

    out = tmp_path / "run"
    args = _train_args(model_dir, data_file, str(out), "--max_steps", "100000", "--save_steps", "2")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe nobody reads would stop the run
        proc = subprocess.Popen([sys.executable, "-m", "tsugiki", *args], stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 300
            def saved() -> bool:  # any checkpoint: rotation soon removes the first ones
                return out.is_dir() and any(name.startswith("checkpoint-") for name in os.listdir(out))

            while not saved() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert saved(), log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "run the same command again to resume from it" in log.read_text()
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no lock, no half-written checkpoint

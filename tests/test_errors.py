"""Every bad input gets an error that names the culprit, and nothing is lost."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tsugiki
from tsugiki import LoraConfig, PeftModel, get_peft_model
from tsugiki.adapter_io import AdapterLoadError
from tiny_models import randomize_adapters, tiny_gpt2, tiny_llama, token_batch


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_targets_matching_nothing_name_the_request_and_existing_modules():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qkv_proj"]))
    msg = str(info.value)
    assert "['qkv_proj']" in msg and "q_proj" in msg and "LlamaForCausalLM" in msg


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=["0", "3"]),
                                    tsugiki.AdaLoraConfig(r=2, target_modules=["0", "3"], total_step=10)])
def test_a_target_of_a_type_the_method_cannot_adapt_is_named_not_skipped(config):
    """Listed beside layers it can adapt, a Conv2d used to be left out silently (a different model
    than HF PEFT's, which adapts it)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 4))
    with pytest.raises(ValueError, match=r"selects modules this method cannot adapt: 0 \(Conv2d\).*LoHa and LoKr"):
        get_peft_model(net, config)
    assert isinstance(net[0], torch.nn.Conv2d) and isinstance(net[3], torch.nn.Linear)  # left as they were


def test_no_default_targets_for_unknown_architecture_says_what_to_pass():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pass target_modules explicitly"):
        get_peft_model(net, LoraConfig())


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match="modules_to_save=\\['score_head'\\] matched no module"):
        get_peft_model(tiny_llama(), LoraConfig(modules_to_save=["score_head"]))


def test_adapter_shapes_that_do_not_fit_name_key_and_both_shapes(saved):
    bigger = tiny_llama(hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(bigger, saved)
    msg = str(info.value)
    assert "lora_A" in msg and "(4, 16)" in msg and "(4, 32)" in msg


def test_adapter_for_another_architecture(saved):
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_gpt2(), saved)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg and "q_proj" in msg


def test_missing_and_unexpected_keys_are_errors_unless_not_strict(saved):
    weights = load_file(saved / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[dropped]
    weights["base_model.model.model.layers.0.mlp.mystery.lora_A.weight"] = torch.zeros(4, 16)
    save_file(weights, saved / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError) as info:
        PeftModel.from_pretrained(tiny_llama(), saved)
    msg = str(info.value)
    assert "missing 1 key" in msg and "layers.1.self_attn.v_proj.lora_B" in msg
    assert "unexpected 1 key" in msg and "mlp.mystery" in msg
    loaded = PeftModel.from_pretrained(tiny_llama(), saved, strict=False)
    assert loaded(token_batch()).logits.shape[-1] == 64


def test_corrupt_or_truncated_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors is corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_pickle_adapters_need_explicit_opt_in(saved):
    weights = load_file(saved / "adapter_model.safetensors")
    os.remove(saved / "adapter_model.safetensors")
    torch.save(weights, saved / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="pickle.*allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    model = PeftModel.from_pretrained(tiny_llama(), saved, allow_pickle=True)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(lora_b, weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is not an adapter folder"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_whole_model_checkpoint_is_named_as_one(tmp_path):
    """transformers' Trainer saves a tsugiki model whole; the error says so and how to get the adapter."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, task_type="CAUSAL_LM"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"whole model's weights \(model.safetensors\).*save_pretrained"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False).unexpected_keys
    tiny_llama().save_pretrained(tmp_path / "full")  # a full fine-tune or a merged model: a model, not an adapter
    with pytest.raises(FileNotFoundError, match=r"a full fine-tune or a merged model\): load it as the model itself"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "full")


def test_bad_adapter_config_json(saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    (saved / "adapter_config.json").write_text('{"peft_type": "NOPE_METHOD"}')
    with pytest.raises(ValueError, match="peft_type='NOPE_METHOD' is not supported"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_failed_load_adapter_leaves_the_model_as_it_was(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), saved)
    ids = token_batch()
    before = model(ids).logits
    bad = tmp_path / "bad"
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    other.save_pretrained(bad)
    weights = load_file(bad / "adapter_model.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="missing 1 key"):
        model.load_adapter(bad, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert torch.equal(model(ids).logits, before)


def test_save_to_a_file_path_is_refused_and_user_card_kept(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    a_file = tmp_path / "taken.txt"
    a_file.write_text("mine")
    with pytest.raises(NotADirectoryError, match="taken.txt"):
        model.save_pretrained(a_file)
    assert a_file.read_text() == "mine"
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text("my own notes")
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "my own notes"
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_interrupted_save_keeps_the_previous_adapter(saved, monkeypatch):
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("tsugiki.adapter_io.save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert not [f for f in os.listdir(saved) if f.endswith(".tmp")]


def test_unknown_adapter_names_and_duplicates():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("__base__", LoraConfig(r=2))
    with pytest.raises(ValueError, match="selected_adapters has unknown adapters \\['x'\\]"):
        model.save_pretrained("/tmp/never-written", selected_adapters=["x"])
    with pytest.raises(ValueError, match="already carries adapters"):
        get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(TypeError, match="LoraConfig"):
        get_peft_model(tiny_llama(), {"r": 2})
    assert tsugiki.LoraConfig is LoraConfig


@pytest.mark.parametrize("damage", ["empty", "cut in the header", "cut in the tensor data", "not GGUF"])
def test_a_damaged_gguf_file_is_named_with_what_to_do(tmp_path, damage):
    from tiny_models import write_tiny_gguf
    from tsugiki import plan
    from tsugiki.models import load_model, load_tokenizer

    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, layers=2)
    data = whole.read_bytes()
    kept = {"empty": b"", "cut in the header": data[:40], "cut in the tensor data": data[:-4000],
            "not GGUF": b"PK\x03\x04" + data[4:]}[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(kept)
    message = rf"{path} is not a readable GGUF file .*download it again, or pass a model folder"
    with pytest.raises(ValueError, match=message):
        plan.estimate(str(path))
    with pytest.raises(ValueError, match=message):
        load_model(str(path))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(path))


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3"])
def test_a_method_option_that_does_not_exist_is_named_before_anything_loads(tmp_path, method):
    """The model folder does not even exist: the bad option is reported first, nothing is written."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"'lora_rank' is not an option of \w+Config"):
        tsugiki.train({"model": str(tmp_path / "no-such-model"), "data": str(tmp_path / "no-such.jsonl"),
                       "output_dir": str(out), "method": method, "method_args": {"lora_rank": 4}}, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_packing_a_prompt_method_is_refused_before_anything_loads(tmp_path, method):
    with pytest.raises(ValueError, match=f"packing: true cannot train {method}: its virtual tokens"):
        tsugiki.train({"model": str(tmp_path / "no-such-model"), "data": str(tmp_path / "no-such.jsonl"),
                       "output_dir": str(tmp_path / "run"), "method": method, "packing": True}, progress=False)


def test_targets_in_method_args_are_read_as_the_jobs_key_reads_them():
    """'q_proj' was taken as a regular expression over whole module names and matched nothing."""
    from tsugiki.methods.lora import lora_from_train_config

    for given, read in (("q_proj", ["q_proj"]), ("q_proj,v_proj", ["q_proj", "v_proj"]),
                        (r".*\.(q|v)_proj", r".*\.(q|v)_proj"), ("all-linear", "all-linear")):
        job = tsugiki.TrainConfig.load(None, {"method_args": {"target_modules": given}})
        assert lora_from_train_config(job, "base").target_modules == read


@pytest.mark.parametrize("key", ["lora_r", "rank", "lora_rank"])
def test_a_rank_under_another_name_points_to_the_jobs_lora_r(tmp_path, key):
    """r is set from the job's lora_r (method_args' r is refused when they differ): the hint says lora_r."""
    with pytest.raises(ValueError, match=rf"'{key}' is not an option of LoraConfig; the job sets its 'r' from "
                                         r"lora_r: set lora_r instead"):
        tsugiki.train({"data": str(tmp_path / "x.jsonl"), "method": "lora", "method_args": {key: 4}},
                      progress=False)


def test_a_bad_prompt_row_is_named_by_line_before_the_model_loads(tmp_path, capsys):
    from tsugiki import cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "fine"}\n\n{"instruction": "x", "input": 5}\n')
    # The model does not exist: the row is checked first.
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--input", str(prompts)]) == 2
    assert f"{prompts}, line 3, field 'input': expected a string, got int 5" in capsys.readouterr().err
    prompts.write_text('{"question": "x"}\n')
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(prompts)]) == 2
    assert f"{prompts}, line 1 has fields ['question']" in capsys.readouterr().err


def test_eval_refuses_a_row_count_below_one(tmp_path, capsys):
    from tsugiki import cli

    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", "x.jsonl", "--max-rows", "0"]) == 2
    assert "--max-rows must be a positive number of rows, got 0" in capsys.readouterr().err


def test_inspect_names_dora(tmp_path):
    from tiny_models import tiny_llama
    from tsugiki.inspect_adapter import describe_adapter

    tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, use_dora=True)).save_pretrained(tmp_path)
    assert "method:       LORA with DoRA" in describe_adapter(str(tmp_path))


@pytest.mark.parametrize("config, targets", [
    (tsugiki.LoHaConfig(r=2), "q_proj, v_proj"),
    (tsugiki.AdaptionPromptConfig(adapter_len=3, adapter_layers=1), "self_attn"),
    (tsugiki.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), "none: 5 virtual tokens"),
])
def test_inspect_names_the_targets_of_every_method(tmp_path, config, targets):
    from tiny_models import tiny_llama
    from tsugiki.inspect_adapter import describe_adapter

    tsugiki.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    assert f"targets:      {targets}" in describe_adapter(str(tmp_path))


def test_a_folder_of_several_adapters_points_to_its_subfolders(tmp_path):
    from tiny_models import tiny_llama
    from tsugiki.inspect_adapter import describe_adapter

    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2))
    model.add_adapter("second", tsugiki.LoraConfig(r=2))
    model.save_pretrained(tmp_path / "both")
    assert "more adapters in subfolders: second" in describe_adapter(str(tmp_path / "both"))
    model.save_pretrained(tmp_path / "one", selected_adapters=["second"])  # nothing at the top
    with pytest.raises(ValueError, match=r"holds adapters in the subfolders \['second'\].*one/second"):
        tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "one")


def test_inspect_reads_an_adapter_saved_as_pickle(tmp_path):
    from tiny_models import tiny_llama
    from tsugiki.inspect_adapter import describe_adapter

    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2))
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    described = [describe_adapter(str(tmp_path / kind)).splitlines() for kind in ("st", "bin")]
    # The same description but for the folder's and file's names and sizes.
    assert [line for line in described[0] if line.startswith(("targets", "parameters"))] == \
        [line for line in described[1] if line.startswith(("targets", "parameters"))]


def test_fsdp_on_a_quantized_base_is_refused_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="fsdp: true cannot shard a 4bit base"):
        tsugiki.train({"model": str(tmp_path / "no-such-model"), "data": str(tmp_path / "no-such.jsonl"),
                       "output_dir": str(out), "method": "qlora", "fsdp": True}, progress=False)
    assert not out.exists()


def test_a_missing_adapter_is_the_error_peft_code_catches(tmp_path):
    from tiny_models import tiny_llama

    # HF PEFT raises ValueError here; code written for it catches that. FileNotFoundError says what it is.
    for exc in (ValueError, FileNotFoundError):
        with pytest.raises(exc, match="does not exist"):
            tsugiki.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nowhere"))


def test_unexpected_errors_are_one_line_in_the_cli(tmp_path, capsys, monkeypatch):
    from tsugiki import cli

    def boom(args):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # torch.save, disk full

    parser_default = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser_default(), "inspect", boom))
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tsugiki inspect: error: RuntimeError: [enforce fail") and "--debug" in err
    assert "Traceback" not in err


def _with_func(parser, command, func):
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices[command].set_defaults(func=func)
    return parser


def test_outputs_that_cannot_be_written_are_refused_before_any_model_loads(tmp_path, capsys):
    from tsugiki import cli

    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "a-file").write_text("x")
    no_model = str(tmp_path / "no-model")  # never reached: the output is checked first
    assert cli.main(["generate", "--model", no_model, "--prompt", "hi", "--output", str(tmp_path),
                     "--overwrite"]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    assert cli.main(["train", "--model", no_model, "--data", str(tmp_path / "data.jsonl"),
                     "--output_dir", str(tmp_path / "a-file" / "run")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_eval_rows_without_an_answer_are_named_before_any_model_loads(tmp_path, capsys):
    from tsugiki import cli

    (tmp_path / "held-out.jsonl").write_text('{"instruction": "a", "output": "b"}\n'
                                             '{"instruction": "c", "output": "  "}\n')
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "held-out.jsonl")]) == 2
    assert "held-out.jsonl, line 2: no reference answer to score against" in capsys.readouterr().err


def test_an_adapter_given_as_a_file_or_whose_base_moved_says_what_to_pass(tmp_path, capsys):
    from tiny_models import tiny_llama
    from tsugiki import cli

    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert cli.main(["generate", "--adapter", str(tmp_path / "rows.jsonl"), "--prompt", "hi"]) == 2
    assert "is a file; give the adapter's folder" in capsys.readouterr().err
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "moved-away")
    model.save_pretrained(tmp_path / "adapter")
    assert cli.main(["generate", "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"]) == 2
    assert "is not there any more; give its new place with --model" in capsys.readouterr().err


def test_move_into_refuses_a_folder_in_the_way_before_changing_anything(tmp_path):
    import re

    from tsugiki.fileio import move_into

    source, folder = tmp_path / "new", tmp_path / "out"
    source.mkdir()
    folder.mkdir()
    (source / "config.json").write_text("new")
    (source / "vocab.json").write_text("new")
    (folder / "config.json").write_text("old")
    (folder / "model.safetensors").write_text("old")
    (folder / "vocab.json").mkdir()
    with pytest.raises(IsADirectoryError, match="vocab.json into .*a folder of that name is in the way"):
        move_into(source, folder, stale=re.compile(r"^model\.safetensors$"))
    assert (folder / "config.json").read_text() == "old" and (folder / "model.safetensors").exists()


@pytest.mark.parametrize("config", [
    tsugiki.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=10),
    tsugiki.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=3),
])
def test_prompt_dimensions_that_contradict_the_model_are_named(config):
    """They crashed deep inside the first forward (a size mismatch, or the KV cache's layer index)."""
    with pytest.raises(ValueError, match=r"(token_dim=10|num_layers=3) does not match the model.s \d+ .*leave it out"):
        get_peft_model(tiny_llama(), config)

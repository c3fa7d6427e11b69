"""What inference loads: the training template after merge and full fine-tunes, quantized merged folders,
and `inspect --data` on the whole file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tsugiki
from tsugiki.cli import main
from tsugiki.data import get_template
from tsugiki.generation import load_for_inference
from tsugiki.pipeline import TEMPLATE_FILE, save_template
from helpers_data import make_chat_tokenizer, tiny_llama, write_jsonl
from tiny_models import tiny_llama as sized_llama

ROWS = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i % 5}"} for i in range(12)]
PROMPT = "Say the word number 3."


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl", ROWS)


def _train(model_dir, data_file, out, *extra):
    argv = ["train", "--model", model_dir, "--data", data_file, "--output_dir", out, "--max_steps", "4",
            "--batch_size", "4", "--learning_rate", "1e-2", "--lora_r", "4", "--save_steps", "0",
            "--dtype", "fp32", "--tensorboard", "false", *extra]
    assert main(argv) == 0


def _saved_template_name(folder):
    with open(os.path.join(folder, TEMPLATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)["name"]


def _generated(capsys, *argv):
    capsys.readouterr()
    assert main(["generate", *argv, "--prompt", PROMPT, "--dtype", "fp32", "--max-new-tokens", "6"]) == 0
    return capsys.readouterr().out


def test_merged_model_keeps_the_training_template(model_dir, data_file, tmp_path, capsys):
    adapter = str(tmp_path / "alp")
    _train(model_dir, data_file, adapter, "--template", "alpaca")
    merged = str(tmp_path / "merged")
    capsys.readouterr()
    assert main(["merge", "--adapter", adapter, "--output", merged]) == 0
    assert "saved as tsugiki_template.json and as the tokenizer's chat template" in capsys.readouterr().out
    assert _saved_template_name(merged) == "alpaca"

    with_adapter = load_for_inference(adapter=adapter, dtype="fp32")
    from_merged = load_for_inference(merged, dtype="fp32")
    assert from_merged.template.name == "alpaca"
    prompt = from_merged.template.format_prompt(PROMPT)
    assert prompt == with_adapter.template.format_prompt(PROMPT)
    assert prompt != get_template(None, load_for_inference(model_dir).tokenizer).format_prompt(PROMPT)
    assert _generated(capsys, "--model", merged) == _generated(capsys, "--adapter", adapter)
    # The merged tokenizer's chat template writes the trained format (the base's ChatML is gone), for
    # transformers' apply_chat_template and anything else that reads the folder; the run's own tokenizer too.
    for folder in (merged, adapter):
        chat = AutoTokenizer.from_pretrained(folder).apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
        assert chat == prompt

    # An explicit --template is used for the merge and is what the merged folder records.
    merged_llama = str(tmp_path / "merged-llama2")
    assert main(["merge", "--adapter", adapter, "--output", merged_llama, "--template", "llama2"]) == 0
    assert _saved_template_name(merged_llama) == "llama2"
    from_llama = load_for_inference(merged_llama, dtype="fp32")
    assert from_llama.template.name == "llama2"
    assert from_llama.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False) == \
        from_llama.template.format_prompt(PROMPT)


def test_full_fine_tune_folder_template_and_precedence(model_dir, data_file, tmp_path):
    full = str(tmp_path / "full")
    _train(model_dir, data_file, full, "--template", "alpaca", "--method", "full", "--max_steps", "1")
    loaded = load_for_inference(full, dtype="fp32")
    assert loaded.template.name == "alpaca"
    assert AutoTokenizer.from_pretrained(full).apply_chat_template([{"role": "user", "content": PROMPT}],
                                                                   tokenize=False) == loaded.template.format_prompt(PROMPT)
    # Precedence: explicit template > the adapter's saved one > the model folder's > the chat template.
    assert load_for_inference(full, template="llama2", dtype="fp32").template.name == "llama2"
    adapter = str(tmp_path / "on-full")
    net = tsugiki.get_peft_model(AutoModelForCausalLM.from_pretrained(full),
                                 tsugiki.LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=full))
    net.save_pretrained(adapter)
    assert load_for_inference(adapter=adapter, dtype="fp32").template.name == "alpaca"  # none of its own
    save_template(get_template("japanese"), adapter)
    assert load_for_inference(adapter=adapter, dtype="fp32").template.name == "japanese"
    assert load_for_inference(adapter=adapter, template="llama2", dtype="fp32").template.name == "llama2"
    assert load_for_inference(model_dir, dtype="fp32").template.name == "chat"


def test_requantized_merge_loads_as_the_quantized_model_it_is(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from tsugiki.models import load_model
    from tsugiki.quant import dequantize_model

    # Layers 64 wide and tall: bitsandbytes' CPU 4-bit kernels fail on narrower ones.
    model_dir = str(tmp_path / "tiny-64")
    sized_llama(vocab_size=400, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=256).save_pretrained(model_dir)
    make_chat_tokenizer().save_pretrained(model_dir)
    adapter = str(tmp_path / "qlora")
    base = load_model(model_dir, quantization="4bit")
    tsugiki.get_peft_model(base, tsugiki.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    base_model_name_or_path=model_dir)).save_pretrained(adapter)
    merged = str(tmp_path / "mq")
    with pytest.warns(UserWarning, match="quantized again"):
        assert main(["merge", "--adapter", adapter, "--quantization", "4bit", "--requantize", "--output", merged]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", merged, "--prompt", PROMPT, "--max-new-tokens", "3"]) == 0
    assert "holds 4-bit quantized weights; using them as saved" in capsys.readouterr().err
    assert main(["generate", "--model", merged, "--prompt", PROMPT, "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "cannot be cast to dtype 'fp32'" in err and "leave --dtype at auto" in err
    # Merged again, an adapter onto that 4-bit folder: only unquantized (transformers cannot save it quantized).
    adapter2 = str(tmp_path / "second")
    tsugiki.get_peft_model(load_model(merged), tsugiki.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                                   base_model_name_or_path=merged)).save_pretrained(adapter2)
    assert main(["merge", "--adapter", adapter2, "--output", str(tmp_path / "m2")]) == 2
    assert "holds 4-bit bitsandbytes weights as saved" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    assert main(["merge", "--adapter", adapter2, "--dequantize", "--dtype", "fp32", "--output", str(tmp_path / "m2")]) == 0
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        unquantized = dequantize_model(load_model(merged), torch.float32).float()  # W + delta, unrounded
        expected = tsugiki.PeftModel.from_pretrained(unquantized, adapter2)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")(ids).logits
    assert "quantization_config" not in json.loads((tmp_path / "m2" / "config.json").read_text())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_inspect_and_train_take_the_template_saved_in_the_model_folder(model_dir, tmp_path, capsys):
    """A merged model records its training template; inspect and train format rows as generate does."""
    import shutil

    from tsugiki.data import get_template
    from tsugiki.models import load_tokenizer
    from tsugiki.pipeline import save_template

    merged = tmp_path / "merged"
    shutil.copytree(model_dir, merged)  # its tokenizer has a chat template, which would win otherwise
    save_template(get_template("alpaca", load_tokenizer(str(merged))), str(merged))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Translate", "input": "good morning", "output": "Bonjour."}) + "\n")
    capsys.readouterr()
    assert main(["inspect", "--data", str(rows), "--model", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "template alpaca" in out and "### Input:\ngood morning" in out
    assert main(["train", "--model", str(merged), "--data", str(rows), "--output_dir", str(tmp_path / "run"),
                 "--max_steps", "1", "--eval_split", "0", "--dtype", "fp32", "--tensorboard", "false"]) == 0
    assert "template alpaca" in capsys.readouterr().out
    assert main(["inspect", "--data", str(rows), "--model", str(merged), "--template", "llama2"]) == 0
    assert "template llama2" in capsys.readouterr().out  # a template given still wins


def test_inspect_data_of_an_adapter_shows_its_rows_as_it_was_trained(model_dir, tmp_path, capsys):
    from tsugiki.data import get_template
    from tsugiki.models import load_tokenizer
    from tsugiki.pipeline import save_template

    adapter = tmp_path / "ja"
    tsugiki.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           tsugiki.LoraConfig(r=2, base_model_name_or_path=model_dir)).save_pretrained(adapter)
    save_template(get_template("japanese", load_tokenizer(model_dir)), str(adapter))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "Greet", "output": "Hello"}) + "\n")
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--data", str(rows)]) == 0
    out = capsys.readouterr().out
    assert "template japanese" in out and "### 指示:\nGreet" in out
    assert main(["merge", "--adapter", str(adapter), "--quantization", "4bit", "--dequantize", "--requantize",
                 "--output", str(tmp_path / "m")]) == 2
    assert "--dequantize and --requantize exclude each other" in capsys.readouterr().err


def test_inspect_data_reads_the_whole_file(model_dir, tmp_path, capsys):
    rows = [{"instruction": f"Question {i}?", "input": "", "output": ""} for i in range(3)] + ROWS[:5]
    path = tmp_path / "leading-empty.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    capsys.readouterr()
    assert main(["inspect", "--data", str(path), "--model", model_dir, "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 rows read" in out and "5 train + 0 eval rows" in out and "3 dropped as empty" in out
    assert "--- example 2 " in out and "--- example 3 " not in out


def test_train_help_names_only_the_data_sources_that_load(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    data_help = " ".join(capsys.readouterr().out.split("\n  --data DATA", 1)[1].split("\n  --eval_data", 1)[0].split())
    assert ".jsonl/.json/.csv/.parquet file" in data_help and "save_to_disk" in data_help
    assert "txt" not in data_help and "or a dataset name" not in data_help


def test_answers_stop_at_every_end_token_the_model_configures():
    """Gemma-style: the tokenizer's EOS plus an end-of-turn id in generation_config; both end an answer."""
    from tsugiki.generation import stop_token_ids

    tokenizer = make_chat_tokenizer()
    model = tiny_llama()
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id, 7]
    model.generation_config.eos_token_id = None
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id]


def _gpt2_with_64_positions():
    from tsugiki.generation import LoadedModel
    from tiny_models import tiny_gpt2

    tokenizer = make_chat_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return LoadedModel(model, tokenizer, get_template(None, tokenizer), None, "gpt2")


def test_generation_stops_at_the_end_of_the_models_context(caplog):
    """GPT-2's position table has 64 rows: transformers would fail with 'index out of range' past it."""
    from tsugiki.generation import GenerationSettings, generate_answers

    loaded = _gpt2_with_64_positions()
    prompt_tokens = len(loaded.tokenizer(loaded.template.format_prompt("a few words here"))["input_ids"])
    answers = generate_answers(loaded, ["a few words here"], GenerationSettings(max_new_tokens=100))
    assert len(loaded.tokenizer(answers[0], add_special_tokens=False)["input_ids"]) <= 64 - prompt_tokens
    assert f"leave room for {64 - prompt_tokens} of the 100 new tokens" in caplog.text


@pytest.mark.parametrize("config", [tsugiki.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
                                    tsugiki.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)])
def test_generation_leaves_room_for_an_adapters_virtual_tokens(config, caplog):
    """They take positions in front of the prompt: GPT-2's table ran out 6 tokens early."""
    from tsugiki.generation import GenerationSettings, generate_answers

    loaded = _gpt2_with_64_positions()
    loaded.model = tsugiki.get_peft_model(loaded.model, config)
    prompt_tokens = len(loaded.tokenizer(loaded.template.format_prompt("a few words here"))["input_ids"])
    answers = generate_answers(loaded, ["a few words here"], GenerationSettings(max_new_tokens=100))
    assert len(loaded.tokenizer(answers[0], add_special_tokens=False)["input_ids"]) <= 64 - 6 - prompt_tokens
    assert f"leave room for {64 - 6 - prompt_tokens} of the 100 new tokens" in caplog.text


def test_an_empty_prompt_is_refused_naming_it():
    from tsugiki.generation import GenerationSettings, generate_answers

    with pytest.raises(ValueError, match="prompt 2 is empty"):
        generate_answers(_gpt2_with_64_positions(), [{"text": "hi"}, {"text": ""}], GenerationSettings())


def test_a_prompt_longer_than_the_context_is_refused_naming_it():
    from tsugiki.generation import GenerationSettings, generate_answers

    loaded = _gpt2_with_64_positions()
    with pytest.raises(ValueError, match=r"prompt 3 is \d+ tokens, and the model's context holds 64"):
        generate_answers(loaded, ["hi", "hello", "word " * 80], GenerationSettings(batch_size=2))


def test_eval_loss_cuts_rows_at_the_models_context():
    from tsugiki.evaluate import reference_loss

    loaded = _gpt2_with_64_positions()
    long_answer = [{"instruction": "Count.", "output": "word " * 100}]  # past GPT-2's 64 positions
    loss, ppl = reference_loss(loaded, long_answer)
    assert loss == pytest.approx(reference_loss(loaded, long_answer, max_length=64)[0])


def test_eval_loss_covers_every_row_of_a_file_that_mixes_formats():
    from tsugiki.data import get_template
    from tsugiki.evaluate import reference_loss
    from tsugiki.generation import LoadedModel

    tokenizer = make_chat_tokenizer()
    loaded = LoadedModel(tiny_llama(), tokenizer, get_template(None, tokenizer), None, "tiny")
    alpaca = [{"instruction": "Say the word number 1.", "output": "word 1"}]
    completion = [{"prompt": "Fruit:", "completion": "mango and a long tail of more words"}]
    loss_a, loss_b = reference_loss(loaded, alpaca)[0], reference_loss(loaded, completion)[0]
    mixed = reference_loss(loaded, alpaca + completion)[0]
    assert min(loss_a, loss_b) < mixed < max(loss_a, loss_b)
    assert reference_loss(loaded, completion + alpaca)[0] == pytest.approx(mixed)


def test_eval_loss_of_a_conversation_is_that_of_its_last_answer():
    """Earlier assistant turns are context, as in generation: a two-answer conversation scores as
    its last answer does after the same context, and a prompt past max_length gives no loss."""
    from tsugiki.data import get_template
    from tsugiki.evaluate import reference_loss
    from tsugiki.generation import LoadedModel

    tokenizer = make_chat_tokenizer()
    loaded = LoadedModel(tiny_llama(), tokenizer, get_template(None, tokenizer), None, "tiny")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there friend"},
             {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "fine"}]
    loss = reference_loss(loaded, [{"messages": turns}])[0]
    # The same rows scored by hand: the tokens of the last answer only.
    from tsugiki.data import build_dataset
    example = build_dataset([{"messages": turns}], tokenizer, loaded.template)[0][0]
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0, :-1].float()
    targets = torch.tensor(example["input_ids"][1:])
    answer_start = len(example["input_ids"]) - len(tokenizer("fine<|im_end|>\n", add_special_tokens=False)["input_ids"])
    want = torch.nn.functional.cross_entropy(logits[answer_start - 1:], targets[answer_start - 1:])
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert reference_loss(loaded, [{"instruction": "word " * 300, "output": "x"}], max_length=64) == (None, None)
    # A training file's "weight" changes nothing here: the last answer is the reference, as in exact match.
    weighed = [dict(turn, weight=0) if turn["role"] == "assistant" else turn for turn in turns]
    assert reference_loss(loaded, [{"messages": weighed}])[0] == loss
    assert reference_loss(loaded, [{"conversations": weighed}])[0] == loss


def test_answer_scores_treat_an_empty_reference_as_matching_only_an_empty_answer():
    from tsugiki.evaluate import contains_match, exact_match

    assert contains_match("The answer is  Paris.", "paris") and exact_match(" Paris \n", "Paris")
    assert not contains_match("anything", "") and contains_match(" ", "")


def test_inference_in_bf16_keeps_the_buffers_fp32_as_training_does(model_dir):
    import torch

    loaded = load_for_inference(model_dir, dtype="bf16")
    floats = {name: t.dtype for name, t in loaded.model.named_buffers() if t.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}  # RoPE's inv_freq: its precision sets the angles
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_merge_writes_all_or_nothing_and_never_over_its_inputs(model_dir, data_file, tmp_path, capsys, monkeypatch):
    adapter = str(tmp_path / "adapter")
    _train(model_dir, data_file, adapter)
    adapter_files = sorted(os.listdir(adapter))
    for output in (adapter, model_dir):
        assert main(["merge", "--adapter", adapter, "--model", model_dir, "--output", output, "--overwrite"]) == 2
        assert "folder the merge reads; choose another folder" in capsys.readouterr().err
    assert sorted(os.listdir(adapter)) == adapter_files
    import tsugiki.generation

    with monkeypatch.context() as patch:  # an output that cannot be a folder is refused before the model loads
        patch.setattr(tsugiki.generation, "load_for_inference", lambda *a, **k: pytest.fail("loaded first"))
        (tmp_path / "a-file").write_text("mine")
        assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "a-file")]) == 2
        assert "is a file; choose a folder path" in capsys.readouterr().err
        assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "a-file" / "sub")]) == 2
        assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"

    merged = tmp_path / "merged"
    merged.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):  # an older, sharded merge
        (merged / stale).write_text("old")
    mine = ("notes.txt", "vocab_notes.txt", "finetune.model", "tokenizer_howto.md")  # named near tokenizer files
    for name in mine:
        (merged / name).write_text("mine")
    (merged / "tokenizer").mkdir()  # a folder of the user's, not a file to replace
    # A training run's folder merged over: its adapter would be applied again by transformers, its
    # vocabulary and chat template files would be read with the new tokenizer's.
    run_files = ("adapter_config.json", "adapter_model.safetensors", "vocab.json", "chat_template.jinja")
    for stale in run_files:
        (merged / stale).write_text("old")
    import tsugiki.pipeline

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # the last file fails: nothing of this merge may be left
        patch.setattr(tsugiki.pipeline, "save_template", full_disk)
        assert main(["merge", "--adapter", adapter, "--output", str(merged), "--overwrite"]) == 2
    assert sorted(os.listdir(merged)) == sorted(["model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                                 "tokenizer", *mine, *run_files])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with monkeypatch.context() as patch:  # a failure into a folder not there before leaves no folder behind
        patch.setattr(tsugiki.pipeline, "save_template", full_disk)
        assert main(["merge", "--adapter", adapter, "--output", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    assert main(["merge", "--adapter", adapter, "--output", str(merged), "--overwrite"]) == 0
    names = set(os.listdir(merged))
    assert "model.safetensors" in names and all((merged / name).read_text() == "mine" for name in mine)
    assert (merged / "tokenizer").is_dir()
    assert not names & {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "adapter_config.json",
                        "adapter_model.safetensors"}
    assert not [n for n in names if (merged / n).is_file() and (merged / n).read_bytes() == b"old"]  # written anew
    AutoModelForCausalLM.from_pretrained(merged)  # loads: no stale index pointing at old shards


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_a_tied_embedding_warns_that_a_merge_would_change_the_other_use(target):
    import warnings

    with pytest.warns(UserWarning, match=r"tied embeddings: .* merged model differs from base \+ adapter"):
        tsugiki.get_peft_model(sized_llama(tie_word_embeddings=True),
                               tsugiki.LoraConfig(r=2, target_modules=[target, "q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # untied: nothing to say
        tsugiki.get_peft_model(sized_llama(tie_word_embeddings=False),
                               tsugiki.LoraConfig(r=2, target_modules=[target, "q_proj"]))

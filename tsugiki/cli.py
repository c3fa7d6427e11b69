"""The ``tsugiki`` command: train | generate | chat | eval | merge | inspect | plan.

Every subcommand explains its options with ``--help``. Errors caused by the
input (a missing file, a bad key, a broken adapter) print one clear line and
exit with status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any, Optional, Sequence

EPILOG = "Run 'tsugiki <command> --help' for the options of each command."


# ----------------------------------------------------------------------------- shared options
def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (a number of rows to show)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


DTYPE_HELP = ("Base weights' dtype: auto = bf16 where the hardware runs it natively (as training does), else fp32 "
              "(default: auto).")


def _add_model_options(p: argparse.ArgumentParser, adapter_required: bool = False,
                       dtype_help: str = DTYPE_HELP, several_adapters: bool = False) -> None:
    p.add_argument("--model", default=None,
                   help="Base model: a Hugging Face model folder, a .gguf file, or 'smollm2-135m-instruct' "
                        "(default: the adapter's base_model_name_or_path, else the built-in default).")
    p.add_argument("--adapter", action="append", default=None, required=adapter_required,
                   help="Adapter folder saved by tsugiki or HF PEFT" + ("." if adapter_required else
                                                                       " (default: none, the bare base).")
                   + (" Repeat it to score several adapters of one base side by side." if several_adapters else ""))
    p.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="none",
                   help="Load the base quantized with bitsandbytes (default: none).")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help=dtype_help)
    p.add_argument("--template", default=None,
                   help="Prompt template: chat, alpaca, japanese, llama2 or your own string with {instruction} "
                        "and {response} (default: the one saved with the adapter, else the one saved in the "
                        "--model folder by merge or a full fine-tune, else the model's chat template). "
                        "merge saves it with a merged model folder (a .gguf output keeps the base file's chat "
                        "template).")


def _add_generation_options(p: argparse.ArgumentParser, batches: bool = True) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="Most tokens to generate per answer (default: %(default)s).")
    p.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="With --do-sample: sampling temperature (default: 1.0).")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="With --do-sample: nucleus sampling threshold (default: 1.0 = off).")
    p.add_argument("--top-k", type=int, default=50,
                   help="With --do-sample: sample among the k most likely tokens (default: 50; 0: no top-k cut).")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Penalty > 1 discourages repeating tokens, e.g. 1.2 (default: 1.0 = off).")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="End an answer where it writes TEXT, which is left out of the answer; repeat it for "
                        "several (default: none, answers end at the model's end-of-turn token). \\n, \\t "
                        "and \\\\ in TEXT are a newline, a tab and a backslash: --stop '\\n\\n' ends "
                        "at the first blank line.")
    if batches:
        p.add_argument("--batch-size", type=int, default=8,
                       help="Prompts generated together (default: 8). In bf16/fp16 a prompt's answer can "
                            "differ slightly with the batch it is in (padding changes the rounding, as in "
                            "transformers); --dtype fp32 makes answers independent of it.")
    p.add_argument("--seed", type=int, default=None,
                   help="Seed for --do-sample, so a rerun with the same prompts"
                        + (" and --batch-size" if batches else "") + " gives the same answers "
                        "(default: none, a new draw each run).")


def _add_output_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--output", help=what)
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")


def _settings(args: argparse.Namespace):
    from .generation import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, batch_size=getattr(args, "batch_size", 1),
                              seed=args.seed, stop=[_unescaped(text) for text in args.stop or []])


def _unescaped(text: str) -> str:
    """``text`` with ``\\n``, ``\\t`` and ``\\\\`` read as a newline, a tab and a backslash (a shell
    argument cannot easily hold a newline); other backslashes stay as written."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _check_adapter_options(args: argparse.Namespace) -> None:
    """``args.adapter``: the first ``--adapter`` (or None); ``args.adapters``: all of them, which
    only eval takes more than one of. A folder with more adapters in subfolders gets a note."""
    given = getattr(args, "adapter", None)
    if not isinstance(given, list):
        return
    from .config import CONFIG_NAME, adapters_in_subfolders
    from .evaluate import refuse_mixed_methods, refuse_repeated_adapters

    if len(given) > 1 and args.command != "eval":
        raise ValueError(f"--adapter was given {len(given)} times; {args.command} uses one adapter "
                         "(tsugiki eval scores several side by side)")
    args.adapters, args.adapter = given, given[0]
    refuse_repeated_adapters(given)  # before a model loads
    if len(given) > 1:
        refuse_mixed_methods(given)
    for folder in given:  # the root adapter of a several-adapter save is used; say that there are others
        others = adapters_in_subfolders(folder) if os.path.isfile(os.path.join(folder, CONFIG_NAME)) else []
        others = [name for name in others if not re.fullmatch(r"checkpoint-\d+", name)]  # a run's own checkpoints
        if others:
            print(f"note: {folder} also holds the adapters {', '.join(others)} in subfolders; this uses the one at "
                  f"its top (give {os.path.join(folder, others[0])} for another)", file=sys.stderr)


def _load(args: argparse.Namespace):
    from .generation import load_for_inference

    quant = None if args.quantization == "none" else args.quantization
    loaded = load_for_inference(args.model, args.adapter, quantization=quant, template=args.template,
                                dtype=args.dtype)
    if loaded.saved_quantization:
        print(f"note: {loaded.base_name} holds {loaded.saved_quantization} quantized weights; using them as saved",
              file=sys.stderr)
    return loaded


def _read_prompt_rows(path: str, with_answers: bool = False) -> list[dict]:
    """The prompt rows of a data file, each checked before any model loads (errors name the line);
    ``with_answers``: each must hold a reference answer too, as eval scores against it."""
    from .data.formats import read_rows_located, sample_from_prompt_row
    from .generation import reference_answer

    rows, _columns, places = read_rows_located(path)
    for row, place in zip(rows, places):
        sample_from_prompt_row(row, where=f"{path}, {place}")
        if with_answers and not (reference_answer(row) or "").strip():
            raise ValueError(f"{path}, {place}: no reference answer to score against (output, response, "
                             "completion, or a final assistant message); eval needs one in every row")
    return [dict(r) for r in rows]


def _refuse_existing(path: str, overwrite: bool, what: str) -> None:
    """Checked before any model loads: an --output file the run could not write at the end."""
    from .fileio import check_writable

    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; give a file path")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{what} {path!r} already exists; pass --overwrite to replace it")
    check_writable(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


# ----------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import run_training
    from .train.config import config_from_args

    from .train import distributed

    from .fileio import terminate_as_exit

    config = config_from_args(args)
    try:
        with terminate_as_exit():  # kill, torchrun and job schedulers send SIGTERM: stop as on Ctrl-C
            result = run_training(config)
    except (KeyboardInterrupt, SystemExit):
        if distributed.is_main():
            _say_how_to_resume(config)
        raise
    if distributed.is_main():
        print(f"{'model' if config.method == 'full' else 'adapter'} saved in {result.output_dir}")
    distributed.finish()
    return 0


def _say_how_to_resume(config) -> None:
    """After Ctrl-C: what a rerun of the same command starts from."""
    from .train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(config.output_dir) if config.output_dir and os.path.isdir(config.output_dir) else None
    if newest:
        print(f"the newest checkpoint is {newest}: run the same command again to resume from it", file=sys.stderr)
    elif config.save_steps:
        print(f"no checkpoint was saved yet (one every {config.save_steps} steps): a rerun starts over",
              file=sys.stderr)


# ----------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from .fileio import atomic_write_text

    if not args.prompt and not args.input:
        raise ValueError("give --prompt TEXT (repeatable) or --input FILE.jsonl")
    if args.output:
        _refuse_existing(args.output, args.overwrite, "output file")
    rows: list[Any] = list(args.prompt or []) + (_read_prompt_rows(args.input) if args.input else [])
    settings = _settings(args)  # checked before the model loads
    loaded = _load(args)
    from .generation import generate_answers

    answers = generate_answers(loaded, rows, settings)
    if args.output or args.input:
        lines = []
        for row, answer in zip(rows, answers):
            record = dict(row) if isinstance(row, dict) else {"prompt": row}
            record["generated"] = answer
            lines.append(json.dumps(record, ensure_ascii=False))
        if args.output:
            atomic_write_text(args.output, "\n".join(lines) + "\n")
            print(f"wrote {len(lines)} answers to {args.output}", file=sys.stderr)
        else:
            print("\n".join(lines))
    else:
        for answer in answers:
            print(answer)
    return 0


# ----------------------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import ConversationTooLongError, fit_conversation, stream_answer

    settings = _settings(args)  # checked before the model loads
    loaded = _load(args)
    settings.seed_sampling()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("tsugiki chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits; "
          "Ctrl-C stops an answer.")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        try:
            kept, left_out = fit_conversation(loaded, history + [{"role": "user", "content": line}],
                                              settings.max_new_tokens)
        except ConversationTooLongError as err:
            print(f"({err})", file=sys.stderr)
            continue
        if left_out:
            print(f"(the {left_out} oldest messages no longer fit the model's context and are left out)",
                  file=sys.stderr)
        history = kept
        print("bot> ", end="", flush=True)
        pieces: list[str] = []
        answer = stream_answer(loaded, {"messages": history}, settings)
        try:
            for piece in answer:
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            answer.close()  # ends generation; the part shown stays in the conversation
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


# ----------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .fileio import atomic_write_text

    if args.output:
        _refuse_existing(args.output, args.overwrite, "output file")
    if args.max_rows is not None and args.max_rows < 1:
        raise ValueError(f"--max-rows must be a positive number of rows, got {args.max_rows}")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base leaves nothing to score without --adapter; give the adapter to evaluate, "
                         "or drop --no-base to score the base model")
    rows = _read_prompt_rows(args.data, with_answers=True)
    if args.max_rows:
        rows = rows[: args.max_rows]
    settings = _settings(args)  # checked before the model loads
    loaded = _load(args)
    report = evaluate(loaded, rows, settings, compare_base=not args.no_base, with_loss=not args.no_loss,
                      progress=True, more_adapters=getattr(args, "adapters", [])[1:],
                      template=args.template)
    print(report.format_table(show=args.show))
    if args.output:
        atomic_write_text(args.output, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .data.jinja import match_chat_template
    from .fileio import MODEL_FOLDER_FILES, check_writable, move_into, open_up_private_files, terminate_as_exit
    from .generation import load_for_inference
    from .pipeline import TEMPLATE_FILE, save_template
    from .gguf_export import is_gguf_path
    from .train.loop import resolve_dtype

    if is_gguf_path(args.output):
        return _merge_into_gguf(args)
    if args.gguf_type is not None:
        raise ValueError(f"--gguf-type sets the tensor type of a GGUF file, and --output {args.output!r} is a folder: "
                         "give --output a file name ending in .gguf, or drop --gguf-type")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise FileExistsError(f"output folder {args.output!r} is not empty; pass --overwrite or choose another")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output {args.output!r} is a file; choose a folder path")
    check_writable(args.output, "--output")  # before the model loads, not after
    base = _merge_base(args.model, args.adapter)
    _refuse_output_over_inputs(args.output, args.adapter, base)
    quant = None if args.quantization == "none" else args.quantization
    saved = _saved_kbit(base)
    if saved and not quant:
        if not args.dequantize:
            raise ValueError(f"the base holds {saved[0]}-bit bitsandbytes weights as saved, and transformers "
                             "cannot save such a model again after a merge: pass --dequantize for an unquantized "
                             "merged model (--dtype fp32 keeps it unrounded)")
        quant = saved
    if not quant and (args.dequantize or args.requantize):
        raise ValueError("--dequantize and --requantize choose what a merge into a --quantization 4bit/8bit base "
                         "saves; without --quantization the base is not quantized and the merged model is plain")
    if args.dequantize and args.requantize:
        raise ValueError("--dequantize and --requantize exclude each other: --dequantize saves an unquantized "
                         "merged model, --requantize a quantized one; pass one")
    if quant and args.dequantize == args.requantize:
        raise ValueError(f"merging into a {quant} base: pass --dequantize (an unquantized merged model; "
                         "--dtype fp32 keeps it unrounded) "
                         "or --requantize (stays quantized; rounds the merged weights)")
    loaded = load_for_inference(args.model, args.adapter, quantization=quant, template=args.template,
                                dtype=None if args.dtype == "auto" else args.dtype)
    dequantize = bool(quant) and args.dequantize
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, next(loaded.model.parameters()).device)
    merged = loaded.model.merge_and_unload(safe_merge=True, dequantize=dequantize, dtype=dtype)
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(parent, exist_ok=True)
    # Written next to the output first: a failure on the way (a full disk, Ctrl-C, kill) leaves the output
    # as it was, and the output folder is made only when the merged model moves in.
    with terminate_as_exit():
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(args.output))}.", suffix=".tmp",
                                   dir=parent)
        try:
            merged.save_pretrained(staging)
            chat_template_written = match_chat_template(loaded.tokenizer, loaded.template)
            loaded.tokenizer.save_pretrained(staging)
            # The prompt format goes with the model, so generate/chat/eval on the merged folder format as
            # training did.
            save_template(loaded.template, staging)
            open_up_private_files(staging)
            move_into(staging, args.output, stale=MODEL_FOLDER_FILES)  # --overwrite: no old model file stays
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model saved in {args.output} (loads with transformers' AutoModelForCausalLM); "
          f"prompt template {loaded.template.name!r} saved as {TEMPLATE_FILE}"
          + (" and as the tokenizer's chat template" if chat_template_written else ""))
    return 0


def _merge_into_gguf(args: argparse.Namespace) -> int:
    """``merge --output FILE.gguf``: one GGUF file in the layout of the .gguf base (see tsugiki.gguf_export).

    Everything that can be refused is refused before the model loads: a base that is not a
    .gguf file, a quantized-on-load base, an architecture or type the writer cannot write, an
    existing output without --overwrite, the base file itself as the output.
    """
    from .fileio import check_writable, terminate_as_exit
    from .generation import load_for_inference
    from .gguf_export import CONVERT_HINT, DEFAULT_GGUF_TYPE, check_gguf_source, save_gguf
    from .models import resolve_model
    from .train.loop import resolve_dtype

    output = args.output
    if os.path.isdir(output):
        raise IsADirectoryError(f"--output {output!r} is a folder; a GGUF output is one file: choose a file path")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"--output {output!r} exists; pass --overwrite to replace it, or choose another name")
    if args.quantization != "none" or args.dequantize or args.requantize:
        raise ValueError("a GGUF output is written from the base's own weights, not from a bitsandbytes-quantized "
                         "load: drop --quantization, --dequantize and --requantize (--gguf-type q8_0, q4_0 or "
                         "q4_1 writes a quantized GGUF file)")
    base = resolve_model(_merge_base(args.model, args.adapter))
    if base.kind != "gguf":
        what = "model folder" if base.kind == "hf_dir" else "Hub model"
        raise ValueError(f"--output {output!r} is a GGUF file, which tsugiki writes only from a .gguf base (it copies "
                         f"that file's tokenizer and metadata), and the base {base.path!r} is a Hugging Face {what}: "
                         f"{CONVERT_HINT}")
    if os.path.exists(output) and os.path.samefile(output, base.gguf_file):
        raise ValueError(f"--output {output!r} is the base GGUF file the merge reads; choose another file")
    tensor_type = args.gguf_type or DEFAULT_GGUF_TYPE
    check_gguf_source(base.gguf_file, tensor_type)
    check_writable(os.path.dirname(os.path.abspath(output)), "--output's folder")  # the file goes in it
    loaded = load_for_inference(args.model, args.adapter, template=args.template,
                                dtype=None if args.dtype == "auto" else args.dtype)
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, next(loaded.model.parameters()).device)
    merged = loaded.model.merge_and_unload(safe_merge=True, dtype=dtype)
    with terminate_as_exit():  # SIGTERM removes the temporary file as Ctrl-C does
        save_gguf(merged, base.gguf_file, output, tensor_type)
    print(f"merged model saved as {output} (GGUF, {tensor_type} weights, with the base file's tokenizer, chat "
          "template and settings; loads with llama.cpp, Ollama, or transformers' gguf_file=)")
    note = _gguf_template_note(loaded.template, base.gguf_file)
    if note:
        print(note, file=sys.stderr)
    return 0


def _merge_base(model: Optional[str], adapter: Optional[str]) -> str:
    """The base a merge loads, as load_for_inference picks it: --model, else the adapter's, else the default."""
    from .config import PeftConfig
    from .models import DEFAULT_MODEL

    recorded = PeftConfig.from_pretrained(adapter).base_model_name_or_path if adapter else None
    return model or recorded or DEFAULT_MODEL


def _gguf_template_note(template, source_gguf: str) -> Optional[str]:
    """A note when the adapter's prompt format is not the chat template the GGUF file carries (the base's)."""
    from .gguf_export import source_chat_template

    if template.kind == "chat" and template.chat_template == source_chat_template(source_gguf):
        return None
    return (f"note: the adapter was trained with the prompt template {template.name!r}, but the GGUF file holds "
            "the base's chat template, which llama.cpp and Ollama apply to chat messages; for the trained "
            "behaviour send them prompts formatted as in training (raw completion), or give them that template")


def _saved_kbit(base: str) -> Optional[str]:
    """``"4bit"``/``"8bit"`` when the base folder holds bitsandbytes weights as saved (a ``merge
    --requantize`` output, a pre-quantized checkpoint), read from its config.json."""
    import json

    path = os.path.join(base, "config.json") if os.path.isdir(base) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            quantization = json.load(fh).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None  # the load says what is wrong with it
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsandbytes":
        return None
    return "4bit" if quantization.get("load_in_4bit") else "8bit" if quantization.get("load_in_8bit") else None


def _refuse_output_over_inputs(output: str, adapter: Optional[str], base: str) -> None:
    """A merged model written over its own base or adapter would destroy what it was made from."""
    for what, folder in (("base model", base), ("adapter", adapter)):
        if folder and os.path.isdir(folder) and os.path.exists(output) and os.path.samefile(folder, output):
            raise ValueError(f"--output {output!r} is the {what} folder the merge reads; choose another folder")


# ----------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    if args.data:
        return _inspect_data(args)
    if not args.adapter_dir:
        raise ValueError("give an adapter folder to describe, or --data FILE to show tokenized examples")
    from .inspect_adapter import describe_adapter

    print(describe_adapter(args.adapter_dir))
    return 0


def _inspect_data(args: argparse.Namespace) -> int:
    from .data import build_dataset
    from .inspect_adapter import show_example
    from .models import load_tokenizer
    from .pipeline import folder_template

    model, adapter = args.model, args.adapter_dir  # with an adapter: the rows as it was trained on them
    if adapter and not model:
        from .config import PeftConfig

        model = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    from .generation import has_tokenizer

    tokenizer = load_tokenizer(adapter if adapter and has_tokenizer(adapter) else model)
    template = folder_template(args.template, tokenizer, adapter, model)  # as generate and eval take it
    # The whole file: the summary describes it all, and empty rows at its start do not hide good ones.
    examples, _, stats = build_dataset(args.data, tokenizer, template, max_length=args.max_length,
                                       train_on=args.train_on)
    print(stats.summary())
    for i, example in enumerate(examples[: args.rows]):
        print(f"\n--- example {i + 1} ({len(example['input_ids'])} tokens) ---")
        print(show_example(example, tokenizer))
    return 0


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Subcommand parsers: no prefix matching, so a misspelt key is reported, not guessed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .gguf_export import GGUF_TYPES
    from .plan import add_plan_arguments
    from .train.config import add_config_arguments

    parser = argparse.ArgumentParser(
        prog="tsugiki", epilog=EPILOG, allow_abbrev=False,
        description="Fine-tune LLMs with LoRA/QLoRA: train an adapter on your data, generate, chat, evaluate, merge.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="Fine-tune a base model on instruction data and save the adapter.",
                       description="Fine-tune a base model on your data. Keys come from --config YAML and/or "
                                   "--key value flags (flags win); the resolved config is saved with the outputs.")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="Generate answers for prompts with a base model (+ adapter).",
                       description="Generate answers; with --input FILE.jsonl, writes JSONL rows with a "
                                   "'generated' field (to --output or standard output).")
    _add_model_options(p)
    p.add_argument("--prompt", action="append", help="A prompt (the user's message); repeat for several.")
    p.add_argument("--input", help="JSONL/JSON/CSV/Parquet file of rows (any supported data format; JSON and CSV may be gzipped, .jsonl.gz).")
    _add_output_options(p, "Write JSONL here instead of standard output.")
    _add_generation_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="Talk to the model in the terminal; answers stream as they are generated.",
                       description="A conversation in the terminal with a base model (+ adapter): each answer "
                                   "streams as it is generated and joins the history the next one sees. "
                                   "/reset clears it, /exit (or Ctrl-D) quits, Ctrl-C stops an answer. When the "
                                   "conversation outgrows the model's context, its oldest turns are left out.")
    _add_model_options(p)
    p.add_argument("--system", default=None, help="A system message that starts the conversation.")
    _add_generation_options(p, batches=False)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="Score base and base + adapter side by side on held-out rows.",
                       description="Loss/perplexity on the reference answers, and exact-match and "
                                   "contains-match of generated answers, for the base and base + adapter "
                                   "(or several adapters of one base: repeat --adapter).")
    _add_model_options(p, several_adapters=True)
    p.add_argument("--data", required=True, help="Held-out rows with reference answers (any supported format).")
    p.add_argument("--max-rows", type=int, default=None, help="Use only the first N rows.")
    p.add_argument("--show", type=_count, default=5, help="Print this many sample answers (default: 5).")
    p.add_argument("--no-base", action="store_true", help="Skip the bare-base column.")
    p.add_argument("--no-loss", action="store_true", help="Skip loss/perplexity (generation only).")
    _add_output_options(p, "Also write the scores as JSON here, with each row's reference and answers "
                           "(\"per_row\").")
    _add_generation_options(p)
    p.set_defaults(func=cmd_eval, max_new_tokens=64)

    p = sub.add_parser("merge", help="Fold an adapter into its base and save a plain transformers model, or a "
                                      "GGUF file for llama.cpp and Ollama.",
                       description="Fold an adapter into its base. --output FOLDER saves a transformers model "
                                   "folder; --output FILE.gguf (from a .gguf base of the Llama architecture, "
                                   "e.g. the default) writes one GGUF file: the base file's metadata, tokenizer "
                                   "and chat template with the merged weights, in --gguf-type.")
    _add_model_options(p, adapter_required=True,
                       dtype_help="dtype of the merged model: auto = the base's as it loads (a model folder: its "
                                  "saved dtype; a .gguf file: fp32, exact for its dequantized blocks); bf16 "
                                  "halves the size of an fp32 one (default: auto). A .gguf output's type is "
                                  "--gguf-type.")
    p.add_argument("--output", required=True,
                   help="Folder for the merged model (safetensors + tokenizer), or a file name ending in .gguf "
                        "for one GGUF file (the base must be a .gguf file; from a model folder, merge into a "
                        "folder and convert it with llama.cpp's convert_hf_to_gguf.py).")
    p.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output folder: the model, "
                   "tokenizer and adapter files there are replaced or removed; other files stay. A .gguf "
                   "--output file is replaced once the new one is complete.")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="With a .gguf --output: the type of its weight matrices; norms stay f32, as llama.cpp "
                        "writes them. f16 (default), bf16, f32 (the merge unrounded), or quantized q8_0, q4_0, "
                        "q4_1 (a matrix whose rows do not split into blocks of 32 falls back to f16).")
    p.add_argument("--dequantize", action="store_true",
                   help="With --quantization: save the merged model unquantized, merged in fp32 and stored in "
                        "the dtype of the model's other weights (--dtype fp32: all fp32, the merge unrounded).")
    p.add_argument("--requantize", action="store_true",
                   help="With --quantization: keep the merged model quantized (the merge is rounded).")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="Describe an adapter, or show tokenized examples with the loss mask.",
                       description="'tsugiki inspect ADAPTER_DIR' prints its base, method, targets and size. "
                                   "'tsugiki inspect --data FILE' prints a few tokenized rows with the tokens "
                                   "that carry loss marked [[like this]], to debug templates.")
    p.add_argument("adapter_dir", nargs="?", help="An adapter folder.")
    p.add_argument("--data", help="A data file to tokenize and show.")
    p.add_argument("--model", default=None, help="Whose tokenizer to use (default: the built-in default model).")
    p.add_argument("--template", default=None, help="Template name or string (default: auto).")
    p.add_argument("--train-on", choices=("response", "all"), default="response",
                   help="Which tokens carry loss (default: response).")
    p.add_argument("--max-length", type=int, default=1024, help="Truncate rows to this many tokens (default: 1024).")
    p.add_argument("--rows", type=_count, default=3, help="How many examples to show (default: 3).")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="Estimate peak memory before loading anything, and whether it fits.")
    add_plan_arguments(p)
    p.set_defaults(func=None)
    for command in sub.choices.values():  # `tsugiki train --debug` as well as `tsugiki --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="Show full tracebacks on errors.")
    return parser


def _unknown_options_message(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """Name the unknown options and suggest the closest real one (argparse alone does not)."""
    import difflib

    from .train.config import HF_KEY_NAMES, handled_otherwise

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [o for action in sub._actions for o in action.option_strings]
    parts = []
    for i, item in enumerate(unknown):
        if not item.startswith("-"):
            if i == 0 or not unknown[i - 1].startswith("-"):  # not the value of an unknown option
                parts.append(f"unexpected argument {item!r}")
            continue
        flag = item.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hf_name = HF_KEY_NAMES.get(flag.lstrip("-").replace("-", "_"))
        if hf_name and f"--{hf_name}" in known:
            close = [f"--{hf_name}"]
        instead = handled_otherwise(flag) if command == "train" else None
        parts.append(f"unknown option {flag!r}" + (f": {instead}" if instead else
                                                    f"; did you mean {close[0]!r}?" if close else ""))
    return "; ".join(parts) + f" (see 'tsugiki {command} --help')"


def _one_line_warning(message: Warning | str, category: type, filename: str, lineno: int, line: Any = None) -> str:
    """A warning as the command line shows it: what it says, not the source line that raised it
    (--debug keeps Python's own format)."""
    return f"warning: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:
        print(f"tsugiki {args.command}: error: {_unknown_options_message(parser, args.command, unknown)}",
              file=sys.stderr)
        return 2
    python_format = warnings.formatwarning
    if not args.debug:
        from .quant import quiet_hub_kernel_notice

        quiet_hub_kernel_notice()
        warnings.formatwarning = _one_line_warning
    try:
        _check_adapter_options(args)
        if args.command == "plan":
            from .plan import run_plan_cli

            return run_plan_cli(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tsugiki ... | head` closed the pipe: nothing wrong, nothing more to print
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, ImportError) as err:
        if args.debug:
            raise
        print(f"tsugiki {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # not an input problem we know of: still one line, and where to look further
        if args.debug:
            raise
        print(f"tsugiki {args.command}: error: {type(err).__name__}: {err} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = python_format


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

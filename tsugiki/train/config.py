"""Training configuration: one dataclass, loaded from YAML and/or ``--key value`` overrides.

Precedence (lowest to highest): field defaults < YAML file < overrides.
Every field carries its own help string (``metadata["help"]``) so the CLI and
the docs read from one place. Values given as strings (the command line) are
coerced to the field's type; unknown keys are rejected with the closest valid
name; invalid values are rejected naming the key.

The resolved config is written next to the outputs as ``train_config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ..fileio import atomic_write_text

from ..data.tokenize import TRAIN_ON

CONFIG_FILENAME = "train_config.yaml"
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
DTYPES = ("auto", "bf16", "fp32", "fp16")
QUANTIZATIONS = ("none", "4bit", "8bit")


def _f(default: Any, help: str, **kw):
    """A dataclass field with a help string (mutable defaults go through a factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A bad training configuration: unknown key, wrong type or invalid value."""


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs, with documented defaults.

    The effective batch of one optimizer step is ``batch_size * grad_accum * processes``
    examples (processes = torchrun's world size, 1 by default); the loss of a step is the sum of per-token losses over all of
    its target tokens divided by their count (not a mean of micro-batch means).
    """

    # --- what to train, on what, where
    model: Optional[str] = _f(None, "Base model: a Hugging Face id or local directory, or a .gguf file. None = the built-in default model.")
    data: Optional[str] = _f(None, "Training data: a local .jsonl/.json/.csv/.parquet file (.jsonl.gz, .json.gz, .csv.gz: gzipped), or a folder saved with datasets' save_to_disk (not a Hub dataset name).")
    eval_data: Optional[str] = _f(None, "Evaluation data (same formats as `data`). None = hold out `eval_split` of `data`.")
    eval_split: float = _f(0.0, "Held out from `data` for evaluation when `eval_data` is not given: a fraction in (0, 1) or a row count >= 1 (0 = none).")
    max_rows: Optional[int] = _f(None, "Use only the first N rows of `data` (None = all).")
    output_dir: str = _f("tsugiki-output", "Directory for checkpoints, metrics, the final adapter and the summary.")
    overwrite: bool = _f(False, "Start over in a non-empty `output_dir`, resuming nothing: what an earlier tsugiki run wrote there (in a folder with its train_config.yaml or checkpoints: records, checkpoints, and the final files its outputs.json lists: the adapter or model, tokenizer and template files, its README card) is removed. Other files stay and are never replaced: a README.md of your own is kept (no card is written), and a file of yours under another name the run writes (e.g. tokenizer_config.json) stops the run before it starts, naming the file.")
    resume: Union[str, bool] = _f("auto", "'auto': continue from the latest complete checkpoint in `output_dir` if there is one; a checkpoint path: continue from it (an `output_dir` other than the checkpoint's own folder follows the fresh-start rules: empty, or `overwrite`); false: start fresh.")
    # --- method
    method: str = _f("lora", "Fine-tuning method (lora, qlora, dora, ia3, prompt_tuning, ..., or full).")
    quantization: str = _f("none", "Base weights quantization: none, 4bit (NF4) or 8bit. With method qlora, none means 4bit (QLoRA is LoRA on a 4-bit base); 8bit there gives LoRA on an 8-bit base.")
    lora_r: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).")
    method_args: Optional[dict] = _f(None, "The method's own options as a mapping, e.g. {num_virtual_tokens: 20} for prompt tuning, or any LoraConfig option for lora (use_rslora, rank_pattern, ...); on the command line key=value,key=value or a JSON object. The rank, alpha, dropout and targets have their own keys (lora_r, lora_alpha, lora_dropout, target_modules); method_args may not contradict them.")
    target_modules: Optional[list[str]] = _f(None, "Modules to adapt: names/suffixes (comma-separated on the command line), 'all-linear', one regular expression over full module names (e.g. '.*\\.(q|v)_proj'), or None for the per-architecture default.")
    # --- data shaping
    template: Optional[str] = _f(None, "Prompt template: chat (the tokenizer's chat template), alpaca, japanese, llama2, auto, or your own string with {instruction} and {response} (and optionally {input}); None = auto: chat when the tokenizer has a chat template, else alpaca.")
    max_length: int = _f(1024, "Maximum tokens per example (longer ones are truncated).")
    packing: bool = _f(False, "Pack several examples into one row (no padding; attention kept per example via position_ids).")
    group_by_length: bool = _f(False, "Order batches so rows of similar length go together (less padding), still shuffled per epoch.")
    shuffle: bool = _f(True, "Shuffle the rows each epoch (seeded by `seed`); false keeps the file's order.")
    train_on: str = _f("response", "Which tokens carry loss: 'response' (answers and EOS only) or 'all' (but answers a row gives weight 0).")
    # --- optimisation
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = derive from `num_epochs`. When > 0 it wins over `num_epochs`.")
    num_epochs: float = _f(1.0, "Passes over the training data (used when `max_steps` is -1); a fraction (0.5, 2.5) ends the last pass part way, rounded up to whole optimizer steps.")
    batch_size: int = _f(4, "Examples per micro-batch on each process (halved automatically on out-of-memory); one step is batch_size * grad_accum * processes examples.")
    max_forward_tokens: Union[int, str] = _f("auto", "Most tokens (rows x padded length) one forward pass may hold: a micro-batch is split into smaller forwards to stay under it (at least one row each), which changes neither the loss nor the gradients beyond float rounding (with dropout or NEFTune, the random draws follow the split). 'auto': as many tokens as keep the saved activations of a forward under a quarter of the frozen weights' size (estimated from the model's shape, with gradient checkpointing from what it keeps: each block's input and one block, so forwards get several times longer; no limit for architectures tsugiki.plan does not know); 0: no limit.")
    pad_to_multiple_of: int = _f(64, "Pad each forward's rows to a multiple of this many tokens (1 = to the longest row only). Few distinct shapes keep the CPU matmul library's per-shape kernel caches small (each new sequence length costs ~10 MB that stays resident).")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step on each process (doubled when the micro-batch is halved).")
    learning_rate: float = _f(2e-4, "Peak learning rate of AdamW.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up: cosine, linear or constant.")
    optimizer: str = _f("adamw", "adamw (torch, fused where the device allows; 8 bytes of state per trainable parameter), adamw_8bit (bitsandbytes' block-wise 8-bit states: 2 bytes), or paged_adamw / paged_adamw_8bit (bitsandbytes' states in CUDA unified memory, paged to the CPU under memory pressure; on a CPU the same as unpaged).")
    warmup_steps: int = _f(0, "Steps of linear warm-up to `learning_rate`: update k (from 0) of the first W runs at (k+1)/(W+1) x learning_rate, so none is spent at 0 (transformers' Trainer uses k/W); the schedule follows.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay; never applied to 1-D parameters: biases, norm weights, DoRA's magnitudes and LLaMA-Adapter's gates (transformers' Trainer decays the last two, shrinking what they scale).")
    max_grad_norm: float = _f(1.0, "Clip the global gradient L2 norm to this value (0 = no clipping).")
    neftune_alpha: Optional[float] = _f(None, "NEFTune noise alpha (e.g. 5); None or 0 = off. Training only. Each embedding gets uniform noise of half-width alpha / sqrt(L x hidden), L the padded length of the forward's rows, as in transformers (so pad_to_multiple_of and max_forward_tokens change its size a little).")
    dtype: str = _f("auto", "Compute dtype: auto (bf16 where the hardware supports it, else fp32), bf16, fp16 or fp32. Trainable weights and optimizer state stay fp32.")
    target_logits_only: bool = _f(True, "Compute the output layer only at positions that carry loss: the same loss and gradients as full logits, with less time and memory (Llama-, Qwen-, Mistral-, GPT-2-style models; others always use full logits).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory. Each forward also gets longer (max_forward_tokens: auto), so on a CPU whose matrix products are fast (AMX) it can be faster too; see benchmarks/README.md.")
    activation_offloading: bool = _f(False, "With gradient_checkpointing on a CUDA device: keep what checkpointing saves, each decoder layer's input (layers x tokens x hidden x 2 bytes), in pinned host memory instead of device memory; it is copied out during the forward and back for the recompute (transformers' activation_checkpointing_enable(offload=True)). Frees that much device memory for longer rows or bigger batches, at the cost of the copies; max_forward_tokens: auto then counts one block a token. Needs gradient_checkpointing: true; on a CPU there is nothing to offload and it is ignored with a message.")
    fused_blocks: bool = _f(True, "Run the RMSNorm and SiLU-gate of Llama, Mistral, Qwen2 and Qwen3 blocks as tsugiki's fused functions while training: the same values, fewer bytes kept for the backward pass (the norm keeps its bf16 input instead of an fp32 copy; the gate recomputes silu). On k-bit bases the fp32 norms hand bf16 to the layers after them, so activations stay 16-bit as on a 16-bit base. false: the model's own modules.")
    fast_attention: bool = _f(True, "On a CPU, run bf16 attention of models that use transformers' SDPA as batched bf16 matrix products while training (tsugiki.kernels.attention): 1.2-4x faster than torch's CPU flash kernel up to ~1k tokens a row (~500 on CPUs with AMX), at the precision of transformers' eager attention (scores and probabilities rounded to bf16). Longer rows, other devices and dtypes use SDPA. false: SDPA throughout.")
    fsdp: bool = _f(False, "Shard the model's weights across processes with FSDP2 (each process keeps about 1/N of them): for models too big for one device; needs torchrun with 2+ processes (--nproc_per_node 2+).")
    seed: int = _f(42, "Random seed: same seed, same data, same config = same adapter.")
    # --- bookkeeping
    logging_steps: int = _f(10, "Write a metrics line every N optimizer steps.")
    eval_steps: int = _f(0, "Evaluate every N steps (0 = only at the end); needs evaluation data.")
    keep_best: bool = _f(False, "End the run with the trainable weights of the evaluation with the lowest eval loss (every eval_steps and at the end), not the last step's; summary.json names its step. Holds a copy of the trainable weights in memory (for method: full, of the whole model). Needs eval_steps and evaluation data; not with fsdp.")
    early_stopping_patience: int = _f(0, "Stop the run after this many evaluations in a row without a lower eval loss than the best so far (0 = never stop early); with keep_best, the best adapter is what is saved. Needs eval_steps and evaluation data.")
    save_steps: int = _f(200, "Save a resumable checkpoint every N steps and at the end (0 = never).")
    save_total_limit: Optional[int] = _f(2, "Keep only the newest N checkpoints (None = keep all).")
    tensorboard: bool = _f(True, "Write TensorBoard logs to output_dir/runs when tensorboard is installed.")

    def __post_init__(self):
        # Direct construction gets the same coercion as YAML and the command line (5 -> 5.0, "true" -> True).
        for key, value in _coerce_all(dataclasses.asdict(self), "TrainConfig()").items():
            setattr(self, key, value)
        self.validate()

    # ------------------------------------------------------------------ build
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; strings are coerced, unknown keys rejected (``source`` names the origin)."""
        return cls(**_coerce_all(values, source))

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> "TrainConfig":
        """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (which win)."""
        values: dict[str, Any] = {}
        if path is not None:
            path = os.path.expanduser(os.fspath(path))
            values.update(_coerce_all(_read_yaml(path), f"config file {path}"))
        if overrides:
            values.update(_coerce_all(overrides, "the settings given"))
        return cls(**values)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (coerced and validated)."""
        return dataclasses.replace(self, **_coerce_all(changes, "replace()"))

    # ------------------------------------------------------------------ check
    def validate(self) -> None:
        """Reject invalid values, naming the key and what is allowed."""
        def bad(key: str, why: str):
            raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        for key in ("lora_r", "batch_size", "grad_accum", "logging_steps", "pad_to_multiple_of"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if not 0 < self.num_epochs < float("inf"):
            bad("num_epochs", "must be a number of passes > 0 (fractions allowed)")
        if self.max_length < 2:
            bad("max_length", "must be >= 2 (a token and the next one to predict)")
        for key in ("warmup_steps", "save_steps", "eval_steps", "seed", "early_stopping_patience"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", "must be a positive number of steps, or -1 to use num_epochs")
        if not 0 < self.learning_rate < float("inf"):
            bad("learning_rate", "must be a finite number > 0")
        for key in ("weight_decay", "max_grad_norm", "lora_alpha"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.eval_split < 0 or (self.eval_split >= 1 and not float(self.eval_split).is_integer()):
            bad("eval_split", "must be a fraction in [0, 1) or a whole number of rows")
        if self.neftune_alpha is not None and self.neftune_alpha < 0:
            bad("neftune_alpha", "must be >= 0 (or None to turn NEFTune off)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad("save_total_limit", "must be >= 1, or None to keep every checkpoint")
        if self.max_rows is not None and self.max_rows < 1:
            bad("max_rows", "must be >= 1, or None for all rows")
        for key, allowed in (("lr_scheduler", SCHEDULERS), ("optimizer", OPTIMIZERS), ("dtype", DTYPES),
                             ("quantization", QUANTIZATIONS), ("train_on", TRAIN_ON)):
            if getattr(self, key) not in allowed:
                hint = difflib.get_close_matches(str(getattr(self, key)), allowed, n=1)
                bad(key, f"must be one of {', '.join(allowed)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if not self.output_dir:
            bad("output_dir", "must be a directory path")
        if self.activation_offloading and not self.gradient_checkpointing:
            bad("activation_offloading", "offloads what gradient checkpointing keeps: set gradient_checkpointing: true "
                "as well (or activation_offloading: false)")
        for key in ("keep_best", "early_stopping_patience"):
            if getattr(self, key) and not self.eval_steps:
                bad(key, "compares evaluations during the run: set eval_steps as well (e.g. 50), with eval_split "
                    "or eval_data")
        if self.keep_best and self.method == "adalora":
            bad("keep_best", "is not available with method adalora: its rank allocation keeps changing which "
                "triplets the saved adapter holds, so an earlier step's weights do not fit the final pattern")
        if self.keep_best and self.fsdp:
            bad("keep_best", "is not available with fsdp: true (each process holds only a shard of the weights); "
                "use early_stopping_patience and the checkpoints (save_steps) instead")
        if not (self.resume is False or (isinstance(self.resume, str) and self.resume)):
            bad("resume", "must be 'auto', a checkpoint path, or false")

    def no_eval_rows_error(self) -> "ConfigError":
        """What to raise when eval_steps asks for evaluations and no rows are held out (HF's Trainer
        refuses this too), instead of never evaluating."""
        return ConfigError(f"eval_steps={self.eval_steps} evaluates held-out rows and there are none: set "
                          "eval_split (e.g. 0.05) or eval_data, or eval_steps: 0")

    # ------------------------------------------------------------------ write
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str) -> str:
        """Write the resolved config as YAML (to ``path``, or ``path/train_config.yaml`` for a directory), atomically."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILENAME)
        atomic_write_text(path, self.to_yaml())
        return path


# ---------------------------------------------------------------------- coercion
def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue  # the keys a config can hold are names
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(f"key {key!r} is given twice (lines {first_line[key]} and {line})")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a folder; give the YAML file in it")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
        except _DuplicateKey as err:
            raise ConfigError(f"config file {path!r}: {err}; keep one") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path!r} is not UTF-8 text; give a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of key: value, got {type(data).__name__}")
    return data


# Names of transformers' TrainingArguments / TRL's SFTConfig and what tsugiki calls them.
HF_KEY_NAMES = {
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "num_epochs", "lr_scheduler_type": "lr_scheduler", "optim": "optimizer",
    "max_seq_length": "max_length", "neftune_noise_alpha": "neftune_alpha", "bf16": "dtype",
    "fp16": "dtype", "model_name_or_path": "model", "dataset_name": "data", "train_file": "data",
    "resume_from_checkpoint": "resume", "eval_strategy": "eval_steps", "save_strategy": "save_steps",
    "r": "lora_r", "warmup_ratio": "warmup_steps", "load_best_model_at_end": "keep_best",
}


# Settings of other stacks that tsugiki covers another way: what to do instead.
HANDLED_OTHERWISE = {
    "modules_to_save": "it is a LoRA option: give it in method_args ({modules_to_save: [embed_tokens]} in a "
                       "config file, --method_args modules_to_save=embed_tokens on the command line)",
    "auto_find_batch_size": "not needed: a micro-batch that runs out of memory is halved and retried "
                            "(batch_size sets where it starts)",
    "use_cache": "not needed: training turns the model's KV cache off by itself",
    "dataset_text_field": "rows with a 'text' field are trained as plain text, and other fields name their "
                          "format (instruction/output, prompt/completion, messages, ShareGPT "
                          "conversations, ...)",
    "load_in_4bit": "use quantization: 4bit (or method: qlora)",
    "load_in_8bit": "use quantization: 8bit",
    "bnb_4bit_quant_type": "quantization: 4bit is NF4 (in Python, tsugiki.load_model(..., quant_type='fp4'))",
    "bnb_4bit_use_double_quant": "quantization: 4bit uses double quantization (in Python, "
                                 "tsugiki.load_model(..., double_quant=False) turns it off)",
    "bnb_4bit_compute_dtype": "dtype sets the compute dtype (auto: bf16 where the hardware has it)",
    "metric_for_best_model": "keep_best: true keeps the evaluation with the lowest eval loss, the metric "
                             "evaluated during training",
}


def handled_otherwise(key: str) -> Optional[str]:
    """What to do instead of setting ``key``, for a setting of another stack that tsugiki covers another way."""
    return HANDLED_OTHERWISE.get(key.lstrip("-").replace("-", "_"))


def suggest_key(key: str, valid: Sequence[str]) -> Optional[str]:
    """The config key someone typing ``key`` most likely meant: tsugiki's name for a Hugging Face
    training argument, else the closest spelling among ``valid``, else None."""
    if key in HF_KEY_NAMES and HF_KEY_NAMES[key] in valid:
        return HF_KEY_NAMES[key]
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return close[0] if close else None


_PATH_KEYS = ("model", "data", "eval_data", "output_dir", "resume")


def _coerce_all(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in hints:
            close = suggest_key(key, list(hints))
            instead = handled_otherwise(key)
            hint = (f": {instead}" if instead else f"; did you mean {close!r}?" if close
                    else f"; valid keys: {', '.join(hints)}")
            raise ConfigError(f"unknown key {raw_key!r} in {source}{hint}")
        if key in ("data", "eval_data") and value is not None and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(
                f"{key} in {source} is a {type(value).__name__}; it must be the path of a data file (jsonl, json, "
                "csv, parquet) or of a saved datasets folder. Write in-memory rows to a file first (e.g. "
                "datasets.Dataset.from_list(rows).to_json('train.jsonl')), or give tokenized examples to "
                "tsugiki.train.Trainer")
        try:
            out[key] = _coerce(key, value, hints[key])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={reprlib.repr(value)} in {source}: {err}") from None
        if key in _PATH_KEYS and isinstance(out[key], str) and out[key].startswith("~"):
            out[key] = os.path.expanduser(out[key])  # a YAML file or a quoted flag: no shell expanded it
    return out


_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to the type ``hint`` (strings from the command line included)."""
    if key == "resume":  # 'auto' | path | False
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _FALSE | _NONE):
            return False
        if value is True or (isinstance(value, str) and value.strip().lower() in _TRUE):
            return "auto"
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise TypeError("expected 'auto', a checkpoint path, or false")
    if key == "max_forward_tokens":  # 'auto' | int >= 0
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        why = "expected 'auto', 0 (no limit) or a positive number of tokens"
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            raise TypeError(why) from None
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise TypeError(why)
        return number
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is Union and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, str) and value.strip().startswith("{"):  # a JSON object or YAML flow mapping
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise TypeError(f"expected a mapping such as {{\"num_virtual_tokens\": 20}} "
                                f"({getattr(err, 'problem', None) or err})") from None
        if isinstance(value, str):  # key=value,key=value; each value read as YAML (numbers, booleans, lists)
            pairs = [part for part in value.split(",") if part.strip()]
            if not all("=" in part for part in pairs):
                raise TypeError("expected key=value pairs separated by commas")
            value = {k.strip(): yaml.safe_load(v) for k, v in (part.split("=", 1) for part in pairs)}
        if not isinstance(value, dict):
            raise TypeError("expected a mapping of option: value")
        return dict(value)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of names (comma-separated on the command line)")
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError("expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise TypeError("expected an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = _number(value, "an integer")  # accepts "1e3"
            if number.is_integer():
                return int(number)
        raise TypeError("expected an integer")
    if hint is float:
        if isinstance(value, bool):
            raise TypeError("expected a number, got a boolean")
        return _number(value, "a number") if isinstance(value, str) else float(value)
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError("expected a string")
        return os.fspath(value)
    return value


def _number(text: str, kind: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TypeError(f"expected {kind}, got the text {text!r}") from None


# ---------------------------------------------------------------------- CLI
def add_config_arguments(parser: argparse.ArgumentParser, config_flag: bool = True) -> argparse.ArgumentParser:
    """Expose every TrainConfig key as ``--key`` (also ``--key-with-dashes``), help from the field.

    Arguments default to ``argparse.SUPPRESS`` so only what the user typed
    overrides the YAML file; values are strings, coerced by ``config_from_args``.
    A boolean key given alone (``--packing``) means true.
    """
    if config_flag:
        parser.add_argument("--config", default=None, metavar="YAML", help="YAML file of training keys; --key value flags override it.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
        if hints[f.name] is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar=f.name.upper())
        parser.add_argument(*flags, **kw)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the TrainConfig from parsed arguments: ``--config`` file, then the given ``--key`` values."""
    given = vars(args)
    names = set(TrainConfig.field_names())
    overrides = {k: v for k, v in given.items() if k in names}
    return TrainConfig.load(given.get("config"), overrides)

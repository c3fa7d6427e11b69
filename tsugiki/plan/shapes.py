"""An architecture's dimensions and parameter groups, from its config alone.

Llama-style models, GPT-2 and BERT by formula; other transformers architectures
read off the model built on torch's meta device (no weights).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .sources import LLAMA_LIKE, load_config


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

    from ..inject import DEFAULT_TARGETS

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

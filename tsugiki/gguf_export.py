"""Write a merged model back as one GGUF file, in the layout of the GGUF file its base came from.

For llama.cpp and Ollama users who fine-tuned a GGUF base (the built-in default, or any
Llama-architecture GGUF file): :func:`save_gguf` writes the merged weights into a new
GGUF file that is the source file with new weights.

What is copied from the source GGUF file:

* every metadata key/value, in the source's order and with its GGUF value type
  (``general.*``, the ``llama.*`` hyperparameters, ``tokenizer.ggml.*`` with the
  tokens, merges and pre-tokenizer name, ``tokenizer.chat_template``); strings are
  copied as their bytes, numbers with their GGUF type, so nothing is re-encoded;
* the tensor names and their order; a source tensor the model has no parameter for
  (e.g. ``rope_freqs.weight``, computed from the config by transformers) is copied
  as it is, in its own type;
* a tied output: a source without ``output.weight`` gets none (llama.cpp reads the
  embedding for it), and the merged model's ``lm_head`` must then still equal its
  embedding.

What changes: the tensors' data and type, ``general.file_type`` (the
``LlamaFileType`` of ``tensor_type``) and ``general.quantization_version``
(``GGML_QUANT_VERSION``, as llama.cpp writes it). Each tensor is found by mapping the
model's state-dict names with gguf's own tensor-name map
(``gguf.get_tensor_name_map``, as transformers does when it loads a GGUF file).

The q/k permutation: llama.cpp stores the rows of ``attn_q`` and ``attn_k`` (weights
and biases) of each head with the two rotary halves interleaved, and transformers
undoes that on load (its ``LlamaTensorProcessor``). Writing applies it again; with
``d`` the head size, head ``h``, ``i < d/2`` and ``j`` in ``{0, 1}``::

    gguf_row[h*d + 2*i + j] = hf_row[h*d + j*d/2 + i]

over ``n_head`` heads for ``attn_q`` and ``n_head_kv`` heads for ``attn_k``
(``llama.attention.head_count`` / ``head_count_kv`` of the source).

Type policy (``tensor_type``, default ``"f16"``): tensors of two or more
dimensions take ``tensor_type``; 1-D tensors (the norms, biases) stay F32, as
llama.cpp writes them. A matrix whose rows do not split into the quantized
type's blocks (32 values for q8_0, q4_0, q4_1) is written in F16 instead, with a
warning, as llama.cpp's converter does. The types: ``f32``, ``f16``, ``bf16``,
``q8_0``, ``q4_0``, ``q4_1`` (quantized by ``gguf.quants``, llama.cpp's reference
rounding; ``f32`` keeps the merge exact).

Only the ``llama`` GGUF architecture is written (its name map and permutation are the
ones verified here); other GGUF architectures are refused before anything loads.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import nn

# --gguf-type's choices, named as llama.cpp's converter names them (its --outtype).
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1")
DEFAULT_GGUF_TYPE = "f16"
SUPPORTED_ARCHITECTURES = ("llama",)
# How to get a GGUF file when this module cannot write one.
CONVERT_HINT = ("merge into a folder instead (tsugiki merge ... --output merged_model) and convert that with "
                "llama.cpp's convert_hf_to_gguf.py merged_model --outfile merged.gguf")
# Header pseudo-fields GGUFReader lists among the metadata (magic, version, counts): the writer writes its own.
_HEADER_FIELDS = "GGUF."


def _types() -> dict[str, tuple[Any, Any]]:
    """--gguf-type -> (the tensor type of the matrices, the file's ``general.file_type``)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1)}


def is_gguf_path(path: str | os.PathLike) -> bool:
    """Whether an output path names a GGUF file (ends in ``.gguf``, any case)."""
    return os.fspath(path).lower().endswith(".gguf")


# ----------------------------------------------------------------------------- checks before loading
def check_gguf_source(source_gguf: str | os.PathLike, tensor_type: str = DEFAULT_GGUF_TYPE) -> None:
    """Refuse, before a model loads, a source GGUF file or a type :func:`save_gguf` cannot write.

    Raises ValueError naming what is wrong and what to do instead: a file gguf cannot
    parse, an architecture other than ``llama``, a file in the other byte order,
    metadata the writer cannot copy exactly (an empty or nested array), or a
    ``tensor_type`` this version of the ``gguf`` package cannot quantize to.
    """
    _check_tensor_type(tensor_type)
    _check_source(_reader(source_gguf), os.fspath(source_gguf))


def _check_source(reader, source: str) -> None:
    from gguf import GGUFValueType

    arch = _field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source} is a GGUF file of architecture {arch!r}; tsugiki writes GGUF files of "
                         f"architecture {', '.join(SUPPORTED_ARCHITECTURES)} only: {CONVERT_HINT}")
    if reader.byte_order != "I":
        raise ValueError(f"{source} is a GGUF file in the other byte order than this machine's; tsugiki "
                         f"writes files in this machine's order only: {CONVERT_HINT}")
    for key, field in reader.fields.items():
        if field.types and field.types[0] == GGUFValueType.ARRAY and (
                len(field.types) != 2 or field.types[1] == GGUFValueType.ARRAY):
            raise ValueError(f"{source}: its metadata key {key!r} is an empty or nested array, which the "
                             f"gguf package cannot write again: {CONVERT_HINT}")


def _check_tensor_type(tensor_type: str) -> None:
    if tensor_type not in GGUF_TYPES:
        raise ValueError(f"GGUF tensor type {tensor_type!r} is not one tsugiki writes; choose one of "
                         f"{', '.join(GGUF_TYPES)}")
    from gguf import quants

    qtype = _types()[tensor_type][0]
    try:  # gguf releases add quantizers over time: ask this one now, not halfway through a file
        quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError as error:
        raise ValueError(f"the installed gguf package cannot quantize to {tensor_type} ({error}); upgrade it "
                         "(pip install -U gguf) or choose f16, bf16 or f32") from None


def source_chat_template(source_gguf: str | os.PathLike) -> Optional[str]:
    """The ``tokenizer.chat_template`` of a GGUF file (what a file written from it carries), else None."""
    return _field_value(_reader(source_gguf), "tokenizer.chat_template")


def _reader(path: str | os.PathLike):
    """A GGUFReader of ``path``; the last one is kept while the file is unchanged, as the check before
    loading and the writing after it read the same file (parsing a vocabulary's metadata takes seconds)."""
    from .models import unreadable_gguf

    path = os.path.realpath(path)
    stat = os.stat(path)
    try:
        return _cached_reader(path, stat.st_mtime_ns, stat.st_size)
    except Exception as error:  # a cut download or another format: say so, not gguf's parser's words
        clear = unreadable_gguf(path, error)
        if clear is None:
            raise
        raise clear from error


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def _field_value(reader, key: str) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


# ----------------------------------------------------------------------------- the metadata
def _copied_metadata(reader, file_type: int) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, GGUF type, array item type) for every source key, in the source's order, with
    ``general.file_type`` and ``general.quantization_version`` set anew (added at the end if missing)."""
    from gguf import GGML_QUANT_VERSION, GGUFValueType

    changed = {"general.file_type": (int(file_type), GGUFValueType.UINT32, None),
               "general.quantization_version": (GGML_QUANT_VERSION, GGUFValueType.UINT32, None)}
    entries = []
    for key, field in reader.fields.items():
        if key.startswith(_HEADER_FIELDS) or key == "general.architecture":  # the writer's own first key
            continue
        entries.append((key, *(changed.pop(key) if key in changed else _raw_value(field))))
    entries.extend((key, *value) for key, value in changed.items())
    return entries


def _raw_value(field) -> tuple[Any, Any, Any]:
    """A reader field as (value, type, item type), strings as their bytes so that none is re-encoded."""
    from gguf import GGUFValueType

    def one(part: np.ndarray, kind) -> Any:
        return part.tobytes() if kind == GGUFValueType.STRING else part.item()

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        item = field.types[1]
        return [one(field.parts[i], item) for i in field.data], kind, item
    return one(field.parts[field.data[0]], kind), kind, None


# ----------------------------------------------------------------------------- the tensors
@dataclass
class _Planned:
    """One tensor of the new file: its name, numpy-order shape, type, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order of a q or k projection (weight or bias) from transformers' (module docstring)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"a q/k projection of {rows} rows does not split into {n_head} heads of rotary pairs")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _heads_for(gguf_name: str, n_head: int, n_head_kv: int) -> Optional[int]:
    """The head count a tensor's rows are permuted over; None for tensors left as they are."""
    if ".attn_q." in gguf_name:
        return n_head
    if ".attn_k." in gguf_name:
        return n_head_kv
    return None


def _gguf_names(state_dict: dict[str, torch.Tensor], n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> state-dict name, from gguf's name map of the llama architecture."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)
    names = {}
    for key in state_dict:
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            names[gguf_name] = key
    return names


def _converted(name: str, weight: torch.Tensor, heads: Optional[int], qtype) -> Callable[[], np.ndarray]:
    """A function making the data of the merged tensor ``name``: permuted, then converted to ``qtype``."""

    def make() -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        values = weight.detach().to("cpu", torch.float32)
        if heads is not None:
            values = permute_for_gguf(values, heads)
        with np.errstate(over="ignore"):  # an f16 overflow is reported below, with what to do
            data = quants.quantize(values.contiguous().numpy(), qtype)
        if qtype == GGMLQuantizationType.F16 and not np.isfinite(data).all():
            raise ValueError(f"the merged {name} holds values too large for f16 (they would be inf): write "
                             "the file in bf16 or f32 (--gguf-type)")
        return data

    return make


def _matrix_type(name: str, shape: tuple[int, ...], qtype):
    """The type a tensor is written in (module docstring: the type policy)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        warnings.warn(f"GGUF: {name} has rows of {shape[-1]} values, not a multiple of {qtype.name}'s blocks of "
                      f"{block}; it is written in F16", stacklevel=3)
        return GGMLQuantizationType.F16
    return qtype


def _plan(reader, state_dict: dict[str, torch.Tensor], qtype) -> list[_Planned]:
    """Every tensor of the new file, in the source's order; refuses a model that does not fit the source."""
    n_blocks = int(_field_value(reader, "llama.block_count"))
    n_head = int(_field_value(reader, "llama.attention.head_count"))
    n_head_kv = int(_field_value(reader, "llama.attention.head_count_kv") or n_head)
    names = _gguf_names(state_dict, n_blocks)
    planned, used = [], set()
    for tensor in reader.tensors:
        source_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        key = names.get(tensor.name)
        if key is None:  # no parameter of the model: nothing merged into it
            planned.append(_Planned(tensor.name, source_shape, tensor.tensor_type,
                                    lambda data=tensor.data: np.asarray(data)))
            continue
        weight = state_dict[key]
        if tuple(weight.shape) != source_shape:
            raise ValueError(f"the merged model's {key} has shape {tuple(weight.shape)}, but {tensor.name} in the "
                             f"source GGUF file has {source_shape} (a resized vocabulary or another model?): its "
                             f"tokenizer metadata would not fit; {CONVERT_HINT}")
        used.add(key)
        heads = _heads_for(tensor.name, n_head, n_head_kv)
        kind = _matrix_type(tensor.name, source_shape, qtype)
        planned.append(_Planned(tensor.name, source_shape, kind, _converted(tensor.name, weight, heads, kind)))
    _check_nothing_left_out(state_dict, used, names)
    return planned


def _check_nothing_left_out(state_dict: dict[str, torch.Tensor], used: set[str], names: dict[str, str]) -> None:
    """Every model weight went into the file, but a tied output that still equals the embedding."""
    embedding = names.get("token_embd.weight")
    for key, weight in state_dict.items():
        if key in used:
            continue
        if names.get("output.weight") == key and embedding is not None:
            if torch.equal(weight, state_dict[embedding]):
                continue  # tied: llama.cpp uses the embedding as the output
            raise ValueError(f"the source GGUF file ties the output to the embedding, but the merged model's {key} "
                             "differs from its embedding (an adapter on lm_head or embed_tokens?); a GGUF file of "
                             f"this layout cannot hold both: {CONVERT_HINT}")
        raise ValueError(f"the model's weight {key} has no tensor in the source GGUF file: pass the merged "
                         "model (merge_and_unload()) of a base loaded from that file")


def _check_heads(reader, model: nn.Module) -> None:
    """The model's attention heads are those the source file declares (the permutation depends on them)."""
    config = getattr(model, "config", None)
    n_head = int(_field_value(reader, "llama.attention.head_count"))
    n_head_kv = int(_field_value(reader, "llama.attention.head_count_kv") or n_head)
    mine = (getattr(config, "num_attention_heads", n_head), getattr(config, "num_key_value_heads", None) or n_head)
    if mine != (n_head, n_head_kv):
        raise ValueError(f"the model has {mine[0]} attention heads ({mine[1]} for keys and values), the source "
                         f"GGUF file {n_head} ({n_head_kv}): pass the GGUF file the model was loaded from")


# ----------------------------------------------------------------------------- writing
def save_gguf(model: nn.Module, source_gguf: str | os.PathLike, path: str | os.PathLike,
              tensor_type: str = DEFAULT_GGUF_TYPE, progress: bool = True) -> None:
    """Write ``model`` (a merged transformers model loaded from ``source_gguf``) as the GGUF file ``path``.

    ``tensor_type``: ``"f16"`` (default), ``"bf16"``, ``"f32"``, ``"q8_0"``, ``"q4_0"`` or
    ``"q4_1"``; the module docstring says what is copied, what changes and which tensors
    take which type. The file is written next to ``path`` under a temporary name and
    renamed onto it when complete, so an error or Ctrl-C leaves ``path`` as it was (an
    existing file is replaced only then). ``path`` may not be ``source_gguf`` itself.
    ``progress``: a progress bar on standard error when writing takes more than a second.
    """
    from .fileio import atomic_path

    source_gguf, path = os.fspath(source_gguf), os.fspath(path)
    if os.path.exists(path) and os.path.samefile(source_gguf, path):
        raise ValueError(f"{path} is the source GGUF file itself; write the merged model to another path")
    _check_tensor_type(tensor_type)
    reader = _reader(source_gguf)
    _check_source(reader, source_gguf)
    qtype, file_type = _types()[tensor_type]
    _check_heads(reader, model)
    planned = _plan(reader, model.state_dict(), qtype)
    metadata = _copied_metadata(reader, file_type)
    with atomic_path(path) as tmp:
        _write(tmp, metadata, planned, progress)


def _write(path: str, metadata: list[tuple[str, Any, Any, Any]], planned: list[_Planned], progress: bool) -> None:
    """Header, metadata and tensor index first, then each tensor's data made and written one at a time."""
    from gguf import GGUFWriter
    from tqdm.auto import tqdm

    writer = GGUFWriter(path, arch=SUPPORTED_ARCHITECTURES[0])
    try:
        for key, value, kind, item in metadata:
            if key == "general.alignment":  # the writer pads the tensors to it, so it must know it
                writer.add_custom_alignment(int(value))
            else:
                writer.add_key_value(key, value, kind, item)
        for tensor in planned:
            # The shape in elements (numpy order), not bytes: float32 tells the writer so.
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                                   raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.nbytes for t in planned), unit="B", unit_scale=True, desc="writing GGUF",
                  disable=not progress, delay=1.0) as bar:
            for tensor in planned:
                writer.write_tensor_data(tensor.data())
                bar.update(tensor.nbytes)
    finally:
        writer.close()

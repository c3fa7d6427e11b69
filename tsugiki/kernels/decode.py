"""Linear layers on one row of bf16 activations on a CPU, by the kernel that is fastest there.

Generating for one prompt multiplies every weight by a single row per token.
torch sends a bf16 ``(1, in) x (in, out)`` product on a CPU through oneDNN's
matrix-matrix kernel, which at one row is slow. Two other kernels compute the
same product, and which is faster depends on the CPU
(``benchmarks/decode_linear.py``, median of 200 calls):

* ``"mv"``, ``torch.mv``: on a 2-core Xeon with AMX, 1.2-1.7x oneDNN's speed
  (576 x 1536: 32 us against 54 us; 2048 x 8192: 0.69 ms against 0.99 ms),
  and generation 1.28x transformers' own; on a 2-core AMD EPYC with
  AVX512-BF16 and no AMX, 0.47-0.69x, and generation 0.82x;
* ``"native"``, ``F.linear`` with oneDNN switched off for the call (torch's
  own CPU matrix product): on that EPYC, 0.9-2.3x oneDNN's speed with the
  weight in cache (even on SmolLM2's MLP shapes; the 576 x 49152 output layer
  2.4 ms against 4.6 ms), and generation 1.8x transformers' own
  (``benchmarks/inference_overhead.py``), where each weight comes from memory.

:data:`ROW_KERNEL` is ``"mv"`` where torch reports AMX tiles, ``"native"``
elsewhere. All three accumulate in fp32 and round once to bf16, with the same
errors against an fp64 product (and the same agreement with an fp32 model's
next token, ``decode_linear.py --model``). From two rows on oneDNN is as fast
or faster (8 rows: 2-6x faster than ``"native"``), and fp16's matrix-vector
kernel is 3x slower than its matrix-matrix one, so only one bf16 row takes the
other path:

    linear(x, W, b) = row_kernel(x, W, b)   (x one bf16 row on a CPU, no autograd)
                    = F.linear(x, W, b)     otherwise

``"native"`` switches oneDNN off through torch's process-wide flag for the
length of one product: another thread's bf16 product at that moment takes
torch's own kernel too (the same result to rounding, at that kernel's speed).

:func:`single_row_decoding` routes a model's plain ``nn.Linear`` layers through
:func:`linear` for the duration of a ``with`` block; tsugiki's generation
(``PeftModel.generate``, ``tsugiki generate``, ``chat`` and ``eval``) runs
inside it. LoRA layers do the same for their base product
(``LoraLinear._inference_forward``), so a bare base and an adapted model
compute their base products alike; for the length of a ``generate`` call a
LoRA layer's base weight of up to 2^21 elements carries the adapter's ``A``
in extra rows, and at one row :func:`stacked_row` computes ``W x`` and
``A x`` in one product and adds the update with one more call.
"""

from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import has_amx

# torch's switch for oneDNN (private; without it "native" is plain F.linear)
_get_onednn = getattr(torch._C, "_get_mkldnn_enabled", None)
_set_onednn = getattr(torch._C, "_set_mkldnn_enabled", None)


def _mv_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


# The switch is process-wide: threads decoding at once share one "off" period, counted, so the last one
# out restores what the first one in found (each saving and restoring its own could leave it off for good).
_onednn_lock = threading.Lock()
_onednn_users = [0, True]  # threads inside _without_onednn, the setting found by the first


@contextmanager
def _without_onednn() -> Iterator[None]:
    with _onednn_lock:
        if _onednn_users[0] == 0:
            _onednn_users[1] = _get_onednn()
            _set_onednn(False)
        _onednn_users[0] += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn_users[0] -= 1
            if _onednn_users[0] == 0:
                _set_onednn(_onednn_users[1])


def _native_row(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _set_onednn is None:
        return F.linear(x, weight, bias)
    with _without_onednn():
        return F.linear(x, weight, bias)


ROW_KERNELS = {"mv": _mv_row, "native": _native_row}
# The one measured fastest on a CPU of each kind (see the module docstring).
ROW_KERNEL = "mv" if has_amx() else "native"


def is_single_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes :data:`ROW_KERNEL` for ``x`` and ``weight``."""
    return (x.numel() == x.shape[-1] and x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16
            and x.device.type == "cpu" and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one bf16 CPU row without autograd goes through :data:`ROW_KERNEL`.

    A strided input of several rows is made contiguous first. transformers
    computes the first new token's logits from ``hidden[:, -1:, :]``, a view
    whose rows are not adjacent; ``matmul`` then multiplies it batch by batch
    against a copy of the weight per row (8 rows: 8 copies of SmolLM2's 56 MB
    output layer, 0.35-0.7 s per ``generate`` call on a 2-core CPU), where
    copying the rows costs a few microseconds.
    """
    if not is_single_row(x, weight):
        if x.dim() > 2 and not x.is_contiguous():
            x = x.contiguous()
        return F.linear(x, weight, bias)
    return ROW_KERNELS[ROW_KERNEL](x, weight, bias)


def stacked_row(x: torch.Tensor, stack: torch.Tensor, bias: Optional[torch.Tensor], sizes: list[int],
                update: torch.Tensor, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W x + b + U (A x)`` for one bf16 row ``x``, from one product with the stacked ``[W; A]``.

    ``stack`` is ``[W; A]`` ((out + r) x in), ``bias`` ``[b; 0]`` (or None),
    ``sizes`` ``[out, r]`` and ``update`` the ``out x r`` matrix ``U`` as a
    column-major view (``U^T`` contiguous), all bf16::

        [y; z] = row_kernel([W; A], x) + [b; 0]     (one product: y = W x + b and z = A x)
        y     *= scale; y += shift                   (when given: DoRA's factor and bias term)
        y     += U z                                 (one addmv_, in place)

    At one row every torch call costs microseconds whatever its size, so the
    number of calls is what the low-rank update costs. The ``addmv_`` runs
    with oneDNN off: torch's own kernel walks ``U``'s contiguous columns with
    fp32 sums, 2-5 us on SmolLM2's shapes against 18-24 us through oneDNN.
    Returns ``y``, shaped like ``x`` with ``out`` features.
    """
    if _set_onednn is None:
        y, z = F.linear(x, stack, bias).split_with_sizes(sizes, -1)
        _scale_and_shift(y, scale, shift)
        y.view(-1).addmv_(update, z.view(-1))
        return y
    native = ROW_KERNEL == "native"
    if not native:
        y, z = ROW_KERNELS[ROW_KERNEL](x, stack, bias).split_with_sizes(sizes, -1)
    with _without_onednn():  # one switch for both calls where the row kernel is "native"
        if native:
            y, z = F.linear(x, stack, bias).split_with_sizes(sizes, -1)
        _scale_and_shift(y, scale, shift)
        y.view(-1).addmv_(update, z.view(-1))
    return y


def _scale_and_shift(y: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> None:
    if scale is not None:
        y.mul_(scale)
    if shift is not None:
        y.add_(shift)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def routed(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` currently routed through :func:`linear`."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _linear_forward


@contextmanager
def single_row_decoding(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s plain CPU ``nn.Linear`` layers compute through :func:`linear`.

    Every dtype is routed, not only bf16: the strided first-token input costs
    fp32 layers a weight copy per row too (SmolLM2's output layer at 8 rows:
    50 ms against 19 ms contiguous). Yields how many layers were routed (none
    with ``enabled=False``). Layers on another device, layers whose ``forward``
    is already replaced (accelerate's offload hooks, an enclosing block) and
    subclasses of ``nn.Linear`` (bitsandbytes' k-bit layers among them) are
    left alone; on exit each routed layer gets its class's ``forward`` back.
    """
    routed_layers = []
    if enabled:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is nn.Linear and "forward" not in module.__dict__ and weight is not None
                    and weight.device.type == "cpu"):
                module.forward = types.MethodType(_linear_forward, module)
                routed_layers.append(module)
    try:
        yield len(routed_layers)
    finally:
        for module in routed_layers:
            if routed(module):
                del module.forward

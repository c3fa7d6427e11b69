"""A C kernel for LoRA's update on bf16 rows on a CPU, built on first use; torch's products otherwise.

Generating for a batch of prompts adds, at every new token and in every adapted
layer, ``(x A^T)(s B^T)`` for a handful of rows. torch computes it with a cast,
two small products and an add, and at 8 rows each of those calls costs 10-25 us
whatever its size (oneDNN's bf16 products 20-22 us, MKL's fp32 ``mm`` 9-21 us):
25-45 us a layer in a hot loop, and SmolLM2-135M with every linear adapted
generated at 0.80-0.84 of the bare base's tokens/s at batch 8.
``lowrank_rows.c`` does the whole update in one call, 5.5-10 us on SmolLM2's
shapes in a hot loop and 10-19 us inside the model, which then generates at
0.92-0.94 of the base (``benchmarks/inference_overhead.py``; the Generation
section of ``benchmarks/README.md``).

The kernel needs AVX-512 (F, BW, VL: torch's ``"AVX512"`` CPU capability and
up) and a C compiler (``$CC``, else ``cc`` or ``gcc``). It is compiled once
into ``$TSUGIKI_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tsugiki``, else
``~/.cache/tsugiki``) under a name that hashes its source and flags (a new
build deletes those of other sources older than 30 days), loaded
with ``ctypes``, and checked against torch on a small input before its first
use. Where any of that fails, or ``TSUGIKI_NATIVE_KERNELS=0``,
:func:`lowrank_rows_kernel` returns None and the callers keep torch's products;
the reason is logged once (logger ``tsugiki.kernels``, level INFO).

Numerics: the kernel reads ``A`` and ``s B`` rounded to bf16 (as the one-row
path of ``decode.stacked_row`` does), which halves the adapter weights read per
token; in a decode step they come from memory, 19.5 MB a step for SmolLM2 with
every linear adapted at r 16 in fp32. That rounding moves the update by about
2^-9 of itself, less than rounding the output to bf16 moves it. ``z = x A^T``,
the products and the sum with the base output run in fp32, and each output is
rounded to bf16 once, as torch's ``add_`` of an fp32 update rounds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("tsugiki.kernels")

SOURCE = Path(__file__).with_name("lowrank_rows.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fPIC", "-shared")
# Inputs of more rows than this (a prompt rather than a decoding step) are split into one block of rows per
# torch thread, run by a thread each: ctypes lets go of the GIL for the call.
SPLIT_ROWS = 128
# The kernel's z buffer holds 64 ranks per row (MAX_RANK in lowrank_rows.c).
MAX_RANK = 64


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TSUGIKI_CACHE_DIR``, else ``$XDG_CACHE_HOME/tsugiki`` or ``~/.cache/tsugiki``."""
    explicit = os.environ.get("TSUGIKI_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsugiki"


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """The kernel's shared library, compiled into :func:`cache_dir` unless a build of this source is there."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join(FLAGS).encode()).hexdigest()[:16]
    library = cache_dir() / f"lowrank_rows-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f"{library.name}.{os.getpid()}.partial")  # never a half-written library
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[:500]}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    _prune_old_builds(library)
    return library


# Builds of other sources (older tsugiki versions) are removed once they are this old: one still in use
# elsewhere is at worst built again, in a second or two.
STALE_BUILD_SECONDS = 30 * 24 * 3600


def _prune_old_builds(kept: Path) -> None:
    """Delete the other ``lowrank_rows-*.so`` in ``kept``'s folder built more than STALE_BUILD_SECONDS ago."""
    cutoff = time.time() - STALE_BUILD_SECONDS
    for old in kept.parent.glob("lowrank_rows-*.so"):
        try:
            if old != kept and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # another process pruned it first, or the folder is read-only: nothing to do
            pass


def _bind(library: Path) -> Callable[..., None]:
    lib = ctypes.CDLL(str(library))
    if lib.lowrank_rows_max_rank() != MAX_RANK:
        raise RuntimeError(f"{library} holds {lib.lowrank_rows_max_rank()} ranks, tsugiki expects {MAX_RANK}")
    kernel = lib.lowrank_rows_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernel.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    kernel.restype = None
    return kernel


def _self_check(kernel: Callable[..., None]) -> None:
    """Run the kernel on a small input against torch's fp32 update from the same bf16 weights; raise when they part."""
    generator = torch.Generator().manual_seed(0)
    rows, inputs, outputs, rank = 11, 37, 45, 5  # a short row block, a column tail, padded ranks
    x = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
    y = torch.randn(rows, outputs, generator=generator).to(torch.bfloat16)
    A = torch.randn(rank, inputs, generator=generator).to(torch.bfloat16)
    scaled_B_t = torch.randn(rank, outputs, generator=generator).to(torch.bfloat16)
    want = y.float().add(x.float() @ A.float().t() @ scaled_B_t.float()).to(torch.bfloat16)  # the sums' order differs
    got = y.clone()
    LowRankRows(kernel, A, scaled_B_t).add_(got, x)
    if not torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -8 * want.abs().max().item()):
        raise RuntimeError(f"it differs from torch by {(got.float() - want.float()).abs().max().item():.3g}")


@functools.lru_cache(maxsize=None)
def lowrank_rows_kernel() -> Optional[Callable[..., None]]:
    """The C kernel, built and checked on the first call; None where it cannot run here (reason logged)."""
    if os.environ.get("TSUGIKI_NATIVE_KERNELS", "1") == "0":
        reason = "TSUGIKI_NATIVE_KERNELS=0"
    elif os.name != "posix" or not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        reason = f"the CPU does not offer AVX-512 to torch ({torch.backends.cpu.get_cpu_capability()})"
    elif _compiler() is None:
        reason = "no C compiler (set $CC, or install cc/gcc)"
    else:
        try:
            kernel = _bind(_build(_compiler()))
            _self_check(kernel)
            return kernel
        except Exception as error:  # noqa: BLE001 - any failure leaves torch's products in place
            reason = f"building or checking {SOURCE.name} failed: {error}"
    log.info("LoRA's several-row update uses torch's products: %s", reason)
    return None


class LowRankRows:
    """LoRA's update ``(x A^T)(s B^T)`` on bf16 rows, in one call of the C kernel (a few for many rows).

    Holds bf16 copies of ``A^T`` (in x rp) and ``s B^T`` (rp x out), the rank
    padded with zeros to ``rp``, a multiple of 16; build one with :meth:`build`
    for as long as the adapter stays as it is (one ``generate`` call).
    """

    __slots__ = ("_kernel", "_A_t", "_U_t", "_a_ptr", "_u_ptr", "_inputs", "_outputs", "_padded_rank", "_split_inputs")

    def __init__(self, kernel: Callable[..., None], A: torch.Tensor, scaled_B_t: torch.Tensor) -> None:
        rank, self._inputs = A.shape
        self._outputs = scaled_B_t.shape[1]
        self._padded_rank = -(-rank // 16) * 16
        self._A_t = torch.zeros(self._inputs, self._padded_rank, dtype=torch.bfloat16)
        self._A_t[:, :rank] = A.detach().t()
        self._U_t = torch.zeros(self._padded_rank, self._outputs, dtype=torch.bfloat16)
        self._U_t[:rank] = scaled_B_t.detach()
        self._a_ptr, self._u_ptr = self._A_t.data_ptr(), self._U_t.data_ptr()
        self._kernel = kernel
        self._split_inputs = SPLIT_ROWS * self._inputs

    @classmethod
    def build(cls, A: torch.Tensor, scaled_B_t: torch.Tensor) -> Optional["LowRankRows"]:
        """For ``A`` (r x in) and ``s B^T`` (r x out) on a CPU; None without the kernel or above rank 64."""
        if A.device.type != "cpu" or A.shape[0] > MAX_RANK:
            return None
        kernel = lowrank_rows_kernel()
        return None if kernel is None else cls(kernel, A, scaled_B_t)

    def add_(self, out: torch.Tensor, x: torch.Tensor) -> bool:
        """Add the update for ``x`` into ``out``, the base layer's fresh output for it, and return True.

        Returns False, changing nothing, when ``x`` is not a contiguous bf16
        tensor. ``out`` must be what a bf16 CPU linear layer returned for ``x``
        (contiguous, bf16, ``out`` features a row): the caller's promise, not
        checked here, where every microsecond counts. More than
        :data:`SPLIT_ROWS` rows are split across torch's thread count.
        """
        if x.dtype is not torch.bfloat16 or not x.is_contiguous():
            return False
        rows, x_ptr, out_ptr = x.numel() // self._inputs, x.data_ptr(), out.data_ptr()
        threads = torch.get_num_threads() if x.numel() > self._split_inputs else 1
        if threads > 1:
            self._add_split(rows, x_ptr, out_ptr, threads)
        else:
            self._run(rows, x_ptr, out_ptr)
        return True

    def _run(self, rows: int, x_ptr: int, out_ptr: int) -> None:
        self._kernel(rows, self._inputs, self._outputs, self._padded_rank, x_ptr, self._inputs,
                     self._a_ptr, self._u_ptr, out_ptr, self._outputs)

    def _add_split(self, rows: int, x_ptr: int, out_ptr: int, threads: int) -> None:
        """The kernel on ``threads`` blocks of rows at once, the first in this thread (2 bytes an element)."""
        block = -(-rows // (threads * 8)) * 8  # whole blocks of the kernel's 8 rows
        starts = range(block, rows, block)
        pool = _thread_pool(threads - 1)
        pending = [pool.submit(self._run, min(block, rows - start), x_ptr + 2 * start * self._inputs,
                               out_ptr + 2 * start * self._outputs) for start in starts]
        try:
            self._run(min(block, rows), x_ptr, out_ptr)
        finally:
            for done in pending:
                done.result()


_pool: Optional[ThreadPoolExecutor] = None
_pool_owner = (0, 0)  # (process id, workers) the pool was made for


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made again in a forked child (whose copy has no threads) or for another size."""
    global _pool, _pool_owner
    if _pool is None or _pool_owner != (os.getpid(), workers):
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tsugiki-lowrank")
        _pool_owner = (os.getpid(), workers)
    return _pool

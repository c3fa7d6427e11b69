"""Data-parallel training across processes through ``torch.distributed``.

Launch the same command once per process, e.g.

    torchrun --nproc_per_node 2 -m tsugiki train --data train.jsonl ...
    accelerate launch --num_processes 2 -m tsugiki train --data train.jsonl ...

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` joins the process group when
``WORLD_SIZE`` > 1 (backend ``nccl`` when CUDA is available, each process on
GPU ``LOCAL_RANK``; ``gloo`` on CPU). Without those variables every helper here
is a cheap no-op for a single process, so the trainer calls them unconditionally.

The scheme is plain data parallelism with a summed gradient (no DDP wrapper,
so it works on any module, quantized or not): every rank holds the whole
model, takes its share of each optimizer step's rows, and after backward the
gradients are summed over ranks with one coalesced ``all_reduce``. With the
loss of each rank divided by the *global* number of target tokens of the
step, the summed gradient is exactly the single-process gradient up to float
summation order:

    grad = sum over ranks r of d(loss_sum_r)/d(theta) / (sum over ranks r of targets_r)
"""

from __future__ import annotations

import array
import atexit
import datetime
import gc
import hashlib
import os
import pickle
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a rank waits in a collective before giving up (torch's default is 30 min
# for gloo and 10 min for nccl; one long checkpoint write on rank 0 must fit inside).
TIMEOUT = datetime.timedelta(minutes=30)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} in the environment is not an integer") from None


def init_distributed() -> bool:
    """Join the process group the launcher describes; True when running with more than one process.

    Idempotent: a second call (or a group the caller set up itself) is left as is.
    Sets the CUDA device to ``LOCAL_RANK`` first, so that models loaded afterwards
    onto ``"cuda"`` land on this process's own GPU.
    """
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not; "
                           "start the run with torchrun or accelerate launch")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                               "start at most one process per GPU")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    atexit.register(destroy)  # a clean shutdown, also when the caller forgets
    return True


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes training together (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0); before the process group is
    joined, the launcher's ``RANK`` says (so what is said before training starts is said once)."""
    if is_distributed() or env_world_size() <= 1:
        return rank() == 0
    return os.environ.get("RANK", "0").strip() == "0"


def local_device() -> Optional[str]:
    """``cuda:<LOCAL_RANK>`` for a multi-process CUDA run; None (the loader's own choice) otherwise."""
    if env_world_size() > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def barrier() -> None:
    """Wait until every rank gets here (e.g. for a file rank 0 writes)."""
    if is_distributed():
        dist.barrier()


def finish() -> None:
    """Leave the process group together, at the normal end of a run: every rank waits for the
    others first, so none tears its connections down while another still uses them. The run's
    objects (a sharded model, its optimizer) are collected before, while the group they use is
    still there."""
    gc.collect()
    if is_distributed():
        dist.barrier()
    destroy()


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the process's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Union[torch.Tensor, Sequence[float]]) -> Union[torch.Tensor, list[float]]:
    """Sum over ranks.

    A tensor is reduced in place and returned; a sequence of numbers comes back
    as a list of floats, summed in float64 (exact for token counts below 2**53).
    """
    if isinstance(values, torch.Tensor):
        if is_distributed():
            device = _comm_device()
            buf = values if values.device == device else values.to(device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not values:
                values.copy_(buf)
        return values
    numbers = [float(v) for v in values]
    if not is_distributed() or not numbers:
        return numbers
    buf = torch.tensor(numbers, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (it must pickle); returns it unchanged when not distributed."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (it must pickle), in rank order, on every rank; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rows_fingerprint(rows: Sequence[dict]) -> tuple[int, str]:
    """How many tokenized rows there are and a SHA-256 of their ``input_ids`` and ``labels``."""
    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "labels"):
            digest.update(array.array("q", row[key]).tobytes())
            digest.update(b"|")
    return len(rows), digest.hexdigest()


def refuse_different_rows(rows: Sequence[dict], what: str) -> None:
    """ValueError on every rank when the ranks built different ``rows`` (a stale copy of a data file on
    one node, another tokenizer version): each would plan its own steps, and training would be
    silently wrong, or hang in a collective the others never reach. A collective."""
    prints = gather_objects(rows_fingerprint(rows))
    if any(p != prints[0] for p in prints):
        counts = ", ".join(f"rank {r}: {count} rows" for r, (count, _) in enumerate(prints))
        raise ValueError(f"the processes read different {what} ({counts}, or the same number with other "
                         "content): every process must read the same data file with the same settings; "
                         "check that each node has the same copy")


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or its exception, to every rank.

    For decisions that touch the file system (e.g. which checkpoint to resume):
    one process decides and mutates, the others wait and read the answer; when
    rank 0 fails, every rank raises the same error instead of hanging.
    """
    if not is_distributed():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an exception that cannot travel goes as its text
                err = RuntimeError(f"{type(err).__name__}: {err}")
            outcome = (False, err)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def _groups(params: Iterable[torch.nn.Parameter]) -> dict[tuple[torch.dtype, torch.device], list]:
    groups: dict[tuple[torch.dtype, torch.device], list] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    return groups


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` of ``params`` over ranks, coalesced: one flat buffer and one ``all_reduce`` per dtype.

    A parameter without a gradient on a rank (it took no rows this step, or the
    parameter was not used) contributes zeros. Its ``.grad`` stays ``None`` only
    when it is ``None`` on every rank, exactly as a single process would leave
    it (AdamW then skips it; a zero gradient would still apply weight decay).
    """
    if not is_distributed():
        return
    device = _comm_device()
    for (dtype, _dev), group in _groups(params).items():
        present = [p.grad is not None for p in group]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype)
                 for p in group]
        # One count per parameter rides along: how many ranks had a gradient for it.
        parts.append(torch.tensor(present, dtype=dtype, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        counts = flat[-len(group):]
        offset = 0
        for p, count in zip(group, counts.tolist()):
            n = p.numel()
            if count > 0:
                p.grad = flat[offset:offset + n].view_as(p).to(p.device).clone()
            else:
                p.grad = None
            offset += n


def broadcast_params(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Copy ``params`` from rank ``src`` onto every rank, coalesced (one ``broadcast`` per dtype).

    Guarantees identical starting weights even where initialisation drew random
    numbers differently per process.
    """
    if not is_distributed():
        return
    device = _comm_device()
    for (dtype, _dev), group in _groups(params).items():
        flat = torch.cat([p.detach().reshape(-1).to(device, dtype) for p in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for p in group:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n


def shard(items: Sequence[T], of_rank: int | None = None, of_world: int | None = None) -> Sequence[T]:
    """This rank's contiguous share of ``items``: rank r of w gets ``items[ceil(n/w)*r : ceil(n/w)*(r+1)]``.

    The last ranks may get fewer items, or none, when ``n`` does not divide evenly.
    """
    r = rank() if of_rank is None else of_rank
    w = world_size() if of_world is None else of_world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of {w} processes")
    per = -(-len(items) // w)
    return items[per * r:per * (r + 1)]

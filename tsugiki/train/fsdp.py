"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for models too big for one device.

Turned on with ``fsdp: true`` under ``torchrun --nproc_per_node N`` (N >= 2). The
data-parallel scheme of :mod:`tsugiki.train.distributed` stays as it is (each
rank takes its share of a step's rows, the loss is divided by the step's
*global* target count, gradients are *summed* over ranks); what changes is
where the weights live:

* Every parameter, frozen base weights and trainable adapter weights alike, is
  sharded along dim 0 across the ranks (FSDP2 pads uneven splits). Each rank
  keeps about ``1/N`` of the model's bytes resident. The adapter weights are
  sharded too rather than replicated: that keeps every parameter in one kind
  of tensor (``DTensor``), so gradient clipping, the optimizer and the
  checkpoint code have one case, and the optimizer state shrinks by ``N`` as well.
* Units: every decoder layer (the classes the model lists in
  ``_no_split_modules``, else the children of its largest ``nn.ModuleList``)
  is its own unit, all-gathered just before its forward and freed after it
  (and again in backward). Modules the trainer calls directly instead of the
  root's forward (``entry_points``: the body and output head of the
  target-logits loss) are units of their own; the root takes what is left.
* Gradients are reduce-scattered with a plain SUM: FSDP's default averaging
  over ranks is switched off (divide factor 1, sum-only collectives, which gloo
  also supports). With the global-target denominator that makes the summed
  gradient the single-process gradient, as in the data-parallel path.
* Precision: no FSDP ``MixedPrecisionPolicy``. The trainer's dtype policy runs
  before sharding, so frozen weights are already stored (and all-gathered) in
  the compute dtype while trainable weights stay fp32, and the forward keeps
  the trainer's autocast: the numerics are those of a single process.
* Every forward and backward is a collective, so every rank must run the same
  number of micro-batch forwards; the trainer pads a rank that has fewer rows
  with zero-weighted forwards of a one-token batch.

The helpers below that gather (``full_*``, :func:`gathered_for_save`) are
collectives too: call them on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..data import IGNORE_INDEX
from . import distributed

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - an old or distributed-less torch build
    FSDPModule = fully_shard = DTensor = distribute_tensor = None  # type: ignore[assignment]


def available() -> bool:
    """True when this torch build has FSDP2 (``fully_shard``) and DTensor."""
    return fully_shard is not None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP-sharded (DTensor) parameters."""
    return any(is_dtensor(p) for p in model.parameters())


# ---------------------------------------------------------------------- sharding
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` to shard one by one.

    Rule: modules whose class name is in a ``_no_split_modules`` list the model (or a module
    inside it, e.g. the base model under a PEFT wrapper) declares; without one, the children of
    the largest ``nn.ModuleList`` (by parameter count). Empty when neither exists.
    """
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, (list, tuple, set)):
            names.update(str(n) for n in declared)
    if names:
        layers = [m for m in model.modules() if type(m).__name__ in names]
        # A declared class nested inside another declared one belongs to its outer unit.
        inner = {id(sub) for m in layers for sub in m.modules() if sub is not m}
        layers = [m for m in layers if id(m) not in inner]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def tied_outside(model: nn.Module, part: nn.Module) -> list[str]:
    """Names (in ``model``) of the first parameter of ``part`` that ``model`` also uses outside ``part``.

    Empty when ``part`` shares nothing with the rest, e.g. an output head with its own weight;
    an output head tied to the input embeddings gives both names.
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    within: dict[int, int] = {}
    for _name, param in part.named_parameters(remove_duplicate=False):
        within[id(param)] = within.get(id(param), 0) + 1
    for pid, n in within.items():
        if len(owners.get(pid, ())) > n:
            return owners[pid]
    return []


def shard_model(model: nn.Module, entry_points: Sequence[nn.Module] = (), reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model``'s parameters across the ranks of the process group with FSDP2, in place.

    Args:
        model: the whole model (a PEFT wrapper included); its dtype policy already applied.
        entry_points: submodules the caller will call directly instead of ``model(...)``
            (e.g. ``(body, head)`` for the target-logits loss). Each becomes its own unit.
            Once one of them has run, the root's own forward must not be called (FSDP2 picks
            the first unit that runs as root), so a caller uses one way in for the whole run.
        reshard_after_forward: free each layer's gathered weights after its forward (re-gather
            in backward); the memory-saving default.

    Wraps each decoder layer (:func:`decoder_layers`), then each entry point, then the root;
    sets gradient reduction to a plain sum over ranks. Returns ``model`` (FSDP2 changes its
    class in place; names of parameters and modules stay the same).

    Raises:
        RuntimeError: not inside a process group of 2+ ranks, or no FSDP2 in this torch.
        ValueError: an entry point shares a parameter with a module outside it (e.g. an
            output head tied to the input embeddings), which FSDP2 cannot split into two units.
    """
    if not available():
        raise RuntimeError(f"fsdp: this torch build ({torch.__version__}) has no torch.distributed.fsdp.fully_shard "
                           "(FSDP2); install torch >= 2.6 or set fsdp: false")
    if not distributed.is_distributed():
        raise RuntimeError("fsdp: needs torchrun --nproc_per_node 2+ (no process group of 2 or more ranks is running)")
    if is_sharded(model):
        raise RuntimeError(f"fsdp: {type(model).__name__} is already sharded; shard_model runs once per model")
    for entry in entry_points:
        shared = tied_outside(model, entry)
        if shared:
            raise ValueError(f"fsdp: {type(entry).__name__} shares parameter {shared[0]} with another part of "
                             f"the model (tied weights: {', '.join(shared)}); it cannot be a unit of its own")
    units: list[nn.Module] = []
    entry_ids = {id(e) for e in entry_points}
    for layer in decoder_layers(model):
        if id(layer) not in entry_ids:
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
            units.append(layer)
    for entry in entry_points:
        if entry is not model:
            fully_shard(entry, reshard_after_forward=reshard_after_forward)
            units.append(entry)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    units.append(model)
    for unit in units:
        # Sum, do not average: the trainer already divides by the step's global target count.
        # Sum-only collectives also because gloo has neither AVG nor PREMUL_SUM.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    plain = [n for n, p in model.named_parameters() if not is_dtensor(p)]
    if plain:  # every parameter sits in some unit (the root takes the rest), so this is a torch change
        raise RuntimeError(f"fsdp: parameters left unsharded after fully_shard: {plain[:5]}")
    return model


def param_bytes(model: nn.Module) -> tuple[int, int]:
    """``(local, full)`` parameter bytes: what this rank keeps resident, and the whole model's.

    Shared (tied) parameters count once. For a sharded parameter ``local`` counts this rank's
    shard (FSDP2's padding excluded); for a plain one, the whole tensor.
    """
    local = full = 0
    for p in model.parameters():  # deduplicated by identity
        size = p.element_size()
        full += p.numel() * size
        local += (p.to_local().numel() if is_dtensor(p) else p.numel()) * size
    return local, full


# ---------------------------------------------------------------------- full tensors
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole of ``t``: all-gathered when it is a DTensor (a collective), else copied."""
    t = t.detach()
    if is_dtensor(t):
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with ``requires_grad`` as a whole CPU tensor, keyed by its name (collective when sharded)."""
    return {n: full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor state gathered whole onto the CPU (collective when sharded).

    The result has the usual layout (state keyed by parameter index), so a checkpoint written
    under FSDP and one written without it hold the same thing and load either way.
    """
    state = optimizer.state_dict()
    gathered: dict[Any, dict[str, Any]] = {}
    for index in sorted(state["state"]):  # the same order on every rank: the collectives pair up
        gathered[index] = {k: (full_tensor(v) if is_dtensor(v) else v) for k, v in state["state"][index].items()}
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``; a sharded ``param`` takes only its own shard.

    Every rank passes the same whole ``value`` (read from the same file), so the shard is cut
    locally with FSDP's own placement and no data travels between ranks.
    """
    with torch.no_grad():
        if is_dtensor(param):
            value = distribute_tensor(value.detach().to(param.device, param.dtype), param.device_mesh,
                                      param.placements, src_data_rank=None)
        param.copy_(value)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (whole tensors, as :func:`full_optimizer_state` writes) made ready for a sharded optimizer.

    Each state tensor with the shape of its (sharded) parameter becomes a DTensor placed like
    that parameter; scalars such as AdamW's ``step`` stay plain. Returns a new dict for
    ``optimizer.load_state_dict``; unsharded parameters' entries are left as they are.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out_state: dict[Any, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        param = params[int(index)] if int(index) < len(params) else None
        converted = {}
        for key, value in entries.items():
            if (param is not None and is_dtensor(param) and isinstance(value, torch.Tensor)
                    and not is_dtensor(value) and tuple(value.shape) == tuple(param.shape)):
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
            converted[key] = value
        out_state[index] = converted
    return {"state": out_state, "param_groups": state_dict["param_groups"]}


@contextlib.contextmanager
def gathered_for_save(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the adapter's parameters are whole tensors: in ``model.state_dict()``
    and on the modules themselves.

    A collective on entry: every rank gathers every trainable parameter and every parameter
    named ``*bias`` (an adapter may save frozen biases, ``bias: all``); these are small next to
    the frozen matrices, which stay sharded DTensors. Yields the gathered tensors by name, so
    rank 0 can run ``model.save_pretrained(...)`` inside the block. The modules hold the whole
    tensors until the block ends (then their shards again), so a method that computes what it
    saves from its parameters (p-tuning's prompt encoder) computes it from whole tensors too.
    An adapter that saves a frozen matrix (other than a bias) is not supported under FSDP:
    that tensor is still a shard here. No-op for an unsharded model.
    """
    if not is_sharded(model):
        yield {}
        return
    gathered: dict[str, torch.Tensor] = {}
    by_param: dict[int, torch.Tensor] = {}  # a tied parameter is gathered once, under each of its names
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad or name.endswith("bias"):
            if id(param) not in by_param:
                by_param[id(param)] = full_tensor(param)
            gathered[name] = by_param[id(param)]

    def swap(_module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
        for name, value in gathered.items():
            key = prefix + name
            if key in state_dict:
                state_dict[key] = value

    handle = model.register_state_dict_post_hook(swap)
    # Between steps FSDP2 has the shards registered on the modules; put them back before it runs again.
    sharded = [(module, key, param) for module in model.modules() for key, param in module._parameters.items()
               if param is not None and id(param) in by_param and is_dtensor(param)]
    whole: dict[int, nn.Parameter] = {}  # one Parameter per shard, so tied modules stay tied (saved once)
    try:
        for module, key, param in sharded:
            if id(param) not in whole:
                whole[id(param)] = nn.Parameter(by_param[id(param)], requires_grad=param.requires_grad)
            module._parameters[key] = whole[id(param)]
        yield gathered
    finally:
        for module, key, param in sharded:
            module._parameters[key] = param
        handle.remove()


def zero_weight_batch(example: dict, collate) -> dict[str, torch.Tensor]:
    """A one-row, one-token batch without targets, from ``example``'s own fields (for padding forwards).

    Keeps only the first item of every list-valued field and sets every label to -100, so the
    loss is an exact 0 connected to every parameter: backward yields zero gradients and runs the
    same FSDP collectives as a real micro-batch.
    """
    row = {}
    for key, value in example.items():
        row[key] = list(value[:1]) if isinstance(value, (list, tuple)) else value
    if "labels" in row:
        row["labels"] = [IGNORE_INDEX] * len(row["labels"])
    return collate([row])


__all__ = ["available", "decoder_layers", "full_optimizer_state", "full_tensor", "full_trainable_state",
           "gathered_for_save", "is_dtensor", "is_sharded", "load_full_into", "param_bytes", "shard_model",
           "shard_optimizer_state", "tied_outside", "zero_weight_batch"]

"""Checkpoints that survive a crash, and the output-directory rules around them.

A checkpoint ``output_dir/checkpoint-{step}/`` holds:

    adapter files          model.save_pretrained(dir) (what a user loads)
    trainable.safetensors  every parameter with requires_grad, exact fp32 values (what resume loads)
    trainer_state.pt       optimizer, scheduler, grad scaler, RNG states (python, numpy, torch, cuda),
                           step, data position (epoch, batch index), micro-batch size, running totals
    train_config.yaml      the resolved config
    COMPLETE               written last; a folder without it is never resumed from

Under FSDP (:mod:`tsugiki.train.fsdp`) the same files hold whole tensors, gathered
from the shards by every rank and written by rank 0, so a checkpoint written with
``fsdp: true`` resumes with or without it (and the other way round).

It is written into ``.checkpoint-{step}.tmp``, every file fsync'd, the marker
written, then the folder renamed into place. Old checkpoints are deleted only
after the new one is in place, so at any instant the newest complete
checkpoint is a whole one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed, fsdp
from .config import CONFIG_FILENAME, ConfigError, TrainConfig

COMPLETE_MARKER = "COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^(\.checkpoint-\d+\.(tmp|old)|\.final\.tmp)$")
# Files a run writes at the top of output_dir; a folder holding only these is a
# run of ours that never reached a checkpoint, and may be restarted.
RUN_RECORDS = ("train_config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "runs")
# Keys whose change makes an old checkpoint a different run.
RESUME_KEYS = ("model", "data", "method", "method_args", "quantization", "lora_r", "lora_alpha", "target_modules",
               "learning_rate", "lr_scheduler", "warmup_steps", "seed", "max_length", "packing",
               "template", "train_on", "optimizer")


# ---------------------------------------------------------------------- listing
def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first; tmp/incomplete ones are skipped."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_leftovers(output_dir: str) -> list[str]:
    """Delete what an interrupted save or rotation left: ``.checkpoint-*.tmp``/``.old``/``.final.tmp`` folders and
    ``checkpoint-N`` folders without a COMPLETE marker (only a half-done deletion makes those)."""
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if _TMP_RE.match(name) or (_CKPT_RE.match(name) and os.path.isdir(path) and not is_complete(path)):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


# ---------------------------------------------------------------------- output_dir rules
def resolve_resume(config: TrainConfig) -> Optional[str]:
    """Check ``output_dir`` and decide where to resume from (None = fresh start).

    * ``output_dir`` that is a file: error.
    * ``resume: <path>``: that checkpoint, which must be complete.
    * ``resume: auto`` (and no ``overwrite``): the newest complete checkpoint in ``output_dir``, if any.
    * Otherwise a fresh start, allowed only into a missing or empty folder, a folder
      holding nothing but records of an earlier run that never checkpointed, or with
      ``overwrite: true`` (which removes the old checkpoints and records, nothing else).

    Across processes (``WORLD_SIZE`` > 1, see :mod:`tsugiki.train.distributed`) it joins the
    process group, then only rank 0 inspects and cleans ``output_dir``; every rank gets rank 0's
    answer, or raises rank 0's error, so all of them resume from the same checkpoint.
    """
    distributed.init_distributed()
    return distributed.run_on_main(lambda: _resolve_resume_here(config))


def _resolve_resume_here(config: TrainConfig) -> Optional[str]:
    """:func:`resolve_resume` for one process, which may delete leftovers in ``output_dir``."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"output_dir={out!r} is a file; give a directory path")
    if config.resume not in ("auto", False):
        path = config.resume
        if not os.path.isdir(path) or not is_complete(path):
            raise FileNotFoundError(
                f"resume={path!r} is not a complete checkpoint (a checkpoint-N folder with a "
                f"{COMPLETE_MARKER} file); use resume: auto to take the newest complete one")
        remove_leftovers(out)
        return path
    if not os.path.isdir(out):
        return None
    remove_leftovers(out)
    if config.resume == "auto" and not config.overwrite:
        latest = latest_checkpoint(out)
        if latest is not None:
            return latest
    entries = os.listdir(out)
    ours = [e for e in entries if e in RUN_RECORDS or _CKPT_RE.match(e)]
    only_records = len(ours) == len(entries) and not any(_CKPT_RE.match(e) for e in entries)
    if entries and not config.overwrite and not (only_records and config.resume == "auto"):
        raise FileExistsError(
            f"output_dir={out!r} is not empty and holds no checkpoint to resume"
            f"{' (resume is false)' if config.resume is False else ''}; "
            "set overwrite: true to start over there (old checkpoints and records are removed), "
            "or choose another output_dir")
    for name in ours:  # our own files only; anything a user put there stays
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return None


def saved_examples_per_step(checkpoint: str, saved_config: dict[str, Any]) -> int:
    """Examples per optimizer step of the run that wrote ``checkpoint``.

    ``batch_size * grad_accum * world_size`` as recorded in its trainer state; checkpoints
    written before runs could span processes lack it and were single-process runs.
    """
    single = saved_config["batch_size"] * saved_config["grad_accum"]
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        return single
    # mmap: only the small header is read, not the optimizer tensors.
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("examples_per_step", single))


def check_resume_compatible(checkpoint: str, config: TrainConfig, world_size: int = 1) -> None:
    """Refuse to resume a checkpoint whose run differs from ``config`` in a key that changes the run.

    That includes the examples per optimizer step, ``batch_size * grad_accum * world_size``: the
    saved data position counts steps of that size. The number of processes itself may change.
    """
    path = os.path.join(checkpoint, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return
    saved = TrainConfig.load(path).to_dict()
    now = config.to_dict()
    diffs = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if saved[k] != now[k]]
    before, after = saved_examples_per_step(checkpoint, saved), now["batch_size"] * now["grad_accum"] * world_size
    if before != after:
        diffs.append(f"batch_size * grad_accum * processes: {before} -> {after}")
    if diffs:
        raise ConfigError(
            f"cannot resume from {checkpoint}: the run there used different settings ({'; '.join(diffs)}); "
            "restore them, or start a new run with another output_dir (or overwrite: true)")


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- save
def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter with ``requires_grad``, whole, on the CPU; for an FSDP-sharded model a collective."""
    return fsdp.full_trainable_state(model)


def save_checkpoint(output_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, config: TrainConfig, state: dict[str, Any], scaler=None,
                    trainable: Optional[dict[str, torch.Tensor]] = None,
                    optimizer_state: Optional[dict[str, Any]] = None) -> str:
    """Write ``checkpoint-{step}`` atomically (tmp folder, fsync, COMPLETE marker, rename) and rotate old ones.

    ``trainable`` and ``optimizer_state``: whole tensors gathered beforehand (by every rank of an
    FSDP run, :func:`fsdp.full_trainable_state` / :func:`fsdp.full_optimizer_state`); by default
    they are taken from ``model`` and ``optimizer`` here, which suits an unsharded model.
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        save_file(trainable if trainable is not None else trainable_state(model), os.path.join(tmp, TRAINABLE_FILE))
        torch.save({
            **state,
            "step": step,
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        }, os.path.join(tmp, STATE_FILE))
        config.save(os.path.join(tmp, CONFIG_FILENAME))
        _fsync_tree(tmp)
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as fh:
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # re-saving a step (e.g. the end of a resumed run): swap, then delete
        old = os.path.join(output_dir, f".checkpoint-{step}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    rotate_checkpoints(output_dir, config.save_total_limit)
    return final


def rotate_checkpoints(output_dir: str, limit: Optional[int]) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``limit``; returns the deleted paths."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _step, path in found[:-limit]] if len(found) > limit else []
    for path in doomed:
        # Drop the marker first: a half-deleted folder must never look complete.
        os.remove(os.path.join(path, COMPLETE_MARKER))
        shutil.rmtree(path)
    return doomed


# ---------------------------------------------------------------------- load
def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    scaler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Load trainable weights, optimizer, scheduler (and scaler, RNG) from ``path``; returns the trainer state.

    An FSDP-sharded model and its optimizer take their own shards of the saved whole tensors
    (every rank reads the files; nothing travels between ranks).
    """
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file)")
    saved = load_file(os.path.join(path, TRAINABLE_FILE))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); was it made with another method or target_modules?")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                 f"the model has {tuple(param.shape)}")
            fsdp.load_full_into(param, saved[name])
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    optimizer_state = state.pop("optimizer")
    if fsdp.is_sharded(model):
        optimizer_state = fsdp.shard_optimizer_state(optimizer, optimizer_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("scaler", None)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    rng = state.pop("rng")
    if restore_rng:
        set_rng_state(rng)
    return state

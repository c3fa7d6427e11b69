"""Checkpoints that survive a crash, and the output-directory rules around them.

A checkpoint ``output_dir/checkpoint-{step}/`` holds:

    adapter files          model.save_pretrained(dir) (what a user loads)
    trainable.safetensors  every parameter with requires_grad, exact fp32 values (what resume loads)
    trainer_state.pt       optimizer, scheduler, grad scaler, RNG states (python, numpy, torch, cuda),
                           step, data position (epoch, batch index), micro-batch size, running totals,
                           and the method's own state (``method_state``: what the model's
                           ``state_for_checkpoint()`` returns, e.g. AdaLoRA's importance averages
                           and rank pattern; given back to its ``load_checkpoint_state(state)``)
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

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import socket
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed, fsdp
from ..fileio import (MODEL_WEIGHT_FILES, TEMPLATE_FILE, TOKENIZER_EXTRA_FILES, TOKENIZER_FILES, atomic_write_text,
                      open_up_private_files)
from ..model import CARD_MARKER
from .config import CONFIG_FILENAME, ConfigError, TrainConfig

COMPLETE_MARKER = "COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^(\.checkpoint-\d+\.(tmp|old)|\.final\.tmp)$")
# Files a run writes at the top of output_dir; a folder holding only these is a
# run of ours that never reached a checkpoint, and may be restarted.
OUTPUTS_FILE = "outputs.json"  # the names the final save put at the top of output_dir, written before it moves them
RUN_RECORDS = (CONFIG_FILENAME, "metrics.jsonl", "summary.json", "loss_curve.png", "runs", OUTPUTS_FILE)
# What a finished run leaves at the top of output_dir besides its records: the adapter (or, for method
# full, the model), the tokenizer, the prompt template and the adapter card README.md (ours only with
# CARD_MARKER).
# (A full model's weights and the tokenizer's files by their patterns in tsugiki.fileio.)
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", TRAINABLE_FILE,
               "config.json", "generation_config.json", TEMPLATE_FILE, *TOKENIZER_EXTRA_FILES)
CARD_FILE = "README.md"
# Keys whose change makes an old checkpoint a different run: which rows train and in what order, the
# adapter, and the update. max_steps/num_epochs may change (to extend a run); keys of speed, memory,
# precision and records may too.
RESUME_KEYS = ("model", "data", "max_rows", "eval_split", "seed", "shuffle", "group_by_length", "max_length",
               "packing", "template", "train_on",
               "method", "method_args", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
               "learning_rate", "lr_scheduler", "warmup_steps", "optimizer", "weight_decay", "max_grad_norm",
               "neftune_alpha")


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


# ---------------------------------------------------------------------- one run per output_dir
LOCK_FILE = ".tsugiki-run.lock"  # "<pid> <host>" of the run training into the folder


def run_lock_holder(output_dir: str) -> Optional[str]:
    """Who holds ``output_dir``'s run lock, if a live process does: "pid N on HOST"; None when there is no
    lock, or it was left by a process that is gone (killed) or by this one."""
    try:
        with open(os.path.join(output_dir, LOCK_FILE), encoding="utf-8") as fh:
            pid_text, _, host = fh.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname():
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
    return f"pid {pid} on {host}"


def refuse_if_in_use(output_dir: str) -> None:
    """Raise FileExistsError when a live run holds ``output_dir``'s lock."""
    holder = run_lock_holder(output_dir)
    if holder:
        raise FileExistsError(f"output_dir={output_dir!r} is in use by another tsugiki run ({holder}); wait for "
                              f"it to end or choose another output_dir (delete {LOCK_FILE} there if no run is "
                              "using it)")


def take_run_lock(output_dir: str) -> None:
    """Mark ``output_dir`` as this process's run; refuse when a live run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    for _ in range(2):
        try:  # created only if absent: of two runs starting together, one gets it
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_in_use(output_dir)
            with contextlib.suppress(FileNotFoundError):  # left by a process that is gone: take it over
                os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        return
    refuse_if_in_use(output_dir)  # another run took the stale lock first


def release_run_lock(output_dir: str) -> None:
    """Remove ``output_dir``'s run lock if this process holds it."""
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            mine = fh.read().split(" ")[0].strip() == str(os.getpid())
    except OSError:
        return
    if mine:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def leftovers(output_dir: str) -> list[str]:
    """What an interrupted save or rotation left: ``.checkpoint-*.tmp``/``.old``/``.final.tmp`` folders and
    ``checkpoint-N`` folders without a COMPLETE marker (only a half-done deletion makes those)."""
    if not os.path.isdir(output_dir):
        return []
    return [name for name in os.listdir(output_dir)
            if _TMP_RE.match(name) or (_CKPT_RE.match(name) and os.path.isdir(os.path.join(output_dir, name))
                                       and not is_complete(os.path.join(output_dir, name)))]


def remove_leftovers(output_dir: str) -> list[str]:
    """Delete :func:`leftovers`; returns their names."""
    removed = leftovers(output_dir)
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


# ---------------------------------------------------------------------- output_dir rules
def is_our_card(path: str) -> bool:
    """``path`` is an adapter card tsugiki wrote (it carries CARD_MARKER), which may be regenerated."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return CARD_MARKER in fh.read()
    except OSError:
        return False


def written_by_runs(name: str) -> bool:
    """A run writes an entry of this name at the top of output_dir (records, checkpoints, final outputs)."""
    return (name in RUN_RECORDS or name in RUN_OUTPUTS or name == CARD_FILE or bool(_CKPT_RE.match(name))
            or bool(MODEL_WEIGHT_FILES.match(name)) or bool(TOKENIZER_FILES.match(name)))


def recorded_outputs(output_dir: str) -> Optional[set[str]]:
    """The final outputs an earlier run put in ``output_dir``: the names in its outputs.json; none when it
    never reached its final save (no summary.json either); None for a run that predates outputs.json (its
    outputs are then told by name, :func:`written_by_runs`)."""
    path = os.path.join(output_dir, OUTPUTS_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return set(json.load(fh))
        except (OSError, ValueError, TypeError):
            return None  # unreadable: fall back to the names runs write
    return None if os.path.isfile(os.path.join(output_dir, "summary.json")) else set()


def record_outputs(output_dir: str, names: Sequence[str]) -> None:
    """Write outputs.json (atomically) before the final save moves ``names`` into ``output_dir``."""
    atomic_write_text(os.path.join(output_dir, OUTPUTS_FILE), json.dumps(sorted(set(names)), indent=1) + "\n")


def will_write(name: str, config: TrainConfig) -> bool:
    """Whether this run's final save writes an entry of this name: its adapter (or, training every weight,
    its model), the tokenizer's files and the template."""
    if config.method == "full":
        essential = name in ("config.json", "generation_config.json") or bool(MODEL_WEIGHT_FILES.match(name))
    else:
        essential = name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", TRAINABLE_FILE)
    return essential or name == TEMPLATE_FILE or name in TOKENIZER_EXTRA_FILES or bool(TOKENIZER_FILES.match(name))


def is_run_folder(output_dir: str) -> bool:
    """``output_dir`` holds an earlier run: its train_config.yaml (written before training starts) or a checkpoint."""
    return os.path.isfile(os.path.join(output_dir, CONFIG_FILENAME)) or bool(list_checkpoints(output_dir))


def run_files(output_dir: str) -> list[str]:
    """Entries of ``output_dir`` an earlier run wrote: in a run folder, every name runs write (a README.md only
    when it is our card); elsewhere none."""
    if not os.path.isdir(output_dir) or not is_run_folder(output_dir):
        return []
    outputs = recorded_outputs(output_dir)

    def ours(name: str) -> bool:
        if name == CARD_FILE:
            return is_our_card(os.path.join(output_dir, name))
        if name in RUN_RECORDS or _CKPT_RE.match(name):
            return True
        # A merged model or notes the user saved beside the adapter are not the run's.
        return written_by_runs(name) if outputs is None else name in outputs

    return sorted(name for name in os.listdir(output_dir) if ours(name))


def user_files(output_dir: str) -> set[str]:
    """Entries of ``output_dir`` no run of ours wrote: never removed or replaced (our own card excepted)."""
    if not os.path.isdir(output_dir):
        return set()
    ours = set(run_files(output_dir))
    return {name for name in os.listdir(output_dir) if name not in ours
            and not (name == CARD_FILE and is_our_card(os.path.join(output_dir, name)))}


def resolve_resume(config: TrainConfig, clean: bool = True) -> Optional[str]:
    """Check ``output_dir`` and decide where to resume from (None = fresh start).

    * ``output_dir`` that is a file: error.
    * ``resume: <path>``: that checkpoint, which must be complete. Into the folder that holds it,
      the run simply goes on; into another ``output_dir``, that folder follows the fresh-start rules below.
    * ``resume: auto`` (and no ``overwrite``): the newest complete checkpoint in ``output_dir``, if any.
    * Otherwise a fresh start, allowed only into a missing or empty folder, a folder
      holding nothing but records of an earlier run that never checkpointed, or with
      ``overwrite: true``.

    What a start over removes is what an earlier run wrote: in a run folder (one with
    ``train_config.yaml`` or a checkpoint) its records, checkpoints and final outputs
    (adapter or model files, tokenizer files, template, our README card). Any other file
    stays and is never replaced: a README.md of the user's is kept (the run then writes no
    card), and a user's file under another name the run writes (``tokenizer_config.json``,
    ``adapter_config.json``, ...) is an error here, before anything is removed or trained.

    ``clean=False`` checks and decides without removing anything: what a job calls before it
    loads its data and model, so a job refused on the way (a missing file, a bad key) has not
    deleted the earlier run that ``overwrite`` would replace. The trainer calls it again, cleaning,
    when training is about to start.

    Across processes (``WORLD_SIZE`` > 1, see :mod:`tsugiki.train.distributed`) it joins the
    process group, then only rank 0 inspects and cleans ``output_dir``; every rank gets rank 0's
    answer, or raises rank 0's error, so all of them resume from the same checkpoint.
    """
    distributed.init_distributed()
    return distributed.run_on_main(lambda: _resolve_resume_here(config, clean))


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _resolve_resume_here(config: TrainConfig, clean: bool = True) -> Optional[str]:
    """:func:`resolve_resume` for one process; with ``clean`` it deletes leftovers and an earlier run's files
    in ``output_dir``."""
    out = config.output_dir
    tidy = remove_leftovers if clean else leftovers  # either way, the names no longer count as content
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"output_dir={out!r} is a file; give a directory path")
    # Before anything is removed: a second run into the same folder must not touch the first one's files.
    if clean:
        take_run_lock(out)
    else:
        refuse_if_in_use(out)
    path = None  # an explicit checkpoint to resume from
    if config.resume not in ("auto", False):
        path = config.resume
        if not os.path.isdir(path) or not is_complete(path):
            raise FileNotFoundError(
                f"resume={path!r} is not a complete checkpoint (a checkpoint-N folder with a "
                f"{COMPLETE_MARKER} file); use resume: auto to take the newest complete one")
        if _same_folder(os.path.dirname(os.path.abspath(path)), out):  # the run goes on in its own folder
            tidy(out)
            return path
    if not os.path.isdir(out):
        return path
    left = set(tidy(out)) | {LOCK_FILE}
    if config.resume == "auto" and not config.overwrite:
        latest = latest_checkpoint(out)
        if latest is not None:
            return latest
    entries = [e for e in os.listdir(out) if e not in left]
    ours = run_files(out)
    restartable = bool(ours) and all(e in RUN_RECORDS for e in entries)  # a run that never checkpointed
    if entries and not config.overwrite and not (restartable and config.resume is not False):
        if path:
            where = f"is not the folder of checkpoint {path!r}"
            if latest_checkpoint(out):  # e.g. the same command again, after this run checkpointed there
                where += " (resume: auto goes on from the newest checkpoint in output_dir)"
        else:
            where = f"holds no checkpoint to resume{' (resume is false)' if config.resume is False else ''}"
        raise FileExistsError(
            f"output_dir={out!r} is not empty and {where}; set overwrite: true to start over there (an earlier "
            "run's checkpoints, records and outputs are removed, other files stay), or choose another output_dir")
    clashes = sorted(name for name in user_files(out) if name != CARD_FILE and will_write(name, config))
    if clashes:  # checked before anything is removed
        raise FileExistsError(
            f"output_dir={out!r} holds {', '.join(clashes)}, which this run would write and which no earlier "
            f"tsugiki run there wrote (a run's folder has {CONFIG_FILENAME} or checkpoints); move or delete "
            f"{'it' if len(clashes) == 1 else 'them'}, or choose another output_dir")
    for name in ours if clean else ():  # an earlier run's files only; anything a user put there stays
        entry = os.path.join(out, name)
        shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)
    return path


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
    state = load_trainer_state(path, mmap=True)
    return int(state.get("examples_per_step", single))


def _resume_values(values: dict[str, Any]) -> dict[str, Any]:
    """A config's ``RESUME_KEYS``, each as what it does to the run."""
    out = {k: values[k] for k in RESUME_KEYS}
    for key in ("model", "data", "eval_data"):  # a local path, however spelt (./data.jsonl, absolute)
        if key in out and isinstance(out[key], str) and os.path.exists(out[key]):
            out[key] = os.path.realpath(out[key])
    if values["eval_data"]:  # nothing is held out of `data` then: every row trains
        out["eval_split"] = 0.0
    out["neftune_alpha"] = values["neftune_alpha"] or None  # 0 and None both mean off
    return out


def check_resume_compatible(checkpoint: str, config: TrainConfig, world_size: int = 1) -> None:
    """Refuse to resume a checkpoint whose run differs from ``config`` in a key that changes the run
    (``RESUME_KEYS``: the training rows and their order, the adapter, the update).

    That includes the examples per optimizer step, ``batch_size * grad_accum * world_size``: the
    saved data position counts steps of that size. The number of processes itself may change.
    """
    path = os.path.join(checkpoint, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return
    saved_config, now_config = TrainConfig.load(path).to_dict(), config.to_dict()
    saved, now = _resume_values(saved_config), _resume_values(now_config)
    label = {"eval_split": "eval_split (rows held out of data; none when eval_data is given)"}
    diffs = [f"{label.get(k, k)}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if saved[k] != now[k]]
    before = saved_examples_per_step(checkpoint, saved_config)
    after = now_config["batch_size"] * now_config["grad_accum"] * world_size
    if before != after:
        diffs.append(f"batch_size * grad_accum * processes: {before} -> {after}")
    if diffs:
        raise ConfigError(
            f"cannot resume from {checkpoint}: the run there used different settings ({'; '.join(diffs)}); "
            "restore them, or start a new run with another output_dir (or overwrite: true)")


def _damaged(checkpoint: str, name: str, err: Exception) -> ValueError:
    others = [c for _, c in list_checkpoints(os.path.dirname(os.path.abspath(checkpoint)))
              if not _same_folder(c, checkpoint)]
    fix = f"resume: {others[-1]} (the one before)" if others else "overwrite: true to start over"
    return ValueError(f"checkpoint {checkpoint} is damaged: {name} cannot be read ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); delete that folder, or set {fix}")


def load_trainer_state(path: str, mmap: bool = False) -> dict[str, Any]:
    """Read a ``trainer_state.pt`` without running code from it: weights-only unpickling, which
    allows tensors and plain containers, plus the numpy array types of numpy's RNG state."""
    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
    numpy_rng = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), numpy_core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_rng):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain values, which tsugiki does not "
                         f"unpickle (they could run code); was it written by tsugiki? ({err})") from err
    except (RuntimeError, EOFError) as err:  # a truncated or empty zip archive
        raise _damaged(os.path.dirname(path), os.path.basename(path), err) from err


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
                    optimizer_state: Optional[dict[str, Any]] = None,
                    rng_states: Optional[list[dict[str, Any]]] = None) -> str:
    """Write ``checkpoint-{step}`` atomically (tmp folder, fsync, COMPLETE marker, rename) and rotate old ones.

    ``trainable`` and ``optimizer_state``: whole tensors gathered beforehand (by every rank of an
    FSDP run, :func:`fsdp.full_trainable_state` / :func:`fsdp.full_optimizer_state`); by default
    they are taken from ``model`` and ``optimizer`` here, which suits an unsharded model.
    ``rng_states``: every rank's random state, in rank order (default: this process's), so each
    rank of a resumed run draws what it would have drawn (its dropout, NEFTune noise).
    """
    rng_states = rng_states or [rng_state()]
    os.makedirs(output_dir, exist_ok=True)
    method_state = method_hook(model, "state_for_checkpoint")
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
            "rng": rng_states[0],
            "rng_ranks": rng_states,
            "method_state": method_state() if method_state is not None else None,
        }, os.path.join(tmp, STATE_FILE))
        config.save(os.path.join(tmp, CONFIG_FILENAME))
        open_up_private_files(tmp)
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
    """Load trainable weights, optimizer, scheduler (and scaler, RNG, the method's state) from ``path``;
    returns the trainer state.

    An FSDP-sharded model and its optimizer take their own shards of the saved whole tensors
    (every rank reads the files; nothing travels between ranks).
    """
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} file)")
    try:
        saved = load_file(os.path.join(path, TRAINABLE_FILE))
    except Exception as err:  # safetensors' own error types: a damaged file
        raise _damaged(path, TRAINABLE_FILE, err) from err
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # DoRA's magnitude was a bare parameter (``...lora_magnitude_vector.<adapter>``) in earlier releases.
    saved = {(k + ".weight" if k not in params and k + ".weight" in params else k): v for k, v in saved.items()}
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
    state = load_trainer_state(os.path.join(path, STATE_FILE))
    optimizer_state = state.pop("optimizer")
    if fsdp.is_sharded(model):
        optimizer_state = fsdp.shard_optimizer_state(optimizer, optimizer_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler_state = state.pop("scaler", None)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    rng, ranks = state.pop("rng"), state.pop("rng_ranks", None)
    if restore_rng:  # each rank its own state when the run has as many ranks as the one that saved
        same_world = ranks is not None and len(ranks) == distributed.world_size()
        set_rng_state(ranks[distributed.rank()] if same_world else rng)
    method_state = state.pop("method_state", None)  # absent from checkpoints of older versions
    restore = method_hook(model, "load_checkpoint_state")
    if restore is not None and method_state is not None:
        restore(method_state)
    return state


def method_hook(model: nn.Module, name: str) -> Optional[Callable]:
    """``model.<name>`` when the adapter method defines it (through a PeftModel's tuner), else None:
    the trainer's per-step hooks and the checkpoint hooks above."""
    hook = getattr(model, name, None)
    return hook if callable(hook) else None

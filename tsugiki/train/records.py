"""What a run leaves behind for people: progress bar, metrics.jsonl, TensorBoard, loss curve, summary.

``metrics.jsonl`` holds one JSON object per line: at each logging step
``step, epoch, loss, lr, grad_norm, tokens_per_s`` (loss is token-weighted over
the steps since the previous line), plus ``eval_loss, eval_ppl`` on steps that
evaluated. On resume, lines past the checkpoint's step are dropped so the file
reads as one uninterrupted run.

In a run across processes only rank 0 keeps records (:func:`make_recorder`);
the other ranks get a :class:`QuietRecorder` that writes no file and only
prints their own warnings, prefixed with their rank.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
from typing import Any, Optional

import torch

from ..fileio import atomic_write_text, atomic_write_with

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "runs"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an unreadable line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """Progress bar + metrics.jsonl + optional TensorBoard for one run.

    ``start_step`` > 0 means a resumed run: the bar starts there and metrics
    lines from after that step (written by the interrupted run) are discarded.
    ``earlier_run``: the folder of the run resumed from; when it is another folder,
    its metrics up to ``start_step`` start this run's file, so the file (and the loss
    curve) covers the whole run.
    """

    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, earlier_run: Optional[str] = None):
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, METRICS_FILE)
        self.notes: list[str] = []
        os.makedirs(output_dir, exist_ok=True)
        earlier = os.path.join(earlier_run, METRICS_FILE) if earlier_run else None
        if start_step and earlier and os.path.isfile(earlier) and not os.path.exists(self.metrics_path):
            shutil.copyfile(earlier, self.metrics_path)
        self._truncate_metrics(start_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._tb = self._open_tensorboard(start_step) if tensorboard else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            # tqdm's own rate and remaining-time estimate give the ETA.
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train",
                             dynamic_ncols=True, file=sys.stderr)

    def _truncate_metrics(self, start_step: int) -> None:
        if not os.path.exists(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
        atomic_write_text(self.metrics_path, "".join(keep))

    def _open_tensorboard(self, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.notes.append("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            return None
        return SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR),
                             purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line, mirror numbers to TensorBoard and the bar's postfix."""
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key, value, step)
            self._tb.flush()
        if self._bar is not None:
            shown = {}
            if record.get("loss") is not None:
                shown["loss"] = f"{record['loss']:.4f}"
            if record.get("lr") is not None:
                shown["lr"] = f"{record['lr']:.2e}"
            if record.get("tokens_per_s") is not None:
                shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if record.get("eval_loss") is not None:
                shown["eval_loss"] = f"{record['eval_loss']:.4f}"
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._file.closed:
            self._file.close()


class QuietRecorder:
    """The recorder of a rank other than 0: the same methods, no files, no bar.

    Messages (e.g. this rank halving its micro-batch on out-of-memory) still
    reach stderr, prefixed ``[rank N]`` so they are not mistaken for rank 0's.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self.notes: list[str] = []

    def log(self, record: dict[str, Any]) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def write(self, message: str) -> None:
        print(f"[rank {self.rank}] {message}", file=sys.stderr)

    def close(self) -> None:
        pass


def make_recorder(output_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                  progress: bool = True, rank: int = 0, earlier_run: Optional[str] = None):
    """A :class:`RunRecorder` on rank 0, a :class:`QuietRecorder` on every other rank."""
    if rank != 0:
        return QuietRecorder(rank)
    return RunRecorder(output_dir, total_steps, start_step, tensorboard, progress, earlier_run)


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_loss_curve(output_dir: str) -> tuple[Optional[str], Optional[str]]:
    """Draw train loss (and eval loss) against step into loss_curve.png.

    Returns (path, None), or (None, note) when matplotlib is missing or there is nothing to draw.
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed: no loss_curve.png (pip install matplotlib)"
    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None, "no losses were logged: no loss_curve.png"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, LOSS_CURVE_FILE)
    try:
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path, None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run: CUDA max allocated on GPU, else the process's peak RSS.

    On Linux that is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` also holds the RSS
    of the process this one was started from (a notebook's kernel running ``!tsugiki train``
    reported its own gigabytes as the run's peak).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def files_size(paths: list[str]) -> int:
    """Total bytes of files (folders counted recursively)."""
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for root, _d, files in os.walk(path):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        elif os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def write_summary(output_dir: str, summary: dict[str, Any], echo: bool = True) -> str:
    """Save summary.json (atomically) and print a short human-readable version."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    atomic_write_text(path, json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n")
    if echo:
        lines = [
            f"steps {summary.get('steps')} in {summary.get('train_time_s', 0):.1f} s, "
            f"{summary.get('tokens_per_s', 0):.0f} tokens/s",
            ("final train loss " + (f"{summary['train_loss']:.4f}" if summary.get("train_loss") is not None else "n/a"))
            + (f", eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})"
               if summary.get("eval_loss") is not None else "")
            + (f" of the step-{summary['saved_step']} weights kept"
               if summary.get("saved_step") not in (None, summary.get("steps")) else ""),
            f"peak memory {_human(summary.get('peak_memory_bytes', 0))} ({summary.get('peak_memory_kind')}), "
            f"adapter {_human(summary.get('adapter_size_bytes', 0))} on disk",
            f"outputs in {output_dir}",
        ]
        print("\n".join(lines), file=sys.stderr)
    return path

"""Crash-safe file writes: write to a temporary name in the same folder, then rename.

A reader never sees a half-written file: ``os.replace`` is atomic on POSIX and
Windows when source and target are on the same file system.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator, Optional


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp made it private (0600), and a writer may have made its own: give it what open() would
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _new_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def open_up_private_files(folder: str | os.PathLike) -> None:
    """Give files under ``folder`` left private (0600) the permissions a new file gets.

    safetensors writes through a private temporary file, so a model saved by transformers'
    ``save_pretrained`` is readable by its owner only, unlike the config beside it; a merged
    model shared with a serving container or another user could not be read.
    """
    mode = _new_file_mode()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and (os.stat(path).st_mode & 0o777) == 0o600 and mode != 0o600:
                os.chmod(path, mode)


# The file names of a model folder: its weights (one file, or shards and their index), and the files a
# tokenizer keeps its vocabulary in (transformers' vocab_files_names and more) and the ones beside them.
MODEL_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# The names tokenizers save under (exact, so that a user's "vocab_notes.txt" or "finetune.model" is not one).
TOKENIZER_FILES = re.compile(r"^(tokenizer\.(json|model)|tokenizer_config\.json|(vocab|merges)\.(json|txt)|vocab\.bpe"
                             r"|bpe\.codes|(spiece|sentencepiece\.bpe|spm|sentencepiece)\.model|(source|target)\.spm"
                             r"|[\w.-]*\.tiktoken)$")
TOKENIZER_EXTRA_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# The prompt template saved beside an adapter or model, so generation formats as training did.
TEMPLATE_FILE = "tsugiki_template.json"
# Everything a loader reads from a model folder: what replacing the model there must not leave behind
# (an adapter's files beside merged weights make transformers apply the adapter a second time).
MODEL_FOLDER_FILES = re.compile("|".join([
    MODEL_WEIGHT_FILES.pattern, TOKENIZER_FILES.pattern, r"^adapter_(config\.json|model\.(safetensors|bin))$",
    *(f"^{re.escape(name)}$" for name in (*TOKENIZER_EXTRA_FILES, "config.json", "generation_config.json",
                                          TEMPLATE_FILE))]))


def move_into(source: str | os.PathLike, folder: str | os.PathLike, stale: Optional[re.Pattern] = None) -> None:
    """Move every entry of ``source`` into ``folder`` (one rename each), replacing entries of the same name.

    Afterwards the files of ``folder`` whose names match ``stale`` and that ``source`` lacks are
    removed, so an old model's shard index does not outlive it; every other entry of ``folder``
    stays, folders included. A folder in the way of a file is an error before anything changes.
    """
    new = sorted(os.listdir(source))
    for name in new:
        dest = os.path.join(folder, name)
        if os.path.isdir(dest) and not os.path.islink(dest) and not os.path.isdir(os.path.join(source, name)):
            raise IsADirectoryError(f"cannot write {name} into {folder}: a folder of that name is in the way; "
                                    "move it, or choose another output folder")
    os.makedirs(folder, exist_ok=True)
    for name in new:
        dest = os.path.join(folder, name)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(source, name), dest)
    for name in os.listdir(folder) if stale is not None else ():
        path = os.path.join(folder, name)
        if name not in new and stale.match(name) and os.path.isfile(path):
            os.remove(path)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM (what ``kill`` and job schedulers send) exits through Python, so that
    ``finally`` blocks remove half-written files as they do on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail now, not after an hour's work, when ``path`` (a folder or a file to be) cannot be written:
    the folder itself if it exists, else the nearest folder above it that does."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{what} {path!r} cannot be written: {probe} is not a folder; choose another")
    try:  # a real write: permission bits say nothing about read-only mounts, or to root
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PermissionError(f"{what} {path!r} cannot be written ({probe}: {err.strerror}); choose "
                              "another") from None


def ensure_directory(path: str | os.PathLike, what: str = "output folder") -> str:
    """Create ``path`` as a folder, or fail clearly when a file is in the way."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file; choose a folder path")
    os.makedirs(path, exist_ok=True)
    return path

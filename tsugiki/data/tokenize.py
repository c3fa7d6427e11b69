"""Rows → token ids + labels, with the loss restricted to response tokens.

Each text segment produced by the template is tokenized on its own and the ids
are concatenated, so the prompt tokens seen in training are exactly those
``tokenizer(template.format_prompt(row))`` gives at generation time, and the
label mask follows segment boundaries without any offset arithmetic.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .errors import DataError, NoRowsLeft
from .formats import Sample, detect_format, normalise, read_rows_located
from .templates import Template, get_template

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100
PLACES_SHOWN = 3  # rows named in a warning about dropped or cut rows; the rest are counted
TRAIN_ON = ("response", "all")

log = logging.getLogger("tsugiki.data")


@dataclass
class DataStats:
    """What :func:`build_dataset` did to the rows; ``summary()`` gives one readable line."""

    source: str
    format: str
    template: str
    max_length: int
    rows_read: int = 0
    dropped_empty: int = 0  # a required field was missing or empty, or every answer had weight 0
    truncated: int = 0  # cut to max_length and kept (a trainable token survived; else dropped_no_trainable)
    dropped_no_trainable: int = 0  # no label left to learn from, usually after truncation
    train_rows: int = 0
    eval_rows: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    # Where the first rows of each kind above sit ("line 7"), for the warnings: a few to look at, not all.
    examples_of: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, place: str) -> None:
        """Count a row as ``kind`` (``"truncated"``, ``"dropped_empty"``, ``"dropped_no_trainable"``),
        keeping its place when it is among the first :data:`PLACES_SHOWN` of that kind."""
        setattr(self, kind, getattr(self, kind) + 1)
        shown = self.examples_of.setdefault(kind, [])
        if len(shown) < PLACES_SHOWN:
            shown.append(place)

    def places(self, kind: str) -> str:
        """`` (line 3, line 8 and 4 more)``: where rows of ``kind`` are, for a warning; empty when unknown."""
        shown = self.examples_of.get(kind, [])
        if not shown:
            return ""
        more = getattr(self, kind) - len(shown)
        return f" ({', '.join(shown)}" + (f" and {more} more)" if more else ")")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, role: str = "train") -> str:
        """One line about the file; ``role="eval"`` for an evaluation file (its rows all evaluate)."""
        split = (f"{self.train_rows} train + {self.eval_rows} eval rows" if role == "train"
                 else f"{self.train_rows + self.eval_rows} eval rows")
        return (
            f"{self.source}: {self.rows_read} rows read, format {self.format}, template {self.template}; "
            f"{split}, {self.tokens} tokens "
            f"({self.trainable_tokens} trained on); {self.truncated} truncated to {self.max_length} tokens, "
            f"{self.dropped_no_trainable} dropped with no trainable token, {self.dropped_empty} dropped as empty"
        )


def encode(sample: Sample, template: Template, tokenizer: Any, train_on: str = "response") -> tuple[list[int], list[int]]:
    """Token ids and labels for one sample, untruncated.

    Labels are ``-100`` on prompt tokens unless ``train_on="all"``, and on the
    tokens of assistant turns of weight 0 (context only) either way. An EOS id
    follows every response (for chat templates: unless the assistant span
    already contains the EOS token, as ChatML's ``<|im_end|>`` does).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set tokenizer.eos_token before building the data set")
    input_ids: list[int] = []
    labels: list[int] = []
    if template.kind == "instruction" or sample.text is not None:
        # Chat templates write their own BOS text; plain text gets the tokenizer's leading specials.
        input_ids = leading_special_ids(tokenizer)
        labels = list(input_ids) if train_on == "all" else [IGNORE_INDEX] * len(input_ids)
    segments = template.segments(sample)
    last_reply = _last_reply(segments) if template.kind == "chat" else None
    for seg in segments:
        ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"] if seg.text else []
        if seg.eos_after or (seg is last_reply and eos not in ids):
            ids = ids + [eos]  # the end of the reply, trained on with it or not
        input_ids += ids
        # "all" widens the loss to prompts; an answer of weight 0 stays context only.
        keep = seg.trainable or (train_on == "all" and not seg.reply)
        labels += ids if keep else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def prompt_token_ids(prompt: str, template: Template, tokenizer: Any) -> list[int]:
    """A generation prompt's token ids, as :func:`encode` starts the same row in training.

    Instruction templates get the tokenizer's leading BOS; chat templates none, since
    they write their own (a Llama-3 style tokenizer adding BOS again would double it).
    """
    lead = leading_special_ids(tokenizer) if template.kind != "chat" else []
    return lead + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _last_reply(segments):
    return next((s for s in reversed(segments) if s.reply), None)


def leading_special_ids(tokenizer: Any) -> list[int]:
    # What the tokenizer puts in front of any text (BOS for Llama-style tokenizers, nothing for GPT-2 style).
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [i for i in ids[:1] if bos is not None and i == bos]


def build_dataset(
    path_or_rows: str | os.PathLike | datasets.Dataset | Iterable[dict],
    tokenizer: Any,
    template: str | dict | Template | None = None,
    max_length: int = 1024,
    train_on: str = "response",
    max_rows: int | None = None,
    eval_split: float | int | None = None,
    seed: int = 0,
) -> tuple[list[dict], list[dict] | None, DataStats]:
    """Load, format, tokenize, mask, truncate and split training data.

    Args:
        path_or_rows: a data file / saved-datasets folder (see :func:`load_rows`), a
            ``datasets.Dataset``, or a list of row dicts.
        tokenizer: the model's tokenizer (must have an EOS token).
        template: a template name or spec for :func:`get_template` (default ``None``: auto).
        max_length: rows longer than this many tokens are cut to it (default 1024).
        train_on: ``"response"`` (default): loss on response tokens + EOS only;
            ``"all"``: loss on every token but those of assistant turns of weight 0.
            ``text`` rows always train on all tokens.
        max_rows: keep the first ``max_rows`` rows (default ``None``: all).
        eval_split: hold out a seeded random eval set: a fraction in (0, 1) or a row
            count >= 1 (default ``None``: no eval set).
        seed: seed for the eval split (default 0).

    Returns:
        ``(train, eval_or_None, stats)``; examples are dicts with ``input_ids`` and
        ``labels`` (lists of int, ``-100`` where no loss is taken), in file order.

    Raises:
        DataError: bad input (see :mod:`tsugiki.data.formats`), or no rows left.
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    rows, columns, source, places = _rows_and_columns(path_or_rows, max_rows)
    fmt = detect_format(columns, source)
    template = get_template(template, tokenizer)
    stats = DataStats(source=source, format=fmt, template=template.name, max_length=max_length)

    examples = []
    for i, row in enumerate(rows):
        stats.rows_read += 1
        place = places[i] if places else f"row {i + 1}"
        where = f"{source}, {place}"
        sample = normalise(row, fmt, where)
        if sample is None:
            stats.note("dropped_empty", place)
            continue
        try:
            input_ids, labels = encode(sample, template, tokenizer, train_on)
        except DataError as err:  # e.g. turns that do not alternate: say which row
            raise DataError(f"{where}: {err}") from err
        cut = len(input_ids) > max_length
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        # Position 0 is never predicted (labels shift by one), so it does not count as trainable.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.note("dropped_no_trainable", place)
            continue
        if cut:  # counted among the rows kept: a cut row with nothing left to learn is counted as dropped
            stats.note("truncated", place)
        examples.append({"input_ids": input_ids, "labels": labels})

    if not examples:
        raise NoRowsLeft(
            f"{source}: no rows left after filtering ({stats.rows_read} read, {stats.dropped_empty} empty, "
            f"{stats.dropped_no_trainable} with no trainable token within max_length={max_length}); "
            "check the fields hold text, or raise max_length"
        )
    train, evals = split_eval(examples, eval_split, seed, source)
    stats.train_rows, stats.eval_rows = len(train), len(evals) if evals else 0
    stats.tokens = sum(len(e["input_ids"]) for e in examples)
    stats.trainable_tokens = sum(sum(lab != IGNORE_INDEX for lab in e["labels"][1:]) for e in examples)
    _warn(stats)
    return train, evals, stats


def _rows_and_columns(path_or_rows, max_rows):
    if isinstance(path_or_rows, (str, os.PathLike)):
        rows, columns, places = read_rows_located(path_or_rows, max_rows)
        return rows, columns, str(path_or_rows), places
    if _is_dataset(path_or_rows):
        ds = path_or_rows if max_rows is None else path_or_rows.select(range(min(max_rows, len(path_or_rows))))
        return ds, ds.column_names, "dataset", None
    rows = list(path_or_rows)[:max_rows] if max_rows is not None else list(path_or_rows)
    if not rows:
        raise DataError("rows: the data holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"rows, row {i + 1}: expected a dict of fields, got {type(row).__name__}")
    return rows, list(dict.fromkeys(k for r in rows for k in r)), "rows", None


def _is_dataset(obj: Any) -> bool:
    # Only look when datasets is already imported: a Dataset cannot exist otherwise,
    # and importing it here would cost every caller its 80 MiB.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, datasets.Dataset)


def split_eval(examples: list, eval_split: float | int | None, seed: int = 0, source: str = "data"):
    """Split off a seeded random eval set; both parts keep their original order.

    ``eval_split`` is a fraction in (0, 1) (rounded, at least one row) or a count >= 1.
    """
    if eval_split is None or eval_split == 0:
        return examples, None
    n = len(examples)
    if isinstance(eval_split, bool) or not isinstance(eval_split, (int, float)):
        raise DataError(f"eval_split must be a fraction in (0, 1) or a row count, got {eval_split!r}")
    if isinstance(eval_split, float):
        if not 0 < eval_split < 1:
            raise DataError(f"eval_split as a fraction must be in (0, 1), got {eval_split}; pass an int for a row count")
        count = max(1, round(n * eval_split))
    else:
        count = eval_split
    if not 1 <= count < n:
        raise DataError(
            f"{source}: eval_split={eval_split} asks for {count} eval rows but {n} rows remain; "
            "leave at least one row for training"
        )
    held = set(random.Random(seed).sample(range(n), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


def _warn(stats: DataStats) -> None:
    if stats.truncated:
        log.warning("%s: %d of %d rows were longer than max_length=%d tokens and were cut%s", stats.source,
                    stats.truncated, stats.rows_read, stats.max_length, stats.places("truncated"))
    if stats.dropped_no_trainable:
        log.warning("%s: %d rows dropped: no trainable token left within max_length=%d%s", stats.source,
                    stats.dropped_no_trainable, stats.max_length, stats.places("dropped_no_trainable"))
    if stats.dropped_empty:
        log.warning("%s: %d rows dropped: a required field was missing or empty, or every answer had weight 0%s",
                    stats.source, stats.dropped_empty, stats.places("dropped_empty"))
    log.info("%s", stats.summary())

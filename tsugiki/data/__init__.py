"""Training data: files → rows → templated text → token ids + labels → batches.

- :mod:`.formats`: :func:`read_rows` / :func:`load_rows`, :func:`detect_format`, row normalisation.
- :mod:`.templates`: :class:`Template`, :func:`get_template` (chat, alpaca, japanese, llama2, custom).
- :mod:`.tokenize`: :func:`build_dataset` (masking, truncation, eval split, :class:`DataStats`).
- :mod:`.batching`: :class:`Collator`, :func:`pack`, :class:`PackedCollator`, :func:`batches`.

Every bad-input error is a :class:`DataError` (a ``ValueError``).
"""

from .batching import (
    Batches,
    Collator,
    PackedCollator,
    batch_plan,
    batches,
    block_causal_mask,
    collate,
    pack,
    pad_token_id_for,
)
from .errors import DataError
from .formats import FORMATS, Sample, detect_format, load_rows, read_rows
from .templates import BUILTIN_TEMPLATES, Template, get_template
from .tokenize import IGNORE_INDEX, DataStats, build_dataset, encode, split_eval

__all__ = [
    "BUILTIN_TEMPLATES",
    "Batches",
    "Collator",
    "DataError",
    "DataStats",
    "FORMATS",
    "IGNORE_INDEX",
    "PackedCollator",
    "Sample",
    "Template",
    "batch_plan",
    "batches",
    "block_causal_mask",
    "build_dataset",
    "collate",
    "detect_format",
    "encode",
    "get_template",
    "load_rows",
    "read_rows",
    "pack",
    "pad_token_id_for",
    "split_eval",
]

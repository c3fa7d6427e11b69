"""Read training rows from disk, recognise their format, and normalise them.

Supported sources:

- ``.json`` (a list of objects, or one object per line), ``.jsonl`` / ``.ndjson``,
  ``.csv``, ``.parquet``; the JSON and CSV kinds may be gzipped (``.jsonl.gz``,
  ``.json.gz``, ``.ndjson.gz``, ``.csv.gz``) and read as the plain file would be;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (a ``DatasetDict`` must have a ``train`` split, or exactly one split).

JSON files are parsed here, line by line for JSON lines, because the
``datasets`` JSON reader does not say which line is broken; :func:`read_rows`
then hands them on as plain dicts, so training on JSON never imports
``datasets`` and pyarrow (about 80 MiB of resident memory and half a second).
CSV files are read with pandas and Parquet files with pyarrow, every CSV cell
as the text written there (``NA`` and ``None`` are answers, not missing
values); only saved folders go through 🤗 ``datasets``, whose cache could hand
back an older file's rows.

Formats, recognised from the column names (first match wins):

==================== ==========================================================
``messages``         ``messages``: list of ``{"role", "content"}``, roles
                     ``system`` (first only), ``user``, ``assistant``
``sharegpt``         ``conversations``: list of ``{"from", "value"}`` (or
                     ``{"role", "content"}``), speakers ``system`` (first
                     only), ``human`` or ``user``, ``gpt`` or ``assistant``
``alpaca``           ``instruction``, ``output``, optional ``input``
``dolly``            ``instruction``, ``response``, optional ``context``
``prompt_completion`` ``prompt``, ``completion``
``text``             ``text`` (whole-text language modelling)
==================== ==========================================================

In the two conversation formats an assistant message may carry ``"weight": 0``
or ``1``, as in OpenAI's fine-tuning files: a turn of weight 0 is shown to the
model as context but not trained on; a conversation with no answer of weight 1
is dropped like one with no answer at all.

In the instruction and prompt formats ``input`` and ``context`` are one slot
(either name, in any of them). In every format but ``text`` a ``system`` field
is the row's system turn, in training as in generation (a conversation may hold
it as its first message instead, not both).

Structured formats win over ``text`` because several public sets (Alpaca among
them) ship a pre-rendered ``text`` column next to the structured fields, and
the structured fields are what make response-only loss possible.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import DataError

if TYPE_CHECKING:
    import datasets

FORMATS = ("messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "text")

# Required and optional columns per format, in detection order.
_FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "dolly": (("instruction", "response"), ("context",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}

_ACCEPTED = (
    "'text'; 'instruction' + 'output' (+ optional 'input', Alpaca); "
    "'instruction' + 'response' (+ optional 'context', Dolly); 'prompt' + 'completion'; "
    "'messages' (list of {role, content}); 'conversations' (ShareGPT: list of {from, value})"
)

# The speaker names each conversation field accepts, and the Sample role each stands for.
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SPEAKERS = {
    "messages": _MESSAGE_ROLES,
    # ShareGPT's own names, and the chat names some exports write instead.
    "conversations": {**_MESSAGE_ROLES, "human": "user", "gpt": "assistant"},
}
# The (speaker, text) keys of a conversation item, in the order they are looked for.
_ITEM_KEYS = {"messages": (("role", "content"),), "conversations": (("from", "value"), ("role", "content"))}
_ITEM_SHAPE = {"messages": "{role, content}", "conversations": "{from, value} (or {role, content})"}
_ITEM_EXPECTED = {"messages": "'role' and 'content'", "conversations": "'from' and 'value' (or 'role' and 'content')"}
_SPEAKER_HINT = {
    "messages": "'system' (first message only), 'user' or 'assistant'",
    "conversations": "'system' (first message only), 'human' (or 'user') or 'gpt' (or 'assistant')",
}

_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
_TABLES = (".csv", ".parquet", ".pq")
# Text kinds are read whole and checked as UTF-8 here, so they may come gzipped; Parquet compresses itself.
_GZIPPABLE = (".json", ".jsonl", ".ndjson", ".csv")


@dataclass
class Sample:
    """One row in a common shape, whatever file format it came from.

    ``text`` is set only for the ``text`` format (then ``turns`` is empty).
    Otherwise ``turns`` alternates ``("user", ...)`` / ``("assistant", ...)``;
    ``input`` is the Alpaca ``input`` / Dolly ``context`` of the first user turn
    (empty when absent) and ``system`` the conversation's system turn, if any.
    ``untrained_turns`` holds the indices in ``turns`` of assistant turns that are
    context only (``"weight": 0``): their tokens carry no loss.
    """

    text: str | None = None
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    input: str = ""
    untrained_turns: set[int] = field(default_factory=set)

    def trains_on(self, turn: int) -> bool:
        """Whether the tokens of ``turns[turn]``, an assistant turn, carry loss (not weight 0)."""
        return turn not in self.untrained_turns

    def messages(self) -> list[dict[str, str]]:
        """The sample as chat messages, ``input`` folded into the first user turn."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for i, (role, content) in enumerate(self.turns):
            if i == 0 and self.input:
                content = f"{content}\n\n{self.input}"
            out.append({"role": role, "content": content})
        return out


def read_rows(path: str | os.PathLike, max_rows: int | None = None) -> tuple[Sequence[dict], list[str]]:
    """The raw rows of a data file or saved-datasets folder, and their field names.

    JSON and JSON-lines files come back as a list of plain dicts (fields a row
    omits are absent, not ``None``); other sources as the ``datasets.Dataset``
    of :func:`load_rows`. Arguments and errors are those of :func:`load_rows`.
    """
    rows, columns, _places = read_rows_located(path, max_rows)
    return rows, columns


def read_rows_located(path: str | os.PathLike,
                      max_rows: int | None = None) -> tuple[Sequence[dict], list[str], list[str]]:
    """:func:`read_rows` plus where each row sits, for messages: ``"line 5"`` in a
    JSON-lines file, ``"item 3"`` in a JSON list, ``"row 2"`` elsewhere (1-based)."""
    p = _checked_path(path, max_rows)
    if p.is_file() and _content_suffix(p) in _TABLES:
        rows, columns, places = _read_table(p, max_rows)
        return rows, columns, places
    if not _is_json(p):
        ds = load_rows(p, max_rows)
        return ds, ds.column_names, [f"row {i}" for i in range(1, len(ds) + 1)]
    rows, columns, places = _read_json_checked(p, max_rows)
    return rows, list(columns), places


def load_rows(path: str | os.PathLike, max_rows: int | None = None) -> datasets.Dataset:
    """Load the raw rows of a data file or saved-datasets folder as a ``datasets.Dataset``.

    Args:
        path: a ``.json``, ``.jsonl``, ``.ndjson``, ``.csv`` or ``.parquet`` file (the first
            four also gzipped: ``.jsonl.gz``), or a folder written by ``save_to_disk``.
        max_rows: keep only the first ``max_rows`` rows (default ``None``: all).

    Raises:
        DataError: the path is missing, the file is malformed (JSON errors name the
            1-based line) or not a readable gzip file, the extension is unknown, or the
            file holds no rows.
    """
    import datasets

    p = _checked_path(path, max_rows)
    if p.is_dir():
        ds = _load_saved(p)
    elif _is_json(p):
        _rows, columns, _places = _read_json_checked(p, max_rows)
        try:
            ds = datasets.Dataset.from_dict(columns)
        except Exception as e:  # pyarrow refuses, e.g., nested fields whose types differ between rows
            raise DataError(f"{p}: {e}") from e
    elif _content_suffix(p) in _TABLES:
        rows, columns, _places = _read_table(p, max_rows)
        ds = datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in columns})
    else:
        raise DataError(
            f"{p}: unknown data file type {_content_suffix(p)!r}; use .json, .jsonl, .ndjson, .csv or .parquet "
            "(the first four may be gzipped: .jsonl.gz, .csv.gz), or a folder saved with Dataset.save_to_disk"
        )
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    if len(ds) == 0:
        raise DataError(f"{p}: the data holds no rows")
    return ds


def _read_table(p: Path, max_rows: int | None) -> tuple[list[dict], list[str], list[str]]:
    """The rows of a CSV or Parquet file as plain dicts, their columns and places.

    Read directly (pandas, pyarrow), not through ``datasets``: its cache would return an
    older file's rows for a changed file of the same size and time. CSV has no types, so
    every cell is text, kept as written: ``42`` stays the string an answer needs, and
    ``NA``, ``None`` or ``null`` are answers too, not missing values. Places count rows
    as a spreadsheet does, the header being row 1.
    """
    if _content_suffix(p) == ".csv":
        rows = _read_csv(p, max_rows)
        places = [f"row {i}" for i in range(2, len(rows) + 2)]
    else:
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(p).to_pylist()
        except Exception as e:  # pyarrow's own error types: not a Parquet file, a damaged one
            raise DataError(f"{p}: could not be read as Parquet: {e}") from e
        rows = rows[:max_rows] if max_rows else rows
        places = [f"row {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise DataError(f"{p}: the data holds no rows")
    return rows, list(rows[0]), places


def _read_csv(p: Path, max_rows: int | None) -> list[dict]:
    import warnings

    import pandas

    text = read_utf8(p)  # a file that is not UTF-8: the error that names the line
    try:
        with warnings.catch_warnings():
            # A row with more cells than the header: pandas would drop the extra cells, with a warning.
            warnings.simplefilter("error", pandas.errors.ParserWarning)
            # Parsed from the checked text, already unzipped, rather than read a second time.
            frame = pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                                    index_col=False, nrows=max_rows)
    except pandas.errors.EmptyDataError:
        raise DataError(f"{p}: the file is empty; a CSV file needs a header line naming the columns "
                        "(e.g. instruction,output) and a row per example") from None
    except pandas.errors.ParserWarning:
        raise DataError(f"{p}: a row has more cells than the header line names; quote cells that hold "
                        'commas ("red, green, blue")') from None
    except (pandas.errors.ParserError, ValueError) as e:  # e.g. "Expected 2 fields in line 4, saw 4"
        raise DataError(f"{p}: could not be read as CSV: {str(e).strip()}; quote cells that hold commas") from e
    if frame.empty:
        raise DataError(f"{p}: the data holds no rows: only the header line {','.join(frame.columns)!r}")
    return frame.to_dict("records")


def _checked_path(path: str | os.PathLike, max_rows: int | None) -> Path:
    p = Path(path)
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if not p.exists():
        raise DataError(f"data file not found: {p} (check the path; it is resolved from {Path.cwd()})")
    return p


def _is_json(p: Path) -> bool:
    return p.is_file() and (_content_suffix(p) == ".json" or _content_suffix(p) in _JSON_LINES_SUFFIXES)


def _content_suffix(p: str | os.PathLike) -> str:
    """The lower-case suffix that names what a file holds: ``.jsonl`` for ``d.jsonl`` and ``d.JSONL.gz``.

    A gzipped file of a kind that is not read gzipped keeps both suffixes (``.parquet.gz``),
    so that it is refused as an unknown type under its whole name.
    """
    suffix = Path(p).suffix.lower()
    if suffix != ".gz":
        return suffix
    inner = Path(Path(p).stem).suffix.lower()
    return inner if inner in _GZIPPABLE else inner + suffix


def _read_bytes(p: Path) -> bytes:
    """A file's bytes, unzipped when its name ends in ``.gz``."""
    raw = p.read_bytes()
    if p.suffix.lower() != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off file, an EOFError
        raise DataError(f"{p}: not a readable gzip file ({e}); the file may be cut off or damaged (download or "
                        f"compress it again), or it is not compressed (then drop the .gz from its name)") from None


def _load_saved(p: Path) -> datasets.Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(
            f"{p}: is a folder but not one written by Dataset.save_to_disk ({e}); "
            "point at a data file or a saved datasets folder"
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"{p}: saved DatasetDict has splits {sorted(loaded)} and none is 'train'; save the split to train on")
    return loaded


def _read_json_checked(p: Path, max_rows: int | None) -> tuple[list[dict], dict[str, list], list[str]]:
    """The rows of a JSON file, their columns and places; a field must hold one type in every row."""
    rows, places = _read_json(p, max_rows)
    if not rows:
        raise DataError(f"{p}: the data holds no rows")
    columns = _columns(rows)
    clash = _first_type_clash(columns, places)
    if clash:
        raise DataError(f"{p}: {clash}")
    return rows, columns, places


def read_utf8(p: str | os.PathLike) -> str:
    """A text file's content (a UTF-8 byte-order mark dropped; unzipped first when the name ends in
    ``.gz``); a file that is not UTF-8 is an error naming the line of its first bad byte."""
    raw = _read_bytes(Path(p))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{p}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as "
                        "UTF-8") from None


def _read_json(p: Path, max_rows: int | None) -> tuple[list[dict], list[str]]:
    """Parse a JSON array or JSON-lines file; errors name the 1-based line.

    Returns the rows and, per row, where it sits in the file (for later messages).
    """
    content = read_utf8(p)
    json_list_allowed = _content_suffix(p) == ".json"
    if json_list_allowed and content.lstrip().startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}, line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from e
        rows = rows[:max_rows] if max_rows else rows
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"{p}: item {i} of the JSON list is a {type(row).__name__}, expected an object with fields")
        return rows, [f"item {i}" for i in range(1, len(rows) + 1)]
    rows, places = [], []
    # Lines end at "\n" only: JSON writers leave U+2028, U+2029 and U+0085 unescaped inside strings,
    # where str.splitlines() would cut them.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (" (a .json file must hold a JSON list or one object per line)" if json_list_allowed
                    else " (this looks like a JSON list: name the file .json, or write one object per line)"
                    if lineno == 1 and line.lstrip().startswith("[") else "")
            raise DataError(f"{p}, line {lineno}: malformed JSON: {e.msg} (column {e.colno}){hint}") from e
        if not isinstance(row, dict):
            raise DataError(f"{p}, line {lineno}: expected a JSON object with fields, got {type(row).__name__}")
        rows.append(row)
        places.append(f"line {lineno}")
        if max_rows is not None and len(rows) >= max_rows:
            break
    return rows, places


def _columns(rows: list[dict]) -> dict[str, list]:
    # Union of keys in first-seen order: rows may omit optional fields such as `input`.
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def _first_type_clash(columns: dict[str, list], places: list[str]) -> str | None:
    for key, values in columns.items():
        first = next(((i, type(v)) for i, v in enumerate(values) if v is not None), None)
        for i, v in enumerate(values):
            if first and v is not None and type(v) is not first[1]:
                return (
                    f"{places[i]}, field '{key}': is a {type(v).__name__} here but a {first[1].__name__} "
                    f"at {places[first[0]]}; give the field one type in every row"
                )
    return None


def detect_format(column_names, source: str | os.PathLike | None = None) -> str:
    """Name the format of rows with these columns: one of :data:`FORMATS`.

    Raises:
        DataError: no known combination of fields; the message lists the fields found
            (and ``source`` when given) and the accepted formats.
    """
    cols = set(column_names)
    for name, (required, _optional) in _FORMAT_FIELDS.items():
        if all(c in cols for c in required):
            return name
    where = f"{source}: " if source is not None else ""
    hint = ""
    lowered = {str(c).strip().lower() for c in cols}
    if any(all(k in lowered for k in required) for required, _ in _FORMAT_FIELDS.values()):
        hint = "; field names are read as written, in lower case: rename them (e.g. 'Instruction' to 'instruction')"
    elif len(cols) == 1 and any(sep in str(next(iter(cols))) for sep in ";\t|"):
        hint = "; the header holds one field with ';', tab or '|' in it: save the CSV with commas between fields"
    raise DataError(f"{where}no recognised data format in fields {sorted(cols)}; accepted fields: {_ACCEPTED}{hint}")


def normalise(row: dict[str, Any], fmt: str, where: str) -> Sample | None:
    """Turn one raw row of format ``fmt`` into a :class:`Sample`.

    Returns ``None`` when a required value is missing, empty or blank (the caller counts
    and drops such rows). ``where`` names the row in error messages.

    Raises:
        DataError: a value has the wrong type, a message has a bad role, or the row is in
            another format than the file's (it would be dropped as empty, silently).
    """
    required = _FORMAT_FIELDS[fmt][0]
    if not all(_filled(row, key) for key in required):  # a CSV row has every column, empty where unused
        own = next((name for name, (fields, _) in _FORMAT_FIELDS.items()
                    if all(_filled(row, k) for k in fields)), None)
        if own is not None and own != fmt:
            raise DataError(f"{where}: this row is in the {own} format ({', '.join(sorted(row))}) but the file is "
                            f"read as {fmt} rows ({', '.join(required)}); put rows of one format in a file")
    if fmt in ("messages", "sharegpt"):
        field = _conversation_field(fmt)
        return _with_row_system(_normalise_conversation(row.get(field), field, where), row, field, where)
    if fmt == "text":
        text = _string(row, "text", where)
        return Sample(text=text) if text.strip() else None
    instr_key, resp_key = {
        "alpaca": ("instruction", "output"),
        "dolly": ("instruction", "response"),
        "prompt_completion": ("prompt", "completion"),
    }[fmt]
    instruction, response = _string(row, instr_key, where), _string(row, resp_key, where)
    if not instruction.strip() or not response.strip():  # nothing to ask, or nothing to learn
        return None
    return Sample(turns=[("user", instruction), ("assistant", response)], input=_context(row, where),
                  system=_string(row, "system", where) or None)


def _filled(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and value != ""


def _context(row: dict, where: str) -> str:
    """The text a row gives its instruction to work on: ``input`` (Alpaca) or ``context`` (Dolly),
    whichever it has, in every instruction and prompt format (generation reads it the same way)."""
    given = {key: _string(row, key, where) for key in ("input", "context")}
    given = {key: text for key, text in given.items() if text.strip()}
    if len(given) == 2 and given["input"] != given["context"]:
        raise DataError(f"{where}: fields 'input' and 'context' both hold text; they are the same slot "
                        "(Alpaca's and Dolly's name for it): keep one")
    return next(iter(given.values()), "")


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}, field '{key}': expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def _conversation_field(fmt: str) -> str:
    """The row field that holds a conversation format's turns."""
    return _FORMAT_FIELDS[fmt][0][0]


def _normalise_conversation(items: Any, field: str, where: str, require_assistant: bool = True) -> Sample | None:
    """A :class:`Sample` from the list of a ``messages`` or ShareGPT ``conversations`` field.

    ``None`` when the field is missing or, with ``require_assistant``, when no assistant turn
    of weight 1 holds text (nothing to learn). Raises :class:`DataError` naming the item for
    a bad shape, a speaker the field does not accept, a system turn that is not the first, or
    a bad ``weight``.
    """
    if items is None:
        return None
    if not isinstance(items, list):
        raise DataError(f"{where}, field '{field}': expected a list of {_ITEM_SHAPE[field]}, got {type(items).__name__}")
    sample = Sample()
    for i, item in enumerate(items):
        role, content = _conversation_item(item, field, i, where)
        if _weighs_zero(item, role, f"{where}, field '{field}[{i}].weight'"):
            sample.untrained_turns.add(len(sample.turns))
        if role == "system":
            sample.system = content
        else:
            sample.turns.append((role, content))
    if require_assistant and not any(role == "assistant" and content.strip() and sample.trains_on(k)
                                     for k, (role, content) in enumerate(sample.turns)):
        return None  # nothing to learn: no answer, only empty ones, or only ones of weight 0
    return sample


def _with_row_system(sample: Sample | None, row: dict, field: str, where: str) -> Sample | None:
    """``sample`` with the row's own ``system`` field as its system turn (LLaMA-Factory's ShareGPT
    files keep it there); a row that also has a different system message in ``field`` is an error."""
    system = _string(row, "system", where)
    if sample is None or not system.strip():
        return sample
    if sample.system is not None and sample.system != system:
        raise DataError(f"{where}: the row has a 'system' field and a different system message in '{field}'; "
                        "keep one of them")
    sample.system = system
    return sample


def _weighs_zero(item: dict, role: str, where: str) -> bool:
    """Whether a conversation item carries ``"weight": 0`` (shown, not trained on).

    Only assistant turns take a weight, and only 0 or 1, as in OpenAI's chat fine-tuning
    files; a weight of ``None`` is no weight (datasets gives every item the keys of all).
    """
    weight = item.get("weight")
    if weight is None:
        return False
    if role != "assistant":
        raise DataError(f"{where}: only assistant turns take a weight (it says whether to train on the answer); "
                        f"remove it from this {role} turn")
    if isinstance(weight, bool) or weight not in (0, 1):  # True == 1 in Python, but JSON's true is no weight
        raise DataError(f"{where}: {weight!r:.40} is not a weight; use 1 (train on this answer) or 0 (show it as "
                        "context only), or leave the key out (1)")
    return weight == 0


def _conversation_item(item: Any, field: str, i: int, where: str) -> tuple[str, str]:
    """The Sample role and the text of item ``i`` of a conversation field; errors name ``field[i]``."""
    keys = None
    if isinstance(item, dict):
        # A speaker key holding None is absent: datasets gives every item of a column the keys of all.
        keys = next(((speaker, text) for speaker, text in _ITEM_KEYS[field]
                     if item.get(speaker) is not None and text in item), None)
    if keys is None:
        raise DataError(f"{where}, field '{field}[{i}]': expected an object with {_ITEM_EXPECTED[field]}, "
                        f"got {item!r:.80}")
    speaker_key, text_key = keys
    speaker, content = item[speaker_key], item[text_key]
    if not isinstance(content, str):
        raise DataError(f"{where}, field '{field}[{i}].{text_key}': expected a string, got {type(content).__name__}")
    role = _SPEAKERS[field].get(speaker) if isinstance(speaker, str) else None
    if role is None or (role == "system" and i > 0):
        raise DataError(f"{where}, field '{field}[{i}].{speaker_key}': {speaker!r} is not allowed here; "
                        f"use {_SPEAKER_HINT[field]}")
    return role, content


def without_turn_weights(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the ``weight`` of its conversation turns left out (a copy): scoring takes the last
    answer as the reference, whatever a training file says about learning it."""
    out = dict(row)
    for key in (_conversation_field(fmt) for fmt in ("messages", "sharegpt")):
        if isinstance(row.get(key), list):
            out[key] = [{k: v for k, v in item.items() if k != "weight"} if isinstance(item, dict) else item
                        for item in row[key]]
    return out


def conversation_turns(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The user and assistant turns of a ``messages`` or ShareGPT ``conversations`` row, as
    ``(role, text)`` with chat role names.

    ``[]`` for a row of another format or a malformed conversation: this serves displays
    and reference answers, and the row's own errors come from where it is read for a model.
    """
    for fmt in ("messages", "sharegpt"):  # detection order
        field = _conversation_field(fmt)
        if field in row:
            try:
                sample = _normalise_conversation(row[field], field, "row", require_assistant=False)
            except DataError:
                return []
            return sample.turns if sample else []
    return []


def sample_from_prompt_row(row: dict[str, Any] | str, where: str = "prompt row") -> Sample:
    """A :class:`Sample` for generation: a raw row of any format, or a plain string.

    A plain string is the user's instruction. Instruction and prompt/completion
    rows give their prompt side only; a messages row keeps all its turns
    (``Template.format_prompt`` drops a final assistant turn), and so does a
    ShareGPT ``conversations`` row. ``where`` names
    the row in errors (e.g. ``"prompts.jsonl, line 3"``).
    """
    if isinstance(row, str):
        return Sample(turns=[("user", row)])
    fmt = _detect_prompt_format(row, where)
    if fmt in ("messages", "sharegpt"):
        field = _conversation_field(fmt)
        sample = _normalise_conversation(row[field], field, where, require_assistant=False) or Sample()
        return _with_row_system(sample, row, field, where)
    if fmt == "text":
        return Sample(text=_string(row, "text", where))
    instr_key = "prompt" if fmt == "prompt_completion" else "instruction"
    return Sample(turns=[("user", _string(row, instr_key, where))], input=_context(row, where),
                  system=_string(row, "system", where) or None)


def _detect_prompt_format(row: dict, where: str) -> str:
    # At generation time the response field is usually absent, so only the prompt side is required.
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(f"{where} has fields {sorted(row)}; expected 'instruction', 'prompt', 'messages', 'conversations' or 'text'")

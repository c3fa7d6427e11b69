"""Loading files, format detection, and the bad-input errors of the loader."""

import gzip
import json
import os

import datasets
import pandas as pd
import pytest

from tsugiki.data import DataError, detect_format, load_rows, read_rows
from tsugiki.data.formats import normalise

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(5)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json_list", "json_lines", "csv", "parquet", "saved", "saved_dict"])
def test_load_rows_reads_every_source_kind(tmp_path, kind):
    df = pd.DataFrame(ROWS)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "json_list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=2))
    elif kind == "json_lines":  # JSON lines under a .json name, as many hub sets are
        path = write_jsonl(tmp_path / "d.json", ROWS)
    elif kind == "csv":
        path = tmp_path / "d.csv"
        df.to_csv(path, index=False)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        df.to_parquet(path)
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_pandas(df).save_to_disk(str(path))
    else:
        path = tmp_path / "saved"
        ds = datasets.Dataset.from_pandas(df)
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    ds = load_rows(path)
    assert len(ds) == 5
    assert ds[3]["instruction"] == "question 3" and ds[3]["output"] == "answer 3"
    assert len(load_rows(path, max_rows=2)) == 2
    assert load_rows(path, max_rows=2)[1]["output"] == "answer 1"
    # read_rows gives the same rows; JSON ones as the plain dicts of the file.
    rows, columns = read_rows(path, max_rows=4)
    assert columns == ["instruction", "input", "output"]
    assert [(r["instruction"], r["output"]) for r in rows] == [(r["instruction"], r["output"]) for r in ROWS[:4]]
    if kind.startswith("json"):
        assert rows == ROWS[:4]
    assert isinstance(rows, list) == (kind.startswith("json") or kind in ("csv", "parquet"))  # files: plain dicts


def test_jsonl_rows_may_omit_optional_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "x", "output": "d"}])
    ds = load_rows(path)
    assert ds.column_names == ["instruction", "output", "input"]
    assert ds[0]["input"] is None and ds[1]["input"] == "x"
    rows, columns = read_rows(path)
    assert columns == ["instruction", "output", "input"] and "input" not in rows[0]


def test_json_field_of_two_types_names_both_lines_in_either_reader(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": 5}])
    for reader in (read_rows, load_rows):
        with pytest.raises(DataError, match=r"d\.jsonl: line 2, field 'text': is a int here but a str at line 1"):
            reader(path)


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["text"], "text"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["instruction", "input", "output", "text"], "alpaca"),  # structured beats a pre-rendered text column
        (["instruction", "context", "response", "category"], "dolly"),
        (["instruction", "response"], "dolly"),
        (["prompt", "completion"], "prompt_completion"),
        (["messages", "id"], "messages"),
        (["conversations", "id"], "sharegpt"),
        (["messages", "conversations"], "messages"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_normalise_every_format():
    alpaca = normalise({"instruction": "I", "input": "X", "output": "R"}, "alpaca", "row 1")
    assert alpaca.turns == [("user", "I"), ("assistant", "R")] and alpaca.input == "X"
    dolly = normalise({"instruction": "I", "context": "", "response": "R"}, "dolly", "row 1")
    assert dolly.turns == [("user", "I"), ("assistant", "R")] and dolly.input == ""
    pc = normalise({"prompt": "P", "completion": "C"}, "prompt_completion", "row 1")
    assert pc.turns == [("user", "P"), ("assistant", "C")]
    chat = normalise(
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        "messages", "row 1",
    )
    assert chat.system == "S" and chat.turns == [("user", "U"), ("assistant", "A")]
    assert normalise({"text": "T"}, "text", "row 1").text == "T"
    # Missing or empty required values are dropped (None), not errors.
    assert normalise({"instruction": "I", "output": None}, "alpaca", "row 1") is None
    assert normalise({"text": ""}, "text", "row 1") is None
    # ... and so are values of whitespace alone: a row of nothing but spaces teaches nothing.
    assert normalise({"text": " \n\t"}, "text", "row 1") is None
    assert normalise({"instruction": "I", "output": "  "}, "alpaca", "row 1") is None
    assert normalise({"prompt": "\n", "completion": "C"}, "prompt_completion", "row 1") is None
    assert normalise({"messages": [{"role": "user", "content": "U"}]}, "messages", "row 1") is None


# -- bad input ---------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl"):
        load_rows(tmp_path / "nope.jsonl")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert "bad.jsonl, line 4" in str(err.value)
    assert issubclass(DataError, ValueError)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: expected a JSON object"):
        load_rows(path)


def test_malformed_json_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json, line 3"):
        load_rows(path)


def test_unknown_extension_and_plain_folder(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unknown data file type '\.txt'; use .*\.csv\.gz"):
        load_rows(tmp_path / "d.txt")
    # Parquet compresses itself and is not read gzipped: the whole suffix is named.
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(DataError, match=r"unknown data file type '\.parquet\.gz'"):
        load_rows(tmp_path / "d.parquet.gz")
    with pytest.raises(DataError, match="not one written by Dataset.save_to_disk"):
        load_rows(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the data holds no rows"):
        load_rows(path)


def test_no_recognised_fields_lists_fields_and_formats():
    with pytest.raises(DataError) as err:
        detect_format(["question", "answer"], "qa.jsonl")
    msg = str(err.value)
    assert "qa.jsonl" in msg and "'answer', 'question'" in msg
    for accepted in ("'text'", "'instruction'", "'output'", "'response'", "'prompt'", "'completion'", "'messages'",
                     "'conversations'"):
        assert accepted in msg


def test_csv_cells_are_text_even_when_a_column_holds_numbers(tmp_path):
    path = tmp_path / "num.csv"
    path.write_text('instruction,input,output\n"add one",41,42\n"halve",,3.5\n', encoding="utf-8")
    rows, columns = read_rows(path)
    assert [dict(r) for r in rows] == [{"instruction": "add one", "input": "41", "output": "42"},
                                       {"instruction": "halve", "input": "", "output": "3.5"}]
    sample = normalise(rows[0], "alpaca", "num.csv, row 2")
    assert sample.turns == [("user", "add one"), ("assistant", "42")] and sample.input == "41"


def test_csv_cells_that_pandas_would_call_missing_are_kept_as_written(tmp_path):
    """'None', 'NA', 'null' are answers; a changed file of the same size and time is read anew."""
    path = tmp_path / "na.csv"
    path.write_text("instruction,input,output\n\"Which is prime: 4, 6 or 8?\",,None\nExpand it,NA,North America\n"
                    "Is it set?,,null\n", encoding="utf-8")
    rows, _ = read_rows(path)
    assert [r["output"] for r in rows] == ["None", "North America", "null"] and rows[1]["input"] == "NA"
    stamp = os.stat(path).st_mtime_ns
    path.write_text("instruction,input,output\n\"Which is prime: 4, 6 or 9?\",,Nine\nExpand it,NA,North Africa\n"
                    "Is it set?,,true\n", encoding="utf-8")
    os.utime(path, ns=(stamp, stamp))  # as cp -p or an unpacked archive leave it
    assert [r["output"] for r in read_rows(path)[0]] == ["Nine", "North Africa", "true"]


@pytest.mark.parametrize("text, columns, message", [
    (",instruction,output\n0,q,a\n", ["Unnamed: 0", "instruction", "output"], None),  # pandas' index column
    ("instruction,output,\nq,a,\n", ["instruction", "output", "Unnamed: 2"], None),  # Excel's trailing comma
    ("instruction,output\nq,a\nlist,red, green\nr,b\n", None, r"line 3, saw 3.*quote cells that hold commas"),
    ("instruction,output\nlist,red, green\nq,a\n", None, "a row has more cells than the header line names"),
])
def test_csv_files_as_spreadsheets_write_them(tmp_path, text, columns, message):
    path = tmp_path / "sheet.csv"
    path.write_text(text, encoding="utf-8")
    if message:
        with pytest.raises(DataError, match=message):
            read_rows(path)
    else:
        assert read_rows(path)[1] == columns


def test_a_csv_cell_longer_than_pythons_csv_field_limit_is_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text(f"instruction,output\nsummarise,{'x' * 200_000}\n", encoding="utf-8")
    assert len(read_rows(path)[0][0]["output"]) == 200_000


@pytest.mark.parametrize("text, message", [
    ("", r"empty\.csv: the file is empty; a CSV file needs a header line"),
    ("\n\n", r"empty\.csv: the file is empty"),
    ("instruction,output\n\n", r"empty\.csv: the data holds no rows: only the header line 'instruction,output'"),
])
def test_an_empty_or_header_only_csv_file_is_named_as_such(tmp_path, text, message):
    path = tmp_path / "empty.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_prompt_row_with_a_non_text_input_is_named():
    from tsugiki.data.formats import sample_from_prompt_row

    with pytest.raises(DataError, match=r"prompt row, field 'input': expected a string, got int 5"):
        sample_from_prompt_row({"instruction": "x", "input": 5})
    assert sample_from_prompt_row({"instruction": "x", "context": "c"}).input == "c"


def test_bad_values_name_row_and_field():
    with pytest.raises(DataError, match=r"d\.jsonl, row 7, field 'output': expected a string"):
        normalise({"instruction": "I", "output": 3}, "alpaca", "d.jsonl, row 7")
    with pytest.raises(DataError, match=r"row 2, field 'messages\[1\]\.role': 'tool'"):
        normalise({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "messages", "row 2")
    with pytest.raises(DataError, match=r"field 'messages\[0\]': expected an object"):
        normalise({"messages": ["hi"]}, "messages", "row 2")


def test_a_row_in_another_format_is_an_error_not_a_silent_drop(tmp_path):
    from helpers_data import make_tokenizer, write_jsonl
    from tsugiki.data import DataError, build_dataset

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    rows.insert(3, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl, line \d: this row is in the .* format .* put rows of one "
                                        r"format in a file"):
        build_dataset(str(path), make_tokenizer(), "alpaca")


@pytest.mark.parametrize("suffix, content, line", [
    (".jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n', 2),
    (".csv", b'instruction,output\n"a","b"\n"caf\xe9","x"\n', 3),
])
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, suffix, content, line):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"latin1\{suffix}, line {line}: not UTF-8 text \(byte 0xe9\)"):
        load_rows(str(path))


@pytest.mark.parametrize("row", [
    {"instruction": "Summarize the text", "context": "The cat sat.", "output": "A cat sat."},
    {"instruction": "Summarize the text", "input": "The cat sat.", "response": "A cat sat."},
    {"prompt": "Summarize the text", "input": "The cat sat.", "completion": "A cat sat."},
])
def test_the_context_slot_trains_under_either_name_as_generation_reads_it(row):
    from tsugiki.data.formats import sample_from_prompt_row

    fmt = detect_format(row)
    trained = normalise(row, fmt, "row 1")
    assert trained.input == "The cat sat." == sample_from_prompt_row(row).input
    with pytest.raises(DataError, match="'input' and 'context' both hold text"):
        normalise({**row, "input": "one", "context": "other"}, fmt, "row 1")


def test_a_system_field_is_the_rows_system_turn_in_training_and_generation():
    from tsugiki.data.formats import sample_from_prompt_row

    row = {"system": "Answer in French.", "instruction": "Greet", "output": "Bonjour"}
    assert normalise(row, "alpaca", "row 1").system == "Answer in French." == sample_from_prompt_row(row).system
    # Beside a conversation too (LLaMA-Factory's ShareGPT files keep it there), unless it says otherwise.
    sharegpt = {"system": "Answer in French.", "conversations": [{"from": "human", "value": "Greet"},
                                                                 {"from": "gpt", "value": "Bonjour"}]}
    assert normalise(sharegpt, "sharegpt", "line 1").system == "Answer in French."
    assert sample_from_prompt_row(sharegpt).system == "Answer in French."
    both = {"system": "Be brief.", "messages": [{"role": "system", "content": "Be long."},
                                                {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match="line 2: the row has a 'system' field and a different system message"):
        normalise(both, "messages", "line 2")


def test_a_csv_row_of_another_format_is_named_not_dropped(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("instruction,output,prompt,completion\nq,a,,\n,,p,c\n", encoding="utf-8")
    rows, columns = read_rows(path)
    fmt = detect_format(columns)
    with pytest.raises(DataError, match="row 3: this row is in the prompt_completion format"):
        [normalise(row, fmt, place) for row, place in zip(rows, ["row 2", "row 3"])]


def test_a_conversation_whose_answers_are_all_empty_is_dropped_as_empty():
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    assert normalise(empty, "messages", "line 1") is None


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "seps.jsonl"
    rows = [{"text": "one\u2028two"}, {"text": "three\u2029four\x85five"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert read_rows(path)[0] == rows


@pytest.mark.parametrize("name, text, message", [
    ("upper.jsonl", '{"Instruction": "q", "Output": "a"}\n', "rename them .e.g. 'Instruction' to 'instruction'"),
    ("semi.csv", "instruction;output\nq;a\n", "save the CSV with commas between fields"),
    ("array.jsonl", '[\n  {"text": "a"}\n]\n', "this looks like a JSON list: name the file .json"),
])
def test_near_misses_in_the_data_say_how_to_fix_them(tmp_path, name, text, message):
    from tsugiki.data import build_dataset
    from helpers_data import make_tokenizer

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        build_dataset(str(path), make_tokenizer(), "alpaca")


# -- gzipped files -------------------------------------------------------------


def _gzipped(path, plain):
    """``path`` written as the gzip of the plain file ``plain``; returns ``path``."""
    path.write_bytes(gzip.compress(plain.read_bytes()))
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.ndjson", "list.json", "lines.json", "d.csv"])
def test_gzipped_files_read_as_the_plain_file_does(tmp_path, name):
    plain = tmp_path / name
    if name == "list.json":
        plain.write_text(json.dumps(ROWS, indent=2))
    elif name == "d.csv":
        pd.DataFrame(ROWS).to_csv(plain, index=False)
    else:
        write_jsonl(plain, ROWS)
    packed = _gzipped(tmp_path / f"packed-{name}.GZ", plain)  # the suffix in any case, as for plain files
    assert read_rows(packed, max_rows=3) == read_rows(plain, max_rows=3)
    assert load_rows(packed)[4] == load_rows(plain)[4]


@pytest.mark.parametrize("suffix, content, message", [
    (".jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "broken\n', r"line 3: malformed JSON"),
    (".jsonl", b'{"text": "a"}\n\n{"text": "caf\xe9"}\n', r"line 3: not UTF-8 text \(byte 0xe9\)"),
    (".json", b'[\n  {"text": "a"},\n  {"text": "b",}\n]\n', r"line 3, column \d+: malformed JSON"),
    (".csv", b'instruction,output\n"a","b"\n"caf\xe9","x"\n', r"line 3: not UTF-8 text"),
])
def test_errors_in_a_gzipped_file_name_the_line_of_the_unzipped_text(tmp_path, suffix, content, message):
    path = tmp_path / f"bad{suffix}.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=rf"bad\{suffix}\.gz, {message}"):
        read_rows(path)


@pytest.mark.parametrize("damage", ["not gzip", "cut off", "flipped byte"])
def test_a_damaged_gzip_file_is_named_with_what_to_do(tmp_path, damage):
    packed = gzip.compress(b'{"text": "hello"}\n' * 50)
    content = {"not gzip": b'{"text": "hello"}\n', "cut off": packed[: len(packed) // 2],
               "flipped byte": packed[:-6] + bytes([packed[-6] ^ 0xFF]) + packed[-5:]}[damage]
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(content)
    for reader in (read_rows, load_rows):
        with pytest.raises(DataError, match=r"d\.jsonl\.gz: not a readable gzip file \(.+\); the file may be cut "
                                            r"off or damaged .* drop the \.gz from its name"):
            reader(path)


# -- ShareGPT conversations ----------------------------------------------------

CHAT = [("system", "Be brief."), ("user", "hello"), ("assistant", "hi there"), ("user", "how are you"),
        ("assistant", "fine thanks")]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def messages_row(turns=CHAT):
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def sharegpt_row(turns=CHAT, names=SHAREGPT_NAMES, keys=("from", "value")):
    return {"conversations": [{keys[0]: names[role], keys[1]: text} for role, text in turns]}


@pytest.mark.parametrize("row", [
    sharegpt_row(),
    sharegpt_row(names={"system": "system", "user": "user", "assistant": "assistant"}),
    sharegpt_row(keys=("role", "content")),
    {"conversations": [{"from": "human", "value": "hello"}, {"role": "assistant", "content": "hi there"}]},
], ids=["human-gpt", "user-assistant", "role-content", "mixed-keys"])
def test_a_sharegpt_row_is_the_sample_of_the_same_messages_row(row):
    from tsugiki.data.formats import sample_from_prompt_row

    expected_turns = CHAT if len(row["conversations"]) == len(CHAT) else CHAT[1:3]
    expected = normalise(messages_row(expected_turns), "messages", "line 1")
    assert normalise(row, "sharegpt", "line 1") == expected
    assert expected.turns[0] == ("user", "hello") and expected.turns[1] == ("assistant", "hi there")
    assert sample_from_prompt_row(row) == sample_from_prompt_row(messages_row(expected_turns))


def test_sharegpt_rows_without_an_answer_are_dropped_and_prompt_rows_need_none():
    from tsugiki.data.formats import sample_from_prompt_row

    question = sharegpt_row(CHAT[:2])
    assert normalise(question, "sharegpt", "line 1") is None
    assert normalise(sharegpt_row(CHAT[:2] + [("assistant", "  ")]), "sharegpt", "line 1") is None
    assert sample_from_prompt_row(question).turns == [("user", "hello")]


@pytest.mark.parametrize("items, message", [
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}],
     r"line 4, field 'conversations\[1\]\.from': 'bot' is not allowed here; use 'system' \(first message only\), "
     r"'human' \(or 'user'\) or 'gpt' \(or 'assistant'\)"),
    ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}],
     r"line 4, field 'conversations\[1\]\.from': 'system' is not allowed here"),
    ([{"role": "tool", "content": "a"}], r"line 4, field 'conversations\[0\]\.role': 'tool' is not allowed here"),
    ([{"from": "human", "text": "a"}],
     r"line 4, field 'conversations\[0\]': expected an object with 'from' and 'value' \(or 'role' and 'content'\)"),
    (["hello"], r"line 4, field 'conversations\[0\]': expected an object"),
    ([{"from": "gpt", "value": 42}], r"line 4, field 'conversations\[0\]\.value': expected a string, got int"),
    ("hello", r"line 4, field 'conversations': expected a list of \{from, value\}"),
])
def test_a_bad_sharegpt_conversation_names_the_row_and_item(items, message):
    from tsugiki.data.formats import sample_from_prompt_row

    with pytest.raises(DataError, match=message):
        normalise({"conversations": items}, "sharegpt", "d.jsonl, line 4")
    with pytest.raises(DataError, match=message):  # generation reads the row the same way
        sample_from_prompt_row({"conversations": items}, where="d.jsonl, line 4")


def test_a_sharegpt_file_trains_and_prompts_as_the_same_messages_file(tmp_path):
    from helpers_data import make_chat_tokenizer
    from tsugiki.data import build_dataset, get_template
    from tsugiki.evaluate import _prompt_text
    from tsugiki.generation import reference_answer

    tok = make_chat_tokenizer()
    shared = build_dataset(str(write_jsonl(tmp_path / "share.jsonl", [sharegpt_row()])), tok)
    chat = build_dataset(str(write_jsonl(tmp_path / "chat.jsonl", [messages_row()])), tok)
    assert shared[2].format == "sharegpt"
    assert shared[0] == chat[0]
    labels = shared[0][0]["labels"]
    assert tok.decode([t for t in labels if t != -100]) == "hi there<|im_end|>\nfine thanks<|im_end|>\n"
    template = get_template("chat", tok)
    assert template.format_prompt(sharegpt_row()) == template.format_prompt(messages_row())
    assert template.format_prompt(sharegpt_row()).endswith("how are you<|im_end|>\n<|im_start|>assistant\n")
    assert reference_answer(sharegpt_row()) == "fine thanks"
    assert reference_answer(sharegpt_row(CHAT[:2])) is None
    assert _prompt_text(sharegpt_row()) == "how are you"  # eval shows the question a row asks


def test_sharegpt_rows_from_parquet_whose_items_carry_every_key(tmp_path):
    """datasets and pyarrow give each item the keys of all items, None where it has none."""
    rows = [sharegpt_row(CHAT[1:3]), sharegpt_row(CHAT[1:3], keys=("role", "content"),
                                                    names={"user": "user", "assistant": "assistant"})]
    path = tmp_path / "share.parquet"
    pd.DataFrame(rows).to_parquet(path)
    read, columns = read_rows(path)
    assert set(read[0]["conversations"][0]) == {"from", "value", "role", "content"}
    samples = [normalise(row, detect_format(columns), f"row {i}") for i, row in enumerate(read, 1)]
    assert samples[0] == samples[1] and samples[0].turns == [("user", "hello"), ("assistant", "hi there")]


# -- OpenAI "weight" on assistant turns ----------------------------------------


def test_assistant_weights_say_which_answers_are_trained():
    row = messages_row()
    row["messages"][2]["weight"] = 0
    row["messages"][4]["weight"] = 1
    sample = normalise(row, "messages", "line 1")
    assert sample.untrained_turns == {1} and not sample.trains_on(1) and sample.trains_on(3)
    row["messages"][4]["weight"] = 0  # no answer left to learn: dropped, as a row with no answer is
    assert normalise(row, "messages", "line 1") is None
    share = sharegpt_row()
    share["conversations"][2]["weight"] = 0
    assert normalise(share, "sharegpt", "line 1").untrained_turns == {1}


@pytest.mark.parametrize("index, weight, message", [
    (2, 2, r"field 'messages\[2\]\.weight': 2 is not a weight; use 1 \(train on this answer\) or 0"),
    (2, 0.5, r"field 'messages\[2\]\.weight': 0\.5 is not a weight"),
    (2, "0", r"field 'messages\[2\]\.weight': '0' is not a weight"),
    (2, True, r"field 'messages\[2\]\.weight': True is not a weight"),
    (1, 0, r"field 'messages\[1\]\.weight': only assistant turns take a weight .* remove it from this user turn"),
    (0, 1, r"field 'messages\[0\]\.weight': only assistant turns take a weight .* this system turn"),
])
def test_a_bad_weight_names_the_row_and_message(index, weight, message):
    from tsugiki.data.formats import sample_from_prompt_row

    row = messages_row()
    row["messages"][index]["weight"] = weight
    with pytest.raises(DataError, match=r"d\.jsonl, line 3, " + message):
        normalise(row, "messages", "d.jsonl, line 3")
    with pytest.raises(DataError, match=message):
        sample_from_prompt_row(row, where="d.jsonl, line 3")
    share = {"conversations": [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"], **(
        {"weight": m["weight"]} if "weight" in m else {})} for m in row["messages"]]}
    with pytest.raises(DataError, match=message.replace("messages", "conversations")):
        normalise(share, "sharegpt", "d.jsonl, line 3")


def test_weights_read_from_parquet_where_every_message_has_the_key(tmp_path):
    """pyarrow gives the user and system messages a weight of None: that is no weight."""
    row = messages_row()
    row["messages"][2]["weight"] = 0
    path = tmp_path / "openai.parquet"
    pd.DataFrame([row, messages_row()]).to_parquet(path)
    rows, columns = read_rows(path)
    assert rows[0]["messages"][1]["weight"] is None and rows[1]["messages"][2]["weight"] is None
    samples = [normalise(r, detect_format(columns), f"row {i}") for i, r in enumerate(rows, 1)]
    assert [s.untrained_turns for s in samples] == [{1}, set()]

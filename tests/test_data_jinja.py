"""Instruction templates written as Jinja chat templates: apply_chat_template renders what training tokenized."""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError

from helpers_data import make_tokenizer
from tsugiki.data import build_dataset, get_template
from tsugiki.data.jinja import instruction_chat_template, match_chat_template

TEMPLATES = ["alpaca", "japanese", "llama2", "Q: {instruction}\nA: {response} END",
             {"prompt": "<u>{system}{instruction} {input}</u>", "response": "<a>{response}</a>", "system": "S",
              "system_format": "[{system}]", "turn_separator": "||"}]
CONVERSATIONS = [
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": 'braces {instruction} "quotes" \\n 日本'},
     {"role": "assistant", "content": "{response}"}],
]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tok(request):
    return make_tokenizer(bos=request.param)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES, ids=lambda n: "dict" if isinstance(n, dict) else n.split(":")[0])
def test_apply_chat_template_renders_the_training_text_and_generation_prompt(tok, name, messages):
    template = get_template(name, tok)
    chat = make_tokenizer(bos=bool(tok("")["input_ids"]))
    assert match_chat_template(chat, template)

    # The token ids and labels of training, through the instruction template and through its Jinja form.
    row = {"messages": messages}
    direct, _, _ = build_dataset([row], tok, template)
    via_jinja, _, _ = build_dataset([row], chat, get_template("chat", chat))
    assert via_jinja[0]["input_ids"] == direct[0]["input_ids"]
    assert via_jinja[0]["labels"] == direct[0]["labels"]

    # transformers' own rendering, tokenized as apply_chat_template does, and the generation prompt.
    assert chat.apply_chat_template(messages, tokenize=True, return_dict=False) == direct[0]["input_ids"]
    prompt = chat.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    lead = chat.bos_token if tok("")["input_ids"] else ""
    assert prompt == lead + template.format_prompt(row)


def test_turns_out_of_order_are_refused_naming_the_message():
    chat = make_tokenizer()
    chat.chat_template = instruction_chat_template(get_template("alpaca"))
    with pytest.raises(TemplateError, match="message 2 is user"):
        chat.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
    with pytest.raises(TemplateError, match="message 2 is system"):
        chat.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                 tokenize=False)


def test_a_chat_template_is_left_as_it_is():
    chat = make_tokenizer()
    chat.chat_template = "{{ messages[0]['content'] }}"
    assert not match_chat_template(chat, get_template("chat", chat))
    assert chat.chat_template == "{{ messages[0]['content'] }}"

"""An instruction template written as a Jinja chat template.

A model trained with an instruction template (``alpaca``, ``japanese``, ``llama2``
or the user's own) expects that format at inference. Saved as the tokenizer's
``chat_template``, the Jinja text below makes transformers' ``apply_chat_template``
(and every tool that reads the template from the model folder) render a
conversation exactly as training did:

- a leading ``system`` message replaces the template's default system text (an
  empty one keeps the default); it appears once, in the first user turn, through
  ``system_format``;
- each user turn is the ``prompt`` (``prompt_no_input`` when given: chat messages
  carry no separate input) with ``{instruction}`` the message; turns after the
  first are preceded by ``turn_separator``;
- each assistant turn is ``response`` with ``{response}`` the message, then the
  tokenizer's EOS text.

The prompt already ends where the answer starts, so ``add_generation_prompt``
adds nothing. Turns that do not alternate user/assistant are refused with
``raise_exception``, as the instruction template refuses them.
"""

from __future__ import annotations

import json
import re

from .tokenize import leading_special_ids

_PLACEHOLDER = re.compile(r"\{(instruction|input|system|response)\}")


def _expression(text: str, values: dict[str, str]) -> str:
    """``text`` as Jinja output: literal runs quoted, known placeholders as the given expressions."""
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(text):
        if m.group(1) not in values:
            continue
        if m.start() > pos:
            parts.append(json.dumps(text[pos:m.start()], ensure_ascii=False))
        parts.append(values[m.group(1)])
        pos = m.end()
    if pos < len(text):
        parts.append(json.dumps(text[pos:], ensure_ascii=False))
    return " ~ ".join(parts) if parts else '""'


def instruction_chat_template(template, with_bos: bool = False) -> str:
    """The Jinja ``chat_template`` that renders conversations as ``template`` (an instruction
    :class:`~tsugiki.data.templates.Template`) does in training; ``with_bos`` starts it with the
    BOS text, for tokenizers that put BOS in front of every text (chat templates write their
    own, and ``apply_chat_template`` tokenizes without adding it)."""
    if template.kind != "instruction":
        raise ValueError(f"template {template.name!r} is already a chat template")
    prompt = template.prompt_no_input if template.prompt_no_input is not None else template.prompt
    system_text = _expression(template.system_format, {"system": "ns.system"})
    user_turn = _expression(prompt, {"instruction": "message['content']", "input": '""', "system": "system_text"})
    answer = _expression(template.response, {"response": "message['content']"})
    default_system = json.dumps(template.system, ensure_ascii=False)
    separator = json.dumps(template.turn_separator, ensure_ascii=False)
    return (
        f"{{#- tsugiki instruction template {json.dumps(template.name, ensure_ascii=False)} -#}}\n"
        f"{{%- set ns = namespace(system={default_system}, turn=0) -%}}\n"
        + ("{{- bos_token if messages else '' -}}\n" if with_bos else "")
        + "{%- for message in messages -%}\n"
        "{%- if loop.first and message['role'] == 'system' -%}\n"
        "{%- if message['content'] -%}{%- set ns.system = message['content'] -%}{%- endif -%}\n"
        "{%- elif message['role'] == ('user' if ns.turn % 2 == 0 else 'assistant') -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        f"{{%- set system_text = ({system_text}) if ns.turn == 0 and ns.system else '' -%}}\n"
        f"{{%- if ns.turn > 0 -%}}{{{{ {separator} }}}}{{%- endif -%}}\n"
        f"{{{{ {user_turn} }}}}\n"
        "{%- else -%}\n"
        f"{{{{ {answer} }}}}{{{{ eos_token }}}}\n"
        "{%- endif -%}\n"
        "{%- set ns.turn = ns.turn + 1 -%}\n"
        "{%- else -%}\n"
        "{{ raise_exception('turns must alternate user/assistant (a system message may come first); message '"
        " ~ loop.index ~ ' is ' ~ message['role']) }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    )


def match_chat_template(tokenizer, template) -> bool:
    """Give ``tokenizer`` a ``chat_template`` that renders as ``template`` when it is an instruction
    template (a chat template is the tokenizer's own already); returns whether it changed.

    Done before a tokenizer is saved beside a trained model or adapter, so that
    ``apply_chat_template`` on the saved folder writes prompts in the trained format.
    """
    if template.kind != "instruction" or not hasattr(tokenizer, "chat_template"):
        return False
    tokenizer.chat_template = instruction_chat_template(template, with_bos=bool(leading_special_ids(tokenizer)))
    return True

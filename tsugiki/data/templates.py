"""Prompt templates: how a normalised row becomes text, and which part is the response.

Two kinds:

- ``chat``: the model's own ``tokenizer.chat_template`` (Jinja), rendered with
  ``apply_chat_template``. The template string is stored in the :class:`Template`
  so that generation after training uses exactly the format trained on.
- ``instruction``: a plain-text template. Built in: ``alpaca`` (English Alpaca,
  with and without input), ``japanese`` (``### 指示:`` / ``### 入力:`` /
  ``### 回答:``), ``llama2`` (``[INST] ... [/INST]``). Or your own, either

  * a string holding ``{instruction}``, optionally ``{input}`` and ``{system}``,
    and ``{response}``; everything before ``{response}`` is the prompt, e.g.
    ``"Q: {instruction}\\nA: {response}"``, except spaces just before it,
    which open the response (so ``" Paris"`` is tokenized as one word); or
  * a dict with the fields of :meth:`Template.to_dict` (``prompt`` with
    ``{instruction}``, optional ``prompt_no_input``, ``response`` with
    ``{response}``, ``system``, ``system_with_input``, ``system_format``,
    ``turn_separator``).

  Placeholders are ``{instruction}``, ``{input}``, ``{system}`` in the prompt and
  ``{response}`` in the response part; other ``{word}`` placeholders are an
  error, other braces are literal text. ``{input}`` renders empty for rows
  without one unless ``prompt_no_input`` is given; a prompt without ``{input}``
  gets a row's input after the instruction (``"{instruction}\n\n{input}"``, as
  chat templates do), so it is never dropped. ``{system}`` renders as
  ``system_format`` (default ``"{system}\\n\\n"``) filled with the row's system
  turn, else the template's default system text, and as nothing when both are
  empty. ``prompt_completion`` rows use ``prompt`` as the instruction; for plain
  concatenation use the template ``"{instruction}{response}"``.

Every response is followed by the tokenizer's EOS token (added as a token id by
:mod:`tsugiki.data.tokenize`, not as text).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Collection

from .errors import DataError
from .formats import Sample, sample_from_prompt_row

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PROMPT_FIELDS = {"instruction", "input", "system"}

_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_JA_SYSTEM = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"
_JA_SYSTEM_INPUT = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"


@dataclass
class Segment:
    """A run of text; ``trainable`` marks text that carries loss, ``eos_after`` asks for an EOS token
    after it, and ``reply`` marks an assistant turn (trainable unless its row gives it weight 0)."""

    text: str
    trainable: bool
    eos_after: bool = False
    reply: bool = False


@dataclass
class Template:
    """A serialisable prompt template (see the module docstring for the fields' meaning).

    ``tokenizer`` is not serialised; chat templates need one to render, and
    instruction templates use its EOS text when a multi-turn prompt is rendered.
    """

    name: str
    kind: str = "instruction"
    prompt: str = ""
    prompt_no_input: str | None = None
    response: str = "{response}"
    system: str = ""
    system_with_input: str | None = None
    system_format: str = "{system}\n\n"
    turn_separator: str = "\n\n"
    chat_template: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("instruction", "chat"):
            raise DataError(f"template {self.name!r}: kind must be 'instruction' or 'chat', got {self.kind!r}")
        if self.kind == "chat":
            if not self.chat_template:
                raise DataError(f"template {self.name!r}: kind 'chat' needs a chat_template string")
            return
        where = f"template {self.name!r}"
        _check_placeholders(self.prompt, _PROMPT_FIELDS, f"{where}, field 'prompt'")
        if "{instruction}" not in self.prompt:
            raise DataError(f"{where}, field 'prompt': has no {{instruction}} placeholder: {self.prompt!r}")
        if self.prompt_no_input is not None:
            _check_placeholders(self.prompt_no_input, _PROMPT_FIELDS - {"input"}, f"{where}, field 'prompt_no_input'")
            if "{instruction}" not in self.prompt_no_input:
                raise DataError(f"{where}, field 'prompt_no_input': has no {{instruction}} placeholder")
        _check_placeholders(self.response, {"response"}, f"{where}, field 'response'")
        if "{response}" not in self.response:
            raise DataError(f"{where}, field 'response': has no {{response}} placeholder: {self.response!r}")
        _check_placeholders(self.system_format, {"system"}, f"{where}, field 'system_format'")

    # -- serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (the tokenizer is left out)."""
        d = asdict(self)
        d.pop("tokenizer")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], tokenizer: Any = None) -> Template:
        """Rebuild a template saved by :meth:`to_dict`; pass the tokenizer for chat templates."""
        known = {f for f in cls.__dataclass_fields__ if f != "tokenizer"}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"template dict has unknown fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**{"name": "custom", **d}, tokenizer=tokenizer)

    # -- rendering -----------------------------------------------------------

    def segments(self, sample: Sample) -> list[Segment]:
        """The sample's text in order, split into prompt and response runs."""
        if sample.text is not None:
            return [Segment(sample.text, trainable=True, eos_after=True)]
        if self.kind == "chat":
            messages = sample.messages()
            first_turn = len(messages) - len(sample.turns)  # after a system message, if any
            untrained = {first_turn + turn for turn in sample.untrained_turns}
            return self._chat_segments(messages, untrained)
        return self._instruction_segments(sample)

    @property
    def answer_suffix(self) -> str:
        """Text a custom template puts after ``{response}`` (``"... => {response} END"``: ``"END"``)."""
        return self.response.split("{response}", 1)[1].strip() if self.kind == "instruction" else ""

    def answer_from(self, generated: str) -> str:
        """The answer in ``generated`` text: without the template's :attr:`answer_suffix`,
        which training taught the model to write after each answer."""
        generated = generated.strip()
        suffix = self.answer_suffix
        if suffix and generated.endswith(suffix):
            generated = generated[: -len(suffix)].rstrip()
        return generated

    def format_prompt(self, row: dict[str, Any] | str) -> str:
        """Text up to where the response starts, for generation.

        ``row`` is a raw row of any supported format (its response, or a final
        assistant turn, is left out) or a plain string (the user's instruction).
        """
        sample = sample_from_prompt_row(row)
        if sample.text is not None:
            return sample.text
        if sample.turns and sample.turns[-1][0] == "assistant":
            sample.turns = sample.turns[:-1]
        if not sample.turns:
            raise DataError("format_prompt: the row has no user turn to answer")
        if self.kind == "chat":
            return self._render(sample.messages(), add_generation_prompt=True)
        segs = self._instruction_segments(sample)
        eos = getattr(self.tokenizer, "eos_token", None) or ""
        return "".join(s.text + (eos if s.eos_after else "") for s in segs)

    def _instruction_segments(self, sample: Sample) -> list[Segment]:
        segs: list[Segment] = []
        turns = sample.turns
        for i in range(0, len(turns), 2):
            user_role, instruction = turns[i]
            if user_role != "user":
                raise DataError(f"template {self.name!r}: turns must alternate user/assistant, turn {i + 1} is {user_role!r}")
            first = i == 0
            has_input = first and bool(sample.input)
            default_system = (self.system_with_input or self.system) if has_input else self.system
            system = sample.system or default_system
            system_text = self.system_format.replace("{system}", system) if (first and system) else ""
            prompt = self.prompt if (has_input or self.prompt_no_input is None) else self.prompt_no_input
            if has_input and "{input}" not in prompt:
                instruction = f"{instruction}\n\n{sample.input}"
            text = _fill(prompt, instruction=instruction, input=sample.input if first else "", system=system_text)
            segs.append(Segment(("" if first else self.turn_separator) + text, trainable=False))
            if i + 1 < len(turns):
                role, response = turns[i + 1]
                if role != "assistant":
                    raise DataError(f"template {self.name!r}: turns must alternate user/assistant, turn {i + 2} is {role!r}")
                segs.append(Segment(_fill(self.response, response=response), trainable=sample.trains_on(i + 1),
                                    eos_after=True, reply=True))
        return segs

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.tokenizer is None:
            raise DataError(f"template {self.name!r} is a chat template and needs a tokenizer: Template.from_dict(d, tokenizer)")
        if not messages:
            return ""
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as err:  # the template's own raise_exception(...): it refuses these turns
            roles = ", ".join(m["role"] for m in messages)
            raise DataError(f"the chat template of {self.name!r} refused the conversation ({roles}): {err}. "
                            "Give the rows the turns it expects (a system message, or none), or use an "
                            "instruction template (--template alpaca, or your own)") from None

    def _opening_prefix(self, through: str, content: str) -> str:
        """The text before a conversation's content when it opens with an assistant turn.

        That is the template's generation prompt for an empty conversation (which
        may carry a default system prompt), when the template renders one that
        ``through`` starts with; else everything in ``through`` before ``content``.
        """
        try:
            prefix = self.tokenizer.apply_chat_template([], chat_template=self.chat_template, tokenize=False,
                                                        add_generation_prompt=True)
        except Exception:  # templates that read messages[0] fail on an empty conversation
            prefix = None
        if isinstance(prefix, str) and prefix and through.startswith(prefix):
            return prefix
        at = through.rfind(content) if content else -1
        return through[:at] if at >= 0 else through

    def _chat_segments(self, messages: list[dict], untrained: Collection[int] = ()) -> list[Segment]:
        # Render the conversation prefix by prefix: the text each assistant turn adds
        # after the generation prompt is that turn's span. This needs no
        # {% generation %} markers, which most chat templates lack. `untrained`: indices
        # of assistant messages that are context only (weight 0).
        full = self._render(messages, add_generation_prompt=False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            through = self._render(messages[: k + 1], add_generation_prompt=False)
            before = (self._render(messages[:k], add_generation_prompt=True) if k
                      else self._opening_prefix(through, m["content"]))
            if not (full.startswith(before) and full.startswith(through) and len(through) >= len(before)):
                raise DataError(
                    f"chat template of {self.name!r} renders message {k + 1} differently depending on what follows, "
                    "so the assistant turns cannot be located; use an instruction template (template='alpaca' or your own)"
                )
            spans.append((len(before), len(through), k not in untrained))
        segs, pos = [], 0
        for start, end, trained in spans:
            if start > pos:
                segs.append(Segment(full[pos:start], trainable=False))
            segs.append(Segment(full[start:end], trainable=trained, reply=True))
            pos = end
        if pos < len(full):
            segs.append(Segment(full[pos:], trainable=False))
        return segs


def _check_placeholders(text: str, allowed: set[str], where: str) -> None:
    bad = sorted({m for m in _PLACEHOLDER.findall(text) if m not in allowed})
    if bad:
        names = ", ".join("{" + b + "}" for b in bad)
        ok = ", ".join("{" + a + "}" for a in sorted(allowed))
        raise DataError(f"{where}: unknown placeholder {names}; allowed here: {ok}")


def _fill(text: str, **values: str) -> str:
    # Substitute only the known placeholders so that other braces stay literal text.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    "alpaca": dict(
        prompt="{system}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        prompt_no_input="{system}### Instruction:\n{instruction}\n\n### Response:\n",
        system=_ALPACA_SYSTEM,
        system_with_input=_ALPACA_SYSTEM_INPUT,
    ),
    "japanese": dict(
        prompt="{system}### 指示:\n{instruction}\n\n### 入力:\n{input}\n\n### 回答:\n",
        prompt_no_input="{system}### 指示:\n{instruction}\n\n### 回答:\n",
        system=_JA_SYSTEM,
        system_with_input=_JA_SYSTEM_INPUT,
    ),
    # Llama-2 chat: the system text sits inside the first [INST] block.
    "llama2": dict(
        prompt="[INST] {system}{instruction}\n\n{input} [/INST]",
        prompt_no_input="[INST] {system}{instruction} [/INST]",
        response=" {response}",
        system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        turn_separator="",
    ),
}


def get_template(name_or_spec: str | dict | Template | None, tokenizer: Any = None) -> Template:
    """Resolve a template name or spec.

    Args:
        name_or_spec: ``None`` or ``"auto"`` (default): the tokenizer's chat template
            when it has one, else ``alpaca``; ``"chat"``: the tokenizer's chat template
            (error if none); ``"alpaca"``, ``"japanese"``, ``"llama2"``; a custom
            template string containing ``{instruction}`` and ``{response}``; a dict
            as written by :meth:`Template.to_dict`; or a :class:`Template`.
        tokenizer: the model's tokenizer (needed for chat templates).

    Raises:
        DataError: unknown name, missing placeholders, or ``"chat"`` without a chat template.
    """
    if isinstance(name_or_spec, Template):
        if name_or_spec.tokenizer is None and tokenizer is not None:
            name_or_spec.tokenizer = tokenizer
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return Template.from_dict(name_or_spec, tokenizer)
    chat = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if name_or_spec in (None, "auto"):
        name_or_spec = "chat" if chat else "alpaca"
    if not isinstance(name_or_spec, str):
        raise DataError(f"template must be a name, a template string or a dict, got {type(name_or_spec).__name__}")
    if name_or_spec == "chat":
        if not isinstance(chat, str) or not chat:
            raise DataError(
                "template 'chat' asks for the tokenizer's chat template, but the tokenizer has none; "
                "use 'alpaca', 'japanese', 'llama2' or your own template string"
            )
        return Template(name="chat", kind="chat", chat_template=chat, tokenizer=tokenizer)
    if name_or_spec in BUILTIN_TEMPLATES:
        return Template(name=name_or_spec, tokenizer=tokenizer, **BUILTIN_TEMPLATES[name_or_spec])
    if "{" not in name_or_spec:
        raise DataError(
            f"unknown template {name_or_spec!r}; use 'auto', 'chat', {', '.join(repr(n) for n in BUILTIN_TEMPLATES)}, "
            "or a template string with {instruction} and {response} placeholders"
        )
    return _from_string(name_or_spec, tokenizer)


def _from_string(spec: str, tokenizer: Any) -> Template:
    _check_placeholders(spec, _PROMPT_FIELDS | {"response"}, "custom template")
    if "{response}" not in spec:
        raise DataError(f"custom template has no {{response}} placeholder: {spec!r}; put {{response}} where the answer goes")
    if spec.count("{response}") > 1:
        raise DataError(f"custom template has {{response}} more than once: {spec!r}")
    prompt, after = spec.split("{response}")
    if "{instruction}" not in prompt:
        raise DataError(f"custom template has no {{instruction}} placeholder before {{response}}: {spec!r}")
    # In "A: {response}" the space belongs to the answer: left at the prompt's end it is
    # tokenized alone (a lone space token, rare before a word in pretraining text) instead
    # of as part of the answer's first word (" Paris"), as llama2's " {response}" has it.
    lead = prompt[len(prompt.rstrip(" \t")):]
    prompt = prompt[: len(prompt) - len(lead)]
    return Template(name="custom", prompt=prompt, response=lead + "{response}" + after, tokenizer=tokenizer)

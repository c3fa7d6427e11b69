"""tsugiki chat: a conversation that outgrows the context, Ctrl-C during an answer, errors while streaming."""

from __future__ import annotations

import threading

import pytest

import tsugiki.generation as generation
from tsugiki.cli import main
from tsugiki.generation import (ConversationTooLongError, GenerationSettings, fit_conversation,
                                load_for_inference, stream_answer)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(model_dir, dtype="fp32")  # a tiny Llama built for 256 positions


def _prompt_length(loaded, messages):
    from tsugiki.data.tokenize import prompt_token_ids

    return len(prompt_token_ids(loaded.template.format_prompt({"messages": messages}), loaded.template,
                                loaded.tokenizer))


def _conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i} " + "word " * 12},
                     {"role": "assistant", "content": f"answer {i} " + "word " * 12}]
    return messages + [{"role": "user", "content": "the newest question"}]


def test_a_conversation_that_fits_is_kept_whole(loaded):
    messages = _conversation(1)
    assert fit_conversation(loaded, messages, 16) == (messages, 0)


def test_the_oldest_turns_go_first_and_the_system_message_stays(loaded):
    messages = _conversation(12)
    assert _prompt_length(loaded, messages) + 32 > 256  # too long for the model's context
    kept, left_out = fit_conversation(loaded, messages, 32)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and kept[1:] == messages[1 + left_out:]
    assert left_out > 0 and left_out % 2 == 0  # whole question + answer pairs
    assert _prompt_length(loaded, kept) + 32 <= 256
    one_more = messages[:1] + messages[1 + left_out - 2:]  # the newest pair that was left out, back in
    assert _prompt_length(loaded, one_more) + 32 > 256


def test_a_message_longer_than_the_context_is_refused(loaded):
    messages = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ConversationTooLongError, match="256-token context with 16 tokens left"):
        fit_conversation(loaded, messages, 16)


def test_closing_the_stream_early_stops_generation(loaded, monkeypatch):
    forward_calls = []
    real_forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda *a, **k: forward_calls.append(1) or real_forward(*a, **k))
    settings = GenerationSettings(max_new_tokens=200)
    pieces = stream_answer(loaded, "hello", settings)
    next(pieces)
    pieces.close()
    stopped_at = len(forward_calls)
    assert stopped_at < 50  # 200 tokens (no end token comes from these random weights) without the stop
    assert len(forward_calls) == stopped_at  # the generating thread has ended


def test_an_error_while_generating_reaches_the_reader(loaded, monkeypatch):
    def broken(net, kwargs):
        raise RuntimeError("out of memory in the middle")

    monkeypatch.setattr(generation, "_generate", broken)
    outcome = []

    def read() -> None:
        try:
            list(stream_answer(loaded, "hello", GenerationSettings(max_new_tokens=4)))
        except RuntimeError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)  # before the fix the reader waited for ever
    assert outcome == ["out of memory in the middle"]


def _run_chat(model_dir, monkeypatch, typed, fake_answers, *extra):
    """Run ``tsugiki chat`` on ``typed`` lines; each answer comes from ``fake_answers`` (a generator function)."""
    typed, seen = iter(typed), []

    def fake_stream(loaded, row, settings):
        seen.append([dict(m) for m in row["messages"]])
        yield from fake_answers(len(seen))

    monkeypatch.setattr(generation, "stream_answer", fake_stream)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert main(["chat", "--model", model_dir, *extra]) == 0
    return seen


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(model_dir, monkeypatch, capsys):
    def answers(n):
        yield "Hel"
        if n == 1:
            raise KeyboardInterrupt
        yield "lo"

    seen = _run_chat(model_dir, monkeypatch, ["hi", "again", "/exit"], answers)
    assert "bot> Hel [stopped]" in capsys.readouterr().out
    assert seen[1][-2:] == [{"role": "assistant", "content": "Hel"}, {"role": "user", "content": "again"}]


def test_chat_leaves_out_the_oldest_turns_and_says_so(model_dir, monkeypatch, capsys):
    def answers(n):
        yield "answer " + "word " * 30

    typed = ["question " + "word " * 30 for _ in range(6)] + ["/exit"]
    seen = _run_chat(model_dir, monkeypatch, typed, answers, "--system", "Be brief.", "--max-new-tokens", "32")
    err = capsys.readouterr().err
    assert "oldest messages no longer fit the model's context" in err
    assert all(h[0]["content"] == "Be brief." and h[1]["role"] == "user" for h in seen)
    assert len(seen[-1]) < 2 + 2 * 5  # not the whole conversation


def test_chat_refuses_a_message_too_long_and_goes_on(model_dir, monkeypatch, capsys):
    def answers(n):
        yield "ok"

    seen = _run_chat(model_dir, monkeypatch, ["word " * 400, "short one", "/exit"], answers)
    assert "newest message does not fit the model's 256-token context" in capsys.readouterr().err
    assert seen == [[{"role": "user", "content": "short one"}]]

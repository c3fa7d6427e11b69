"""Stop strings: an answer ends before the first one it writes, in generate, eval's answers and chat's stream."""

from __future__ import annotations

import pytest

from tsugiki.cli import _unescaped, main
from tsugiki.generation import GenerationSettings, _until_stop, generate_answers, load_for_inference, stream_answer

PROMPTS = ["hello there", "what is two plus two"]


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(model_dir, dtype="fp32")  # random weights: answers run to max_new_tokens


def _counting_forwards(loaded, monkeypatch) -> list:
    calls: list = []
    real_forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    return calls


def _stop_inside(answer: str) -> str:
    """A piece of ``answer`` from its middle, whose first occurrence is there (not at the start)."""
    for start in range(len(answer) // 3, len(answer) - 3):
        piece = answer[start:start + 3]
        if piece.strip() and answer.find(piece) == start:
            return piece
    pytest.fail(f"no usable stop string in {answer!r}")


def test_a_stop_string_ends_the_answer_before_it_and_ends_generation(loaded, monkeypatch):
    full = generate_answers(loaded, PROMPTS, GenerationSettings(max_new_tokens=40))
    stop = _stop_inside(full[0])
    calls = _counting_forwards(loaded, monkeypatch)
    cut = generate_answers(loaded, PROMPTS[:1], GenerationSettings(max_new_tokens=40, stop=[stop]))
    assert cut == [full[0][: full[0].find(stop)].rstrip()]
    assert len(calls) < 40  # generation ended at the stop string, not at max_new_tokens


def test_each_row_of_a_batch_stops_at_its_own_place(loaded):
    full = generate_answers(loaded, PROMPTS, GenerationSettings(max_new_tokens=40))
    stops = [_stop_inside(full[0]), "never written by this model \u2603"]
    cut = generate_answers(loaded, PROMPTS, GenerationSettings(max_new_tokens=40, stop=stops))
    expected = [answer[: answer.find(stops[0])].rstrip() if stops[0] in answer else answer for answer in full]
    assert cut == expected and cut[0] != full[0]


def test_a_prompt_ending_in_part_of_a_stop_string_does_not_end_the_answer(loaded):
    """The chat prompt ends with a newline: the stop '\\n' + first answer character must not match across it."""
    full = generate_answers(loaded, PROMPTS[:1], GenerationSettings(max_new_tokens=12))[0]
    assert generate_answers(loaded, PROMPTS[:1], GenerationSettings(max_new_tokens=12, stop=["\n" + full[0]]))[0] \
        == (full if ("\n" + full[0]) not in full else full[: full.find("\n" + full[0])].rstrip())


def test_chat_streams_the_same_answer_as_generate(loaded, monkeypatch):
    full = generate_answers(loaded, PROMPTS[:1], GenerationSettings(max_new_tokens=40))[0]
    settings = GenerationSettings(max_new_tokens=40, stop=[_stop_inside(full)])
    calls = _counting_forwards(loaded, monkeypatch)
    streamed = "".join(stream_answer(loaded, PROMPTS[0], settings))
    assert streamed == generate_answers(loaded, PROMPTS[:1], settings)[0] != full
    assert len(calls) < 2 * 40


@pytest.mark.parametrize("pieces, stops, shown", [
    (["ab", "c##", "#d"], ["###"], "abc"),            # the stop string split over pieces
    (["ab", "c#", "#d"], ["###"], "abc##d"),          # only part of it: everything held back comes out
    (["x", "yEND", "more"], ["END", "yE"], "x"),      # the earliest of several wins
    (["END rest"], ["END"], ""),
    (["plain"], [], "plain"),
])
def test_streamed_text_stops_before_a_stop_string_split_over_pieces(pieces, stops, shown):
    assert "".join(_until_stop(iter(pieces), stops)) == shown


def test_the_command_line_reads_backslash_escapes_in_stop_strings():
    assert _unescaped(r"\n\n") == "\n\n"
    assert _unescaped(r"a\tb") == "a\tb"
    assert _unescaped("x\\\\n") == "x\\n"  # an escaped backslash, then a plain n
    assert _unescaped(r"C:\path") == r"C:\path"  # other backslashes stay


def test_generate_command_cuts_at_the_stop_string(loaded, model_dir, capsys):
    full = generate_answers(loaded, PROMPTS[:1], GenerationSettings(max_new_tokens=30))[0]
    stop = _stop_inside(full)
    assert main(["generate", "--model", model_dir, "--dtype", "fp32", "--max-new-tokens", "30",
                 "--prompt", PROMPTS[0], "--stop", stop.replace("\\", "\\\\").replace("\n", "\\n")]) == 0
    assert capsys.readouterr().out == full[: full.find(stop)].rstrip() + "\n"

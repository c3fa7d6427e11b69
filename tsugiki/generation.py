"""Load a base (+ adapter) for inference, and generate answers in the trained format.

The prompt of each row is rendered with the template the model was trained
with (saved as ``tsugiki_template.json`` beside the adapter, or in the model
folder of a merged model or a full fine-tune), so generation sees the same
format as training. Batches are left-padded, decoding is greedy unless
sampling is asked for, generation stops at EOS (or at a stop string, which the
answer then ends before), and only the new tokens are decoded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .config import AdapterNotFoundError, PeftConfig
from .data.formats import conversation_turns
from .data.templates import Template
from .data.tokenize import prompt_token_ids
from .kernels.decode import single_row_decoding
from .model import PeftModel
from .models import DEFAULT_MODEL, load_model, load_tokenizer

Row = Union[str, dict]
log = logging.getLogger("tsugiki.generate")


@dataclass
class GenerationSettings:
    """Decoding options (defaults: greedy, 128 new tokens, no repetition penalty, unseeded sampling)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    batch_size: int = 8
    seed: Optional[int] = None  # seeds torch's generator before sampling: same seed, same answers
    # Texts that end an answer: it is cut before the first one it holds (leading whitespace aside).
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        bad = next((s for s in self.stop if not isinstance(s, str) or not s), None)
        if bad is not None:
            raise ValueError(f"stop strings must be non-empty text, got {bad!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k cut)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = off)")

    def seed_sampling(self) -> None:
        """Seed torch's generator, so sampled answers repeat for the same prompts and batch size."""
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence transformers' warnings about sampling-only settings of the model's config
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    template: Template
    adapter: Optional[str]
    base_name: str
    saved_quantization: Optional[str] = None  # e.g. "4-bit" when the folder itself holds quantized weights


def has_tokenizer(folder: str) -> bool:
    """Whether ``folder`` holds a saved tokenizer (an adapter saved with the tokenizer it was trained with)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def _saved_quantization(model: nn.Module) -> Optional[str]:
    """How transformers quantized ``model`` while loading it (e.g. a ``merge --requantize`` folder), else None."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4-bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8-bit"
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        method = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
        return str(getattr(method, "value", method) or "quantized")
    return None


def load_for_inference(model: Optional[str] = None, adapter: Optional[str] = None,
                       quantization: Optional[str] = None, template: Optional[Union[str, dict]] = None,
                       dtype: Optional[str] = "auto") -> LoadedModel:
    """The base model (named, or the adapter's base, or the default) with the adapter if given.

    ``dtype`` is the base weights' dtype: ``"auto"`` (default: bf16 where the hardware runs it
    natively, as in training, else fp32), ``"bf16"``, ``"fp16"``, ``"fp32"``, or None to keep
    the dtype the weights load in. Adapter weights stay fp32 on a half-precision base.
    A model folder saved quantized (``merge --requantize``) loads as it is: ``"auto"`` and
    None keep it, another ``dtype`` is an error (its weights cannot be cast).
    The template is, in order: ``template`` if given, the one saved with the adapter, the
    one saved in the model folder (by ``merge`` or a full fine-tune), the tokenizer's chat
    template, the built-in ``alpaca``.
    """
    from .pipeline import folder_template

    # Subnormal floats (common in barely trained adapters) are very slow on CPUs; treating them
    # as zero changes nothing measurable and keeps generation fast.
    torch.set_flush_denormal(True)
    base_name = model
    if adapter is not None:
        if os.path.isfile(adapter):
            raise AdapterNotFoundError(f"adapter {adapter!r} is a file; give the adapter's folder (the one "
                                       "with adapter_config.json)")
        if not os.path.isdir(adapter):
            raise AdapterNotFoundError(f"adapter folder {adapter!r} does not exist")
        config = PeftConfig.from_pretrained(adapter)
        base_name = model or config.base_model_name_or_path
        if not model and base_name and os.path.isabs(base_name) and not os.path.exists(base_name):
            raise FileNotFoundError(f"the adapter's base model {base_name!r} (recorded in its "
                                    "adapter_config.json) is not there any more; give its new place with --model")
    base_name = base_name or DEFAULT_MODEL
    tokenizer = load_tokenizer(adapter if adapter and has_tokenizer(adapter) else base_name)
    base = load_model(base_name, quantization=quantization)
    saved_quant = None if quantization else _saved_quantization(base)
    if saved_quant and dtype not in (None, "auto"):
        raise ValueError(f"{base_name} holds {saved_quant} quantized weights, which cannot be cast to "
                         f"dtype {dtype!r}; leave --dtype at auto to use them as saved, or merge again with "
                         "--dequantize for an unquantized model")
    if dtype is not None and not quantization and not saved_quant:
        from .train.loop import resolve_dtype

        target = resolve_dtype(dtype, next(base.parameters()).device)
        for param in base.parameters():  # weights only: buffers (RoPE's inv_freq) keep fp32, as in training
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    net: nn.Module = PeftModel.from_pretrained(base, adapter) if adapter else base
    net.eval()
    return LoadedModel(net, tokenizer, folder_template(template, tokenizer, adapter, base_name), adapter,
                       str(base_name), saved_quant)


def stop_token_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """Where an answer ends: the tokenizer's EOS and every EOS of the model's generation config.

    Chat models often list their end-of-turn token there beside the tokenizer's EOS
    (Gemma: ``[1, 107]``); passing the tokenizer's alone would generate past the turn.
    """
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def reference_answer(row: Row) -> Optional[str]:
    """The expected answer of a data row (its response / output / completion / last assistant turn
    of ``messages`` or ShareGPT ``conversations``)."""
    if isinstance(row, str):
        return None
    for key in ("output", "response", "completion"):
        if isinstance(row.get(key), str):
            return row[key]
    turns = conversation_turns(row)
    if turns and turns[-1][0] == "assistant":
        return turns[-1][1]
    return None


def context_length(model_or_config: Any) -> Optional[int]:
    """The number of positions a model (or its transformers config) was built for
    (``max_position_embeddings``, GPT-2's ``n_positions``...), or None when the config does not say.

    Of a model whose active adapter puts virtual tokens in front of every row (prompt tuning,
    p-tuning, prefix tuning), the positions left for the real tokens after them.
    """
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            adapter = getattr(model_or_config, "active_peft_config", None)
            if getattr(adapter, "is_prompt_learning", False):
                value -= int(getattr(adapter, "num_virtual_tokens", 0) or 0)
            return max(value, 1)
    return None


def new_token_room(limit: Optional[int], prompt_lengths: Sequence[int], asked: int,
                   first_row: int = 0) -> int:
    """How many new tokens a batch of prompts may get: ``asked``, or fewer where the longest
    prompt would run past the model's ``limit`` positions (GPT-2-style position tables have
    no entries past it; RoPE models were not trained there). A prompt that fills the context
    alone is an error naming its row (counted from 1)."""
    if limit is None or not prompt_lengths:
        return asked
    longest = max(prompt_lengths)
    if longest >= limit:
        row = first_row + list(prompt_lengths).index(longest) + 1
        raise ValueError(f"prompt {row} is {longest} tokens, and the model's context holds {limit}: "
                         "shorten it (or use a model with a longer context)")
    if longest + asked > limit:
        log.warning("prompts of up to %d tokens leave room for %d of the %d new tokens asked in the model's "
                    "%d-token context; answers stop there", longest, limit - longest, asked, limit)
    return min(asked, limit - longest)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _generate(net: nn.Module, kwargs: dict) -> Any:
    """``net.generate(**kwargs)``; a bare base inside ``single_row_decoding``, as ``PeftModel.generate`` runs."""
    if isinstance(net, PeftModel):
        return net.generate(**kwargs)
    with single_row_decoding(net):
        return net.generate(**kwargs)


@torch.inference_mode()
def generate_answers(loaded: LoadedModel, rows: Sequence[Row], settings: Optional[GenerationSettings] = None,
                     use_adapter: bool = True, progress: Optional[Iterable] = None) -> list[str]:
    """Answer each row (a prompt string or a data row) with the loaded model.

    ``use_adapter=False`` runs the bare base (the adapter disabled) for side-by-side comparisons.
    """
    settings = settings or GenerationSettings()
    settings.seed_sampling()
    tok, net = loaded.tokenizer, loaded.model
    prompts = [prompt_token_ids(loaded.template.format_prompt(row), loaded.template, tok) for row in rows]
    empty = next((i for i, ids in enumerate(prompts, start=1) if not ids), None)
    if empty is not None:  # a row of the text format with no text: nothing to continue from
        raise ValueError(f"prompt {empty} is empty: give it some text to continue")
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end of every row
    answers: list[str] = []
    try:
        limit = context_length(net)
        for first_row, chunk in zip(range(0, len(prompts), settings.batch_size),
                                    _chunks(prompts, settings.batch_size)):
            room = new_token_room(limit, [len(p) for p in chunk], settings.max_new_tokens, first_row)
            enc = tok.pad({"input_ids": list(chunk)}, return_tensors="pt", padding=True)
            device = next(net.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            kwargs = dict(**enc, **settings.generate_kwargs(), pad_token_id=tok.pad_token_id,
                          eos_token_id=stop_token_ids(tok, net))
            kwargs["max_new_tokens"] = room
            if settings.stop:  # the new tokens start after the padded prompts
                at_text = _StopAtText(tok, settings.stop, enc["input_ids"].shape[1])
                kwargs["stopping_criteria"] = _stopping_criteria(at_text)
            if isinstance(net, PeftModel) and not use_adapter:
                with net.disable_adapter():
                    out = _generate(net, kwargs)
            else:
                out = _generate(net, kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(loaded.template.answer_from(cut_at_stop(text, settings.stop)) for text in texts)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        tok.padding_side = old_side
    return answers


class ConversationTooLongError(ValueError):
    """The newest message alone, with room for the answer, does not fit the model's context."""


def fit_conversation(loaded: LoadedModel, messages: list[dict], room_for_answer: int) -> tuple[list[dict], int]:
    """The newest part of ``messages`` whose prompt leaves ``room_for_answer`` tokens of the context.

    The oldest turns go first, a user message and the answers after it at a time, so the
    kept part still starts with a user turn; a leading system message always stays.
    Returns the kept messages and how many were left out. Raises
    :class:`ConversationTooLongError` when even the last user message does not fit.
    """
    limit = context_length(loaded.model)
    if limit is None:
        return messages, 0
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]

    def fits(kept: list[dict]) -> bool:
        prompt = loaded.template.format_prompt({"messages": system + kept})
        return len(prompt_token_ids(prompt, loaded.template, loaded.tokenizer)) + room_for_answer <= limit

    starts = [i for i, m in enumerate(turns) if m.get("role") == "user"] or [0]
    for start in starts:
        if fits(turns[start:]):
            return system + turns[start:], start
    raise ConversationTooLongError(
        f"the newest message does not fit the model's {limit}-token context with {room_for_answer} tokens "
        "left for the answer; write a shorter message or lower --max-new-tokens")


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` without its leading whitespace, up to (not including) the first stop string it holds."""
    text = text.lstrip()
    end = _first_stop(text, stops)
    return text if end is None else text[:end]


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the earliest of ``stops`` starts in ``text``, or None."""
    starts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(starts) if starts else None


def _stopping_criteria(*criteria: Any) -> Any:
    """transformers' list of stopping criteria (imported here: generation alone needs it)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


class _StopAtText:
    """A stopping criterion that ends a row once its new text (leading whitespace aside) holds a stop string.

    The new tokens are decoded whole each step, as a stop string may span several tokens and
    a token's text can depend on its neighbours; the prompt is left out, so a prompt ending
    in part of a stop string does not end the answer early.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, tuple(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [any(s in text.lstrip() for s in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _StopWhenSet:
    """A stopping criterion that ends generation once ``event`` is set (another thread's Ctrl-C)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_answer(loaded: LoadedModel, messages_or_prompt: Union[str, dict], settings: GenerationSettings):
    """Generate one answer token by token (for ``tsugiki chat``); yields text pieces.

    Closing the generator early (the reader's Ctrl-C) stops generation within a token; an
    error inside generation is raised here instead of leaving the reader waiting.
    """
    from threading import Event, Thread

    from transformers import TextIteratorStreamer

    tok, net = loaded.tokenizer, loaded.model
    ids = prompt_token_ids(loaded.template.format_prompt(messages_or_prompt), loaded.template, tok)
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop, failures = Event(), []
    at_text = [_StopAtText(tok, settings.stop, len(ids))] if settings.stop else []
    kwargs = dict(**enc, **settings.generate_kwargs(), streamer=streamer, pad_token_id=tok.pad_token_id,
                  eos_token_id=stop_token_ids(tok, net),
                  stopping_criteria=_stopping_criteria(_StopWhenSet(stop), *at_text))
    kwargs["max_new_tokens"] = new_token_room(context_length(net), [len(ids)], settings.max_new_tokens)

    def work() -> None:
        try:
            with torch.inference_mode():
                _generate(net, kwargs)
        except BaseException as err:  # handed to the reader: the streamer would otherwise never end
            failures.append(err)
            streamer.end()

    thread = Thread(target=work, daemon=True)
    thread.start()
    try:
        yield from _without_suffix(_until_stop(_left_stripped(streamer), settings.stop), loaded.template.answer_suffix)
    finally:
        stop.set()
        thread.join()
    if failures:
        raise failures[0]


def _left_stripped(pieces: Iterable[str]) -> Iterator[str]:
    """Pass text pieces through without the whitespace the text starts with, as generate's answers have none."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


def _until_stop(pieces: Iterable[str], stops: Sequence[str]) -> Iterator[str]:
    """Pass text pieces through up to (not including) the first stop string; the tail that could
    still turn out to start one is held back until the next piece tells."""
    if not stops:
        yield from pieces
        return
    held_back = max(len(s) for s in stops) - 1
    pending = ""
    for piece in pieces:
        pending += piece
        end = _first_stop(pending, stops)
        if end is not None:
            if end:
                yield pending[:end]
            return
        safe = len(pending) - held_back
        if safe > 0:
            yield pending[:safe]
            pending = pending[safe:]
    if pending:
        yield pending


def _without_suffix(pieces: Iterable[str], suffix: str) -> Iterator[str]:
    """Pass text pieces through, dropping ``suffix`` (and the spaces around it) where the text ends with it.

    The tail that could still turn out to be the suffix is held back until the text ends.
    """
    if not suffix:
        yield from pieces
        return
    pending = ""
    for piece in pieces:
        pending += piece
        safe = len(pending[: max(0, len(pending.rstrip()) - len(suffix))].rstrip())  # spaces before it wait too
        if safe > 0:
            yield pending[:safe]
            pending = pending[safe:]
    tail = pending.rstrip()
    yield tail[: -len(suffix)].rstrip() if tail.endswith(suffix) else pending

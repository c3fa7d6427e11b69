"""Evaluate a base model and base + adapter side by side on held-out rows.

Two kinds of numbers:

* **loss / perplexity** on the reference answers (teacher forcing, response
  tokens only, token-weighted): ``ppl = exp(sum of token losses / tokens)``;
* **answer accuracy** of generated answers against the references:
  ``exact`` when the answer equals the reference after trimming and collapsing
  whitespace, ``contains`` when the reference appears in the answer
  (case-insensitive; an empty reference only in an empty answer).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import torch

from .data import IGNORE_INDEX, Collator, build_dataset, detect_format, pad_token_id_for
from .data.errors import NoRowsLeft
from .data.formats import conversation_turns, without_turn_weights
from .generation import GenerationSettings, LoadedModel, Row, context_length, generate_answers, reference_answer
from .model import PeftModel
from .train.loop import count_targets, token_loss_sum

log = logging.getLogger("tsugiki.eval")


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(answer: str, reference: str) -> bool:
    return normalise_answer(answer) == normalise_answer(reference)


def contains_match(answer: str, reference: str) -> bool:
    expected, got = normalise_answer(reference).casefold(), normalise_answer(answer).casefold()
    # Every string contains "", so an empty reference would match any answer.
    return expected in got if expected else not got


@dataclass
class SideReport:
    """Scores of one model (the base, or base + adapter)."""

    name: str
    answers: list[str] = field(default_factory=list)
    exact: float = 0.0
    contains: float = 0.0
    loss: Optional[float] = None
    ppl: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {"exact_match": self.exact, "contains_match": self.contains, "loss": self.loss, "ppl": self.ppl}


@dataclass
class EvalReport:
    rows: list[Row]
    references: list[str]
    sides: list[SideReport]

    def to_dict(self) -> dict[str, Any]:
        """The scores per model, and per row the reference and each model's answer with its two
        scores, so a score can be checked afterwards."""
        per_row = []
        for i, reference in enumerate(self.references):
            entry: dict[str, Any] = {"expected": reference}
            for side in self.sides:
                entry[side.name] = {"answer": side.answers[i], "exact": exact_match(side.answers[i], reference),
                                    "contains": contains_match(side.answers[i], reference)}
            per_row.append(entry)
        return {"rows": len(self.rows), **{s.name: s.to_dict() for s in self.sides}, "per_row": per_row}

    def format_table(self, show: int = 5, width: int = 60) -> str:
        """Sample answers, then one line of scores per model."""
        lines: list[str] = []
        label = max([10] + [len(side.name) + 2 for side in self.sides])
        for i, row in enumerate(self.rows[:show]):
            prompt = row if isinstance(row, str) else _prompt_text(row)
            lines.append(f"[{i + 1}] {_clip(prompt, width * 2)}")
            lines.append(f"    {'expected:':<{label}}    {_clip(self.references[i], width)}")
            for side in self.sides:
                mark = "ok" if exact_match(side.answers[i], self.references[i]) else "--"
                lines.append(f"    {side.name + ':':<{label}} {mark} {_clip(side.answers[i], width)}")
        lines.append("")
        model = max(16, label)
        header = f"{'model':<{model}}{'exact':>8}{'contains':>10}{'loss':>9} {'ppl':>10}"
        lines.append(header)
        for side in self.sides:
            loss = f"{side.loss:.4f}" if side.loss is not None else "-"
            ppl = f"{side.ppl:.2f}" if side.ppl is not None else "-"
            # A space before ppl: an untrained model's perplexity runs past ten characters.
            lines.append(f"{side.name:<{model}}{side.exact:>7.1%}{side.contains:>10.1%}{loss:>9} {ppl:>10}")
        return "\n".join(lines)


def _prompt_text(row: dict) -> str:
    for key in ("instruction", "prompt"):
        if row.get(key):
            extra = row.get("input") or row.get("context") or ""
            # The input is what changes from row to row: keep it whole, shorten the instruction.
            return (_clip(row[key], 40) + f" | {extra}") if extra else row[key]
    users = [text for role, text in conversation_turns(row) if role == "user"]
    return users[-1] if users else str(row)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _last_answer_only(labels: list[int]) -> list[int]:
    """``labels`` with every target before the last run of targets (the last answer) set to -100."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= i <= end else IGNORE_INDEX for i, label in enumerate(labels)]


@torch.no_grad()
def reference_loss(loaded: LoadedModel, rows: Sequence[dict], max_length: int = 1024, batch_size: int = 8,
                   use_adapter: bool = True) -> tuple[float, float]:
    """Token-weighted loss and perplexity of the reference answers: of a conversation, its last
    assistant turn (the earlier ones are context, as in generation). ``(None, None)`` when no row
    has an answer token within ``max_length`` (or the model's context, when shorter)."""
    max_length = min(max_length, context_length(loaded.model) or max_length)
    # build_dataset reads one format per data set; a file may mix them, row by row as generation takes them.
    by_format: dict[str, list[dict]] = {}
    for row in rows:
        by_format.setdefault(detect_format(row, "eval row"), []).append(without_turn_weights(row))
    examples = []
    for group in by_format.values():
        try:
            examples += build_dataset(group, loaded.tokenizer, loaded.template, max_length=max_length)[0]
        except NoRowsLeft as err:
            log.warning("no loss for these rows: %s", err)  # prompts longer than max_length, e.g.
    if not examples:
        return None, None
    examples = [{**e, "labels": _last_answer_only(e["labels"])} for e in examples]
    collate = Collator(pad_token_id_for(loaded.tokenizer))
    net = loaded.model
    device = next(net.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        if isinstance(net, PeftModel) and not use_adapter:
            with net.disable_adapter():
                logits = net(**inputs).logits
        else:
            logits = net(**inputs).logits
        total += float(token_loss_sum(logits, batch["labels"]))
        count += count_targets(batch)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))


def evaluate(loaded: LoadedModel, rows: Sequence[Row], settings: Optional[GenerationSettings] = None,
             compare_base: bool = True, with_loss: bool = True, max_length: int = 1024,
             progress: bool = False, more_adapters: Sequence[str] = (),
             template: Optional[Union[str, dict]] = None) -> EvalReport:
    """Score base and/or base + adapter on ``rows`` (data rows with reference answers).

    ``more_adapters``: further adapter folders of the same base, loaded beside the first and
    scored each in its own column, named by its folder; each prompts with its own saved
    template unless ``template`` is given (the bare base uses the first adapter's).
    """
    references = [reference_answer(r) for r in rows]
    missing = [i + 1 for i, ref in enumerate(references) if ref is None]
    if missing:
        raise ValueError(f"rows {missing[:5]} have no reference answer (output/response/completion "
                         "or a final assistant message); evaluation needs one per row")
    has_adapter = isinstance(loaded.model, PeftModel)
    if more_adapters and not has_adapter:
        raise ValueError("more_adapters needs a first adapter loaded with the model")
    refuse_repeated_adapters([loaded.adapter or "", *more_adapters])
    refuse_mixed_methods([loaded.adapter, *more_adapters] if more_adapters else [])
    sides: list[tuple[str, Optional[str], LoadedModel]] = []  # (column, adapter name or None, model view)
    if compare_base or not has_adapter:
        sides.append(("base", None, loaded))
    if has_adapter:
        folders = [loaded.adapter] + list(more_adapters)
        labels = adapter_labels(folders) if more_adapters else ["adapter"]
        names = [loaded.model.active_adapter] + [_load_beside(loaded, f, i) for i, f in enumerate(more_adapters, 1)]
        for label, name, folder in zip(labels, names, folders):
            view = loaded if folder == loaded.adapter else replace(loaded, template=_template_of(loaded, folder,
                                                                                                  template))
            sides.append((label, name, view))
    reports = []
    for label, adapter_name, view in sides:
        if adapter_name is not None:
            view.model.set_adapter(adapter_name, inference_mode=True)
        bar = _bar(len(rows), f"generating ({label})") if progress else None
        try:
            answers = generate_answers(view, rows, settings, use_adapter=adapter_name is not None, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        side = SideReport(label, answers)
        side.exact = sum(exact_match(a, r) for a, r in zip(answers, references)) / len(rows)
        side.contains = sum(contains_match(a, r) for a, r in zip(answers, references)) / len(rows)
        if with_loss and all(isinstance(r, dict) for r in rows):
            side.loss, side.ppl = reference_loss(view, rows, max_length, use_adapter=adapter_name is not None)
        reports.append(side)
    return EvalReport(list(rows), references, reports)


RESERVED_LABELS = ("base", "rows", "per_row", "expected")


def refuse_repeated_adapters(folders: Sequence[str]) -> None:
    """ValueError naming the first folder given again (another spelling of the same path counts)."""
    seen = [os.path.realpath(f) for f in folders]
    twice = next((f for i, f in enumerate(folders) if os.path.realpath(f) in seen[:i]), None)
    if twice is not None:
        raise ValueError(f"adapter {twice!r} is given twice; give each adapter once")


def refuse_mixed_methods(folders: Sequence[str]) -> None:
    """ValueError, before any model loads, when the adapter folders hold adapters of different
    methods (a LoRA and an IA3 one): they are scored on one loaded base, which holds one method.
    A folder without an adapter config is named by its own error."""
    from .config import PeftConfig

    methods = {folder: str(PeftConfig.from_pretrained(folder).peft_type) for folder in folders}
    if len(set(methods.values())) > 1:
        listing = ", ".join(f"{folder} is {method}" for folder, method in methods.items())
        raise ValueError(f"adapters scored side by side share one loaded base, which holds adapters of one "
                         f"method: {listing}; score each method's adapters in a run of their own")


def adapter_labels(folders: Sequence[str]) -> list[str]:
    """Column names for adapter folders: each folder's own name, or its whole path where two
    share a name (or a name is one of the report's own keys)."""
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    clash = {n for n in names if names.count(n) > 1 or n in RESERVED_LABELS}
    return [os.path.normpath(f) if n in clash else n for n, f in zip(names, folders)]


def _load_beside(loaded: LoadedModel, folder: str, index: int) -> str:
    """Load adapter ``folder`` into ``loaded.model`` under a new name (warning when its recorded
    base is not the one loaded); returns the name."""
    from .config import PeftConfig

    recorded = PeftConfig.from_pretrained(folder).base_model_name_or_path
    first = PeftConfig.from_pretrained(loaded.adapter).base_model_name_or_path
    if recorded and first and recorded != first:
        log.warning("adapter %s was trained on %s, the first adapter on %s: scoring it on %s", folder, recorded,
                    first, loaded.base_name)
    name = f"eval_{index}"
    loaded.model.load_adapter(folder, adapter_name=name)
    return name


def _template_of(loaded: LoadedModel, folder: str, template: Optional[Union[str, dict]]):
    """The template an adapter is scored with: ``template`` if given, else the one saved with it,
    else the first adapter's."""
    from .data import get_template
    from .pipeline import load_saved_template

    if template is not None:
        return get_template(template, loaded.tokenizer)
    return load_saved_template(folder, loaded.tokenizer) or loaded.template


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)

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
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .data import IGNORE_INDEX, Collator, build_dataset, detect_format, pad_token_id_for
from .data.errors import NoRowsLeft
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
        for i, row in enumerate(self.rows[:show]):
            prompt = row if isinstance(row, str) else _prompt_text(row)
            lines.append(f"[{i + 1}] {_clip(prompt, width * 2)}")
            lines.append(f"    expected:  {_clip(self.references[i], width)}")
            for side in self.sides:
                mark = "ok" if exact_match(side.answers[i], self.references[i]) else "--"
                lines.append(f"    {side.name + ':':<10} {mark} {_clip(side.answers[i], width)}")
        lines.append("")
        header = f"{'model':<16}{'exact':>8}{'contains':>10}{'loss':>9} {'ppl':>10}"
        lines.append(header)
        for side in self.sides:
            loss = f"{side.loss:.4f}" if side.loss is not None else "-"
            ppl = f"{side.ppl:.2f}" if side.ppl is not None else "-"
            # A space before ppl: an untrained model's perplexity runs past ten characters.
            lines.append(f"{side.name:<16}{side.exact:>7.1%}{side.contains:>10.1%}{loss:>9} {ppl:>10}")
        return "\n".join(lines)


def _prompt_text(row: dict) -> str:
    for key in ("instruction", "prompt"):
        if row.get(key):
            extra = row.get("input") or row.get("context") or ""
            # The input is what changes from row to row: keep it whole, shorten the instruction.
            return (_clip(row[key], 40) + f" | {extra}") if extra else row[key]
    messages = row.get("messages") or []
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
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
        by_format.setdefault(detect_format(row, "eval row"), []).append(row)
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
             progress: bool = False) -> EvalReport:
    """Score base and/or base + adapter on ``rows`` (data rows with reference answers)."""
    references = [reference_answer(r) for r in rows]
    missing = [i + 1 for i, ref in enumerate(references) if ref is None]
    if missing:
        raise ValueError(f"rows {missing[:5]} have no reference answer (output/response/completion "
                         "or a final assistant message); evaluation needs one per row")
    sides: list[tuple[str, bool]] = []
    has_adapter = isinstance(loaded.model, PeftModel)
    if compare_base or not has_adapter:
        sides.append(("base", False))
    if has_adapter:
        sides.append(("adapter", True))
    reports = []
    for name, use_adapter in sides:
        bar = _bar(len(rows), f"generating ({name})") if progress else None
        try:
            answers = generate_answers(loaded, rows, settings, use_adapter=use_adapter, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        side = SideReport(name, answers)
        side.exact = sum(exact_match(a, r) for a, r in zip(answers, references)) / len(rows)
        side.contains = sum(contains_match(a, r) for a, r in zip(answers, references)) / len(rows)
        if with_loss and all(isinstance(r, dict) for r in rows):
            side.loss, side.ppl = reference_loss(loaded, rows, max_length, use_adapter=use_adapter)
        reports.append(side)
    return EvalReport(list(rows), references, reports)


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)

"""Examples → tensor batches: padding, length grouping, packing, and a resumable batch order.

Resume contract of :func:`batches`: the batch sequence is a pure function of
``(examples, batch_size, group_by_length, packing, max_length, shuffle, seed,
epoch, drop_last)``. A run interrupted after finishing batch ``b`` of epoch
``e`` continues with ``batches(..., epoch=e, start_batch=b + 1)`` and sees
exactly the batches the uninterrupted run would have seen; the next epoch is
``epoch=e + 1, start_batch=0``. ``len()`` is the number of batches in the
whole epoch (the same for every epoch), so it can size a learning-rate
schedule. Nothing depends on global random state.

Packing keeps rows apart: ``position_ids`` restart at 0 for every row and the
first label of each row is ``-100``. transformers (5.x) detects packed rows from
``position_ids`` and builds a block-diagonal causal mask (sdpa and eager) or
uses the varlen kernel (flash-attention) - but only when the model is called
with no ``attention_mask`` and **no KV cache**: call the model with
``use_cache=False`` (training should anyway). With a cache the rows silently
attend to each other. ``block_mask=True`` adds an explicit 4D additive mask
instead, which needs no cache setting and works for any attention
implementation that accepts a 4D mask.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch

from .errors import DataError
from .tokenize import IGNORE_INDEX

# Length grouping sorts within windows of this many batches, so batches have
# similar lengths while the data order stays random (as transformers' LengthGroupedSampler).
MEGABATCH_FACTOR = 50


def pad_token_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")
    return pad


def collate(examples: Sequence[dict], pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Padding uses ``pad_token_id`` (default 0; its value never matters because the
    attention mask hides it and its labels are ``-100``) and optionally rounds T
    up to a multiple of ``pad_to_multiple_of``.
    """
    if not examples:
        raise DataError("collate: got an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """Callable form of :func:`collate` (for a ``DataLoader``); same defaults."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_token_id, self.pad_to_multiple_of)


def pack(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Pack rows, in order, into sequences of at most ``max_length`` tokens.

    Next-fit: a row goes into the current pack if it fits, else starts a new one,
    so the result is deterministic and keeps the data order. Each pack has
    ``input_ids``, ``labels`` (first token of every row set to ``-100``) and
    ``position_ids`` (restarting at 0 for every row).

    Raises:
        DataError: a row is longer than ``max_length``.
    """
    packs: list[dict] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if n > max_length:
            raise DataError(f"pack: example {i} has {n} tokens, more than max_length={max_length}; build the data with the same max_length")
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += e["input_ids"]
        # The first token of a row must not be predicted from the previous row's last token.
        current["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packs.append(current)
    return packs


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: causal within each row of a pack, blocked across rows.

    Rows are found where ``position_ids`` do not step by +1 (the rule transformers
    uses). Allowed entries are 0, blocked ones the most negative ``dtype`` value.
    """
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    segment = (step != 1).cumsum(-1)  # (B, T) row id per token
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


class PackedCollator:
    """Collate packs from :func:`pack` into ``input_ids``, ``labels``, ``position_ids``.

    Args:
        pad_token_id: id used for padding (default 0; never attended to across rows, never trained on).
        padding_free: ``True`` (default): concatenate the packs into one (1, total)
            row with no padding; ``False``: (B, T) right-padded, the padding forming its
            own row (positions restart at 0, labels ``-100``).
        block_mask: also return ``attention_mask``, the (B, 1, T, T) additive mask of
            :func:`block_causal_mask`, for attention code that ignores packed
            ``position_ids`` or runs with a KV cache (default ``False``).
        mask_dtype: dtype of that mask; use the model's compute dtype (default float32).

    No 2D ``attention_mask`` is returned: transformers only honours packed
    ``position_ids`` when the attention mask is absent.
    """

    def __init__(self, pad_token_id: int = 0, padding_free: bool = True, block_mask: bool = False, mask_dtype: torch.dtype = torch.float32):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.block_mask = block_mask
        self.mask_dtype = mask_dtype

    def __call__(self, packs: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not packs:
            raise DataError("PackedCollator: got an empty batch")
        if self.padding_free:
            packs = [{k: [v for p in packs for v in p[k]] for k in ("input_ids", "labels", "position_ids")}]
        width = max(len(p["input_ids"]) for p in packs)
        rows = {"input_ids": [], "labels": [], "position_ids": []}
        for p in packs:
            pad = width - len(p["input_ids"])
            rows["input_ids"].append(p["input_ids"] + [self.pad_token_id] * pad)
            rows["labels"].append(p["labels"] + [IGNORE_INDEX] * pad)
            rows["position_ids"].append(p["position_ids"] + list(range(pad)))
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
        if self.block_mask:
            batch["attention_mask"] = block_causal_mask(batch["position_ids"], self.mask_dtype)
        return batch


def batch_plan(
    lengths: Sequence[int],
    batch_size: int,
    group_by_length: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[list[int]]:
    """The epoch's batches as lists of item indices; deterministic in (seed, epoch).

    With ``group_by_length``, the shuffled items are cut into windows of
    ``batch_size * 50``, each window is sorted by length into batches, the batches
    are shuffled, and the batch holding the longest item goes first (a too-large
    batch size then fails at step 1, not hours in). ``drop_last`` drops batches
    smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"tsugiki-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = batch_size * MEGABATCH_FACTOR
        plan = []
        for w in range(0, len(order), window):
            ranked = sorted(order[w : w + window], key=lambda i: -lengths[i])
            plan += [ranked[b : b + batch_size] for b in range(0, len(ranked), batch_size)]
        if shuffle:
            rng.shuffle(plan)
    else:
        plan = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if drop_last:
        plan = [b for b in plan if len(b) == batch_size]
    if group_by_length and plan:
        longest = max(range(len(plan)), key=lambda k: max(lengths[i] for i in plan[k]))
        plan.insert(0, plan.pop(longest))
    return plan


class Batches:
    """One epoch of collated batches, from ``start_batch`` on; ``len()`` counts the whole epoch."""

    def __init__(self, items: Sequence[dict], plan: list[list[int]], collator, start_batch: int = 0):
        if not 0 <= start_batch <= len(plan):
            raise DataError(f"start_batch={start_batch} is outside this epoch's {len(plan)} batches")
        self.items, self.plan, self.collator, self.start_batch = items, plan, collator, start_batch

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.plan[self.start_batch :]:
            yield self.collator([self.items[i] for i in indices])


def batches(
    examples: Sequence[dict],
    batch_size: int,
    group_by_length: bool = False,
    packing: bool = False,
    max_length: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    pad_token_id: int = 0,
    block_mask: bool = False,
    drop_last: bool = False,
) -> Batches:
    """Batches for one epoch (see the module docstring for the resume contract).

    Without packing each batch is :func:`collate` output over ``batch_size`` rows.
    With ``packing=True`` the rows are packed once, in order, into sequences of
    ``max_length`` (required), and each batch concatenates ``batch_size`` packs
    into one padding-free (1, total) row (:class:`PackedCollator`); packs have
    nearly equal lengths, so ``group_by_length`` changes little there.
    ``block_mask`` adds the 4D mask to packed batches.
    """
    if packing:
        if max_length is None:
            raise DataError("batches: packing=True needs max_length (the packed sequence length)")
        items = pack(examples, max_length)
        collator = PackedCollator(pad_token_id, padding_free=True, block_mask=block_mask)
    else:
        items, collator = examples, Collator(pad_token_id)
    plan = batch_plan([len(e["input_ids"]) for e in items], batch_size, group_by_length, shuffle, seed, epoch, drop_last)
    return Batches(items, plan, collator, start_batch)

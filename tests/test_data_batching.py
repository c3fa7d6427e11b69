"""Collation, length grouping, packing (with loss equivalence) and the resumable batch order."""

import pytest
import torch
import torch.nn.functional as F

from helpers_data import make_chat_tokenizer, make_tokenizer, tiny_llama
from tsugiki.data import (
    IGNORE_INDEX,
    DataError,
    PackedCollator,
    batch_plan,
    batches,
    block_causal_mask,
    build_dataset,
    collate,
    pack,
    pad_token_id_for,
)


def ex(ids, n_prompt=1):
    return {"input_ids": list(ids), "labels": [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])}


def test_collate_right_pads_with_masked_labels():
    batch = collate([ex([5, 6, 7]), ex([8, 9])], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert collate([ex([5, 6, 7])], pad_to_multiple_of=4)["input_ids"].shape == (1, 4)


def test_pad_token_falls_back_to_eos():
    assert pad_token_id_for(make_tokenizer()) == 0  # has <pad>
    chat = make_chat_tokenizer()  # no pad token
    assert pad_token_id_for(chat) == chat.eos_token_id


def test_group_by_length_batches_similar_lengths_seeded():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    plan = batch_plan(lengths, 4, group_by_length=True, seed=3)
    assert sorted(i for b in plan for i in b) == list(range(400))
    assert max(lengths[i] for i in plan[0]) == max(lengths)  # longest batch first
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan) / len(plan)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batch_plan(lengths, 4, seed=3)) / len(plan)
    assert spread < random_spread / 5
    assert plan == batch_plan(lengths, 4, group_by_length=True, seed=3)
    assert plan != batch_plan(lengths, 4, group_by_length=True, seed=4)
    assert plan != batch_plan(lengths, 4, group_by_length=True, seed=3, epoch=1)


def test_batch_plan_without_shuffle_and_drop_last():
    assert batch_plan([1] * 5, 2, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert batch_plan([1] * 5, 2, shuffle=False, drop_last=True) == [[0, 1], [2, 3]]


def test_resume_from_a_batch_index_replays_the_same_batches():
    examples = [ex(range(1, 2 + i % 7)) for i in range(30)]
    for kwargs in ({}, {"group_by_length": True}, {"packing": True, "max_length": 8}):
        full = list(batches(examples, 4, seed=5, epoch=2, **kwargs))
        resumed = list(batches(examples, 4, seed=5, epoch=2, start_batch=3, **kwargs))
        assert len(batches(examples, 4, seed=5, epoch=2, start_batch=3, **kwargs)) == len(full)
        assert len(resumed) == len(full) - 3
        for a, b in zip(full[3:], resumed):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        other = list(batches(examples, 4, seed=5, epoch=3, **kwargs))
        assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full, other))
    with pytest.raises(DataError, match="start_batch=99"):
        batches(examples, 4, start_batch=99)


def test_pack_restarts_positions_and_masks_row_starts():
    rows = [ex([10, 11, 12]), ex([20, 21]), ex([30, 31, 32, 33]), ex([40])]
    packs = pack(rows, max_length=6)
    assert [p["input_ids"] for p in packs] == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 40]]
    assert packs[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert packs[1]["position_ids"] == [0, 1, 2, 3, 0]
    assert packs[0]["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21]
    with pytest.raises(DataError, match="example 2 has 4 tokens, more than max_length=3"):
        pack(rows, max_length=3)


def test_packed_collator_layouts_and_block_mask():
    packs = pack([ex([10, 11, 12]), ex([20, 21]), ex([30, 31, 32, 33])], max_length=5)
    flat = PackedCollator(pad_token_id=0)(packs)
    assert flat["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert "attention_mask" not in flat
    padded = PackedCollator(pad_token_id=0, padding_free=False, block_mask=True)(packs)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 3, 0]  # padding is a row of its own
    assert padded["labels"][1, -1] == IGNORE_INDEX
    allowed = padded["attention_mask"][0, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, False, True, False],
        [False, False, False, True, True],
    ]
    assert padded["attention_mask"].shape == (2, 1, 5, 5)
    assert block_causal_mask(torch.tensor([[0, 1, 0]]), torch.bfloat16).dtype == torch.bfloat16


def row_losses(logits, labels, starts, lengths):
    """Mean next-token loss of each row inside a packed (1, T) sequence."""
    out = []
    for s, n in zip(starts, lengths):
        out.append(F.cross_entropy(logits[0, s : s + n - 1], labels[0, s + 1 : s + n], ignore_index=IGNORE_INDEX))
    return torch.stack(out)


@pytest.fixture(scope="module")
def packed_case():
    tok = make_tokenizer()
    rows = [
        {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
        {"instruction": "Translate to French", "input": "good morning", "output": "Bonjour."},
        {"instruction": "hello", "output": "hi there, how are you"},
    ]
    train, _, _ = build_dataset(rows, tok, "alpaca", max_length=128)
    return tok, train


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("block_mask", [False, True])
def test_packed_loss_equals_unpacked_loss(packed_case, attn, block_mask):
    tok, train = packed_case
    model = tiny_llama(attn, vocab_size=len(tok))
    lengths = [len(e["input_ids"]) for e in train]
    batch = PackedCollator(pad_token_id_for(tok), block_mask=block_mask)(pack(train, max_length=sum(lengths)))
    assert batch["input_ids"].shape == (1, sum(lengths))
    with torch.no_grad():
        unpacked = torch.stack([
            model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss for e in train
        ])
        # Packed rows are kept apart by position_ids when there is no KV cache (use_cache=False),
        # or by the explicit 4D mask.
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    packed = row_losses(logits, batch["labels"], starts, lengths)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)
    # The batch-level loss is the token-weighted mean of the same terms.
    with torch.no_grad():
        whole = model(**batch, use_cache=False).loss
    counts = torch.tensor([sum(lab != IGNORE_INDEX for lab in e["labels"][1:]) for e in train], dtype=torch.float)
    torch.testing.assert_close(whole, (unpacked * counts).sum() / counts.sum(), atol=1e-5, rtol=1e-5)


def test_packed_rows_would_leak_without_separation(packed_case):
    # Guards the test above: plain causal attention over the pack (positions not
    # restarted) gives different losses, so equality there is not an accident.
    tok, train = packed_case
    model = tiny_llama("sdpa", vocab_size=len(tok))
    batch = PackedCollator(pad_token_id_for(tok))(pack(train, max_length=1000))
    lengths = [len(e["input_ids"]) for e in train]
    with torch.no_grad():
        unpacked = torch.stack([model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss for e in train])
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    leaked = row_losses(logits, batch["labels"], [0, lengths[0], lengths[0] + lengths[1]], lengths)
    assert not torch.allclose(leaked[1:], unpacked[1:], atol=1e-4)


def test_packing_batches_need_max_length():
    with pytest.raises(DataError, match="packing=True needs max_length"):
        batches([ex([1, 2])], 2, packing=True)

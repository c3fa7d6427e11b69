"""tsugiki's CPU attention (tsugiki.kernels.attention) against SDPA and transformers' eager attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tiny_models import tiny_llama
from tsugiki import LoraConfig, get_peft_model
from tsugiki.kernels import attention
from tsugiki.kernels.attention import GroupedAttention, attention_forward, fast_attention

BF16 = torch.bfloat16


def _inputs(B, H, Hk, T, D=16, Tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or T
    q = (torch.randn(B, H, T, D, generator=g) * 1.5).to(BF16)
    k = (torch.randn(B, Hk, Tk, D, generator=g) * 1.5).to(BF16)
    v = torch.randn(B, Hk, Tk, D, generator=g).to(BF16)
    grad = torch.randn(B, H, T, D, generator=g).to(BF16)
    return q, k, v, grad


def _padding_mask(B, T, seed=0):
    """Right padding: row b has a random length; causal inside it (bool, True = may attend)."""
    lengths = torch.randint(T // 2, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    real = torch.arange(T)[None] < lengths[:, None]
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]


def _packed_mask(T, starts):
    """One row holding several sequences: causal inside each, nothing across them."""
    doc = torch.zeros(T, dtype=torch.long)
    for s in starts:
        doc[s:] += 1
    return (torch.ones(T, T, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :]))[None, None]


def _run(fn, q, k, v, grad):
    """fn's output and the gradients of q, k, v (fp32 leaves when the inputs are fp32)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _sdpa(mask, causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                          enable_gqa=True)


def _eager(mask, causal):
    """transformers' eager attention in bf16: bf16 scores times scale, + mask, fp32 softmax rounded to bf16."""
    def run(q, k, v):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        allowed = mask if mask is not None else (
            torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if causal else None)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)
    return run


def _rel_errors(got, ref):
    return [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, ref)]


CASES = {
    "gqa-causal": dict(B=2, H=6, Hk=2, T=33, mask=None),
    "mha-causal": dict(B=1, H=4, Hk=4, T=64, mask=None),
    "gqa-padding": dict(B=3, H=6, Hk=3, T=20, mask="padding"),
    "packed": dict(B=1, H=4, Hk=2, T=24, mask="packed"),
    "one-query": dict(B=2, H=4, Hk=2, T=1, Tk=9, mask=None),
}


def _case(name):
    c = CASES[name]
    q, k, v, grad = _inputs(c["B"], c["H"], c["Hk"], c["T"], Tk=c.get("Tk"))
    mask = {None: None, "padding": _padding_mask(c["B"], c["T"]),
            "packed": _packed_mask(c["T"], [9, 15])}[c["mask"]]
    causal = mask is None and c["T"] > 1
    return q, k, v, grad, mask, causal


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_fp32_sdpa_as_closely_as_eager_bf16(name):
    q, k, v, grad, mask, causal = _case(name)
    ref = _run(_sdpa(mask, causal), q.float(), k.float(), v.float(), grad.float())
    got = _run(lambda q, k, v: GroupedAttention.apply(q, k, v, mask, causal, q.shape[-1] ** -0.5), q, k, v, grad)
    eager = _run(_eager(mask, causal), q, k, v, grad)
    assert all(t.dtype == BF16 for t in got)
    for ours, theirs, what in zip(_rel_errors(got, ref), _rel_errors(eager, ref), ("out", "dq", "dk", "dv")):
        assert ours < 1.3 * theirs + 1e-3, (what, ours, theirs)  # eager's precision (bf16 scores)
        assert ours < 1.5e-2, (what, ours)


def test_a_query_that_may_attend_nowhere_gets_zeros_as_in_sdpa():
    q, k, v, grad = _inputs(2, 4, 2, 12)
    mask = _padding_mask(2, 12).clone()
    mask[:, :, 3] = False
    out, dq, dk, dv = _run(lambda q, k, v: GroupedAttention.apply(q, k, v, mask, False, 0.25), q, k, v, grad)
    ref = _run(_sdpa(mask, False), q.float(), k.float(), v.float(), grad.float())
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all()
    assert (ref[0][:, :, 3] == 0).all()
    torch.testing.assert_close(out.float(), ref[0], atol=3e-2, rtol=0)


@pytest.mark.parametrize("mask_kind", [None, "padding"])
def test_chunked_rows_give_the_same_result_as_one_chunk(monkeypatch, mask_kind):
    q, k, v, grad = _inputs(3, 6, 3, 16)
    mask = _padding_mask(3, 16) if mask_kind else None
    run = lambda q, k, v: GroupedAttention.apply(q, k, v, mask, mask is None, 0.25)  # noqa: E731
    whole = _run(run, q, k, v, grad)
    monkeypatch.setattr(attention, "CHUNK_SCORES", 2 * 16 * 16)  # one (batch, key head) row per chunk
    chunked = _run(run, q, k, v, grad)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


@pytest.mark.parametrize("change", ["fp32", "dropout", "float-mask", "too-long", "crop-keys"])
def test_calls_it_does_not_cover_run_transformers_sdpa_unchanged(monkeypatch, change):
    q, k, v, _ = _inputs(2, 6, 2, 16)
    mask, kwargs = None, {}
    if change == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif change == "dropout":
        kwargs["dropout"] = 0.1
    elif change == "float-mask":
        mask = torch.zeros(2, 1, 16, 16).masked_fill_(~_padding_mask(2, 16), float("-inf")).to(BF16)
    elif change == "too-long":
        monkeypatch.setattr(attention, "MAX_ROW_SCORES", 3 * 16 * 16 - 1)
    elif change == "crop-keys":
        k, v = torch.cat([k, k], 2), torch.cat([v, v], 2)
    assert not attention.covers(q, k, v, mask, kwargs.get("dropout", 0.0), causal=mask is None)
    calls = []
    monkeypatch.setattr(GroupedAttention, "apply", lambda *a: calls.append(a))
    torch.manual_seed(0)
    out, _ = attention_forward(_Module(), q, k, v, mask, **kwargs)
    torch.manual_seed(0)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask, **kwargs)
    assert not calls
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_attention_forward_returns_what_sdpa_returns_in_shape_and_close_in_value():
    q, k, v, _ = _inputs(2, 6, 2, 16)
    out, weights = attention_forward(_Module(), q, k, v, None, scaling=0.3)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == ref.shape == (2, 16, 6, 16) and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=0)


def _grafted_llama():
    model = tiny_llama(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                       attn_implementation="sdpa").to(BF16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    return model


def test_a_grafted_llama_trains_alike_under_fast_attention_and_the_config_is_put_back(monkeypatch):
    ids = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 17:] = 0  # one padded row: the padding mask path
    calls = []
    original = GroupedAttention.apply
    monkeypatch.setattr(GroupedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    results = []
    for enabled in (False, True):
        model = _grafted_llama()
        config = model.get_base_model().config
        with fast_attention(model, enabled) as switched:
            assert switched == (1 if enabled else 0)
            assert config._attn_implementation == (attention.KEY if enabled else "sdpa")
            loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
            loss.backward()
        assert config._attn_implementation == "sdpa"
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                if p.requires_grad}))
    assert len(calls) == 2  # one per layer, only when enabled
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=0)
    for name, ref in grads_ref.items():
        assert (grads[name] - ref).norm() <= 5e-2 * ref.norm(), name


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_llama(attn_implementation="eager")
    with fast_attention(model) as switched:
        assert switched == 0
        assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("probe,limit", [(lambda: True, 1 << 20), (lambda: False, 1 << 22), (None, 1 << 22),
                                         (lambda: 1 / 0, 1 << 22)])
def test_the_row_limit_follows_the_cpu(monkeypatch, probe, limit):
    """AMX CPUs run SDPA's flash kernel faster, so tsugiki's path stops at shorter rows there."""
    if probe is None:
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", probe, raising=False)
    assert attention._row_limit() == limit

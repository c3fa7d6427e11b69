"""add_weighted_adapter: each combination type against its formula, and against HF PEFT."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tsugiki
from tsugiki import combine
from tsugiki.methods.lora import LoraEmbedding, LoraLayer

TARGETS_A = ["q_proj", "v_proj", "embed_tokens"]
TARGETS_B = ["q_proj", "k_proj", "embed_tokens"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def two_adapters(r_a=4, r_b=4, alpha_a=8, alpha_b=4, rslora_b=False, targets_b=TARGETS_B, **kw_b):
    """Tiny Llama with random (non-zero) adapters 'default' and 'b' that overlap on q_proj / embed_tokens."""
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(
        r=r_a, lora_alpha=alpha_a, init_lora_weights=False, target_modules=TARGETS_A))
    torch.manual_seed(1)
    model.add_adapter("b", tsugiki.LoraConfig(r=r_b, lora_alpha=alpha_b, init_lora_weights=False,
                                              target_modules=targets_b, use_rslora=rslora_b, **kw_b))
    return model


def lora_layers(model, adapter):
    return {n: m for n, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.adapter_names}


def factors(layer, name):
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach()
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()


def weighted_delta(layer, sources):
    return sum(w * layer.get_delta_weight(n).detach() for n, w in sources if n in layer.adapter_names)


def ids():
    return torch.tensor([[1, 5, 9, 2, 33, 60], [7, 7, 3, 0, 12, 40]])


# -- each type against its formula ------------------------------------------------------------
def test_cat_is_exact_and_concatenates_scaled_factors():
    model = two_adapters(r_a=4, r_b=2, rslora_b=True)
    w = [0.7, -1.3]
    model.add_weighted_adapter(["default", "b"], w, "mix", combination_type="cat")
    cfg = model.peft_config["mix"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (6, 6, False)
    assert cfg.target_modules == ["embed_tokens", "k_proj", "q_proj", "v_proj"]
    layers = lora_layers(model, "mix")
    assert set(layers) == set(lora_layers(model, "default")) | set(lora_layers(model, "b"))
    for name, layer in layers.items():
        assert layer.scaling["mix"] == 1.0
        want = weighted_delta(layer, [("default", w[0]), ("b", w[1])])
        torch.testing.assert_close(layer.get_delta_weight("mix").detach(), want, atol=1e-5, rtol=1e-5)
    q = layers["model.layers.0.self_attn.q_proj"]
    (A0, B0), (A1, B1) = factors(q, "default"), factors(q, "b")
    A, B = factors(q, "mix")
    torch.testing.assert_close(A, torch.cat([A0 * w[0] * q.scaling["default"], A1 * w[1] * q.scaling["b"]]))
    torch.testing.assert_close(B, torch.cat([B0, B1], dim=1))
    # Layers adapted by one source only: that source's rows, zero padding after them.
    v = layers["model.layers.0.self_attn.v_proj"]
    A, B = factors(v, "mix")
    assert torch.count_nonzero(A[4:]) == 0 and torch.count_nonzero(B[:, 4:]) == 0


def test_linear_weights_each_factor_by_root_of_weight_times_scaling():
    model = two_adapters(alpha_a=8, alpha_b=2)
    w = [0.5, -2.0]
    model.add_weighted_adapter(["default", "b"], w, "lin", combination_type="linear")
    assert model.peft_config["lin"].r == 4 and model.peft_config["lin"].lora_alpha == 4
    for name, layer in lora_layers(model, "lin").items():
        A = torch.zeros_like(factors(layer, "lin")[0])
        B = torch.zeros_like(factors(layer, "lin")[1])
        for n, wi in zip(["default", "b"], w):
            if n in layer.adapter_names:
                c = wi * layer.scaling[n]
                An, Bn = factors(layer, n)
                A += math.copysign(math.sqrt(abs(c)), c) * An
                B += math.sqrt(abs(c)) * Bn
        got_A, got_B = factors(layer, "lin")
        torch.testing.assert_close(got_A, A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_B, B, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.get_delta_weight("lin").detach(), B @ A if not isinstance(layer, LoraEmbedding)
                                   else (B @ A).T, atol=1e-5, rtol=1e-5)


def test_weights_given_as_a_tensor_combine_as_the_same_numbers():
    model = two_adapters(alpha_a=8, alpha_b=2)
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "numbers", combination_type="linear")
    model.add_weighted_adapter(["default", "b"], torch.tensor([0.5, -2.0]), "tensor", combination_type="linear")
    for layer in lora_layers(model, "tensor").values():
        assert torch.equal(layer.get_delta_weight("tensor"), layer.get_delta_weight("numbers"))


def test_linear_with_one_source_has_the_weighted_delta():
    model = two_adapters()
    model.add_weighted_adapter(["b"], [-0.4], "only_b", combination_type="svd")  # one source: linear
    for name, layer in lora_layers(model, "b").items():
        torch.testing.assert_close(layer.get_delta_weight("only_b").detach(),
                                   -0.4 * layer.get_delta_weight("b").detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("svd_rank", [None, 8, 2])
def test_svd_is_the_truncated_svd_of_the_weighted_sum(svd_rank):
    model = two_adapters(r_a=4, r_b=4)
    w = [1.0, 0.6]
    model.add_weighted_adapter(["default", "b"], w, "s", combination_type="svd", svd_rank=svd_rank)
    rank = svd_rank or 4
    assert model.peft_config["s"].r == rank
    for name, layer in lora_layers(model, "s").items():
        full = weighted_delta(layer, [("default", w[0]), ("b", w[1])])
        U, S, Vh = torch.linalg.svd(full)
        k = min(rank, S.numel())
        want = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        torch.testing.assert_close(layer.get_delta_weight("s").detach(), want, atol=1e-5, rtol=1e-4)
        if rank >= 8:  # both sources fit: exact
            torch.testing.assert_close(layer.get_delta_weight("s").detach(), full, atol=1e-5, rtol=1e-4)


def test_svd_clamp_limits_factors_to_the_quantile():
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "raw", combination_type="svd")
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "clamped", combination_type="svd", svd_clamp=0.9)
    q = lora_layers(model, "raw")["model.layers.1.self_attn.q_proj"]
    A, B = factors(q, "raw")
    t = torch.quantile(torch.cat([B.flatten(), A.flatten()]), 0.9)
    cA, cB = factors(q, "clamped")
    torch.testing.assert_close(cA, A.clamp(-t, t))
    torch.testing.assert_close(cB, B.clamp(-t, t))
    assert cA.abs().max() <= t + 1e-6 and not torch.equal(cB, B)


def test_quantile_matches_torch():
    x = torch.randn(1001)
    for q in (0.0, 0.25, 0.9, 0.999, 1.0):
        torch.testing.assert_close(combine.quantile(x, q), torch.quantile(x, q))


# -- merge rules on a hand-made example ---------------------------------------------------------
T1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.1], [1.0, -0.2, -6.0]])
T2 = torch.tensor([[-1.0, 2.0, 0.3], [-5.0, -0.4, 0.2], [0.6, 3.0, 1.0]])


def test_magnitude_prune_keeps_the_largest_entries():
    kept = combine.prune_magnitude(T1, 4 / 9)  # int(4/9 * 9) = 4 entries: -6, 4, 3, -2
    assert torch.equal(kept, torch.tensor([[3.0, 0, 0], [-2.0, 4.0, 0], [0, 0, -6.0]]))
    assert torch.equal(combine.prune_magnitude(T1, 1.0), T1)
    merged = combine.merge_tensors("magnitude_prune", [T1, T2], torch.tensor([1.0, 0.5]), density=4 / 9)
    p2 = torch.tensor([[0, 2.0, 0], [-5.0, 0, 0], [0, 3.0, 0]])  # T2 keeps -5, 3, 2 and ... -1 (4th)
    p2[0, 0] = -1.0
    torch.testing.assert_close(merged, kept + 0.5 * p2)


def test_ties_elects_sign_then_averages_agreeing_entries():
    w = torch.tensor([1.0, 2.0])
    # density 1: no pruning; "total" elects the sign of T1 + T2.
    got = combine.merge_tensors("ties", [T1, T2], w, density=1.0, majority_sign_method="total")
    want = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            a, b = T1[i, j].item(), T2[i, j].item()
            sign = 1.0 if a + b >= 0 else -1.0
            vals = [wv * x for wv, x in ((1.0, a), (2.0, b)) if x != 0 and math.copysign(1, x) == sign]
            want[i, j] = sum(vals) / max(len(vals), 1)
    torch.testing.assert_close(got, want)
    # Spot checks: (0,0): 3 + -1 > 0 -> only T1 counts -> 3; (0,1): -1 + 2 > 0 -> only 2*2 = 4.
    assert got[0, 0] == 3.0 and got[0, 1] == 4.0
    # "frequency" counts signs: with three tensors, two small negatives outvote one large positive.
    T3 = -0.1 * torch.ones(3, 3)
    big = 10 * torch.ones(3, 3)
    freq = combine.merge_tensors("ties", [big, T3, T3], torch.ones(3), density=1.0, majority_sign_method="frequency")
    total = combine.merge_tensors("ties", [big, T3, T3], torch.ones(3), density=1.0, majority_sign_method="total")
    torch.testing.assert_close(freq, -0.1 * torch.ones(3, 3))
    torch.testing.assert_close(total, big)


def test_ties_with_pruning_and_entries_with_no_agreeing_task():
    w = torch.tensor([1.0, 1.0])
    a = torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    b = torch.tensor([[-2.0, 0.0], [0.5, 1.0]])
    got = combine.merge_tensors("ties", [a, b], w, density=1.0)
    # (0,0): 1-2<0 -> -2; (0,1): both zero -> 0; (1,0): only b -> 0.5; (1,1): -3+1<0 -> -3
    assert torch.equal(got, torch.tensor([[-2.0, 0.0], [0.5, -3.0]]))
    pruned = combine.merge_tensors("ties", [a, b], w, density=0.5)  # keep 2 of 4 entries each
    # a keeps 1, -3; b keeps -2, 1 -> (0,0): -1 -> -2; (1,1): -2 -> -3
    assert torch.equal(pruned, torch.tensor([[-2.0, 0.0], [0.0, -3.0]]))


def test_dare_keeps_about_density_and_rescales():
    torch.manual_seed(0)
    t = torch.randn(200, 200)
    kept = combine.prune_random(t, 0.3)
    mask = kept != 0
    assert abs(mask.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(kept[mask], t[mask] / 0.3)
    assert torch.equal(combine.prune_random(t, 1.0), t)
    # dare_linear: mean over many draws approaches the plain weighted sum.
    torch.manual_seed(1)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    runs = torch.stack([combine.merge_tensors("dare_linear", [x, -x], torch.tensor([1.0, 0.5]), density=0.5)
                        for _ in range(4000)])
    torch.testing.assert_close(runs.mean(0), 0.5 * x, atol=0.1, rtol=0)


def test_dare_on_a_model_follows_the_seed():
    model = two_adapters()
    w = [0.8, 0.4]
    torch.manual_seed(123)
    model.add_weighted_adapter(["default", "b"], w, "d1", combination_type="dare_linear", density=0.5)
    torch.manual_seed(123)
    model.add_weighted_adapter(["default", "b"], w, "d2", combination_type="dare_linear", density=0.5)
    # Reference with the same seed: per layer in model order, A factors then B factors, each source in order.
    torch.manual_seed(123)
    for name, layer in lora_layers(model, "d1").items():
        src = [(n, wi) for n, wi in zip(["default", "b"], w) if n in layer.adapter_names]
        c = [wi * layer.scaling[n] for n, wi in src]
        A = sum(math.copysign(math.sqrt(abs(ci)), ci) * (factors(layer, n)[0] * torch.bernoulli(
            torch.full_like(factors(layer, n)[0], 0.5)) / 0.5) for (n, _), ci in zip(src, c))
        B = sum(math.sqrt(abs(ci)) * (factors(layer, n)[1] * torch.bernoulli(
            torch.full_like(factors(layer, n)[1], 0.5)) / 0.5) for (n, _), ci in zip(src, c))
        torch.testing.assert_close(factors(layer, "d1")[0], A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(factors(layer, "d1")[1], B, atol=1e-6, rtol=1e-5)
        assert torch.equal(factors(layer, "d1")[0], factors(layer, "d2")[0])


def test_ties_on_a_model_applies_the_rule_to_each_factor():
    model = two_adapters()
    w = [0.8, -0.4]
    model.add_weighted_adapter(["default", "b"], w, "t", combination_type="ties", density=0.6,
                               majority_sign_method="frequency")
    q = lora_layers(model, "t")["model.layers.0.self_attn.q_proj"]
    c = [wi * q.scaling[n] for n, wi in zip(["default", "b"], w)]
    wA = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in c])
    wB = torch.tensor([math.sqrt(abs(x)) for x in c])
    (A0, B0), (A1, B1) = factors(q, "default"), factors(q, "b")
    torch.testing.assert_close(factors(q, "t")[0], combine.merge_tensors("ties", [A0, A1], wA, 0.6, "frequency"))
    torch.testing.assert_close(factors(q, "t")[1], combine.merge_tensors("ties", [B0, B1], wB, 0.6, "frequency"))


def test_ties_svd_factors_the_ties_merge_of_the_deltas():
    model = two_adapters()
    w = [1.0, 0.5]
    model.add_weighted_adapter(["default", "b"], w, "ts", combination_type="ties_svd", density=0.5, svd_rank=16)
    q = lora_layers(model, "ts")["model.layers.1.self_attn.q_proj"]
    deltas = [q.get_delta_weight(n).detach() for n in ("default", "b")]
    want = combine.merge_tensors("ties", deltas, torch.tensor(w), density=0.5)
    torch.testing.assert_close(q.get_delta_weight("ts").detach(), want, atol=1e-5, rtol=1e-4)


# -- against HF PEFT ------------------------------------------------------------------------------
def load_in_hf(model, tmp_path):
    peft = pytest.importorskip("peft")
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
        hf.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return hf.eval()


def hf_layers(hf, adapter):
    from peft.tuners.lora import LoraLayer as HFLoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in hf.named_modules()
            if isinstance(m, HFLoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


CASES = [
    dict(combination_type="linear"),
    dict(combination_type="cat"),
    dict(combination_type="svd"),
    dict(combination_type="svd", svd_rank=3, svd_clamp=0.95),
    dict(combination_type="svd", svd_full_matrices=False),
    dict(combination_type="ties", density=0.5),
    dict(combination_type="ties", density=0.7, majority_sign_method="frequency"),
    dict(combination_type="magnitude_prune", density=0.4),
    dict(combination_type="ties_svd", density=0.5),
    dict(combination_type="magnitude_prune_svd", density=0.6, svd_rank=6),
    dict(combination_type="dare_linear", density=0.5),
    dict(combination_type="dare_ties", density=0.6),
    dict(combination_type="dare_ties_svd", density=0.5),
    dict(combination_type="dare_linear", density=1.0),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_matches_hf_peft(kwargs, tmp_path, monkeypatch):
    model = two_adapters()
    hf = load_in_hf(model, tmp_path)
    # DARE draws its masks from torch.bernoulli; route both libraries' draws through one
    # generator, reseeded before each run, so they see the same masks.
    real_bernoulli = torch.bernoulli
    gen = torch.Generator()
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: real_bernoulli(p, generator=gen))
    w = [0.9, -0.6]
    gen.manual_seed(7)
    model.add_weighted_adapter(["default", "b"], w, "mix", **kwargs)
    gen.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns that density 1 prunes nothing
        hf.add_weighted_adapter(["default", "b"], w, "mix", **kwargs)
    assert model.peft_config["mix"].r == hf.peft_config["mix"].r
    assert set(model.peft_config["mix"].target_modules) == set(hf.peft_config["mix"].target_modules)
    ours, theirs = lora_layers(model, "mix"), hf_layers(hf, "mix")
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name].get_delta_weight("mix").detach(),
                                   theirs[name].get_delta_weight("mix").detach(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
    model.set_adapter("mix")
    hf.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, hf(input_ids=ids()).logits, atol=1e-5, rtol=1e-4)


def test_combined_adapter_saves_and_reloads_in_both_libraries(tmp_path):
    peft = pytest.importorskip("peft")
    model = two_adapters(r_a=4, r_b=2)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    back = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path / "mix")
    hf = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids()).logits, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hf(input_ids=ids()).logits, want, atol=1e-5, rtol=1e-4)


# -- configs, modules_to_save, errors -------------------------------------------------------------
def test_regex_targets_are_ored_and_active_adapter_is_kept():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(
        r=2, init_lora_weights=False, target_modules=r".*\.q_proj"))
    model.add_adapter("b", tsugiki.LoraConfig(r=2, init_lora_weights=False, target_modules=r".*\.v_proj"))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.peft_config["mix"].target_modules == r"(.*\.q_proj)|(.*\.v_proj)"
    assert model.active_adapter == "default"
    assert len(lora_layers(model, "mix")) == 4


def test_default_targets_mixed_with_a_list_resolve_to_layers():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("b", tsugiki.LoraConfig(r=2, init_lora_weights=False, target_modules=["o_proj"]))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="svd")
    got = set(lora_layers(model, "mix"))
    assert got == set(lora_layers(model, "default")) | set(lora_layers(model, "b"))


def test_modules_to_save_of_one_source_is_copied_trained():
    model = two_adapters(modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["b"].weight.add_(1.0)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.peft_config["mix"].modules_to_save == ["lm_head"]
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["b"].weight)


def test_modules_to_save_in_two_sources_is_refused():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(
        r=2, init_lora_weights=False, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("b", tsugiki.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"],
                                              modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"\['default', 'b'\] each train their own copy of 'lm_head'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in model.peft_config


def test_layers_the_new_targets_miss_are_an_error_and_leave_no_trace():
    model = tsugiki.get_peft_model(tiny_llama(), tsugiki.LoraConfig(
        r=2, init_lora_weights=False, target_modules=["q_proj"], layers_to_transform=[0]))
    model.add_adapter("b", tsugiki.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"],
                                              layers_to_transform=[1]))
    with pytest.raises(ValueError, match=r"miss layers the sources adapt: \['model.layers.1.self_attn.q_proj'\]"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in model.peft_config and not lora_layers(model, "mix")


@pytest.mark.parametrize("call, match", [
    (dict(adapters=["default", "nope"]), r"unknown adapters \['nope'\]; have: default, b"),
    (dict(weights=[1.0]), r"got 1 weights for 2 adapters"),
    (dict(weights=[1.0, float("nan")]), r"weight nan for adapter 'b' must be a finite number"),
    (dict(adapter_name="b"), r"an adapter named 'b' already exists"),
    (dict(adapters=[]), r"adapters is empty"),
    (dict(combination_type="mean"), r"combination_type='mean' is not known; use one of cat, linear, .*svd"),
    (dict(combination_type="ties"), r"combination_type='ties' needs density"),
    (dict(combination_type="dare_linear", density=0.0), r"density=0.0 must be in \(0, 1\]"),
    (dict(combination_type="dare_ties_svd", density=1.5), r"density=1.5 must be in \(0, 1\]"),
    (dict(majority_sign_method="mode"), r"majority_sign_method='mode' is not known"),
    (dict(svd_rank=0), r"svd_rank=0 must be a positive integer"),
    (dict(svd_clamp=2), r"svd_clamp=2 must be a quantile in \[0, 1\]"),
])
def test_errors_name_the_culprit(call, match):
    model = two_adapters()
    args = dict(adapters=["default", "b"], weights=[1.0, 1.0], adapter_name="mix", combination_type="svd")
    args.update(call)
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**args)
    assert "mix" not in model.peft_config


@pytest.mark.parametrize("ctype", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_factor_types_need_equal_ranks(ctype):
    model = two_adapters(r_a=4, r_b=2)
    with pytest.raises(ValueError, match=r"needs adapters of equal rank, got ranks \{'default': 4, 'b': 2\}"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type=ctype, density=0.5)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")  # fine
    assert model.peft_config["mix"].r == 6


def test_unknown_keyword_is_a_type_error():
    model = two_adapters()
    with pytest.raises(TypeError, match="svd_rnk"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", svd_rnk=3)


def test_svd_on_conv1d_fan_in_fan_out_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D -> fan_in_fan_out notice
        model = tsugiki.get_peft_model(gpt2, tsugiki.LoraConfig(r=2, init_lora_weights=False,
                                                                target_modules=["c_attn"]))
        model.add_adapter("b", tsugiki.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                                  target_modules=["c_attn"]))
    model.add_weighted_adapter(["default", "b"], [1.0, -0.5], "s", combination_type="svd", svd_rank=5)
    (name, layer), = lora_layers(model, "s").items()
    assert layer.fan_in_fan_out and factors(layer, "s")[0].shape == (5, 16)
    torch.testing.assert_close(layer.get_delta_weight("s").detach(),
                               weighted_delta(layer, [("default", 1.0), ("b", -0.5)]), atol=1e-5, rtol=1e-4)


def test_rank_pattern_layers_are_checked_and_padded():
    model = two_adapters(r_a=4, r_b=4, rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' has ranks \{'default': 4, 'b': 2\}"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "lin", combination_type="linear")
    assert "lin" not in model.peft_config
    model.add_weighted_adapter(["default", "b"], [1.0, 2.0], "mix", combination_type="cat")
    cfg = model.peft_config["mix"]
    assert cfg.r == 8 and cfg.rank_pattern == {} and cfg.alpha_pattern == {}
    q = lora_layers(model, "mix")["model.layers.0.self_attn.q_proj"]
    A, B = factors(q, "mix")
    assert A.shape == (8, 16) and torch.count_nonzero(A[6:]) == 0
    torch.testing.assert_close(q.get_delta_weight("mix").detach(),
                               weighted_delta(q, [("default", 1.0), ("b", 2.0)]), atol=1e-5, rtol=1e-4)

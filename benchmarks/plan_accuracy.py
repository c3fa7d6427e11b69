"""How close is `tsugiki.plan` to the memory a real tsugiki LoRA training step uses?

For each case this runs one real training step (forward, backward, AdamW step)
in a fresh subprocess on random weights built from a config (no checkpoint is
read), measures the peak resident set size (RSS) of that step, and compares it
with the estimate `tsugiki.plan.estimate` makes from the config alone.

The step is the one tsugiki's Trainer takes, built from tsugiki's own parts:
`tsugiki.get_peft_model` with a `tsugiki.LoraConfig` (fp32 adapters),
`tsugiki.quant.quantize_model` + `prepare_model_for_kbit_training` for 4-bit
bases (bitsandbytes NF4 `Linear4bit`, double quantization, bf16 compute,
quantized on the CPU from random bf16 weights), then the Trainer's
`apply_dtype_policy` (frozen weights at the compute dtype, trainable ones
fp32), the forward under `torch.autocast` when the compute dtype is 16-bit,
the Trainer's loss (`target_logits_loss_sum`: the output layer at scored
positions only, in chunks; every position is scored here), the batch split
into forwards of as many rows as `max_forward_tokens: auto` allows (each
backward before the next forward), the fused RMSNorm and SiLU gate and the
bf16 CPU attention the Trainer swaps in (`fused_blocks`, `fast_attention`), and AdamW (fused where torch allows, as
`build_optimizer` does).

Measured = peak RSS of the training step. Linux's `/proc/self/clear_refs`
resets the high-water mark after the model is built, so the number covers the
step, not the construction of the random model (a real 4-bit load streams
shards and never holds the bf16 model). The runtime baseline (Python + torch +
transformers + tsugiki) is part of the measured RSS, as it is of the estimate.

Run:  python benchmarks/plan_accuracy.py            (all cases, ~8 min on 2 cores)
      python benchmarks/plan_accuracy.py --only smollm2-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from process_memory import release_freed_memory, reset_peak, status_bytes

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
    # name, config, dtype, quantization, batch, seq, target_modules, gradient_checkpointing
    ("smollm2-fp32", SMOLLM2, "fp32", None, 4, 512, None, False),
    ("smollm2-bf16", SMOLLM2, "bf16", None, 4, 512, None, False),
    ("smollm2-4bit", SMOLLM2, "bf16", "4bit", 4, 512, None, False),
    ("smollm2-bf16-all-linear-ckpt", SMOLLM2, "bf16", None, 4, 512, "all-linear", True),
    ("llama3.2-1b-fp32", LLAMA32_1B, "fp32", None, 1, 256, None, False),
    ("llama3.2-1b-bf16", LLAMA32_1B, "bf16", None, 1, 256, None, False),
    ("llama3.2-1b-4bit", LLAMA32_1B, "bf16", "4bit", 1, 256, None, False),
]


# ----------------------------------------------------------------------------- child


def run_child(spec: dict) -> dict:
    baseline_t0 = time.perf_counter()
    import torch
    import transformers

    from tsugiki import LoraConfig, get_peft_model
    from tsugiki.kernels.attention import fast_attention
    from tsugiki.kernels.block_fused import fused_blocks
    from tsugiki.kernels.target_logits import split_causal_lm, target_logits_loss_sum
    from tsugiki.plan import rows_per_forward
    from tsugiki.train.loop import apply_dtype_policy, auto_forward_tokens, enable_gradient_checkpointing

    if spec["quantization"]:
        import bitsandbytes  # noqa: F401  (counted in the runtime baseline, as in real QLoRA)
    torch.manual_seed(0)
    runtime_rss = status_bytes("VmRSS")

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    cfg = transformers.AutoConfig.for_model(**spec["config"])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if spec["quantization"] == "4bit":
        from tsugiki.quant import prepare_model_for_kbit_training, quantize_model

        quantize_model(model, bits=4, quant_type="nf4", double_quant=spec.get("double_quant", True),
                       compute_dtype=torch.bfloat16)
        # What tsugiki's pipeline does for a quantized base before grafting the adapter.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"],
                                        upcast_matrices=False)
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=spec["target_modules"], **spec["lora"])
    model = get_peft_model(model, lora)
    # What Trainer.prepare() does: dtype policy, then checkpointing, no KV cache.
    apply_dtype_policy(model, dtype)
    if spec["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (spec["batch_size"], spec["max_length"]))
    n_targets = ids[:, 1:].numel()
    body, head = split_causal_lm(model)  # every case here is Llama-shaped: the trainer's chunked loss applies
    budget = auto_forward_tokens(model, dtype, torch.device("cpu"), spec["gradient_checkpointing"])
    rows = rows_per_forward(spec["batch_size"], spec["max_length"], budget)
    autocast = torch.autocast(device_type="cpu", dtype=dtype, enabled=dtype != torch.float32)

    release_freed_memory()
    built_rss = status_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    with fused_blocks(model), fast_attention(model):  # as Trainer.train() runs the model
        for _ in range(spec["steps"]):
            for start in range(0, len(ids), rows):  # the trainer's forwards, gradients accumulated
                part = ids[start:start + rows]
                with autocast:
                    loss = target_logits_loss_sum(body, head, {"input_ids": part, "use_cache": False}, part) / n_targets
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    step_s = (time.perf_counter() - t0) / spec["steps"]
    return {
        "peak_rss": status_bytes("VmHWM"),
        "runtime_rss": runtime_rss,
        "built_rss": built_rss,
        "step_s": step_s,
        "forward_rows": rows,
        "total_s": time.perf_counter() - baseline_t0,
    }


# ----------------------------------------------------------------------------- parent


def case_spec(case, steps: int) -> dict:
    name, config, dtype, quant, batch, seq, targets, ckpt = case
    return dict(
        name=name, config=config, dtype=dtype, quantization=quant, double_quant=True,
        batch_size=batch, max_length=seq, target_modules=targets, gradient_checkpointing=ckpt,
        lora=LORA, steps=steps,
    )


def estimate_for(spec: dict):
    from tsugiki.plan import estimate

    return estimate(
        spec["config"], method="lora", lora_r=spec["lora"]["r"],
        lora_dropout=spec["lora"]["lora_dropout"], target_modules=spec["target_modules"],
        quantization=spec["quantization"], double_quant=spec["double_quant"], dtype=spec["dtype"],
        batch_size=spec["batch_size"], max_length=spec["max_length"], optimizer="adamw",
        gradient_checkpointing=spec["gradient_checkpointing"], device="cpu",
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--steps", type=int, default=1, help="training steps per case (default 1: LoRA's AdamW states are MBs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    gib = 1024**3
    rows = []
    print(f"{'case':32s} {'B x T':>9s} {'rows/fwd':>8s} {'estimate':>9s} {'measured':>9s} {'error':>7s} {'step s':>7s}")
    for case in cases:
        spec = case_spec(case, args.steps)
        est = estimate_for(spec)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {spec['name']} failed (exit {proc.returncode})")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if got["forward_rows"] != est.forward_rows:
            raise SystemExit(f"case {spec['name']}: the trainer ran {got['forward_rows']} rows a forward, "
                             f"the plan assumed {est.forward_rows}")
        err = (est.total - got["peak_rss"]) / got["peak_rss"] * 100
        rows.append((spec, est, got, err))
        print(
            f"{spec['name']:32s} {spec['batch_size']:>3d} x {spec['max_length']:<4d} {est.forward_rows:>8d} "
            f"{est.total / gib:8.2f}G {got['peak_rss'] / gib:8.2f}G {err:+6.1f}% {got['step_s']:7.1f}",
            flush=True,
        )
    worst = max(abs(r[3]) for r in rows)
    print(f"\nworst error {worst:.1f}% (target: within 25%)")
    print("runtime baseline RSS per case (GiB):", ", ".join(f"{r[2]['runtime_rss'] / gib:.2f}" for r in rows))
    return 0 if worst <= 25 else 1


if __name__ == "__main__":
    raise SystemExit(main())

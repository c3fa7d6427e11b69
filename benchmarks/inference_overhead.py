"""Generation speed of a LoRA adapter, unmerged and merged, against the bare base model.

One process loads the default model (SmolLM2-135M-Instruct, the built-in GGUF)
the way ``tsugiki generate`` / ``tsugiki eval`` do (``load_for_inference``:
base weights in bf16 where the CPU runs bf16 natively, else fp32; flush
denormals on) and builds three models from it:

* ``base``: the bare model;
* ``unmerged``: base + ``get_peft_model(LoraConfig(r=16, lora_alpha=32,
  target_modules="all-linear"))`` (``--targets default``: q_proj and v_proj) with ``lora_B`` set to small random values
  (so the adapter is not a no-op); adapter weights fp32, as tsugiki keeps them
  on a half-precision base;
* ``merged``: a copy of ``unmerged`` after ``merge_and_unload()``.

Each form generates as tsugiki's generation runs it: inside
``tsugiki.kernels.decode.single_row_decoding`` (one-row bf16 products as
matrix-vector ones), as ``PeftModel.generate``, ``tsugiki generate``, ``chat``
and ``eval`` do, so the three forms compute their base products alike. A
fourth form, ``plain base``, is the bare model's own ``generate`` as
transformers runs it (``--no-row-decoding``: every form that way).

Each form answers the same fixed prompts (chat template, left padding) with
greedy decoding and ``min_new_tokens = max_new_tokens``, so every form makes
exactly the same number of new tokens, at batch size 1 (one ``generate`` call
per prompt) and at batch size 8 (one call for all prompts). After one warm-up
round, the forms run interleaved for ``--rounds`` rounds (the order rotates
every round: ABC, BCA, CAB, ...); one measurement is new tokens / wall seconds
of a whole round of that form, and the table shows the median per form with
the min-max spread, and the ratios to ``base`` and to ``plain base``. Greedy texts of the merged
and unmerged forms are compared prompt by prompt (bf16 rounding of the merged
weights can make a few diverge).

Run:  python benchmarks/inference_overhead.py            (~5 min on 2 cores)
      python benchmarks/inference_overhead.py --quick    (a few tokens; < 1 min)
      python benchmarks/inference_overhead.py --profile  (also: torch.profiler op table, bs 1)
      python benchmarks/inference_overhead.py --threads 1  (on a machine other jobs share; see --help)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does in two sentences.",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "List four uses of a paperclip.",
]
FORMS = ("plain base", "base", "unmerged", "merged")


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load": load}


def generate_call(model, row_decoding: bool):
    """The form's ``generate``: inside ``single_row_decoding`` as tsugiki generates, or transformers' own."""
    from tsugiki import PeftModel
    from tsugiki.kernels.decode import single_row_decoding

    if not row_decoding:  # a PeftModel's generate routes by itself: call the model it wraps instead
        return (model.get_base_model() if isinstance(model, PeftModel) else model).generate

    def generate(**kwargs):
        with single_row_decoding(model):
            return model.generate(**kwargs)

    return generate


def build_forms(lora_b_std: float, seed: int, targets: str = "all-linear", row_decoding: bool = True):
    """(form name -> its generate call, tokenizer, template, base dtype); the models are in eval mode."""
    import torch

    from tsugiki import LoraConfig, get_peft_model
    from tsugiki.generation import load_for_inference

    loaded = load_for_inference(None)  # default model, dtype "auto", as `tsugiki generate` loads it
    base = loaded.model.eval()
    dtype = next(base.parameters()).dtype
    torch.manual_seed(seed)
    target_modules = None if targets == "default" else targets  # None: the architecture's default (q/v)
    unmerged = get_peft_model(copy.deepcopy(base),
                              LoraConfig(r=16, lora_alpha=32, target_modules=target_modules, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, lora_b_std)
    unmerged.eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    for m in (base, unmerged, merged):
        m.requires_grad_(False)
    forms = {"plain base": generate_call(base, False)}
    forms.update((name, generate_call(m, row_decoding))
                 for name, m in (("base", base), ("unmerged", unmerged), ("merged", merged)))
    return forms, loaded.tokenizer, loaded.template, dtype


def encode_batches(tok, template, batch_size: int) -> list[dict]:
    prompts = [template.format_prompt(p) for p in PROMPTS]
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return [dict(tok(prompts[i:i + batch_size], return_tensors="pt", padding=True))
                for i in range(0, len(prompts), batch_size)]
    finally:
        tok.padding_side = old


def run_round(generate, tok, batches: list[dict], new_tokens: int) -> tuple[float, int, list[list[int]]]:
    """Generate for every batch; (seconds, new tokens made, new token ids per prompt)."""
    import torch

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id)
    outs: list[list[int]] = []
    made = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        for enc in batches:
            out = generate(**enc, **kw)
            new = out[:, enc["input_ids"].shape[1]:]
            made += new.numel()
            outs.extend(new.tolist())
        seconds = time.perf_counter() - t0
    return seconds, made, outs


def measure(forms: dict, tok, template, batch_size: int, new_tokens: int, rounds: int, log) -> dict:
    batches = encode_batches(tok, template, batch_size)
    texts: dict[str, list[list[int]]] = {}
    for name in FORMS:  # warm-up round; its tokens are the greedy texts compared below
        s, made, outs = run_round(forms[name], tok, batches, new_tokens)
        texts[name] = outs
        assert made == len(PROMPTS) * new_tokens, (name, made)
        log(f"  bs {batch_size} warm-up {name}: {made / s:.1f} tok/s")
    speeds: dict[str, list[float]] = {n: [] for n in FORMS}
    for r in range(rounds):
        order = FORMS[r % len(FORMS):] + FORMS[:r % len(FORMS)]
        for name in order:
            s, made, _ = run_round(forms[name], tok, batches, new_tokens)
            speeds[name].append(made / s)
        log(f"  bs {batch_size} round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {speeds[n][-1]:.1f}" for n in FORMS) + " tok/s")
    med = {n: statistics.median(v) for n, v in speeds.items()}
    match = sum(a == b for a, b in zip(texts["merged"], texts["unmerged"]))
    same_prefix = [next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), len(a))
                   for a, b in zip(texts["merged"], texts["unmerged"])]
    differ_from_base = sum(a != b for a, b in zip(texts["unmerged"], texts["base"]))
    same_as_plain = {n: sum(a == b for a, b in zip(texts[n], texts["plain base"])) for n in FORMS}
    return {"batch_size": batch_size, "speeds": speeds, "median": med, "merged_eq_unmerged": match,
            "same_as_plain": same_as_plain,
            "unmerged_ne_base": differ_from_base, "texts": texts,
            "same_prefix": statistics.mean(same_prefix)}


def profile(forms: dict, tok, template, new_tokens: int, log) -> None:
    """torch.profiler's op table (self CPU time) for one bs-1 generate of base and unmerged."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    batches = encode_batches(tok, template, 1)[:1]
    for name in ("base", "unmerged"):
        run_round(forms[name], tok, batches, new_tokens)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            s, made, _ = run_round(forms[name], tok, batches, new_tokens)
        log(f"\n### profile: {name}, bs 1, {made} new tokens, {s:.2f} s (profiler on)\n")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def table(results: list[dict], info: dict, args, command: str, wall: float, dtype) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['threads']}); "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; "
        f"load average {info['load']}.",
        f"Model: SmolLM2-135M-Instruct (built-in GGUF, `load_for_inference`, base {str(dtype).replace('torch.', '')}); "
        f"LoRA r=16, alpha 32, targets {args.targets}, fp32 adapter weights, lora_B ~ N(0, {args.lora_b_std}).",
        f"Greedy, {len(PROMPTS)} prompts, {args.max_new_tokens} new tokens each (min_new_tokens = max_new_tokens), "
        f"1 warm-up + {args.rounds} interleaved rounds; wall {wall:.0f} s; base, unmerged and merged generate "
        + ("inside `single_row_decoding`, as tsugiki does." if args.row_decoding else "as transformers does."),
        f"Command: `{command}`",
        "",
        "| batch | form | tokens/s (median) | min-max over rounds | vs base | vs plain base | text = plain base "
        "| merged = unmerged text (mean common prefix) | unmerged != base text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        med = res["median"]
        for name in FORMS:
            v = res["speeds"][name]
            ratio, plain = med[name] / med["base"], med[name] / med["plain base"]
            n = len(PROMPTS)
            extra = (f"{res['merged_eq_unmerged']}/{n} ({res['same_prefix']:.1f} tokens)",
                     f"{res['unmerged_ne_base']}/{n}") if name == "unmerged" else ("", "")
            lines.append(f"| {res['batch_size']} | {name} | {med[name]:.1f} | {min(v):.1f}-{max(v):.1f} "
                         f"| {ratio:.3f} ({100 * (ratio - 1):+.1f}%) | {plain:.2f}x | {res['same_as_plain'][name]}/{n} "
                         f"| {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run: 4 new tokens, 2 rounds (< 1 min)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measured rounds after the warm-up (default 5)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--targets", default="all-linear",
                    help="LoRA target_modules: all-linear (default; workflow 2), 'default' (the architecture's "
                         "default, q_proj and v_proj for Llama; workflow 1) or a comma-separated list of names")
    ap.add_argument("--lora-b-std", type=float, default=0.01, help="std of the random lora_B values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default 0: torch's default, one per core). On a shared machine use "
                         "--threads 1: with every core in use, a busy core stalls each multi-threaded op")
    ap.add_argument("--no-row-decoding", dest="row_decoding", action="store_false",
                    help="generate every form as transformers does, without tsugiki's one-row matrix-vector "
                         "products (tsugiki.kernels.decode)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler op tables (bs 1)")
    ap.add_argument("--show-texts", action="store_true", help="print the greedy answers of each form")
    args = ap.parse_args()
    if args.quick:
        args.max_new_tokens, args.rounds = 4, 2
    command = "python benchmarks/inference_overhead.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = machine()["load"]
    t0 = time.perf_counter()
    targets = args.targets if args.targets in ("all-linear", "default") else args.targets.split(",")
    try:
        forms, tok, template, dtype = build_forms(args.lora_b_std, args.seed, targets, args.row_decoding)
    except ValueError as err:  # e.g. a --targets name the model does not have
        raise SystemExit(f"--targets {args.targets}: {err}") from None
    log(f"loaded in {time.perf_counter() - t0:.1f} s (base dtype {dtype})")
    results = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        results.append(measure(forms, tok, template, bs, args.max_new_tokens, args.rounds, log))
    if args.show_texts:
        for i, p in enumerate(PROMPTS):
            log(f"\n[{i}] {p}")
            for name in FORMS:
                log(f"  {name}: {tok.decode(results[0]['texts'][name][i], skip_special_tokens=True)!r}")
    if args.profile:
        profile(forms, tok, template, args.max_new_tokens, log)
    wall = time.perf_counter() - t0
    info = machine()
    info["load"] = f"{load_start} at the start, {info['load']} at the end"
    print(table(results, info, args, command, wall, dtype))


if __name__ == "__main__":
    main()

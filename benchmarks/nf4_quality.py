"""NF4 storage cost and quality: bits per parameter, and perplexity of quantized SmolLM2 vs bf16/fp32.

Part 1, bits per parameter of NF4 storage, with and without double quantization:

* `tsugiki.quant.nf4_bits_per_parameter(double_quant)` on its 4096 x 4096 tensor;
* the real thing: the built-in SmolLM2-135M-Instruct (`tsugiki.models.load_model()`,
  fp32) quantized by `tsugiki.quant.quantize_model`; the bytes of every
  `Linear4bit` (packed weight + absmax + code books, + the nested absmax,
  its code book and offset with double quantization) over the number of weights
  those layers represent. Counted right after quantization and again after one
  eval forward (on a CPU with AVX512-BF16, bitsandbytes repacks the weight
  into its CPU inference layout on the first eval forward).

Part 2, perplexity on `benchmarks/data/heldout.txt` (English prose written for
this benchmark, so no model has seen it) with a sliding window: windows of
``--window`` tokens moved by ``--stride``; each token after the first is
scored exactly once, with at least ``window - stride`` tokens of context
whenever that many precede it. Variants of the same fp32 weights:
fp32, bf16 (`model.to(bfloat16)`), NF4 and FP4 (`quantize_model`, bf16 compute, with
and without double quantization) and LLM.int8 (8-bit). The output head and
embedding are never quantized (tsugiki's rule). Also reported: the share of
positions whose top-1 prediction equals fp32's and the mean KL(fp32 || variant)
per token.

The default model is itself a Q4_1 GGUF dequantized to fp32, so "fp32" here
means those weights exactly, and NF4 re-quantizes them.

Part 3, the weights themselves: for every block linear of that model, how many
distinct values each run of 32 consecutive weights holds (a Q4_1 block has at
most 16), and the relative RMS error NF4 (blocks of 64) makes on it, next to
the error it makes on a Gaussian matrix of the same shape and standard
deviation (NF4's design case).

Run:  python benchmarks/nf4_quality.py             (~3 min on 2 cores)
      python benchmarks/nf4_quality.py --weights-only   (part 3 alone, seconds)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def linear4bit_bits(model) -> tuple[float, int, int]:
    """(bits per weight, bytes, weights) over the model's Linear4bit layers, from the tensors they hold."""
    import bitsandbytes as bnb

    total_bytes, weights = 0, 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        state = m.weight.quant_state
        tensors = [m.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
        total_bytes += sum(t.numel() * t.element_size() for t in tensors)
        weights += m.in_features * m.out_features
    return 8.0 * total_bytes / weights, total_bytes, weights


def int8_bits(model) -> tuple[float, int, int]:
    import bitsandbytes as bnb

    from tsugiki.quant import _int8_scales

    total_bytes, weights = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            cb, scb = _int8_scales(m)
            total_bytes += cb.numel() * cb.element_size() + scb.numel() * scb.element_size()
            weights += m.in_features * m.out_features
    return 8.0 * total_bytes / weights, total_bytes, weights


@torch.no_grad()
def sliding_window_logprobs(model, ids: torch.Tensor, window: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the scored positions [n, vocab] in fp32, their target ids [n]); each target scored once."""
    n = ids.numel()
    out_lp, out_tg = [], []
    prev_end = 1  # token 0 has no context and is never a target
    begin = 0
    while prev_end < n:
        end = min(begin + window, n)
        chunk = ids[begin:end].unsqueeze(0)
        logits = model(input_ids=chunk, use_cache=False).logits[0].float()
        # logits[j] predicts token begin + j + 1; score targets prev_end .. end-1
        first = prev_end - begin - 1
        lp = F.log_softmax(logits[first:end - begin - 1], dim=-1)
        out_lp.append(lp)
        out_tg.append(ids[prev_end:end])
        prev_end = end
        begin += stride
    return torch.cat(out_lp), torch.cat(out_tg)


def nf4_relative_error(weight: torch.Tensor) -> float:
    """``||dequantize(quantize_nf4(W)) - W|| / ||W||``, bitsandbytes' NF4 with blocks of 64."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return float((bnbf.dequantize_4bit(packed, state) - weight).norm() / weight.norm())


def distinct_per_block(weight: torch.Tensor, block: int = 32) -> float:
    """Mean number of distinct values in each run of ``block`` consecutive weights."""
    rows = weight.reshape(-1, block).sort(dim=1).values
    return float(1 + (rows[:, 1:] != rows[:, :-1]).sum(dim=1).float().mean())


def weight_error_table(model) -> None:
    """Part 3: the grid the weights sit on, and NF4's error on them vs on Gaussian weights."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.detach().float()
            gauss = torch.randn(w.shape, generator=g) * w.std()
            rows.append((distinct_per_block(w), distinct_per_block(gauss), nf4_relative_error(w),
                         nf4_relative_error(gauss)))
    cols = list(zip(*rows))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"\n## the weights ({len(rows)} block linears; median [min-max] over them)")
    names = ("distinct values per 32 weights, model", "distinct values per 32 weights, Gaussian",
             "NF4 relative RMS error, model", "NF4 relative RMS error, Gaussian")
    for label, xs in zip(names, cols):
        print(f"{label}: {med(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=os.path.join(HERE, "data", "heldout.txt"))
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--weights-only", action="store_true", help="part 3 only (the weights' grid and NF4 error)")
    ap.add_argument("--variants", nargs="*",
                    default=["fp32", "bf16", "nf4-dq", "nf4", "fp4-dq", "int8"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    # bitsandbytes warns on every LLM.int8 matmul that fp32 inputs are cast to fp16.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    import bitsandbytes
    import transformers

    from tsugiki.models import load_model, load_tokenizer
    from tsugiki.quant import nf4_bits_per_parameter

    print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, {os.cpu_count()} CPUs")

    # ---------------------------------------------------------------- part 1: bits per parameter
    print("\n## bits per parameter")
    for dq in (False, True):
        print(f"nf4_bits_per_parameter(double_quant={dq}) = {nf4_bits_per_parameter(dq):.4f}  (4096 x 4096 tensor)")

    t0 = time.perf_counter()
    base = load_model()  # built-in SmolLM2-135M-Instruct, fp32
    base.eval()
    tok = load_tokenizer()
    print(f"loaded SmolLM2-135M-Instruct fp32 in {time.perf_counter() - t0:.1f} s")
    weight_error_table(base)
    if args.weights_only:
        return 0
    text = open(args.text, encoding="utf-8").read()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    probe = ids[:64].unsqueeze(0)

    variants = {}
    bits_rows = []
    for name in args.variants:
        if name == "fp32":
            model = base
        elif name == "bf16":
            model = copy.deepcopy(base).to(torch.bfloat16)
        elif name == "int8":
            model = load_model(copy.deepcopy(base), quantization="8bit")
        else:
            qtype, dq = name.split("-")[0], name.endswith("-dq")
            model = load_model(copy.deepcopy(base), quantization="4bit", quant_type=qtype, double_quant=dq,
                               compute_dtype=torch.bfloat16)
            bits, nbytes, n = linear4bit_bits(model)
            model.eval()
            model(input_ids=probe, use_cache=False)  # first eval forward: bitsandbytes' CPU repack
            bits_after, nbytes_after, _ = linear4bit_bits(model)
            bits_rows.append((name, n, nbytes, bits, nbytes_after, bits_after))
        model.eval()
        variants[name] = model
        if name == "int8":
            model(input_ids=probe, use_cache=False)
            bits, nbytes, n = int8_bits(model)
            bits_rows.append((name, n, nbytes, bits, nbytes, bits))

    print(f"\nSmolLM2-135M quantized block linears ({len(bits_rows) and bits_rows[0][1]:,} weights):")
    print(f"{'variant':8s} {'bytes':>11s} {'bits/param':>10s}   after first eval forward (CPU layout)")
    for name, n, nbytes, bits, nbytes_after, bits_after in bits_rows:
        print(f"{name:8s} {nbytes:11,d} {bits:10.4f}   {nbytes_after:11,d} {bits_after:8.4f}")

    # ---------------------------------------------------------------- part 2: perplexity
    print(f"\n## perplexity: {os.path.relpath(args.text)}: {len(text.split())} words, {ids.numel()} tokens; "
          f"window {args.window}, stride {args.stride}")
    ref_lp = None
    print(f"{'variant':8s} {'ppl':>9s} {'nll/token':>10s} {'vs fp32':>8s} {'top1=fp32':>10s} {'KL nats':>8s} {'s':>6s}")
    results = {}
    for name, model in variants.items():
        t0 = time.perf_counter()
        lp, tg = sliding_window_logprobs(model, ids, args.window, args.stride)
        nll = -lp.gather(1, tg[:, None]).squeeze(1)
        mean = float(nll.mean())
        if ref_lp is None and name == "fp32":
            ref_lp = lp
        agree = kl = float("nan")
        if ref_lp is not None:
            agree = float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean())
            kl = float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
        results[name] = math.exp(mean)
        rel = (results[name] / results["fp32"] - 1) * 100 if "fp32" in results else float("nan")
        print(f"{name:8s} {math.exp(mean):9.3f} {mean:10.4f} {rel:+7.2f}% {agree * 100:9.2f}% {kl:8.4f} "
              f"{time.perf_counter() - t0:6.1f}", flush=True)
    print(f"scored tokens: {tg.numel()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

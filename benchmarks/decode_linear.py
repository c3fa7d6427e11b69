"""One bf16 row times a weight on a CPU: oneDNN's F.linear against tsugiki's row kernels.

For the weight shapes of SmolLM2-135M (576 x 576, 576 x 1536, 1536 x 576, the
576 x 49152 output layer) and Llama-3.2-1B (2048 x 8192), the median time of
``F.linear(x, W)`` as torch runs it (oneDNN's matrix-matrix kernel) and of each
of ``tsugiki.kernels.decode``'s row kernels (``mv``: ``torch.mv``; ``native``:
``F.linear`` with oneDNN switched off) at 1, 2 and 8 rows (from two rows on
``decode.linear`` is F.linear; ``mv`` takes one row only, and ``native`` is
timed there to show why more rows stay with oneDNN), and the largest error of each against an fp64 product, relative
to the largest output. The last column names the kernel ``decode.linear``
takes on this CPU (``decode.ROW_KERNEL``). Weights are re-used call after
call, so the smaller ones sit in cache: these are the kernels' own costs, not
a model's (``benchmarks/inference_overhead.py`` times whole generations).

``--model`` adds a whole-model check of the same kernels: the default model
(SmolLM2-135M-Instruct) in bf16 decodes, one token at a time with its cache,
the greedy continuations (48 tokens) that the fp32 model gives for the 8
prompts of ``inference_overhead.py``, once with oneDNN's F.linear and once
per row kernel; each decode step's logits are compared with the fp32 model's
at the same position (top-1 agreement, largest logit difference, mean KL).

Run:  python benchmarks/decode_linear.py           (~1 min)
      python benchmarks/decode_linear.py --model   (+ ~2 min)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from attention_cpu import median_ms  # same folder: run as python benchmarks/decode_linear.py
from tsugiki.kernels import decode

SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152), (2048, 8192)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement (median)")
    parser.add_argument("--model", action="store_true",
                        help="also compare each kernel's decode-step logits with the fp32 model's (default model)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    kernels = {name: decode.ROW_KERNELS[name] for name in ("mv", "native")}
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 x and W, no bias; "
          f"decode.linear takes `{decode.ROW_KERNEL}` here")
    print("| in x out | rows | F.linear us | mv us | native us | mv speed-up | native speed-up "
          "| error F.linear | error mv | error native |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n_in, n_out in SHAPES:
            weight = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(torch.bfloat16)
            for rows in (1, 2, 8):
                x = torch.randn(rows, 1, n_in, generator=gen).to(torch.bfloat16)
                exact = x.double() @ weight.double().t()
                fns = {"F.linear": F.linear}
                fns.update((name, lambda a, w, k=k: k(a, w, None)) for name, k in kernels.items()
                           if rows == 1 or name != "mv")  # torch.mv takes one row only
                errors = {name: float((fn(x, weight).double() - exact).abs().max() / exact.abs().max())
                          for name, fn in fns.items()}
                times = {name: 1e3 * median_ms(lambda fn=fn: fn(x, weight), args.repeats) for name, fn in fns.items()}
                cells = [f"{times[n]:.1f}" if n in times else "-" for n in ("F.linear", "mv", "native")]
                cells += [f"**{times['F.linear'] / times[n]:.2f}x**" if n in times else "-" for n in ("mv", "native")]
                cells += [f"{errors[n]:.1e}" if n in errors else "-" for n in ("F.linear", "mv", "native")]
                print(f"| {n_in} x {n_out} | {rows} | " + " | ".join(cells) + " |")
    if args.model:
        model_accuracy()


def _decode_logits(model, ids, prompt_length: int, routed: bool) -> torch.Tensor:
    """Logits of each position from the prompt's last on, decoding one token at a time with the cache."""
    logits = []
    with torch.inference_mode(), decode.single_row_decoding(model, enabled=routed):
        out = model(input_ids=ids[:, :prompt_length], use_cache=True)
        logits.append(out.logits[:, -1].float())
        for t in range(prompt_length, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t:t + 1], cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return torch.cat(logits)


def model_accuracy(new_tokens: int = 48) -> None:
    import copy

    from inference_overhead import PROMPTS
    from tsugiki.generation import load_for_inference

    loaded = load_for_inference(None)
    bf16 = loaded.model.eval()
    if next(bf16.parameters()).dtype is not torch.bfloat16:
        raise SystemExit("--model: this CPU runs the model in fp32 (no bf16 instructions); nothing to compare")
    fp32 = copy.deepcopy(bf16).float()
    kernels = ("F.linear", "mv", "native")
    top1, worst, kl, count = dict.fromkeys(kernels, 0), dict.fromkeys(kernels, 0.0), dict.fromkeys(kernels, 0.0), 0
    chosen = decode.ROW_KERNEL
    try:
        for prompt in PROMPTS:
            enc = loaded.tokenizer([loaded.template.format_prompt(prompt)], return_tensors="pt")
            length = enc["input_ids"].shape[1]
            with torch.inference_mode():
                ids = fp32.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
            ref = _decode_logits(fp32, ids, length, routed=False)
            for name in kernels:
                if name != "F.linear":
                    decode.ROW_KERNEL = name
                got = _decode_logits(bf16, ids, length, routed=name != "F.linear")
                top1[name] += int((got.argmax(-1) == ref.argmax(-1)).sum())
                worst[name] = max(worst[name], float((got - ref).abs().max()))
                kl[name] += float(F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                           reduction="sum"))
            count += ref.shape[0]
    finally:
        decode.ROW_KERNEL = chosen
    print(f"\n# SmolLM2-135M-Instruct, bf16 decode steps against the fp32 model: {len(PROMPTS)} prompts, "
          f"{count} positions (the fp32 model's greedy continuations, {new_tokens} tokens)")
    print("| kernel | top-1 = fp32 | largest logit difference | mean KL(fp32 \\|\\| bf16) |")
    print("|---|---|---|---|")
    for name in kernels:
        print(f"| {name} | {top1[name]}/{count} | {worst[name]:.3f} | {kl[name] / count:.5f} |")


if __name__ == "__main__":
    main()

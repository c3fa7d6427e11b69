"""One bf16 row times a weight on a CPU: F.linear (oneDNN's matrix-matrix kernel) vs torch.mv.

For the weight shapes of SmolLM2-135M (576 x 576, 576 x 1536, 1536 x 576, the
576 x 49152 output layer) and Llama-3.2-1B (2048 x 8192), the median time of
``F.linear(x, W)`` and of ``tsugiki.kernels.decode.linear(x, W)`` (``torch.mv``
for one row) at 1, 2 and 8 rows (the latter falls back to F.linear from two
rows on), and the largest error of each against an fp64 product, relative to
the largest output. Weights are re-used call after call, so the smaller ones
sit in cache: these are the kernels' own costs, not a model's
(``benchmarks/inference_overhead.py`` times whole generations).

Run:  python benchmarks/decode_linear.py   (~30 s)
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
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 x and W, no bias")
    print("| in x out | rows | F.linear us | decode.linear us | speed-up | error F.linear | error decode.linear |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n_in, n_out in SHAPES:
            weight = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(torch.bfloat16)
            for rows in (1, 2, 8):
                x = torch.randn(rows, 1, n_in, generator=gen).to(torch.bfloat16)
                exact = x.double() @ weight.double().t()
                errors = [float((fn(x, weight).double() - exact).abs().max() / exact.abs().max())
                          for fn in (F.linear, decode.linear)]
                plain = 1e3 * median_ms(lambda: F.linear(x, weight), args.repeats)
                fast = 1e3 * median_ms(lambda: decode.linear(x, weight), args.repeats)
                print(f"| {n_in} x {n_out} | {rows} | {plain:.1f} | {fast:.1f} | **{plain / fast:.2f}x** "
                      f"| {errors[0]:.1e} | {errors[1]:.1e} |")


if __name__ == "__main__":
    main()

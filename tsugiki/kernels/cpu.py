"""What the CPU offers, where a fast path's choice depends on it."""

from __future__ import annotations

import torch


def has_amx() -> bool:
    """Whether torch reports AMX tiles on this CPU (Intel Xeon from Sapphire Rapids on).

    torch's probe is private (``torch.cpu._is_amx_tile_supported``); where it is
    missing or fails, the answer is False, the choice made for CPUs without AMX.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a failing probe must not stop an import
        return False

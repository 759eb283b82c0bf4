"""One device choice, made once and passed down."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch understands it."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device=cpu")
    return device


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (auto|bf16|fp16|none) on ``device``; None = full precision."""
    amp = (amp or "none").lower()
    if amp in ("none", "off", "false", "fp32"):
        return None
    if device.type != "cuda":
        if amp == "auto":
            return None
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast when a dtype is set, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

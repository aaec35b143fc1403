"""Devices and dtypes by name: "auto" picks CUDA when present; a device that does not exist here is one clear error."""

from __future__ import annotations

import os

import torch

from .errors import ClipCapError

DEVICE_HELP = 'torch device, e.g. cpu, cuda, cuda:1; "auto" is cuda (cuda:LOCAL_RANK under torchrun) when present'
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A torch.device for `name`; "auto" (or None) is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ClipCapError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:0, mps, or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipCapError(f"device {name!r} is not available here: torch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ClipCapError(f"device {name!r} is not available here: {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ClipCapError(f"device {name!r} is not available here: no Apple MPS backend")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ClipCapError(f"device {name!r} is not supported (use cpu, cuda or mps)")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype for "float32" / "float16" / "bfloat16" (None keeps what was saved)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ClipCapError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]

"""Device and dtype choice.

CUDA, then Apple MPS, then CPU. On CPU training runs in float32: these cores have no bf16 units and
bf16 matrix products measured ~100x slower than fp32 here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bitsandbytes_available() -> bool:
    """Installed, without importing it (the import itself probes CUDA and can take seconds)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(requested: str) -> str:
    """'auto' -> the best device present; an explicit choice is kept (the config checked it)."""
    if requested != "auto":
        return requested
    if cuda_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # MPS autocast in half precision is not reliable for training yet; CPU has no bf16 units.
    return torch.float32

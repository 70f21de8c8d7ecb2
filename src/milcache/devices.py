"""Choosing the torch device (``--device auto|cuda|cpu``) and the compute precision
(``--precision auto|bf16|fp16|fp32``). Importable without torch: the CLI reads the names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milcache.errors import MilcacheError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Where extraction decodes JPEG tiles (extractor/jpeg.py says what each means).
DECODE_CHOICES = ("auto", "cpu", "gpu")
PRECISION_HELP = "auto: bf16 on CUDA, fp32 on the CPU."


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MilcacheError(f"--device {name} was asked for, but no CUDA device is available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MilcacheError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        # Always with its index: a tensor's device is cuda:0, never bare cuda, and the two compare unequal.
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise MilcacheError(f"--device {name}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        device = torch.device("cuda", index)
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced precision to compute in, or None for float32 (what ``auto`` means is said here only)."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str):
    """A ``torch.autocast`` context for ``precision`` on ``device`` (disabled for float32)."""
    import torch

    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

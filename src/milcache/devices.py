"""Choosing the torch device from the user's ``--device auto|cuda|cpu``."""

from __future__ import annotations

import torch

from milcache.errors import MilcacheError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MilcacheError(f"--device {name} was asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MilcacheError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None

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


_HOST_MEMORY_RETAINED = False


def _glibc_malloc(name: str):
    """glibc's malloc tuning function ``name`` (mallopt, malloc_trim), or None where there is none
    (not Linux, musl, or no libc.so.6)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def retain_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel
    (process-wide, once; False where there is no glibc). Returns whether it is now so.

    Why: on the CPU, every training step (and every batch a backbone embeds) allocates its
    activations afresh. glibc maps blocks over its mmap threshold (32 MB at most) anew on each
    allocation and unmaps them on free, and trims the heap's free top, so each step touched fresh
    pages: one page fault per 4 KB. On web_recommendation_1 (50 stacked models of 5,863-d weights,
    bench/quality.py), 80 s of a 132 s CV were the kernel's; a resnet18 embedding batches of 32 at
    224² ran 1.3× faster without them (bench/extract.py --allocator). With every block on the heap
    and no trimming, a step reuses the pages the previous step freed; the memory (the peak of a
    step) stays with the process until it exits."""
    global _HOST_MEMORY_RETAINED
    if _HOST_MEMORY_RETAINED:
        return True
    mallopt = _glibc_malloc("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # malloc.h
    _HOST_MEMORY_RETAINED = bool(
        mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_top_pad, 64 << 20)
    )
    return _HOST_MEMORY_RETAINED


def release_free_host_memory() -> bool:
    """Hand the memory glibc's malloc keeps free back to the kernel now (``malloc_trim``); False
    where there is no glibc. Called just before DataLoader workers fork.

    Why: a forked worker shares its parent's pages copy-on-write, so every page the parent writes
    after the fork is copied first, once. With freed memory retained (see
    ``retain_freed_host_memory``), the parent's next batches write into exactly such pages: the
    activations a previous run in the process left, or a fine-tuning epoch's, whose workers fork
    anew every epoch. Released, those pages come back as fresh zero pages (a fault, no copy), and
    are then retained again."""
    malloc_trim = _glibc_malloc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)  # returns whether anything was released: either is fine
    return True

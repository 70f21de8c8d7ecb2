"""Memory of a training step, counted before any work starts (``--memory-budget``).

A head's memory is *measured*, not guessed: its forward pass runs on three small probe bags while
autograd's saved-tensor hook adds up what the backward pass will keep; a quadratic fit through the
three sizes gives the bytes per instance and, for heads with pairwise instance terms (an N × N
attention that a kernel does not avoid), the bytes per instance pair. That works for every head,
a user's own included. The batch planner then keeps each step within the budget, and a bag that
cannot fit on its own is refused by name before training starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from milcache.errors import OptionError

_PROBES = (64, 128, 256)
_UNITS = {"": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_HEADROOM = 2.0  # for gradients, kernels' temporaries and the allocator's slack (a judgement, not a fit)
_HOST_SHARE, _GPU_SHARE = 0.5, 0.8  # of free host memory / of the GPU's memory, when no budget is given


def parse_size(text: str | int | float, option: str = "--memory-budget") -> int:
    """Bytes of ``8GiB``, ``8G``, ``512MiB``, ``1.5GB`` (a bare number is GiB)."""
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not found:
            raise OptionError(f"{option} expects a size such as 8GiB or 512MiB, got {text!r}")
        value, unit = float(found.group(1)), found.group(2).lower()
    size = int(value * _UNITS[unit])
    if size < 1 << 20:
        raise OptionError(f"{option} must be at least 1 MiB, got {text!r}")
    return size


def default_budget(device: torch.device) -> int:
    """Most of the GPU's memory, or half of the host's free memory."""
    if device.type == "cuda":
        return int(_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    from milcache.aggregator.data import available_host_bytes

    return int(_HOST_SHARE * available_host_bytes())


@dataclass(frozen=True)
class HeadMemory:
    """Training bytes of a bag of n instances: ``per_instance · n + per_pair · n²``."""

    per_instance: float
    per_pair: float

    def bag_bytes(self, n: int | np.ndarray) -> np.ndarray | float:
        n = np.asarray(n, dtype=np.float64)
        return _HEADROOM * (self.per_instance * n + self.per_pair * n * n)

    def tokens_within(self, budget: int, longest: int) -> int:
        """Padded instances a step may hold within ``budget`` when its bags have ``longest`` instances."""
        per_token = _HEADROOM * (self.per_instance + self.per_pair * longest)
        return max(1, int(budget // per_token))


def measure_head(head: torch.nn.Module, in_dim: int, input_bytes: int = 4) -> HeadMemory:
    """Bytes autograd keeps for a forward pass of ``head`` on probe bags, fitted as a + b·n + c·n²,
    plus the input's own bytes per instance."""
    saved = [_saved_bytes(head, in_dim, n) for n in _PROBES]
    a = np.vander(np.asarray(_PROBES, dtype=np.float64), 3)  # columns n², n, 1
    pair, per_instance, _ = np.linalg.solve(a, np.asarray(saved, dtype=np.float64))
    pair = pair if pair * _PROBES[-1] > 0.05 * per_instance else 0.0  # fit noise, not an N² term
    return HeadMemory(max(per_instance, 0.0) + in_dim * (input_bytes + 4), max(pair, 0.0))


def _saved_bytes(head: torch.nn.Module, in_dim: int, n: int) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in head.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = head.training
    head.train()
    device = next(head.parameters()).device  # predict measures a head already on the GPU
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, n, in_dim), generator=generator).to(device)
    mask = torch.ones((1, n), dtype=torch.bool, device=device)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = head(x, mask)  # what autograd keeps, even when called under no_grad
    finally:
        head.train(was_training)
    del output
    return sum(seen.values())


def check_bags_fit(
    memory: HeadMemory,
    budget: int,
    lengths: np.ndarray,
    bag_ids: list[str],
    head: str,
    cap: int | None = None,
    training: bool = True,
) -> None:
    """Refuse, by name, the bags that alone need more than ``budget``: in training (``cap`` instances
    at most) and in prediction (every instance, without the backward pass's tensors)."""
    lengths = np.asarray(lengths)
    needed = memory.bag_bytes(lengths) / _HEADROOM
    if training:
        needed = np.maximum(needed, memory.bag_bytes(lengths if cap is None else np.minimum(lengths, cap)))
    over = np.flatnonzero(needed > budget)
    if len(over):
        worst = over[np.argmax(needed[over])]
        names = ", ".join(f"{bag_ids[i]} ({int(lengths[i])} instances)" for i in over[:5])
        raise OptionError(
            f"{len(over)} bag(s) do not fit in --memory-budget {_size(budget)} with the {head} head: {names}; "
            f"the largest needs about {_size(needed[worst])}. Give a larger --memory-budget, or make those bags "
            "smaller (e.g. prototype bags from `milcache index kmeans`)"
        )


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"

"""Sources of instances behind one small interface, found through one registry.

A source answers two questions: what are the instances of this bag (``plan``: coordinates and
attributes), and what are the pixels of this batch of them (``read``). The extraction loop, the
writer, progress, resume and sharding know nothing else about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from milcache.errors import ExtractionError
from milcache.store.tables import BagSpec

_SOURCES: dict[str, Callable[..., Source]] = {}


@dataclass
class BagPlan:
    """The instances of one bag: coordinates (n × k int), per-instance attributes, and per-bag
    extras (small arrays such as a thumbnail) and meta (JSON) to keep in the store."""

    coords: np.ndarray
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


class Source:
    """Base of every source. Instances are created in the main process and pickled into the data
    loader's workers, so they hold settings only; file handles are opened lazily, per process."""

    kind = "?"
    coord_names: list[str] = []

    def settings(self) -> dict:
        """The source's settings, recorded in store.json (a rerun must use the same)."""
        raise NotImplementedError

    def plan(self, bag: BagSpec) -> BagPlan:
        raise NotImplementedError

    def read(self, bag: BagSpec, plan: BagPlan, indices: np.ndarray) -> np.ndarray:
        """Pixels of the instances ``indices`` of ``plan``: uint8 (b × H × W × C)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (end of a worker)."""

    def backbone_options(self, bags: list[BagSpec]) -> dict:
        """Options the backbone needs for this source's input (e.g. ``in_chans`` for volumes)."""
        return {}

    def embed(self, batch: torch.Tensor, forward: Callable, backbone) -> torch.Tensor:
        """Turn a batch from ``read`` (already on the device) into embeddings with ``forward``.
        Images: uint8 B × H × W × C → resized to the backbone's input, normalised."""
        return forward(normalise_images(batch, backbone))


def normalise_images(pixels: torch.Tensor, backbone) -> torch.Tensor:
    """uint8 B × H × W × C on the device → float B × C × H × W at the backbone's input size and norm."""
    import torch.nn.functional as F

    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    if tuple(x.shape[-2:]) != tuple(backbone.input_size):
        mode = "bicubic" if backbone.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=backbone.input_size, mode=mode, antialias=True, align_corners=False)
    mean = torch.tensor(backbone.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(backbone.std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def register_source(kind: str) -> Callable:
    def add(cls):
        cls.kind = kind
        _SOURCES[kind] = cls
        return cls

    return add


def list_sources() -> list[str]:
    return sorted(_SOURCES)


def create_source(kind: str, **settings) -> Source:
    """Build a source; settings left as None keep the source's defaults."""
    import inspect

    from milcache.extractor import cam, tiles, volume  # noqa: F401  (registers the built-in sources)

    if kind not in _SOURCES:
        raise ExtractionError(f"unknown source {kind!r}; choose one of: {', '.join(list_sources())}")
    cls = _SOURCES[kind]
    given = {k: v for k, v in settings.items() if v is not None}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    foreign = sorted(set(given) - accepted)
    if foreign:
        names = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ExtractionError(f"{names} do(es) not apply to --source {kind}")
    return cls(**given)

"""Sources of instances behind one small interface, found through one registry.

A source answers two questions: what are the instances of this bag (``plan``: coordinates and
attributes), and what are the pixels of this batch of them (``read``). The extraction loop, the
writer, progress, resume and sharding know nothing else about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

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
    from milcache.extractor import tiles  # noqa: F401  (registers the built-in sources)

    if kind not in _SOURCES:
        raise ExtractionError(f"unknown source {kind!r}; choose one of: {', '.join(list_sources())}")
    return _SOURCES[kind](**{k: v for k, v in settings.items() if v is not None})

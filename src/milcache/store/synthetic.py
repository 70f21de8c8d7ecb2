"""A synthetic MIL cohort written straight into a store: for trying stage 2, tests and benchmarks.

A bag is positive when it holds at least one *key* instance; key instances are ordinary Gaussian
embeddings shifted along one fixed direction, so a head must find them among the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from milcache.errors import OptionError
from milcache.store.lmdb_store import StoreWriter
from milcache.store.metadata import StoreMetadata


def make_synthetic_store(
    out: str | Path,
    bags: int = 200,
    instances: tuple[int, int] = (20, 100),
    dim: int = 64,
    positive_fraction: float = 0.5,
    signal: float = 1.5,
    groups: int | None = None,
    seed: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
) -> pl.DataFrame:
    """Write the cohort and return its labels (``bag_id``, ``label``, ``group``).

    Each instance carries the attribute ``key`` (1 for key instances), so a test can check where
    a head's attention goes. Coordinates are a (row, column) position on a square grid.
    """
    low, high = instances
    if not 1 <= low <= high:
        raise OptionError(f"--instances takes MIN MAX with 1 <= MIN <= MAX, got {low} {high}")
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    metadata = StoreMetadata(
        backbone="synthetic",
        dim=dim,
        dtype=dtype,
        coords=["x", "y"],
        source={"kind": "synthetic", "signal": signal, "seed": seed},
    )
    rows = []
    with StoreWriter(out, metadata, overwrite=overwrite) as writer:
        for i in range(bags):
            n = int(rng.integers(instances[0], instances[1] + 1))
            label = int(rng.random() < positive_fraction)
            x = rng.standard_normal((n, dim)).astype(np.float32)
            key = np.zeros(n, np.uint8)
            if label:
                chosen = rng.choice(n, size=int(rng.integers(1, max(2, n // 10) + 1)), replace=False)
                key[chosen] = 1
                x[chosen] += signal * np.sqrt(dim) * direction * 0.5
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int32)
            bag_id = f"bag-{i:05d}"
            group = f"patient-{i % groups:04d}" if groups else bag_id
            writer.put(bag_id, x, coords, {"key": key}, meta={"label": label})
            rows.append((bag_id, label, group))
    return pl.DataFrame(rows, schema=["bag_id", "label", "group"], orient="row")

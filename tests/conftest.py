"""Shared builders: tiny stores, manifests and images that the tests make themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milcache.extractor.pyramids import tissue_image, write_pyramid_tiff  # noqa: F401  (re-exported for tests)
from milcache.store import StoreMetadata, StoreWriter


def make_meta(dim: int = 16, dtype: str = "float16", backbone: str = "test-net", **kw) -> StoreMetadata:
    return StoreMetadata(backbone=backbone, dim=dim, dtype=dtype, coords=["x", "y"], **kw)


def random_bags(n_bags: int, dim: int = 16, seed: int = 0, sizes: tuple[int, int] = (1, 60)) -> dict:
    """bag id → (embeddings float32, coords int32, attrs) with bags of different sizes."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_bags):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        out[f"bag-{i:04d}"] = (
            rng.standard_normal((n, dim)).astype(np.float32),
            rng.integers(0, 100_000, size=(n, 2)).astype(np.int32),
            {"tissue": rng.random(n).astype(np.float32), "kind": rng.integers(0, 2, n).astype(np.uint8)},
        )
    return out


def write_store(path: Path, bags: dict, meta: StoreMetadata | None = None, shard: int = 0) -> Path:
    with StoreWriter(path, meta or make_meta(dim=next(iter(bags.values()))[0].shape[1]), shard=shard) as w:
        for bag_id, (emb, coords, attrs) in bags.items():
            w.put(bag_id, emb, coords, attrs)
    return path


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, dict]:
    bags = random_bags(12)
    return write_store(tmp_path / "store", bags), bags

"""What `store info` and `store verify` report."""

from __future__ import annotations

import numpy as np

from milcache.errors import StoreError
from milcache.store.lmdb_store import FeatureStore, shard_paths
from milcache.store.record import CorruptRecord, checksum_ok, decode


def summarize(store: FeatureStore) -> dict:
    """Counts, dims and sizes of a store, plus its metadata (the keys of `store info --json`)."""
    sizes = store.sizes()
    counts = np.fromiter(sizes.values(), dtype=np.int64, count=len(sizes))
    meta = store.metadata
    return {
        "path": str(store.path),
        "backbone": meta.backbone,
        "dim": meta.dim,
        "dtype": meta.dtype,
        "bags": len(sizes),
        "instances": int(counts.sum()),
        "instances_per_bag": {
            "min": int(counts.min()) if counts.size else 0,
            "median": float(np.median(counts)) if counts.size else 0.0,
            "max": int(counts.max()) if counts.size else 0,
        },
        "coords": meta.coords,
        "shards": len(shard_paths(store.path)),
        "disk_bytes": store.disk_bytes(),
        "failures": store.failures(),
        "metadata": {
            "weights_digest": meta.weights_digest,
            "preprocessing": meta.preprocessing,
            "source": meta.source,
            "versions": meta.versions,
            "created": meta.created,
            "schema_version": meta.schema_version,
        },
    }


def verify_bag(store: FeatureStore, bag_id: str) -> str | None:
    """Why a bag's record is bad (checksum, shape, non-finite values), or None when it is sound."""
    if not _valid_utf8(bag_id):
        return "its key is not valid UTF-8: the key was damaged after it was written"
    try:
        raw = store.raw(bag_id)
        if raw is None:
            return "its record is missing from the shard"
        if not checksum_ok(raw):
            return "checksum mismatch: the record's bytes changed after it was written"
        bag = decode(bag_id, raw, check=False)
    except (CorruptRecord, StoreError) as exc:
        return str(exc)
    n, dim = len(bag), store.metadata.dim
    if bag.embeddings.shape != (n, dim) or n == 0:
        return f"embeddings have shape {bag.embeddings.shape}, expected (n > 0, {dim})"
    if bag.embeddings.dtype != np.dtype(store.metadata.dtype):
        return f"embeddings are {bag.embeddings.dtype}, the store says {store.metadata.dtype}"
    if bag.coords.shape != (n, len(store.metadata.coords)):
        return f"coords have shape {bag.coords.shape}, expected ({n}, {len(store.metadata.coords)})"
    for name, values in bag.attrs.items():
        if values.shape != (n,):
            return f"attribute {name!r} has shape {values.shape}, expected ({n},)"
    if not np.isfinite(bag.embeddings).all():
        return "embeddings contain NaN or Inf"
    return None


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def verify(store: FeatureStore, progress: bool = False) -> dict[str, str]:
    """Check every record; returns bag id → problem for the bad ones (empty when all are sound)."""
    from tqdm import tqdm

    problems = {}
    for bag_id in tqdm(store.bag_ids(), desc="verify", unit="bag", disable=not progress):
        problem = verify_bag(store, bag_id)
        if problem:
            problems[bag_id] = problem
    return problems

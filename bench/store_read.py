"""Whole-bag read throughput: the milcache LMDB store against one HDF5 file per bag (CLAM/TRIDENT).

Both hold the same bags (float16 features + int32 coords). Each pass reads every bag's features and
coords into memory (a copy, as a trainer needs them) in key order. Page-cache state is the same for
both: each is read once to warm up, then timed; with --cold (root only) the cache is dropped first.

    python bench/store_read.py --bags 2000 --instances 2000 --dim 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from milcache.store import FeatureStore, StoreMetadata, StoreWriter


def build(root: Path, bags: int, instances: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((instances, dim)).astype(np.float16)
    coords = rng.integers(0, 100_000, (instances, 2)).astype(np.int32)
    (root / "h5").mkdir()
    meta = StoreMetadata(backbone="bench", dim=dim, coords=["x", "y"])
    with StoreWriter(root / "store", meta) as writer:
        for i in range(bags):
            emb = np.roll(block, i, axis=0)  # distinct content, no RNG cost per bag
            writer.put(f"slide-{i:05d}", emb, coords)
            with h5py.File(root / "h5" / f"slide-{i:05d}.h5", "w") as f:
                f.create_dataset("features", data=emb)
                f.create_dataset("coords", data=coords)


def read_store(root: Path) -> int:
    total = 0
    with FeatureStore(root / "store") as store:
        for bag_id in store.bag_ids():
            bag = store.get(bag_id, copy=True)
            features, coords = bag.embeddings, bag.coords
            total += features.nbytes + coords.nbytes
    return total


def read_h5(root: Path) -> int:
    total = 0
    for path in sorted((root / "h5").iterdir()):
        with h5py.File(path, "r") as f:
            features, coords = f["features"][()], f["coords"][()]
            total += features.nbytes + coords.nbytes
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn, root: Path, cold: bool) -> tuple[float, int]:
    if cold:
        drop_caches()
    else:
        fn(root)  # warm-up
    start = time.perf_counter()
    nbytes = fn(root)
    return time.perf_counter() - start, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=300)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dir", type=Path, help="Work folder (default: a temporary one)")
    parser.add_argument("--cold", action="store_true", help="Drop the page cache before each timed pass")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        start = time.perf_counter()
        build(root, args.bags, args.instances, args.dim)
        print(f"built {args.bags} bags × {args.instances} × {args.dim} float16 in {time.perf_counter() - start:.1f}s")
        cold = args.cold and drop_caches()
        if args.cold and not cold:
            print("cannot drop the page cache (not root?): timing warm reads")
        results = {}
        for name, fn in (("hdf5 per bag", read_h5), ("milcache lmdb", read_store)):
            seconds, nbytes = timed(fn, root, cold)
            results[name] = seconds
            print(f"{name:>14}: {seconds:6.2f}s  {nbytes / seconds / 1e9:6.2f} GB/s  {args.bags / seconds:8.1f} bags/s")
        print(
            f"ratio (hdf5 time / milcache time): {results['hdf5 per bag'] / results['milcache lmdb']:.2f}x"
            f" ({'cold' if cold else 'warm'} page cache)"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

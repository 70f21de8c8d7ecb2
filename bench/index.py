"""faiss index: build and query throughput and recall@10, flat (exact) vs IVF-PQ, on one store.

    python bench/index.py [--instances 200000] [--dim 384] [--queries 200]

The store holds clustered synthetic embeddings (tissue-type-like clusters plus noise). Ratios are
IVF-PQ against flat measured in the same run; recall is IVF-PQ's top 10 against the exact top 10.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from milcache.store import StoreWriter
from milcache.store.instance_index import InstanceIndex, build_index
from milcache.store.metadata import StoreMetadata


def make_store(path: Path, instances: int, dim: int, per_bag: int = 2000, centres: int = 200) -> None:
    rng = np.random.default_rng(0)
    means = rng.standard_normal((centres, dim)).astype(np.float32) * 3
    with StoreWriter(path, StoreMetadata(backbone="bench", dim=dim, coords=["x", "y"])) as writer:
        for b in range(instances // per_bag):
            emb = means[rng.integers(0, centres, per_bag)] + rng.standard_normal((per_bag, dim)).astype(np.float32)
            writer.put(f"bag-{b:05d}", emb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, args.instances, args.dim)
        rng = np.random.default_rng(1)
        queries = None
        results, truth = {}, None
        for kind in ("flat", "ivf-pq"):
            info = build_index(store, kind=kind)
            with InstanceIndex(store) as index:
                if queries is None:
                    rows = rng.choice(info.instances, args.queries, replace=False)
                    queries = [
                        index.vector(index.bag_ids[index.bag_of_row[r]], int(index.instance_of_row[r])) for r in rows
                    ]
                start = time.perf_counter()
                found = [set(index.search(q, 10)[0].tolist()) for q in queries]
                seconds = time.perf_counter() - start
                size = (store / "index" / "instances.faiss").stat().st_size
            truth = truth or found
            recall = np.mean([len(t & f) / 10 for t, f in zip(truth, found, strict=True)])
            results[kind] = (info.seconds, args.queries / seconds, size, recall)
            print(
                f"{kind:7s} build {info.seconds:6.1f}s ({info.instances / info.seconds:9.0f} instances/s)  "
                f"query {args.queries / seconds:8.1f}/s  index {size / 2**20:7.1f} MiB  recall@10 {recall:.3f}"
            )
        flat, ivf = results["flat"], results["ivf-pq"]
        print(
            f"ivf-pq vs flat: queries {ivf[1] / flat[1]:.2f}x faster, index {flat[2] / ivf[2]:.1f}x smaller, "
            f"build {flat[0] / ivf[0]:.2f}x the speed, recall@10 {ivf[3]:.3f}"
        )


if __name__ == "__main__":
    main()

"""A faiss index over every instance embedding of a store: similar-instance search and k-means
prototype bags.

The index lives beside the store (``STORE/index/``): ``instances.faiss``, ``rows.npz`` (row →
bag, instance) and ``index.json`` (kind, metric, and the fingerprint of the store it was built
from, so that an index older than the store is detected and named). Exact search (``flat``) for
stores up to a few million instances; ``ivf-pq`` (trained on a sample, codes of a few bytes per
instance) for stores of hundreds of millions, whose candidates are re-ranked with the exact
embeddings read back from the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from milcache import checks
from milcache.errors import OptionError, StoreError
from milcache.store.lmdb_store import FeatureStore, StoreWriter
from milcache.store.metadata import StoreMetadata

INDEX_DIR = "index"
KINDS = ("flat", "ivf-pq")
METRICS = ("cosine", "l2")
_RERANK = 20  # ivf-pq: candidates per wanted neighbour, re-ranked exactly
_TRAIN_PER_LIST = 64  # ivf-pq: training sample per inverted list


@dataclass
class IndexInfo:
    path: Path
    kind: str
    metric: str
    instances: int
    bags: int
    seconds: float


def fingerprint(store: FeatureStore, bag_ids: list[str]) -> str:
    """Changes whenever a bag of ``bag_ids`` is added, removed or rewritten with another size."""
    sizes = store.sizes()
    digest = hashlib.sha256(store.metadata.created.encode())
    for bag_id in bag_ids:
        digest.update(f"{bag_id}\0{sizes[bag_id]}\0".encode())
    return digest.hexdigest()[:32]


def _rows(sizes: dict, bag_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The row map of an index over ``bag_ids``: each row's bag (position in bag_ids) and instance."""
    counts = [sizes[b] for b in bag_ids]
    bag_of_row = np.repeat(np.arange(len(bag_ids), dtype=np.int32), counts)
    instance_of_row = np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if bag_ids else np.empty(0)
    return bag_of_row, instance_of_row.astype(np.int32)


def _chunks(store: FeatureStore, bag_ids: list[str], metric: str, rows: int = 1 << 18):
    """The bags' embeddings as float32 chunks of about ``rows`` rows (normalised for cosine), in order:
    an index is filled without ever holding the whole store in memory."""
    import faiss

    parts, held = [], 0
    for bag_id in bag_ids:
        parts.append(store.get(bag_id).embeddings)
        held += len(parts[-1])
        if held >= rows:
            yield _normalised(np.concatenate(parts).astype(np.float32), metric, faiss)
            parts, held = [], 0
    if parts:
        yield _normalised(np.concatenate(parts).astype(np.float32), metric, faiss)


def _normalised(x: np.ndarray, metric: str, faiss) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if metric == "cosine":
        faiss.normalize_L2(x)
    return x


def _training_sample(store: FeatureStore, bag_ids: list[str], metric: str, wanted: int, seed: int) -> np.ndarray:
    """About ``wanted`` rows drawn uniformly from the bags, read one bag at a time."""
    sizes = store.sizes()
    total = sum(sizes[b] for b in bag_ids)
    rng = np.random.default_rng(seed)
    rate = min(1.0, wanted / max(total, 1))
    picked = []
    for chunk in _chunks(store, bag_ids, metric):
        picked.append(chunk[rng.random(len(chunk)) < rate])
    return np.ascontiguousarray(np.concatenate(picked))


def gpu_faiss(gpu: bool) -> bool:
    """Whether to use faiss's GPU code (--gpu), refusing clearly when this faiss or machine has none."""
    if not gpu:
        return False
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        raise OptionError(
            "--gpu needs faiss built with CUDA: pip install 'milcache[gpu]' (faiss-gpu, in place of faiss-cpu)"
        )
    if faiss.get_num_gpus() == 0:
        raise OptionError("--gpu: faiss sees no CUDA device on this machine")
    return True


def _ivf_pq(store: FeatureStore, bag_ids: list[str], metric: str, seed: int, gpu: bool = False):
    """IVF with ~4·√N lists and product-quantised codes (4 dims a byte), trained on a sample read
    from the store (never the whole store in memory); with ``gpu`` the coarse quantizer's k-means
    (most of the training time) runs on the GPUs, and the index itself stays a CPU index."""
    import faiss

    sizes = store.sizes()
    n, dim = sum(sizes[b] for b in bag_ids), store.metadata.dim
    lists = int(min(max(4 * math.sqrt(n), 1), n // 39 or 1))
    m = next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index = faiss.index_factory(dim, f"IVF{lists},PQ{m}", faiss_metric)
    if gpu:
        faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
    index.train(_training_sample(store, bag_ids, metric, max(_TRAIN_PER_LIST * lists, 256 * 39), seed))
    index.nprobe = max(1, lists // 8)
    return index


def build_index(
    store_dir: str | Path,
    kind: str = "flat",
    metric: str = "cosine",
    bags: list[str] | None = None,
    seed: int = 0,
    gpu: bool = False,
) -> IndexInfo:
    """Index every instance of the store (or of ``bags``) and save it beside the store."""
    import time

    import faiss

    checks.one_of("--kind", kind, KINDS)
    checks.one_of("--metric", metric, METRICS)
    gpu = gpu_faiss(gpu)
    start = time.perf_counter()
    store_dir = Path(store_dir)
    folder = checks.output_dir(store_dir / INDEX_DIR)
    with FeatureStore(store_dir) as store:
        bag_ids = store.select(bags, "to index")
        sizes = store.sizes()
        total = sum(sizes[b] for b in bag_ids)
        if kind == "flat":
            index = (
                faiss.IndexFlatIP(store.metadata.dim) if metric == "cosine" else faiss.IndexFlatL2(store.metadata.dim)
            )
        elif total < 256 * 39:
            raise OptionError(
                f"--kind ivf-pq needs at least {256 * 39} instances to train its codes; {store_dir} has "
                f"{total}: use --kind flat (exact, and fast at this size)"
            )
        else:
            index = _ivf_pq(store, bag_ids, metric, seed, gpu)
        for chunk in _chunks(store, bag_ids, metric):  # one pass, a chunk at a time
            index.add(chunk)
        bag_of_row, instance_of_row = _rows(sizes, bag_ids)
        stamp = fingerprint(store, bag_ids)
    folder.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(folder / "instances.faiss"))
    np.savez(folder / "rows.npz", bag_ids=np.asarray(bag_ids), bag=bag_of_row, instance=instance_of_row)
    info = {
        "kind": kind,
        "metric": metric,
        "instances": total,
        "bags": len(bag_ids),
        "store": stamp,
        "all_bags": bags is None,
    }
    (folder / "index.json").write_text(json.dumps(info, indent=2))
    return IndexInfo(folder, kind, metric, total, len(bag_ids), time.perf_counter() - start)


class InstanceIndex:
    """A saved index, checked against the store it was built from."""

    def __init__(self, store_dir: str | Path) -> None:
        import faiss

        self.store_dir = Path(store_dir)
        folder = self.store_dir / INDEX_DIR
        if not (folder / "index.json").is_file():
            raise StoreError(f"{self.store_dir} has no index: build one with `milcache index build {self.store_dir}`")
        self.info = json.loads((folder / "index.json").read_text())
        rows = np.load(folder / "rows.npz")
        self.bag_ids = [str(b) for b in rows["bag_ids"]]
        self.bag_of_row, self.instance_of_row = rows["bag"], rows["instance"]
        self.store = FeatureStore(self.store_dir)
        covered = self.store.bag_ids() if self.info["all_bags"] else self.bag_ids
        if not all(b in self.store for b in self.bag_ids) or fingerprint(self.store, covered) != self.info["store"]:
            raise StoreError(
                f"the index in {folder} is older than the store {self.store_dir} (bags were added, removed or "
                f"rewritten since it was built): rebuild it with `milcache index build {self.store_dir}`"
            )
        self.index = faiss.read_index(str(folder / "instances.faiss"))
        self._row_of = {b: i for i, b in enumerate(self.bag_ids)}
        self._first_row = np.searchsorted(self.bag_of_row, np.arange(len(self.bag_ids)))

    def __enter__(self) -> InstanceIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def vector(self, bag_id: str, instance: int) -> np.ndarray:
        if bag_id not in self._row_of:
            raise StoreError(f"bag {bag_id!r} is not in the index of {self.store_dir}")
        bag = self.store.get(bag_id)
        if not 0 <= instance < len(bag):
            raise OptionError(f"--instance {instance}: bag {bag_id!r} has instances 0..{len(bag) - 1}")
        if bag.embeddings.shape[1] != self.index.d:
            raise StoreError(f"the index holds {self.index.d}-d vectors, the store {bag.embeddings.shape[1]}-d")
        return bag.embeddings[instance].astype(np.float32)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and distances (1 − cosine similarity, or squared L2) of the k nearest instances."""
        import faiss

        checks.at_least("-k", k, 1)
        if k > self.index.ntotal:
            raise OptionError(f"-k {k} is more than the {self.index.ntotal} instances the index holds")
        if query.shape[-1] != self.index.d:
            raise StoreError(f"a {query.shape[-1]}-d query against an index of {self.index.d}-d vectors")
        q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        cosine = self.info["metric"] == "cosine"
        if cosine:
            faiss.normalize_L2(q)
        wanted = k if self.info["kind"] == "flat" else min(self.index.ntotal, k * _RERANK)
        scores, rows = self.index.search(q, wanted)
        rows = rows[0][rows[0] >= 0]
        if self.info["kind"] != "flat":  # approximate candidates → exact distances from the store
            exact = self._exact(rows)
            if cosine:
                faiss.normalize_L2(exact)
                distance = 1 - exact @ q[0]
            else:
                distance = ((exact - q[0]) ** 2).sum(1)
            order = np.argsort(distance, kind="stable")[:k]
            return rows[order], distance[order]
        return rows, (1 - scores[0][: len(rows)]) if cosine else scores[0][: len(rows)]

    def _exact(self, rows: np.ndarray) -> np.ndarray:
        """The stored embeddings of index rows, reading (and checking) each bag once."""
        out = np.empty((len(rows), self.index.d), np.float32)
        bags = self.bag_of_row[rows]
        for bag in np.unique(bags):
            here = np.flatnonzero(bags == bag)
            out[here] = self.store.get(self.bag_ids[bag]).embeddings[self.instance_of_row[rows[here]]]
        return out

    def neighbours(self, bag_id: str, instance: int, k: int) -> pl.DataFrame:
        """The k nearest instances of one instance across the cohort, with bag, coordinates, distance."""
        return self.nearest(self.vector(bag_id, instance), k)

    def nearest(self, query: np.ndarray, k: int) -> pl.DataFrame:
        """The k nearest instances of a query embedding: rank, bag, instance, coordinates, distance."""
        rows, distance = self.search(query, k)
        names = self.store.metadata.coords
        bags = self.bag_of_row[rows]
        coords = np.empty((len(rows), len(names)), np.int64)
        for bag in np.unique(bags):  # each bag read once
            here = np.flatnonzero(bags == bag)
            coords[here] = self.store.get(self.bag_ids[bag]).coords[self.instance_of_row[rows[here]]]
        return pl.DataFrame(
            {
                "rank": np.arange(len(rows)),
                "bag_id": [self.bag_ids[b] for b in bags],
                "instance": self.instance_of_row[rows].astype(np.int64),
                **{name: coords[:, c] for c, name in enumerate(names)},
                "distance": np.asarray(distance, np.float64),
            }
        )


def prototype_store(
    store_dir: str | Path, k: int, out: str | Path, seed: int = 0, niter: int = 20, gpu: bool = False
) -> dict:
    """faiss k-means over every instance; each bag becomes its per-cluster means (≤ k instances) in a
    new store, with the cluster id and the member count of each prototype as attributes."""
    import faiss

    checks.at_least("--k", k, 2)
    gpu = gpu_faiss(gpu)
    out = checks.output_dir(out)
    with FeatureStore(store_dir) as store:
        bag_ids = store.bag_ids()
        total = sum(store.sizes().values())
        if k > total:
            raise OptionError(f"--k {k} is more than the {total} instances of {store_dir}")
        # trained on a sample (faiss itself samples 256 points a centroid), then each bag assigned
        # as it is read: the store is never held in memory whole
        kmeans = faiss.Kmeans(store.metadata.dim, k, niter=niter, seed=seed, verbose=False, gpu=gpu)
        kmeans.train(_training_sample(store, bag_ids, "l2", 256 * k, seed))
        source = {"kind": "prototypes", "k": k, "from": str(Path(store_dir).resolve()), "source": store.metadata.source}
        spec = dataclasses.replace(store.metadata.embedding, source=source)  # the same embedding space
        meta = StoreMetadata.for_embedding(spec, dtype=store.metadata.dtype, coords=["cluster"])
        assignments = []
        with StoreWriter(out, meta) as writer:
            for bag_id in bag_ids:
                x = np.ascontiguousarray(store.get(bag_id).embeddings, np.float32)
                assignment = kmeans.index.search(x, 1)[1][:, 0]
                assignments.append(assignment.astype(np.int32))
                clusters, members = np.unique(assignment, return_inverse=True)
                sums = np.zeros((len(clusters), x.shape[1]), np.float64)
                np.add.at(sums, members, x)
                counts = np.bincount(members, minlength=len(clusters))
                writer.put(
                    bag_id,
                    (sums / counts[:, None]).astype(np.float32),
                    clusters[:, None].astype(np.int32),
                    {"cluster": clusters.astype(np.int32), "count": counts.astype(np.int32)},
                    meta={"instances": int(counts.sum())},
                )
        np.save(out / "instance_clusters.npy", np.concatenate(assignments) if assignments else np.empty(0, np.int32))
    return {"bags": len(bag_ids), "instances": total, "k": k, "out": str(out)}


DUPLICATES = "duplicates.parquet"


@dataclass
class DedupReport:
    path: Path
    instances: int
    duplicates: int  # instances marked as near-duplicates of an earlier, kept instance of their bag
    bags_with_duplicates: int
    cross_bag_pairs: int | None  # with across_bags: pairs of near-identical instances in different bags
    cross_bag_path: Path | None


def find_duplicates(
    store_dir: str | Path, threshold: float = 0.95, metric: str = "cosine", across_bags: bool = False
) -> DedupReport:
    """Mark near-duplicate instances of each bag (overlapping tiles, one region in two views):
    instance j is a duplicate when it lies within ``threshold`` (cosine similarity ≥ T, or squared
    L2 distance ≤ T) of an earlier instance of its bag that is kept. Written to
    STORE/index/duplicates.parquet (bag_id, instance, kept_instance, distance), which
    ``train-head --skip-duplicates`` reads. With ``across_bags``, pairs of near-identical instances
    in *different* bags (a slide scanned twice, a patient in two bags: a leakage risk between folds)
    are listed in cross_bag_duplicates.parquet, using the built index."""
    checks.one_of("--metric", metric, METRICS)
    if metric == "cosine":
        checks.within("--threshold", threshold, -1.0, 1.0)
    else:
        checks.at_least("--threshold", threshold, 0.0)
    store_dir = Path(store_dir)
    folder = checks.output_dir(store_dir / INDEX_DIR)
    if across_bags:  # a missing, stale or other-metric index is named before anything is written
        with InstanceIndex(store_dir) as found:
            _same_metric(found, metric, store_dir)
    records, total = [], 0
    with FeatureStore(store_dir) as store:
        bag_ids = store.bag_ids()
        for bag_id in bag_ids:
            x = np.ascontiguousarray(store.get(bag_id).embeddings, np.float32)
            total += len(x)
            for instance, kept, distance in _duplicates_in(x, threshold, metric):
                records.append((bag_id, instance, kept, distance))
        stamp = fingerprint(store, bag_ids)
    schema = {"bag_id": pl.Utf8, "instance": pl.Int32, "kept_instance": pl.Int32, "distance": pl.Float32}
    table = pl.DataFrame(records, schema=schema, orient="row")
    folder.mkdir(parents=True, exist_ok=True)
    table.write_parquet(folder / DUPLICATES)
    settings = {"threshold": threshold, "metric": metric, "store": stamp}
    (folder / "duplicates.json").write_text(json.dumps(settings, indent=2))
    cross, cross_path = None, None
    if across_bags:
        pairs = _cross_bag_pairs(store_dir, threshold, metric)
        cross_path = folder / "cross_bag_duplicates.parquet"
        pairs.write_parquet(cross_path)
        cross = pairs.height
    return DedupReport(
        folder / DUPLICATES, total, table.height, table["bag_id"].n_unique() if table.height else 0, cross, cross_path
    )


def _duplicates_in(x: np.ndarray, threshold: float, metric: str) -> list[tuple[int, int, float]]:
    """(instance, kept instance, distance) for each near-duplicate of one bag, greedily in order:
    an instance is dropped only for an earlier instance that is itself kept, so a chain of
    overlapping tiles keeps every other tile instead of collapsing into one."""
    import faiss

    if len(x) < 2:
        return []
    if metric == "cosine":
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    # range_search keeps IP > radius and L2 < radius; nudge so that the threshold itself counts
    radius = np.nextafter(np.float32(threshold), np.float32(-np.inf if metric == "cosine" else np.inf))
    limits, values, neighbours = index.range_search(x, float(radius))
    owner = np.repeat(np.arange(len(x)), np.diff(limits).astype(np.int64))
    earlier = neighbours < owner  # each pair once, from the later instance
    owner, neighbours, values = owner[earlier], neighbours[earlier], values[earlier]
    if not len(owner):
        return []
    order = np.lexsort((neighbours, owner))
    dropped: dict[int, tuple[int, float]] = {}
    for i, j, v in zip(owner[order], neighbours[order], values[order], strict=True):  # the few candidate pairs
        if i not in dropped and j not in dropped:
            dropped[int(i)] = (int(j), float(1 - v if metric == "cosine" else v))
    return [(i, j, d) for i, (j, d) in sorted(dropped.items())]


def _same_metric(found: InstanceIndex, metric: str, store_dir: Path) -> None:
    if found.info["metric"] != metric:
        raise OptionError(
            f"the index of {store_dir} uses --metric {found.info['metric']}; rebuild it with --metric {metric} "
            "or give that metric here"
        )


def _cross_bag_pairs(store_dir: Path, threshold: float, metric: str) -> pl.DataFrame:
    import faiss

    with InstanceIndex(store_dir) as found:
        _same_metric(found, metric, store_dir)
        x = found._exact(np.arange(found.index.ntotal))
        if metric == "cosine":
            faiss.normalize_L2(x)
        radius = np.nextafter(np.float32(threshold), np.float32(-np.inf if metric == "cosine" else np.inf))
        limits, values, rows = found.index.range_search(x, float(radius))
        owner = np.repeat(np.arange(len(x)), np.diff(limits).astype(np.int64))
        bag_a, bag_b = found.bag_of_row[owner], found.bag_of_row[rows]
        keep = (bag_a < bag_b) & (rows >= 0)
        owner, rows, values = owner[keep], rows[keep], values[keep]
        names = np.asarray(found.bag_ids, dtype=object)
        return pl.DataFrame(
            {
                "bag_id": names[found.bag_of_row[owner]].astype(str),
                "instance": found.instance_of_row[owner],
                "other_bag_id": names[found.bag_of_row[rows]].astype(str),
                "other_instance": found.instance_of_row[rows],
                "distance": (1 - values) if metric == "cosine" else values,
            },
            schema={
                "bag_id": pl.Utf8,
                "instance": pl.Int32,
                "other_bag_id": pl.Utf8,
                "other_instance": pl.Int32,
                "distance": pl.Float32,
            },
        )


def duplicate_instances(store: FeatureStore) -> dict[str, np.ndarray]:
    """bag id → the instances ``index dedup`` marked as duplicates (checked against the store)."""
    folder = store.path / INDEX_DIR
    if not (folder / DUPLICATES).is_file():
        raise StoreError(
            f"--skip-duplicates needs the duplicates of {store.path}: run `milcache index dedup {store.path}` first"
        )
    settings = json.loads((folder / "duplicates.json").read_text())
    if fingerprint(store, store.bag_ids()) != settings["store"]:
        raise StoreError(
            f"the duplicates in {folder} are older than the store {store.path} (bags were added, removed or "
            f"rewritten since): run `milcache index dedup {store.path}` again"
        )
    table = pl.read_parquet(folder / DUPLICATES)
    return {str(bag): group["instance"].to_numpy() for (bag,), group in table.group_by("bag_id", maintain_order=True)}

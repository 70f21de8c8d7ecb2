import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from milcache.cli import cli
from milcache.errors import OptionError, StoreError
from milcache.store import FeatureStore, StoreWriter
from milcache.store.instance_index import (
    InstanceIndex,
    build_index,
    duplicate_instances,
    find_duplicates,
    prototype_store,
)
from tests.conftest import make_meta, random_bags, write_store


def _clustered_store(path, bags=40, per_bag=300, dim=32, centres=50, seed=0):
    """Embeddings as real ones are: clustered (tissue types), with noise around each centre."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32) * 3
    with StoreWriter(path, make_meta(dim=dim)) as writer:
        for b in range(bags):
            which = rng.integers(0, centres, per_bag)
            emb = means[which] + rng.standard_normal((per_bag, dim)).astype(np.float32)
            writer.put(f"bag-{b:03d}", emb, rng.integers(0, 1000, (per_bag, 2)).astype(np.int32))
    return path


def test_exact_search_returns_a_planted_neighbour_first(tmp_path):
    bags = random_bags(10, dim=16, seed=3)
    query = bags["bag-0002"][0][5]
    emb, coords, attrs = bags["bag-0007"]
    emb[3] = query * 1.001 + 1e-3  # its near twin, in another bag
    write_store(tmp_path / "s", bags)
    for metric in ("cosine", "l2"):
        build_index(tmp_path / "s", metric=metric)
        found = InstanceIndex(tmp_path / "s").neighbours("bag-0002", 5, 3)
        assert found["bag_id"][0] == "bag-0002" and found["instance"][0] == 5  # itself first
        assert (found["bag_id"][1], found["instance"][1]) == ("bag-0007", 3)
        assert found["x"][1] == coords[3][0] and found["distance"][1] < 1e-3 or metric == "l2"


def test_ivf_pq_recall_at_10_against_exact(tmp_path):
    store = _clustered_store(tmp_path / "s")
    build_index(store, kind="flat")
    exact = InstanceIndex(store)
    queries = [(f"bag-{b:03d}", i) for b in range(0, 40, 4) for i in (0, 50, 100)]
    truth = [set(exact.search(exact.vector(*q), 10)[0].tolist()) for q in queries]
    build_index(store, kind="ivf-pq")
    approx = InstanceIndex(store)
    assert approx.info["kind"] == "ivf-pq"
    found = [set(approx.search(approx.vector(*q), 10)[0].tolist()) for q in queries]
    recall = np.mean([len(t & f) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.9, recall


def test_prototype_store_shapes_and_assignments(tmp_path):
    store = _clustered_store(tmp_path / "s", bags=6, per_bag=200, centres=5)
    summary = prototype_store(store, 5, tmp_path / "proto")
    assert summary == {"bags": 6, "instances": 1200, "k": 5, "out": str(tmp_path / "proto")}
    clusters = np.load(tmp_path / "proto" / "instance_clusters.npy")
    with FeatureStore(store) as original, FeatureStore(tmp_path / "proto") as proto:
        assert proto.metadata.source["kind"] == "prototypes" and proto.metadata.dim == 32
        at = 0
        for bag_id in original.bag_ids():
            emb = original[bag_id].embeddings.astype(np.float32)
            bag = proto[bag_id]
            assert len(bag) <= 5 and bag.attrs["count"].sum() == len(emb)
            mine = clusters[at : at + len(emb)]
            for row, cluster in enumerate(bag.attrs["cluster"]):
                np.testing.assert_allclose(bag.embeddings[row], emb[mine == cluster].mean(0), atol=1e-2)
            at += len(emb)


def test_index_errors(tmp_path):
    store = write_store(tmp_path / "s", random_bags(4, dim=16))
    with pytest.raises(StoreError, match="has no index: build one"):
        InstanceIndex(store)
    with pytest.raises(OptionError, match="ivf-pq needs at least"):
        build_index(store, kind="ivf-pq")
    build_index(store)
    index = InstanceIndex(store)
    with pytest.raises(OptionError, match="-k 10000 is more than"):
        index.search(index.vector("bag-0001", 0), 10_000)
    with pytest.raises(OptionError, match="--instance 999"):
        index.vector("bag-0001", 999)
    with pytest.raises(StoreError, match="16-d"):
        index.search(np.zeros(8, np.float32), 1)
    with pytest.raises(OptionError, match="--k 100000 is more than"):
        prototype_store(store, 100_000, tmp_path / "p")
    index.close()
    with StoreWriter(store, make_meta()) as writer:  # the store moves on
        writer.put("new-bag", np.ones((3, 16), np.float32))
    with pytest.raises(StoreError, match="older than the store"):
        InstanceIndex(store)


def test_index_cli(tmp_path):
    _clustered_store(tmp_path / "s", bags=5, per_bag=50)
    runner = CliRunner()
    result = runner.invoke(cli, ["index", "build", str(tmp_path / "s")])
    assert result.exit_code == 0 and "indexed 250 instances of 5 bags" in result.output, result.output
    result = runner.invoke(
        cli,
        [
            "index",
            "search",
            str(tmp_path / "s"),
            "--bag",
            "bag-001",
            "--instance",
            "4",
            "-k",
            "5",
            "--out",
            str(tmp_path / "n.csv"),
        ],
    )
    assert result.exit_code == 0 and "bag-001" in result.output, result.output
    assert (tmp_path / "n.csv").read_text().count("\n") == 6
    result = runner.invoke(cli, ["index", "search", str(tmp_path / "s"), "--bag", "nope", "--instance", "0"])
    assert result.exit_code == 2 and "bag 'nope' is not in the index" in result.output
    result = runner.invoke(cli, ["index", "kmeans", str(tmp_path / "s"), "--k", "4", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0 and "≤ 4 prototypes" in result.output


def _store_with_planted_duplicates(path):
    """Bags of random instances, some repeated with tiny noise (an overlapping tile), one chain
    a ≈ b ≈ c where a and c are not near, and one instance copied into another bag."""
    rng = np.random.default_rng(5)
    planted, bags = {}, {}
    with StoreWriter(path, make_meta(dim=32)) as writer:
        for b in range(6):
            emb = rng.standard_normal((40, 32)).astype(np.float32)
            twins = rng.choice(np.arange(1, 40), 3, replace=False)
            for t in twins:
                emb[t] = emb[t - 1 - rng.integers(0, t)] + 0.01 * rng.standard_normal(32)
            bags[f"bag-{b}"] = emb
        chain = bags["bag-0"]
        base = rng.standard_normal(32).astype(np.float32)
        side = rng.standard_normal(32).astype(np.float32)
        side -= side @ base / (base @ base) * base
        side *= np.linalg.norm(base) / np.linalg.norm(side)
        for k, angle in enumerate((0.0, 0.35, 0.7)):  # cos(0.35) ≈ 0.94: neighbours near, ends far
            chain[-3 + k] = np.cos(angle) * base + np.sin(angle) * side
        bags["bag-5"][0] = bags["bag-4"][7]  # the same tile in two bags
        for bag_id, emb in bags.items():
            writer.put(bag_id, emb, np.zeros((len(emb), 2), np.int32))
    for bag_id, emb in bags.items():
        x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        sim = np.triu(x @ x.T, 1)
        planted[bag_id] = {int(j) for i, j in zip(*np.nonzero(sim >= 0.99), strict=True)}
    return path, planted


def test_dedup_finds_planted_duplicates_and_training_skips_them(tmp_path):
    store, planted = _store_with_planted_duplicates(tmp_path / "s")
    report = find_duplicates(store, threshold=0.99)
    table = pl.read_parquet(report.path)
    found = {b: set(g["instance"].to_list()) for (b,), g in table.group_by("bag_id")}
    assert {b: s for b, s in found.items()} == {b: s for b, s in planted.items() if s}
    assert report.duplicates == sum(len(s) for s in planted.values())

    chain = find_duplicates(store, threshold=0.9)  # a ≈ b, b ≈ c, a ≉ c: b goes, c stays (kept for a)
    rows = pl.read_parquet(chain.path).filter(pl.col("bag_id") == "bag-0")["instance"].to_list()
    assert 38 in rows and 39 not in rows

    build_index(store)
    report = find_duplicates(store, threshold=0.99, across_bags=True)
    cross = pl.read_parquet(report.cross_bag_path)
    pairs = {row[:4] for row in cross.iter_rows()}  # bag-4's own twins of instance 7 match too
    assert ("bag-4", 7, "bag-5", 0) in pairs and {(a, c) for a, _, c, _ in pairs} == {("bag-4", "bag-5")}

    with FeatureStore(store) as fs:
        skip = duplicate_instances(fs)
    assert {b: set(v.tolist()) for b, v in skip.items()} == {b: s for b, s in planted.items() if s}
    labels = pl.DataFrame({"bag_id": [f"bag-{b}" for b in range(6)], "label": [0, 1, 0, 1, 0, 1]})
    labels.write_csv(tmp_path / "labels.csv")
    from milcache.aggregator.run import load_cohort

    cohort = load_cohort(store, tmp_path / "labels.csv", device="cpu", skip_duplicates=True)
    assert cohort.data.lengths.tolist() == [40 - len(planted[f"bag-{b}"]) for b in range(6)]
    args = ["train-head", "--store", str(store), "--labels", str(tmp_path / "labels.csv"), "--folds", "2"]
    args += ["--epochs", "1", "--device", "cpu", "--skip-duplicates", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


def test_dedup_errors_are_named(tmp_path):
    store, _ = _store_with_planted_duplicates(tmp_path / "s")
    runner = CliRunner()
    labels = tmp_path / "labels.csv"
    pl.DataFrame({"bag_id": [f"bag-{b}" for b in range(6)], "label": [0, 1] * 3}).write_csv(labels)
    args = ["train-head", "--store", str(store), "--labels", str(labels), "--out", str(tmp_path / "r")]
    result = runner.invoke(cli, [*args, "--skip-duplicates", "--device", "cpu"])
    assert result.exit_code == 2 and "run `milcache index dedup" in result.output
    result = runner.invoke(cli, ["index", "dedup", str(store), "--threshold", "1.5"])
    assert result.exit_code == 2 and "--threshold" in result.output
    result = runner.invoke(cli, ["index", "dedup", str(store), "--across-bags"])
    assert result.exit_code == 2 and "has no index" in result.output
    find_duplicates(store)
    with StoreWriter(store, make_meta(dim=32)) as writer:  # the store changes after dedup
        writer.put("bag-new", np.ones((3, 32), np.float32), np.zeros((3, 2), np.int32))
    with FeatureStore(store) as fs, pytest.raises(StoreError, match="older than the store"):
        duplicate_instances(fs)


def test_gpu_without_faiss_gpu_is_refused_by_name(tmp_path):
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this machine has faiss-gpu and a GPU: --gpu works here")
    write_store(tmp_path / "s", random_bags(3, dim=8))
    for args in (
        ["build", str(tmp_path / "s"), "--gpu"],
        ["kmeans", str(tmp_path / "s"), "--k", "2", "--out", "x", "--gpu"],
    ):
        result = CliRunner().invoke(cli, ["index", *args])
        assert result.exit_code == 2 and "--gpu" in result.output and "Traceback" not in result.output

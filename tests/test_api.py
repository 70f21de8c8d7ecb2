"""The Python API: each function gives what its CLI command gives on the same input; a head
registered in user code (or by another package's entry point) is usable by name everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import milcache
from milcache.cli import cli
from milcache.store.synthetic import make_synthetic_store
from tests.conftest import tissue_image, write_pyramid_tiff

FAST = {"epochs": 3, "seed": 0}
FAST_FLAGS = ["--epochs", "3", "--seed", "0", "--device", "cpu"]


@milcache.register_head("test-mean-max")
class MeanMaxHead(milcache.Head):
    """A user's own head: the mean and the max of the instance embeddings, side by side."""

    has_instance_scores = False

    def __init__(self, in_dim, n_outputs, hidden=32, dropout=0.0, instance_dropout=0.0):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.classifier = torch.nn.Linear(2 * hidden, n_outputs)

    def aggregate(self, h, mask):
        weights = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * weights).sum(1) / weights.sum(1).clamp_min(1)
        top = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).clamp_min(-1e4)
        return milcache.HeadOutput(self.classifier(torch.cat([mean, top], -1)), None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("api")
    labels = make_synthetic_store(root / "store", bags=40, instances=(5, 20), dim=16, seed=3, signal=2.5)
    labels.write_csv(root / "labels.csv")
    return root / "store", root / "labels.csv"


def _cli(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_train_head_and_predict_equal_the_cli(cohort, tmp_path):
    store, labels = cohort
    result = milcache.train_head(store, labels, tmp_path / "api", head="attention", folds=3, device="cpu", **FAST)
    _cli(
        ["train-head", "--store", store, "--labels", labels, "--out", tmp_path / "cli", "--head", "attention"]
        + ["--folds", "3", *FAST_FLAGS]
    )
    from_cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert _without_time(result.metrics) == _without_time(from_cli)
    assert result.oof.equals(pl.read_parquet(tmp_path / "cli" / "oof.parquet"))

    bags = ["bag-00003", "bag-00007"]
    table = milcache.predict(tmp_path / "api", store, bags=bags, device="cpu")
    _cli(
        ["predict", "--model", tmp_path / "cli", "--store", store, "--out", tmp_path / "p.csv", "--device", "cpu"]
        + ["--bags", _bag_table(tmp_path, bags)]
    )
    from_cli = pl.read_csv(tmp_path / "p.csv", schema_overrides={"bag_id": pl.Utf8})
    assert isinstance(table, pl.DataFrame) and table["bag_id"].to_list() == from_cli["bag_id"].to_list() == bags
    assert np.allclose(table["prob_1"].to_numpy(), from_cli["prob_1"].to_numpy(), atol=1e-6)


def _bag_table(folder: Path, bags: list[str]) -> Path:
    path = folder / "bags.csv"
    pl.DataFrame({"bag_id": bags}).write_csv(path)
    return path


def test_tune_equals_the_cli(cohort, tmp_path):
    store, labels = cohort
    options = {"n_trials": 2, "folds": 2, "pruner": "none", "holdout": 0.0, "set": {"epochs": 3}}
    result = milcache.tune(store, labels, tmp_path / "api", device="cpu", **options)
    _cli(
        ["tune", "--store", store, "--labels", labels, "--out", tmp_path / "cli", "--n-trials", "2"]
        + ["--folds", "2", "--pruner", "none", "--holdout", "0", "--set", "epochs=3", "--device", "cpu"]
    )
    from_cli = json.loads((tmp_path / "cli" / "best.json").read_text())
    assert result.best["config"] == from_cli["config"] and result.best["value"] == pytest.approx(from_cli["value"])
    assert result.trials.height == 2 and (result.model_dir / "model.safetensors").is_file()


def test_extract_equals_the_cli(tmp_path):
    for i in range(2):
        write_pyramid_tiff(tmp_path / f"s{i}.tif", tissue_image(128, 192, seed=i))
    manifest = tmp_path / "slides.csv"
    manifest.write_text("bag_id,path\n" + "".join(f"s{i},{tmp_path / f's{i}.tif'}\n" for i in range(2)))
    options = {"backbone": "test_resnet", "tile_size": 64, "workers": 0, "device": "cpu"}
    summary = milcache.extract(manifest, tmp_path / "api", **options)
    _cli(
        ["extract", manifest, "--out", tmp_path / "cli", "--backbone", "test_resnet", "--tile-size", "64"]
        + ["--workers", "0", "--device", "cpu"]
    )
    assert summary.bags == 2 and summary.instances > 0 and not summary.failures
    with milcache.FeatureStore(tmp_path / "api") as api, milcache.FeatureStore(tmp_path / "cli") as made:
        assert api.bag_ids() == made.bag_ids()
        for bag in api.bag_ids():
            assert np.array_equal(api.get(bag).embeddings, made.get(bag).embeddings)
            assert np.array_equal(api.get(bag).coords, made.get(bag).coords)


def test_index_functions_equal_the_cli(cohort, tmp_path):
    store, _ = cohort
    info = milcache.index.build(store)
    assert info.instances > 0
    table = milcache.index.search(store, bag="bag-00000", instance=0, k=4)
    _cli(["index", "search", store, "--bag", "bag-00000", "--instance", "0", "-k", "4", "--out", tmp_path / "n.csv"])
    from_cli = pl.read_csv(tmp_path / "n.csv", schema_overrides={"bag_id": pl.Utf8})
    assert table["bag_id"].to_list() == from_cli["bag_id"].to_list() and table.height == 4
    summary = milcache.index.kmeans(store, k=3, out=tmp_path / "protos")
    _cli(["index", "kmeans", store, "--k", "3", "--out", tmp_path / "protos-cli"])
    with milcache.FeatureStore(tmp_path / "protos") as protos, milcache.FeatureStore(tmp_path / "protos-cli") as cli_:
        assert len(protos) == summary["bags"] and max(protos.sizes().values()) <= 3
        for bag in protos.bag_ids():
            assert np.array_equal(protos.get(bag).embeddings, cli_.get(bag).embeddings)
    report = milcache.index.dedup(store, threshold=0.5)
    table = pl.read_parquet(report.path)
    _cli(["index", "dedup", store, "--threshold", "0.5"])
    assert table.height == report.duplicates > 0 and table.equals(pl.read_parquet(report.path))


def test_api_errors_are_the_projects(cohort, tmp_path):
    store, labels = cohort
    with pytest.raises(milcache.OptionError, match="--epochs"):
        milcache.train_head(store, labels, tmp_path / "x", epochs=0)
    with pytest.raises(milcache.OptionError, match="unknown training option"):
        milcache.train_head(store, labels, tmp_path / "x", epoch=3)
    with pytest.raises(milcache.MilcacheError, match="unknown head 'nope'"):
        milcache.train_head(store, labels, tmp_path / "x", head="nope")
    with pytest.raises(milcache.OptionError, match="--shard"):
        milcache.extract(labels, tmp_path / "y", backbone="test_resnet", shard="half")


def test_a_head_registered_in_user_code_trains_tunes_and_predicts_by_name(cohort, tmp_path):
    store, labels = cohort
    assert "test-mean-max" in milcache.list_heads()
    result = milcache.train_head(store, labels, tmp_path / "run", head="test-mean-max", folds=2, device="cpu", **FAST)
    assert result.metrics["auc"] > 0.5
    _cli(
        ["train-head", "--store", store, "--labels", labels, "--out", tmp_path / "cli", "--head", "test-mean-max"]
        + ["--folds", "2", "--head-option", "hidden=16", *FAST_FLAGS]
    )
    study = milcache.tune(
        store,
        labels,
        tmp_path / "study",
        n_trials=2,
        folds=2,
        pruner="none",
        holdout=0.0,
        set={"head": "test-mean-max", "epochs": 3},
        device="cpu",
    )
    assert study.best["head"] == "test-mean-max"
    table = milcache.predict(study.model_dir, store, device="cpu")
    assert table.height == 40


def test_the_same_head_registered_again_replaces_another_is_refused():
    original = milcache.aggregator.heads.head_class("test-mean-max")
    again = type("MeanMaxHead", (MeanMaxHead,), {"__module__": __name__, "__qualname__": "MeanMaxHead"})
    milcache.register_head("test-mean-max")(again)  # a notebook cell run twice
    assert milcache.aggregator.heads.head_class("test-mean-max") is again
    milcache.register_head("test-mean-max")(original)

    class Other(MeanMaxHead):
        pass

    with pytest.raises(milcache.MilcacheError, match="registered twice"):
        milcache.register_head("test-mean-max")(Other)
    with pytest.raises(milcache.MilcacheError, match="registered twice"):
        milcache.register_head("mean")(Other)


def test_a_head_without_aggregate_is_refused_saying_what_to_define():
    class Unfinished(milcache.Head):
        pass

    with pytest.raises(milcache.MilcacheError, match=r"head 'unfinished' .*Unfinished\) must define aggregate"):
        milcache.register_head("unfinished")(Unfinished)
    assert "unfinished" not in milcache.aggregator.heads.list_heads()


def test_a_head_from_another_packages_entry_point_is_found_by_the_cli(cohort, tmp_path):
    """A package that declares `[project.entry-points."milcache.heads"] plug-max = "plug:MaxHead"`."""
    store, labels = cohort
    site = tmp_path / "site"
    (site / "plug-0.1.dist-info").mkdir(parents=True)
    (site / "plug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: plug\nVersion: 0.1\n")
    (site / "plug-0.1.dist-info" / "entry_points.txt").write_text("[milcache.heads]\nplug-max = plug:MaxHead\n")
    (site / "plug.py").write_text(
        textwrap.dedent(
            """
            from milcache.aggregator.heads import MaxPooling

            class MaxHead(MaxPooling):
                pass
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "milcache.cli", "train-head", "--store", str(store), "--labels", str(labels)]
        + ["--out", str(tmp_path / "run"), "--head", "plug-max", "--folds", "2", *FAST_FLAGS],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["head"] == "plug-max"


def test_the_api_takes_what_a_notebook_passes(tmp_path):
    """A polars (or pandas) DataFrame as labels, one bag id or a Series as bags; a fractional fold
    count is refused by name."""
    import polars as pl

    from milcache.store.synthetic import make_synthetic_store

    labels = make_synthetic_store(tmp_path / "store", bags=12, instances=(4, 8), dim=8, seed=3)
    result = milcache.train_head(tmp_path / "store", labels, tmp_path / "run", folds=2, epochs=1, device="cpu")
    assert (tmp_path / "run" / "labels.parquet").is_file() and result.metrics["auc"] >= 0
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())["labels"]
    assert pl.read_parquet(recorded)["bag_id"].to_list() == labels["bag_id"].to_list()
    if __import__("importlib").util.find_spec("pandas"):
        pandas_labels = labels.to_pandas()
        milcache.train_head(tmp_path / "store", pandas_labels, tmp_path / "run-pd", folds=2, epochs=1, device="cpu")
    one = milcache.predict(tmp_path / "run", tmp_path / "store", bags="bag-00001", device="cpu")
    assert one["bag_id"].to_list() == ["bag-00001"]
    series = milcache.predict(tmp_path / "run", tmp_path / "store", bags=labels["bag_id"].head(3), device="cpu")
    assert series.height == 3
    with pytest.raises(milcache.MilcacheError, match="--folds must be a whole number, at least 2; got 2.7"):
        milcache.train_head(tmp_path / "store", labels, tmp_path / "run2", folds=2.7, device="cpu")

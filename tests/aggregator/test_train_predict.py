import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.predict import predict
from milcache.aggregator.run import load_cohort, train_head
from milcache.aggregator.splits import cv_splits
from milcache.cli import cli
from milcache.errors import LabelError, StoreMismatchError
from milcache.store.synthetic import make_synthetic_store

FAST = TrainConfig(epochs=30, patience=8, instances=None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """240 synthetic bags: the first 200 labelled for training, the last 40 held out."""
    root = tmp_path_factory.mktemp("cohort")
    labels = make_synthetic_store(root / "store", bags=240, instances=(8, 30), dim=16, groups=120, seed=1, signal=2.5)
    labels.head(200).write_csv(root / "train.csv")
    labels.tail(40).write_csv(root / "heldout.csv")
    return root, labels


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    root, _ = cohort
    out = tmp_path_factory.mktemp("run")
    metrics = train_head(root / "store", root / "train.csv", out, FAST, folds=3, device="cpu")
    return out, metrics


def test_learns_marked_instance_task_on_held_out_bags(cohort, run):
    root, labels = cohort
    out, metrics = run
    assert metrics["auc"] > 0.9 and len(metrics["folds"]) == 3
    held = labels.tail(40)
    table = predict(out, root / "store", bag_ids=held["bag_id"].to_list(), device="cpu")
    assert roc_auc_score(held["label"].to_numpy(), table["prob_1"].to_numpy()) > 0.95


def test_predict_ensemble_averages_the_fold_models(cohort, run):
    """--ensemble: the three fold models predict together; the probabilities are the mean of each
    fold model's, the instance scores the mean of theirs, and the held-out bags are still ranked right."""
    import torch

    from milcache.aggregator.data import load_bags
    from milcache.aggregator.model import load_model
    from milcache.aggregator.trainer import infer
    from milcache.store import FeatureStore

    root, labels = cohort
    out, metrics = run
    held = labels.tail(40)
    ids = held["bag_id"].to_list()
    table = predict(out, root / "store", bag_ids=ids, device="cpu", ensemble=True)
    assert roc_auc_score(held["label"].to_numpy(), table["prob_1"].to_numpy()) > 0.95
    ensemble, config, task = load_model(out, "cpu", ensemble=True)
    assert len(ensemble.members) == metrics["fold_models"] == 3
    with FeatureStore(root / "store") as store:
        data = load_bags(store, ids, torch.device("cpu"))
    train = TrainConfig(**config["train"])
    each = [infer(member, data, np.arange(len(ids)), train, scores=True) for member in ensemble.members]
    mean_p = np.mean([task.outputs(logits).numpy()[:, 1] for logits, _ in each], axis=0)
    np.testing.assert_allclose(table["prob_1"].to_numpy(), mean_p, rtol=1e-4, atol=1e-5)
    _, scores = infer(ensemble, data, np.arange(len(ids)), train, scores=True)
    np.testing.assert_allclose(scores[0], np.mean([s[0] for _, s in each], axis=0), rtol=1e-4, atol=1e-6)


def test_predict_ensemble_without_fold_models_says_so(cohort, run, tmp_path):
    import shutil

    root, _ = cohort
    out, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "folds.safetensors").unlink()
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            str(bare),
            "--store",
            str(root / "store"),
            "--out",
            str(tmp_path / "p.csv"),
            "--ensemble",
        ],
    )
    assert result.exit_code == 2 and "fold models" in result.output and "without --ensemble" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_run_directory_has_every_artefact(run):
    out, metrics = run
    names = ("model.safetensors", "folds.safetensors", "config.json", "metrics.json", "oof.parquet", "roc.png")
    for name in (*names, "settings.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert {"auc", "accuracy", "balanced_accuracy", "f1", "log_loss"} <= set(saved)
    assert saved["auc"] == pytest.approx(metrics["auc"]) and saved["bags"] == 200
    oof = pl.read_parquet(out / "oof.parquet")
    assert oof.height == 200 and oof["bag_id"].n_unique() == 200  # each bag predicted once, out of fold


def test_run_rebuilds_its_model_and_reproduces_predictions(cohort, run):
    root, _ = cohort
    out, _ = run
    first = predict(out, root / "store", device="cpu")
    second = predict(out, root / "store", device="cpu")
    assert first.equals(second)
    assert set(first.columns) >= {"bag_id", "prob_0", "prob_1", "predicted", "top_instances"}


def test_attention_finds_the_key_instances(cohort, run):
    root, labels = cohort
    out, _ = run
    from milcache.store import FeatureStore

    positives = labels.filter(pl.col("label") == 1)["bag_id"].to_list()
    table = predict(out, root / "store", bag_ids=positives, top_k=1, device="cpu")
    with FeatureStore(root / "store") as store:
        hits = [
            store[b].attrs["key"][json.loads(t)[0]["index"]]
            for b, t in table.select("bag_id", "top_instances").iter_rows()
        ]
    assert np.mean(hits) > 0.8


def test_predict_writes_heatmaps_geojson_and_table(cohort, run, tmp_path):
    root, _ = cohort
    out, _ = run
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            str(out),
            "--store",
            str(root / "store"),
            "--out",
            str(tmp_path / "p.parquet"),
            "--bags",
            str(root / "heldout.csv"),
            "--heatmaps",
            str(tmp_path / "hm"),
            "--geojson",
            str(tmp_path / "gj"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(tmp_path / "p.parquet").height == 40
    pngs = sorted((tmp_path / "hm").glob("*.png"))
    assert len(pngs) == 40 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    geo = json.loads(next((tmp_path / "gj").glob("*.geojson")).read_text())
    assert geo["type"] == "FeatureCollection" and "score" in geo["features"][0]["properties"]["measurements"]


def test_grouped_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 3).astype(object)
    y = np.repeat(rng.integers(0, 2, 40), 3)
    for train, test in cv_splits(y, groups, folds=4, repeats=2):
        assert not set(groups[train]) & set(groups[test])
        assert len(np.unique(y[test])) == 2


def test_train_head_cli_and_its_errors(cohort, tmp_path):
    root, labels = cohort
    runner = CliRunner()
    args = [
        "train-head",
        "--store",
        str(root / "store"),
        "--out",
        str(tmp_path / "r"),
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--folds",
        "2",
        "--head",
        "mean",
    ]
    result = runner.invoke(cli, [*args, "--labels", str(root / "train.csv")])
    assert result.exit_code == 0, result.output
    assert "auc" in result.output and "40 bags of the store have no label" in result.output

    labels.head(10).with_columns(pl.lit(1).alias("label")).write_csv(tmp_path / "one.csv")
    result = runner.invoke(cli, [*args, "--labels", str(tmp_path / "one.csv")])
    assert result.exit_code == 2 and "needs two classes" in result.output

    pl.DataFrame({"bag_id": ["bag-00001", "ghost-1"], "label": [0, 1]}).write_csv(tmp_path / "ghost.csv")
    result = runner.invoke(cli, [*args, "--labels", str(tmp_path / "ghost.csv")])
    assert result.exit_code == 2 and "not in the store" in result.output and "ghost-1" in result.output

    labels.head(6).write_csv(tmp_path / "few.csv")
    result = runner.invoke(cli, [*args[:-4], "--folds", "5", "--labels", str(tmp_path / "few.csv")])
    assert result.exit_code == 2 and "too few bags" in result.output


def test_predict_refuses_a_store_of_another_dim(run, tmp_path):
    out, _ = run
    make_synthetic_store(tmp_path / "other", bags=4, dim=8)
    with pytest.raises(StoreMismatchError, match="dim: model trained on 16, store has 8"):
        predict(out, tmp_path / "other", device="cpu")


def test_fixed_split_and_regression_and_multiclass(cohort, tmp_path):
    root, labels = cohort
    split = labels.head(120).with_columns(
        pl.when(pl.int_range(pl.len()) < 90).then(pl.lit("train")).otherwise(pl.lit("test")).alias("split")
    )
    split.write_csv(tmp_path / "split.csv")
    short = TrainConfig(epochs=6, instances=None)  # the shapes of the result are what is checked here
    metrics = train_head(root / "store", tmp_path / "split.csv", tmp_path / "fixed", short, device="cpu")
    assert len(metrics["folds"]) == 1 and "test bags kept out" in metrics["final_model"]

    rng = np.random.default_rng(0)
    reg = labels.head(120).with_columns(pl.Series("label", labels.head(120)["label"] * 2.0 + rng.random(120)))
    reg.write_csv(tmp_path / "reg.csv")
    metrics = train_head(root / "store", tmp_path / "reg.csv", tmp_path / "reg", FAST, folds=3, device="cpu")
    assert metrics["task"] == "regression" and metrics["pearson_r"] > 0.5
    assert (tmp_path / "reg" / "predictions.png").is_file()

    multi = labels.head(120).with_columns(pl.Series("label", rng.integers(0, 3, 120)))
    multi.write_csv(tmp_path / "multi.csv")
    metrics = train_head(
        root / "store", tmp_path / "multi.csv", tmp_path / "multi", short, folds=3, task_kind="ordinal", device="cpu"
    )
    assert metrics["task"] == "ordinal" and "kappa" in metrics


def test_cohort_refuses_missing_labels(cohort, tmp_path):
    root, _ = cohort
    (tmp_path / "l.csv").write_text("bag_id,label\nbag-00000,1\nbag-00001,\n")
    with pytest.raises(LabelError, match="missing labels"):
        load_cohort(root / "store", tmp_path / "l.csv", device="cpu")


def test_streamed_cohort_trains_like_a_resident_one(cohort, tmp_path):
    root, _ = cohort
    config = TrainConfig(epochs=2, instances=None)  # same batches; only float rounding may differ
    resident = load_cohort(root / "store", root / "train.csv", device="cpu", regime="host")
    streamed = load_cohort(root / "store", root / "train.csv", device="cpu", regime="stream")
    from milcache.aggregator.data import StreamedBags

    assert isinstance(streamed.data, StreamedBags)
    a = train_head(root / "store", root / "train.csv", tmp_path / "a", config, folds=2, device="cpu", cohort=resident)
    b = train_head(root / "store", root / "train.csv", tmp_path / "b", config, folds=2, device="cpu", cohort=streamed)
    assert a["auc"] == pytest.approx(b["auc"], abs=0.01)
    oof_a, oof_b = (pl.read_parquet(tmp_path / d / "oof.parquet").sort("bag_id") for d in ("a", "b"))
    np.testing.assert_allclose(oof_a["prob_1"].to_numpy(), oof_b["prob_1"].to_numpy(), atol=0.01)


def test_streamed_subsampling_keeps_order_and_bounds(cohort):
    import torch

    from milcache.aggregator.data import gather_batch

    root, _ = cohort
    streamed = load_cohort(root / "store", root / "train.csv", device="cpu", regime="stream").data
    batch = np.argsort(-streamed.lengths)[:3]
    gathered = gather_batch(streamed, batch, cap=5, generator=torch.Generator().manual_seed(0))
    x, mask = gathered.x, gathered.mask
    assert x.shape == (3, 5, 16) and mask.all()
    full = streamed.embeddings(int(batch[0]))
    rows = [int(np.flatnonzero((full == r.numpy()).all(1))[0]) for r in x[0]]
    assert rows == sorted(rows) and len(set(rows)) == 5


def test_same_seed_same_results(cohort, tmp_path):
    root, _ = cohort
    config = TrainConfig(epochs=3, instances=8)
    first = train_head(root / "store", root / "train.csv", tmp_path / "a", config, folds=2, device="cpu")
    second = train_head(root / "store", root / "train.csv", tmp_path / "b", config, folds=2, device="cpu")
    assert first["folds"] == second["folds"]


def test_a_blend_of_two_heads_predicts_their_mean_with_the_attention_heads_scores(cohort, run, tmp_path):
    """A blend (what tune --select blend keeps): a directory of run directories that predict
    together. Probabilities are the members' mean; instance scores are the scoring head's alone
    (max pooling gives none), so heatmaps still draw; --ensemble blends the members' fold models."""
    import shutil

    from milcache.aggregator.model import load_model, save_blend

    root, labels = cohort
    out, _ = run
    blend = tmp_path / "blend"
    shutil.copytree(out, blend / "defaults")
    max_config = TrainConfig(head="max", epochs=10, patience=5, instances=None)
    train_head(root / "store", root / "train.csv", blend / "trial-7", max_config, folds=3, device="cpu")
    save_blend(blend, ["defaults", "trial-7"])
    ids = labels.tail(40)["bag_id"].to_list()
    members = [predict(blend / name, root / "store", bag_ids=ids, device="cpu") for name in ("defaults", "trial-7")]
    scores_file = tmp_path / "scores.parquet"
    table = predict(
        blend, root / "store", bag_ids=ids, device="cpu", heatmaps=tmp_path / "maps", scores_file=scores_file
    )
    mean_p = (members[0]["prob_1"].to_numpy() + members[1]["prob_1"].to_numpy()) / 2
    np.testing.assert_allclose(table["prob_1"].to_numpy(), mean_p, rtol=1e-4, atol=1e-5)
    attention = predict(
        blend / "defaults", root / "store", bag_ids=ids[:1], device="cpu", scores_file=tmp_path / "a.parquet"
    )
    assert len(attention) == 1
    np.testing.assert_allclose(
        pl.read_parquet(scores_file).filter(pl.col("bag_id") == ids[0])["score"].to_numpy(),
        pl.read_parquet(tmp_path / "a.parquet")["score"].to_numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    assert len(list((tmp_path / "maps").glob("*.png"))) == 40
    model, config, _ = load_model(blend, "cpu", ensemble=True)
    assert config["blend"] == {"defaults": "gated-attention", "trial-7": "max"}
    assert [len(member.members) for member in model.members] == [3, 3]
    both = predict(blend, root / "store", bag_ids=ids, device="cpu", ensemble=True)
    assert roc_auc_score(labels.tail(40)["label"].to_numpy(), both["prob_1"].to_numpy()) > 0.95


def test_a_blend_of_runs_for_other_tasks_is_refused(cohort, run, tmp_path):
    import shutil

    from milcache.aggregator.model import CONFIG_FILE, load_model, save_blend
    from milcache.errors import MilcacheError

    out, _ = run
    for name in ("a", "b"):
        shutil.copytree(out, tmp_path / name)
    config = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    config["store"] = {**config["store"], "backbone": "another"}
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps(config))
    save_blend(tmp_path, ["a", "b"])
    with pytest.raises(MilcacheError, match="different tasks or embeddings"):
        load_model(tmp_path, "cpu")

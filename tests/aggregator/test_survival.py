"""Survival: the losses against scikit-survival's Cox model and a direct reference, the concordance
against a pair count, labels refused by row, every head trained, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.heads import head_class, list_heads
from milcache.aggregator.run import load_cohort
from milcache.aggregator.survival import SurvivalSpec, cox_loss, discrete_time_loss, harrell_c
from milcache.aggregator.tasks import Task, per_patient
from milcache.aggregator.trainer import fit
from milcache.cli import cli
from milcache.errors import LabelError, MilcacheError
from milcache.store import StoreMetadata, StoreWriter
from milcache.store.synthetic import make_synthetic_survival_store
from milcache.store.tables import read_survival_labels


def _one_instance_store(path: Path, x: np.ndarray, time: np.ndarray, event: np.ndarray) -> Path:
    """Each row of ``x`` a bag of one instance; labels.csv beside it."""
    meta = StoreMetadata(backbone="tabular", dim=x.shape[1], dtype="float32", coords=["row"])
    ids = [f"row-{i:04d}" for i in range(len(x))]
    with StoreWriter(path / "store", meta) as writer:
        for i, bag_id in enumerate(ids):
            writer.put(bag_id, x[i : i + 1].astype(np.float32), np.array([[i]], dtype=np.int32))
    pl.DataFrame({"bag_id": ids, "time": time, "event": event.astype(int)}).write_csv(path / "labels.csv")
    return path / "store"


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_the_linear_head_with_the_cox_loss_is_scikit_survivals_cox_model(tmp_path, ties):
    """WHAS500 (500 patients, 14 covariates, tied times): the linear head trained by the stacked
    trainer on one-instance bags, no penalty, the whole cohort one risk set, reaches the library's
    unpenalised coefficients and concordance."""
    from sksurv.datasets import load_whas500
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    frame, outcome = load_whas500()
    x = frame.astype(float).to_numpy()
    time, event = outcome["lenfol"].astype(np.float64), outcome["fstat"].astype(bool)
    assert len(np.unique(time[event])) < event.sum()  # tied event times: where Efron and Breslow differ
    store = _one_instance_store(tmp_path, x, time, event)
    cohort = load_cohort(store, tmp_path / "labels.csv", survival=SurvivalSpec(ties=ties), device="cpu")
    config = TrainConfig(head="linear", epochs=300, lr=0.05, weight_decay=0.0, batch_size=len(x), instances=None)
    torch.manual_seed(0)
    from milcache.aggregator.model import build_model

    model = build_model("linear", {}, x.shape[1], cohort.task)
    fit(model, cohort.data, cohort.task, cohort.y, np.arange(len(x)), None, config)
    mean, std = model.mean.double().numpy(), model.std.double().numpy()
    ours = model.head.instance_layer.weight.detach().double().numpy()[0]
    reference = CoxPHSurvivalAnalysis(alpha=0, ties=ties).fit((x - mean) / std, outcome)
    np.testing.assert_allclose(ours, reference.coef_, atol=2e-3)
    risk = ((x - mean) / std) @ ours
    assert harrell_c(time, event, risk) == pytest.approx(reference.score((x - mean) / std, outcome), abs=1e-4)


def test_the_cox_loss_leaves_padded_bags_out_and_efron_differs_from_breslow_only_with_ties():
    rng = np.random.default_rng(0)
    risk = torch.tensor(rng.normal(size=12))
    time = torch.tensor(rng.integers(1, 5, 12).astype(float))  # many ties
    event = torch.tensor((rng.random(12) < 0.7).astype(float))
    ones = torch.ones(12)
    padded = cox_loss(
        torch.cat([risk, torch.tensor([9.0, -3.0])]),
        torch.cat([time, torch.tensor([0.5, 10.0])]),
        torch.cat([event, torch.tensor([1.0, 1.0])]),
        torch.cat([ones, torch.zeros(2)]),
    )
    assert padded.item() == pytest.approx(cox_loss(risk, time, event, ones).item())
    assert cox_loss(risk, time, event, ones, ties="efron") != pytest.approx(
        cox_loss(risk, time, event, ones, ties="breslow").item()
    )
    distinct = torch.arange(1.0, 13.0)
    assert cox_loss(risk, distinct, event, ones, ties="efron").item() == pytest.approx(
        cox_loss(risk, distinct, event, ones, ties="breslow").item()
    )


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_the_discrete_time_loss_is_the_likelihood_written_out(alpha):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20, 4))
    interval = rng.integers(0, 4, 20)
    event = (rng.random(20) < 0.6).astype(float)
    hazard = 1 / (1 + np.exp(-logits))
    expected = []
    for h, k, e in zip(hazard, interval, event, strict=True):
        survived_before = np.prod(1 - h[:k])
        uncensored = -e * (np.log(survived_before) + np.log(h[k]))
        censored = -(1 - e) * np.log(survived_before * (1 - h[k]))
        expected.append((1 - alpha) * (uncensored + censored) + alpha * uncensored)
    got = discrete_time_loss(
        torch.tensor(logits), torch.tensor(interval), torch.tensor(event), torch.ones(20), alpha=alpha
    )
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-9)


def _pair_count_c(time, event, risk) -> float:
    """Harrell's C by counting pairs: i comparable with j when i had its event before j's time, or
    at j's censoring time (a patient censored at t was still alive at t)."""
    concordant = comparable = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_the_concordance_counts_pairs_and_a_perfect_risk_scores_one():
    rng = np.random.default_rng(2)
    time = rng.integers(1, 15, 80).astype(float)  # ties in time
    event = rng.random(80) < 0.6  # and censoring
    risk = rng.integers(0, 5, 80).astype(float)  # and in risk
    assert harrell_c(time, event, risk) == pytest.approx(_pair_count_c(time, event, risk))
    order = np.arange(1.0, 81.0)
    task = Task.for_survival(order, np.ones(80))
    y = np.stack([order, np.ones(80)], 1)
    perfect = task.metrics(y, -order[:, None])  # an earlier event, a higher risk
    assert perfect["c_index"] == pytest.approx(1.0) and perfect["uno_c"] == pytest.approx(1.0)
    assert task.metrics(y, order[:, None])["c_index"] == pytest.approx(0.0)


def test_the_discrete_time_outputs_are_a_falling_curve_and_a_risk():
    time = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    task = Task.for_survival(time, np.ones(8), SurvivalSpec(loss="nll", bins=4))
    assert task.n_outputs == 4 and task.survival.edges[0] == 0 and task.survival.edges[-1] == 8
    outputs = task.outputs(torch.randn(5, 4)).numpy()
    assert task.output_columns[0] == "risk" and outputs.shape == (5, 5)
    assert np.all(np.diff(outputs[:, 1:], axis=1) <= 0) and np.all(outputs[:, 1:] > 0)
    np.testing.assert_allclose(outputs[:, 0], -outputs[:, 1:].sum(1), rtol=1e-6)
    names = task.metric_names
    assert names == ["c_index", "uno_c", "ibs", "td_auc"]


def test_several_slides_of_a_patient_are_scored_as_one_prediction():
    y = np.array([[5.0, 1], [5.0, 1], [9.0, 0]])
    outputs = np.array([[1.0], [3.0], [0.0]])
    patients_y, patients_out = per_patient(y, outputs, np.array(["p1", "p1", "p2"], dtype=object))
    np.testing.assert_allclose(patients_out[:, 0], [2.0, 0.0])
    np.testing.assert_allclose(patients_y, [[5.0, 1], [9.0, 0]])


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ("a,-1,1\nb,2,0\n", "row 1: bag 'a'"),
        ("a,1,1\nb,0,0\n", "row 2: bag 'b'"),
        ("a,,1\nb,2,0\n", "missing time"),
        ("a,1,2\nb,2,0\n", "event other than 1"),
        ("a,soon,1\nb,2,0\n", "time that is not a number"),
        ("a,inf,1\nb,2,0\n", "zero, negative or infinite"),
    ],
)
def test_survival_labels_are_refused_naming_the_row(tmp_path, rows, named):
    path = tmp_path / "labels.csv"
    path.write_text("bag_id,time,event\n" + rows)
    with pytest.raises(LabelError, match=named.replace("(", r"\(")):
        read_survival_labels(path)


def test_a_patients_slides_must_share_its_time_and_event(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("bag_id,time,event,group\na,3,1,p1\nb,4,1,p1\nc,2,0,p2\n")
    with pytest.raises(LabelError, match="patient 'p1'"):
        read_survival_labels(path)
    path.write_text("bag_id,time,event\na,3,true\nb,4,False\n")
    assert read_survival_labels(path)["event"].to_list() == [1, 0]


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("survival")
    labels = make_synthetic_survival_store(root / "store", bags=48, instances=(8, 30), dim=16, groups=40, seed=3)
    labels.drop("keys").write_csv(root / "labels.csv")
    return root


@pytest.mark.parametrize("head", list_heads())
def test_every_head_trains_on_survival_or_is_refused_by_name(cohort_dir, tmp_path, head):
    from milcache import api

    run = lambda: api.train_head(  # noqa: E731
        cohort_dir / "store", cohort_dir / "labels.csv", tmp_path / "run", head=head, folds=2, epochs=2, device="cpu"
    )
    if head_class(head).needs_classes:
        with pytest.raises(MilcacheError, match=f"{head!r} adds an instance loss over classes"):
            run()
        return
    metrics = run().metrics
    assert metrics["task"] == "survival" and math.isfinite(metrics["c_index"])
    assert (tmp_path / "run" / "kaplan_meier.png").stat().st_size > 10_000


def test_train_head_and_predict_from_the_cli_with_the_discrete_time_loss(cohort_dir, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(
        cli,
        [
            "train-head",
            "--store",
            str(cohort_dir / "store"),
            "--labels",
            str(cohort_dir / "labels.csv"),
            "--out",
            str(run),
            "--survival-loss",
            "nll",
            "--bins",
            "3",
            "--folds",
            "3",
            "--epochs",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "c_index" in result.output and "log-rank p" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"c_index", "uno_c", "ibs", "td_auc", "kaplan_meier"} <= set(metrics)
    assert metrics["kaplan_meier"]["sizes"] == [20, 20]  # 40 patients, median split
    oof = pl.read_parquet(run / "oof.parquet")
    assert {"time", "event", "group", "risk"} <= set(oof.columns) and len(oof.columns) >= 7
    bags = tmp_path / "bags.csv"
    pl.read_csv(cohort_dir / "labels.csv").select("bag_id", "group").write_csv(bags)
    out = tmp_path / "pred.csv"
    args = ["predict", "--model", str(run), "--store", str(cohort_dir / "store"), "--out", str(out)]
    result = runner.invoke(cli, [*args, "--bags", str(bags), "--heatmaps", str(tmp_path / "maps"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pl.read_csv(out)
    assert table.height == 48 and "risk" in table.columns and "predicted" not in table.columns
    patients = pl.read_csv(tmp_path / "pred.patients.csv")
    assert patients.height == 40 and patients["bags"].sum() == 48
    assert len(list((tmp_path / "maps").glob("*.png"))) == 48


def test_tune_scores_a_survival_study_by_concordance_and_draws_the_held_out_groups(cohort_dir, tmp_path):
    from milcache import api

    best = api.tune(
        cohort_dir / "store",
        cohort_dir / "labels.csv",
        tmp_path / "study",
        n_trials=2,
        folds=2,
        repeats=1,
        holdout=0.25,
        set={"epochs": 2, "head": "attention"},
        device="cpu",
    ).best
    assert best["metric"] == "c_index" and math.isfinite(best["value"])
    assert best["holdout"]["kaplan_meier"]["groups"] == 2
    assert (tmp_path / "study" / "kaplan_meier_holdout.png").is_file()
    assert list((tmp_path / "study" / "best").rglob("kaplan_meier.png"))  # the kept model's (or a blend's members')

"""Survival heads on a synthetic MIL cohort whose hazard is known, against the oracle and against
scikit-survival's Cox model on mean-pooled embeddings, on the same folds.

The cohort (``make_synthetic_survival_store``): each bag holds 0 to 5 key instances among 40-200
Gaussian ones; its event time is exponential with log hazard 0.6 per key instance; a uniform
censoring time hides about 30 % of the events. The oracle's risk is the number of key instances.
Every head of the registry that a survival task can train (CLAM's instance loss needs classes),
with the Cox loss (Efron ties, 64-bag risk sets) and the discrete-time loss (4 intervals), runs
train-head's cross-validation with its defaults: 5-fold x 3, stratified on the event. Prints
Harrell's C (mean ± sd over the 15 test folds), Uno's C, each CV's seconds and its C over the
mean-pooled Cox model's (the baseline, run on the same folds in the same run).

    python bench/survival.py                  # every head, both losses (a few minutes on 2 cores)
    python bench/survival.py --heads attention gated-attention --losses cox
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.heads import head_class, list_heads
from milcache.aggregator.run import cross_validate, load_cohort
from milcache.aggregator.splits import cv_splits
from milcache.aggregator.survival import SurvivalSpec, harrell_c, uno_c
from milcache.store import FeatureStore
from milcache.store.synthetic import make_synthetic_survival_store


def _folds(cohort, folds: int, repeats: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The splits cross_validate draws for this cohort and seed."""
    return cv_splits(cohort.task.strata(cohort.y), cohort.groups, folds, repeats, seed)


def _fold_scores(y: np.ndarray, risk_of, splits) -> tuple[list[float], list[float], float]:
    """Harrell's and Uno's C of ``risk_of(train, test)`` on each test fold, and the seconds it took."""
    harrell, uno, start = [], [], time.perf_counter()
    for train, test in splits:
        risk = risk_of(train, test)
        harrell.append(harrell_c(y[test, 0], y[test, 1] > 0, risk))
        uno.append(uno_c(y[test, 0], y[test, 1] > 0, risk))
    return harrell, uno, time.perf_counter() - start


def _mean_pooled(store_dir: Path, bag_ids: list[str]) -> np.ndarray:
    with FeatureStore(store_dir) as store:
        return np.stack([np.asarray(store[b].embeddings, dtype=np.float64).mean(0) for b in bag_ids])


def _cox_on_mean_pooled(x: np.ndarray, y: np.ndarray):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    def risk_of(train, test):
        mean, std = x[train].mean(0), x[train].std(0) + 1e-9
        model = CoxPHSurvivalAnalysis(alpha=1.0, ties="efron")
        model.fit((x[train] - mean) / std, Surv.from_arrays(y[train, 1] > 0, y[train, 0]))
        return model.predict((x[test] - mean) / std)

    return risk_of


def _row(name: str, harrell, uno, seconds: float, baseline: float | None) -> str:
    ratio = "" if baseline is None else f"{np.mean(harrell) / baseline:6.3f}"
    return (
        f"{name:<28} {np.mean(harrell):.3f} ± {np.std(harrell):.3f}   {np.mean(uno):.3f}   {seconds:7.1f}   {ratio}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=300)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", nargs="*", default=None)
    parser.add_argument("--losses", nargs="*", default=["cox", "nll"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    heads = args.heads or [h for h in list_heads() if not head_class(h).needs_classes]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        labels = make_synthetic_survival_store(
            store, bags=args.bags, instances=(40, 200), dim=args.dim, seed=args.seed
        )
        labels.drop("keys").write_csv(Path(tmp) / "labels.csv")
        keys = labels["keys"].to_numpy().astype(float)
        cohort = load_cohort(store, Path(tmp) / "labels.csv", device="cpu")
        splits = _folds(cohort, args.folds, args.repeats, seed=0)
        y = cohort.y
        print(
            f"{args.bags} bags, {cohort.data.lengths.sum()} instances x {args.dim}, "
            f"{100 * (1 - y[:, 1].mean()):.0f} % censored; {args.folds}-fold x {args.repeats}, "
            f"{torch.get_num_threads()} CPU threads"
        )
        print(f"{'':<28} {'Harrell C':<15} {'Uno C':<7} {'seconds':>7}   C / baseline")
        oracle = _fold_scores(y, lambda train, test: keys[test], splits)
        print(_row("oracle (key count)", *oracle, None))
        pooled = _mean_pooled(store, cohort.data.bag_ids)
        baseline = _fold_scores(y, _cox_on_mean_pooled(pooled, y), splits)
        print(_row("baseline: Cox, mean-pooled", *baseline, None))
        reference = float(np.mean(baseline[0]))
        for loss in args.losses:
            cohort = load_cohort(store, Path(tmp) / "labels.csv", device="cpu", survival=SurvivalSpec(loss=loss))
            for head in heads:
                start = time.perf_counter()
                metrics, *_ = cross_validate(cohort, TrainConfig(head=head), args.folds, args.repeats)
                seconds = time.perf_counter() - start
                harrell = [f["c_index"] for f in metrics["folds"]]
                uno = [f["uno_c"] for f in metrics["folds"]]
                print(_row(f"{head} · {loss}", harrell, uno, seconds, reference), flush=True)


if __name__ == "__main__":
    main()

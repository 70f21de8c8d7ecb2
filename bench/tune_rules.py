"""Would another selection rule beat the defaults? Replays rules offline on the studies and the
outside scores that ``bench/tune_quality.py --every-trial`` left: for each outer fold, every
complete trial's out-of-fold outputs inside its study (what a rule may look at) and its refit's
outputs on the outer test bags (what the rule is judged by). A rule picks members from the inner
outputs alone; its outside AUC is that of the members' outside probabilities averaged, as
`predict` averages a blend's. Nothing is trained, so a rule costs seconds to try.

    python bench/tune_quality.py --datasets web_recommendation_1 --outer 3 --every-trial --json web.json
    python bench/tune_rules.py web.json --outer 3

Binary calibration sets only (the AUC of the positive class). Prints, per data set, each rule's
outside AUC fold by fold, their mean, the paired gain over the defaults (mean ± SE of the per-fold
differences) and the folds it won.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from sklearn.metrics import roc_auc_score

from milcache.aggregator.tasks import Task
from milcache.tuning.selection import _aligned, resampled_scores
from quality import bench_splits, load_dataset
from tune_quality import study_dir

GREEDY_STEPS = 20


@dataclass
class Fold:
    """One outer fold's study, seen as the rules see it."""

    inner: np.ndarray  # trials × study bags: out-of-fold probability of the positive class
    inner_y: np.ndarray
    values: np.ndarray  # each trial's inner score, as the study ranked them
    heads: list[str]
    defaults: int  # the defaults trial's row
    outside: np.ndarray  # trials × outer test bags: the refit's probability of the positive class
    outside_y: np.ndarray


Rule = Callable[[Fold], list[int]]  # a fold → its members' rows (repeats weigh a member more)


def top(k: int) -> Rule:
    def members(fold: Fold) -> list[int]:
        ranked = [int(r) for r in np.argsort(-fold.values) if r != fold.defaults]
        return [fold.defaults, *ranked[:k]]

    return members


def each_head_best(fold: Fold) -> list[int]:
    best: dict[str, int] = {}
    for row in np.argsort(-fold.values):
        best.setdefault(fold.heads[row], int(row))
    return list(best.values())


def greedy(fold: Fold) -> list[int]:
    """Caruana et al. (2004): from the defaults, add (with replacement) the trial whose addition
    makes the average's inner AUC highest."""
    members = [fold.defaults]
    for _ in range(GREEDY_STEPS):
        total = fold.inner[members].sum(0)
        candidates = (total + fold.inner) / (len(members) + 1)
        members.append(int(np.argmax([roc_auc_score(fold.inner_y, c) for c in candidates])))
    return members


def blend_if_sure(share: float) -> Rule:
    """The defaults and the best trial averaged when the blend beats the defaults on the bags left
    out by at least ``share`` of the bootstrap resamples (each resample's pick as the study would
    pick it); the defaults otherwise."""

    def members(fold: Fold) -> list[int]:
        outputs = np.stack([1 - fold.inner, fold.inner], axis=-1)
        bags = np.arange(len(fold.inner_y)).astype(object)  # a bag is its own patient
        scores = resampled_scores(outputs, fold.defaults, Task("binary", [0, 1]), "auc", fold.inner_y, bags)
        sure = np.mean(scores[:, 2] > scores[:, 1]) >= share  # the blend's column against the defaults'
        return [fold.defaults, int(np.argmax(fold.values))] if sure else [fold.defaults]

    return members


RULES: dict[str, Rule] = {
    "defaults": lambda fold: [fold.defaults],
    "best": lambda fold: [int(np.argmax(fold.values))],
    "defaults + best": top(1),
    "defaults + top 2": top(2),
    "defaults + top 4": top(4),
    "defaults + top 9": top(9),
    "all trials": lambda fold: list(range(len(fold.values))),
    "each head's best": each_head_best,
    "greedy ensemble": greedy,
    "blend if 60 % sure": blend_if_sure(0.6),
    "blend if 80 % sure": blend_if_sure(0.8),
}


def load_fold(directory: Path, tuned: dict, y: np.ndarray, test: np.ndarray) -> Fold:
    ranking = tuned["ranking"]
    databases = sorted(directory.glob("*.db"))
    if not databases:
        raise SystemExit(f"no study in {directory} (run tune_quality with the same options)")
    study = optuna.load_study(study_name="milcache", storage=f"sqlite:///{databases[0]}")
    trials = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    chosen = [trials[n] for n in ranking["numbers"]]
    bags = np.sort(chosen[0].user_attrs["out_of_fold"]["bags"])
    return Fold(
        inner=np.stack([_aligned(trial, bags)[:, 1] for trial in chosen]),
        inner_y=y[bags],
        values=np.array([t.value for t in chosen]),
        heads=[t.params.get("head") for t in chosen],
        defaults=next(i for i, t in enumerate(chosen) if t.user_attrs.get("defaults")),
        outside=np.array([np.asarray(o["outputs"])[:, 1] for o in ranking["outside"]]),
        outside_y=y[test],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scores", type=Path, help="tune_quality.py --every-trial --json's file")
    parser.add_argument("--outer", type=int, default=5, help="outer folds, as tune_quality ran")
    parser.add_argument("--trials", type=int, default=50, help="trials per study, as tune_quality ran")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--studies", type=Path, default=Path(".bench-cache/studies"))
    args = parser.parse_args()
    if args.outer < 2 or args.trials < 1:
        parser.error("--outer takes 2 or more, --trials 1 or more")
    if not args.scores.is_file():
        parser.error(f"{args.scores}: no such file (tune_quality.py --every-trial --json writes it)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, result in json.loads(args.scores.read_text()).items():
        if "ranking" not in result["tuned"][0]:
            raise SystemExit(f"{args.scores}: {name} was run without --every-trial")
        _, y = load_dataset(name, args.cache)
        splits = bench_splits(y, args.outer, 1, args.seed)[: len(result["tuned"])]
        folds = [
            load_fold(study_dir(args.studies, name, args.outer, args.trials, k), t, y, test)
            for k, (t, (_, test)) in enumerate(zip(result["tuned"], splits, strict=True))
        ]
        print(f"{name}: outside AUC of each rule, {len(folds)} outer folds")
        aucs = {
            rule: [roc_auc_score(f.outside_y, f.outside[pick(f)].mean(0)) for f in folds]
            for rule, pick in RULES.items()
        }
        for rule, values in aucs.items():
            gains = np.subtract(values, aucs["defaults"])
            spread = gains.std(ddof=1) / np.sqrt(len(gains)) if len(gains) > 1 else float("nan")
            per_fold = " ".join(f"{v:.3f}" for v in values)
            print(
                f"  {rule:20s} {per_fold}  mean {np.mean(values):.3f}  gain {gains.mean():+.3f} ± {spread:.3f}  "
                f"won {int((gains > 0).sum())} of {len(gains)}"
            )


if __name__ == "__main__":
    main()

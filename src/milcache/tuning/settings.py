"""Settings of a study: a plain dataclass, importable without torch (the CLI reads its names)."""

from __future__ import annotations

from dataclasses import dataclass

from milcache import checks
from milcache.aggregator.config import METRICS

PRUNERS = ("median", "hyperband", "none")
# Which trial a study keeps: "one-se" the calibrated defaults (its first trial) unless the best trial
# beats them by more than one standard error of its cross-validated score, "best" the best trial.
SELECTIONS = ("one-se", "best")


@dataclass
class TuneSettings:
    n_trials: int = 50
    timeout: float | None = None
    storage: str | None = None  # default: sqlite inside the run directory
    study_name: str = "milcache"
    metric: str = "auc"
    pruner: str = "median"
    jobs: int = 1
    resume: bool = False
    folds: int = 5
    repeats: int = 1  # of the inner CV: each trial's score averages folds × repeats (less noise on small cohorts)
    seed: int = 0
    holdout: float = 0.2  # of the bags (grouped, stratified), kept out of the study for an unbiased estimate
    skip_duplicates: bool = False  # leave out the near-duplicate instances `index dedup` marked
    selection: str = "one-se"  # one of SELECTIONS

    def __post_init__(self) -> None:
        checks.at_least("--n-trials", self.n_trials, 1)
        checks.above("--timeout", self.timeout, 0)
        checks.one_of("--pruner", self.pruner, PRUNERS)
        checks.one_of("--select", self.selection, SELECTIONS)
        checks.one_of("--metric", self.metric, METRICS)
        checks.at_least("--jobs", self.jobs, 1)
        checks.at_least("--folds", self.folds, 2)
        checks.at_least("--repeats", self.repeats, 1)
        checks.within("--holdout", self.holdout, 0.0, 0.5)

"""Settings of a study: a plain dataclass, importable without torch (the CLI reads its names)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from milcache import checks
from milcache.aggregator.config import METRICS

PRUNERS = ("median", "hyperband", "none")
# Which trial a study keeps (milcache.tuning.selection): "blend" (the default) the calibrated
# defaults (its first trial) and the best trial averaged unless that blend gains nothing over the
# defaults on out-of-bootstrap bags, "bootstrap" the defaults unless picking the best trial alone
# gains on them, "one-se" the defaults unless the best trial beats them by more than one standard
# error of its cross-validated score, "best" the best trial. The blend is the default because it
# risks least where a study's ranking is noise (README: "Does tune beat its defaults?").
SELECTIONS = ("blend", "bootstrap", "one-se", "best")
DEFAULT_SELECTION = SELECTIONS[0]
# On a small cohort a trial's score rests on a handful of test bags per inner fold, and the best of
# many trials is then mostly the luckiest. With repeats left to the cohort, the inner CV is repeated
# until its test folds hold at least this many bags together (at most MAX_AUTO_REPEATS times): 3
# repeats for ucsb_breast_cancer's 39-46 study bags, 2 for web_recommendation_1's 50-60, 1 from 100.
AUTO_REPEATS_BAGS = 100
MAX_AUTO_REPEATS = 5


@dataclass
class TuneSettings:
    n_trials: int = 50
    timeout: float | None = None
    storage: str | None = None  # default: sqlite inside the run directory
    study_name: str = "milcache"
    metric: str | None = None  # None: the task's own (auc; c_index for survival), see ``for_task``
    pruner: str = "median"
    jobs: int = 1
    resume: bool = False
    folds: int = 5
    repeats: int | None = None  # of the inner CV (each trial averages folds × repeats); None: from the cohort
    seed: int = 0
    holdout: float = 0.2  # of the bags (grouped, stratified), kept out of the study for an unbiased estimate
    skip_duplicates: bool = False  # leave out the near-duplicate instances `index dedup` marked
    selection: str = DEFAULT_SELECTION  # one of SELECTIONS

    def __post_init__(self) -> None:
        checks.at_least("--n-trials", self.n_trials, 1)
        checks.above("--timeout", self.timeout, 0)
        checks.one_of("--pruner", self.pruner, PRUNERS)
        checks.one_of("--select", self.selection, SELECTIONS)
        if self.metric is not None:
            checks.one_of("--metric", self.metric, METRICS)
        checks.at_least("--jobs", self.jobs, 1)
        checks.at_least("--folds", self.folds, 2)
        if self.repeats is not None:
            checks.at_least("--repeats", self.repeats, 1)
        checks.within("--holdout", self.holdout, 0.0, 0.5)

    def for_task(self, task_kind: str | None) -> TuneSettings:
        """These settings with the metric left to the task chosen: c_index for survival, else auc."""
        if self.metric is not None:
            return self
        return dataclasses.replace(self, metric="c_index" if task_kind == "survival" else "auc")

    def resolve(self, study_bags: int) -> TuneSettings:
        """These settings with the inner CV's repeats chosen from the number of study bags when
        left to the cohort (see AUTO_REPEATS_BAGS)."""
        if self.repeats is not None:
            return self
        repeats = min(MAX_AUTO_REPEATS, max(1, math.ceil(AUTO_REPEATS_BAGS / max(study_bags, 1))))
        return dataclasses.replace(self, repeats=repeats)

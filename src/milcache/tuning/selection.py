"""Which trial a study keeps (`milcache tune --select`), and how much keeping it is worth.

The best of many trials is optimistic: on a small cohort its inner-CV lead over the calibrated
defaults is partly the luck of being scored on the same few bags as its 49 rivals. Two rules weigh
that luck. "one-se" keeps the defaults unless the best trial leads by more than one standard error
of its cross-validated score. "bootstrap" asks the question directly, after the bootstrap bias
correction of Tsamardinos et al. (2018, "Bootstrapping the out-of-sample predictions for efficient
and accurate cross-validation"): every trial's out-of-fold outputs are resampled by patient; on
each resample the trial that scores best on the drawn bags is picked, as a study would pick it, and
scored beside the defaults on the bags left out. The mean of that difference is what picking the
best trial gains on bags no choice has seen; the defaults are kept unless it is positive.
"blend" (the default) hedges that bet: it keeps the defaults and the best trial together (their
outputs averaged) unless the blend, scored the same way, gains nothing over the defaults alone.
Where the study's ranking is noise, half the weight stays on the calibrated model; where the best
trial is better, the average of two good, different models is usually better than either. On the
calibration sets (bench/tune_quality.py) it lost least where the study's ranking was noise and
kept most of the gain where it was not.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from milcache.aggregator.config import MINIMISED
from milcache.aggregator.tasks import Task

BOOTSTRAP_SAMPLES = 300


def chosen_trial(study, metric: str, folds: int, selection: str, comparison: dict | None = None):
    """The trial whose configuration the study keeps, by ``selection`` (see the module's text).
    "bootstrap" needs ``comparison`` (from ``bootstrap_comparison``); without one (its trials, or
    its best trial, stored no out-of-fold outputs) it keeps what "one-se" keeps."""
    import optuna

    best = study.best_trial
    if selection == "best" or best.user_attrs.get("defaults"):
        return best
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    defaults = next((t for t in complete if t.user_attrs.get("defaults")), None)
    if defaults is None:
        return best
    if selection in ("bootstrap", "blend") and comparison is not None:
        return best if comparison["gain" if selection == "bootstrap" else "blend_gain"] > 0 else defaults
    spread = best.user_attrs.get("metrics", {}).get(f"{metric}_std")
    if spread is None or not np.isfinite(spread):
        return best
    # The std is the population one over all folds × repeats; repeats steady the mean's partition
    # noise, not the sampling noise of a cohort this size, so the folds alone set the error.
    standard_error = spread / np.sqrt(folds - 1)
    return defaults if abs(best.value - defaults.value) <= standard_error else best


def kept_trials(study, metric: str, folds: int, selection: str, comparison: dict | None = None) -> list:
    """The trials whose configurations the study keeps: ``chosen_trial``'s, and for "blend" the
    defaults trial before it when it is another (the two predict together). A blend needs the
    trials' out-of-fold outputs: without a comparison "blend" keeps what "one-se" keeps, alone."""
    chosen = chosen_trial(study, metric, folds, selection, comparison)
    if selection != "blend" or comparison is None or chosen.user_attrs.get("defaults"):
        return [chosen]
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [next(t for t in complete if t.user_attrs.get("defaults")), chosen]


def bootstrap_comparison(
    study, task: Task, y: np.ndarray, groups: np.ndarray, metric: str, seed: int = 0
) -> dict | None:
    """What keeping the study's best trial is worth against its defaults trial on bags no choice
    saw: {"gain", "tuned", "defaults", "blend", "blend_gain", "samples"}, means over
    out-of-bootstrap bags (the tuned one is the bias-corrected estimate of the study's pick, the
    blend one of its outputs averaged with the defaults'). ``y`` and ``groups`` are the cohort's,
    indexed by the bag numbers the trials stored. None when the study has no defaults trial, or
    it or the best trial stored no out-of-fold outputs (a resumed study's trial from an older
    milcache run): the resamples' picks would then not be the study's."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    defaults = next((t for t in complete if t.user_attrs.get("defaults")), None)
    if defaults is None or any("out_of_fold" not in t.user_attrs for t in (defaults, study.best_trial)):
        return None
    bags = np.sort(defaults.user_attrs["out_of_fold"]["bags"])
    outputs = [_aligned(t, bags) for t in complete]
    kept = [k for k, o in enumerate(outputs) if o is not None]  # trials of an older run may lack them
    if len(kept) < 2:
        return None
    outputs = np.stack([outputs[k] for k in kept])  # trials × bags × outputs
    first = kept.index(complete.index(defaults))
    scored = resampled_scores(outputs, first, task, metric, y[bags], groups[bags], seed)
    if not len(scored):
        return None
    sign = -1.0 if metric in MINIMISED else 1.0
    tuned, defaults_mean, blend = (float(v) for v in scored.mean(axis=0))
    return {
        "gain": sign * (tuned - defaults_mean),
        "tuned": tuned,
        "defaults": defaults_mean,
        "blend": blend,
        "blend_gain": sign * (blend - defaults_mean),
        "samples": len(scored),
    }


def resampled_scores(
    outputs: np.ndarray, defaults: int, task: Task, metric: str, y: np.ndarray, groups: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Per bootstrap resample of patients (``BOOTSTRAP_SAMPLES`` of them, those whose scores are
    all defined): the ``metric``, on the bags the resample leaves out, of the trial best on the
    bags it draws, of the defaults (row ``defaults`` of ``outputs``: trials × bags × outputs) and
    of the two averaged. Resamples × 3."""
    sign = -1.0 if metric in MINIMISED else 1.0
    scored = []
    for inside, outside in zip(*_resamples(groups, BOOTSTRAP_SAMPLES, seed), strict=True):
        scores = sign * _scores(task, metric, y[inside], outputs[:, inside])
        if not np.isfinite(scores).any():
            continue
        candidates = outputs[[int(np.nanargmax(scores)), defaults]][:, outside]
        candidates = np.concatenate([candidates, candidates.mean(0, keepdims=True)])
        left = _scores(task, metric, y[outside], candidates)
        if np.isfinite(left).all():
            scored.append(left)
    return np.array(scored).reshape(-1, 3)


def kept_score(kept: list, task: Task, y: np.ndarray, metric: str) -> float:
    """The cross-validated score of what a study keeps: its trial's value, or a blend's."""
    return kept[0].value if len(kept) == 1 else blend_score(kept, task, y, metric)


def blend_score(trials: list, task: Task, y: np.ndarray, metric: str) -> float:
    """``metric`` of the trials' out-of-fold outputs averaged (a blend's cross-validated score)."""
    bags = np.sort(trials[0].user_attrs["out_of_fold"]["bags"])
    outputs = np.mean([_aligned(t, bags) for t in trials], axis=0)
    return float(task.metrics(y[bags], outputs, only=metric)[metric])


def _aligned(trial, bags: np.ndarray) -> np.ndarray | None:
    """A trial's out-of-fold outputs in the order of ``bags`` (None if it scored other bags)."""
    stored = trial.user_attrs.get("out_of_fold")
    if stored is None or len(stored["bags"]) != len(bags):
        return None
    order = np.argsort(stored["bags"])
    if not np.array_equal(np.asarray(stored["bags"])[order], bags):
        return None
    return np.asarray(stored["outputs"], dtype=np.float64)[order]


def _resamples(groups: np.ndarray, samples: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bootstrap resamples of patients (a slide comes with the other slides of its patient): per
    resample, the drawn bag positions (with repeats) and the positions of the bags left out."""
    rng = np.random.default_rng(seed)
    _, group_of = np.unique(groups.astype(str), return_inverse=True)
    n_groups = group_of.max() + 1
    inside, outside = [], []
    for _ in range(samples):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of]
        inside.append(np.repeat(np.arange(len(groups)), counts))
        outside.append(np.flatnonzero(counts == 0))
    return inside, outside


def _scores(task: Task, metric: str, y: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """``metric`` of each trial's outputs (trials × bags × outputs) on bags ``y``: a binary AUC for
    all trials at once from ranks (the Mann-Whitney statistic), any other metric trial by trial."""
    if metric == "auc" and task.kind == "binary":
        positive = y == 1
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            return np.full(len(outputs), np.nan)
        ranks = rankdata(outputs[:, :, 1], axis=1)  # ties share their mean rank, as roc_auc_score counts them
        return (ranks[:, positive].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.array([task.metrics(y, o, only=metric)[metric] for o in outputs])

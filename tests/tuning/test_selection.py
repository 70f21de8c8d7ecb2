import numpy as np
import optuna
import pytest
from sklearn.metrics import roc_auc_score

from milcache.aggregator.tasks import Task
from milcache.tuning.selection import (
    _resamples,
    _scores,
    blend_score,
    bootstrap_comparison,
    chosen_trial,
    kept_trials,
)

BINARY = Task("binary", [0, 1])


def _study_of(out_of_fold: list[np.ndarray], bags: np.ndarray, y: np.ndarray, direction: str = "maximize"):
    """A study whose trial 0 is the defaults; each trial's value is its pooled out-of-fold AUC on
    ``y``, the labels of the study's bags ``bags``."""
    study = optuna.create_study(direction=direction)
    for number, positive in enumerate(out_of_fold):
        outputs = np.stack([1 - positive, positive], 1)
        study.add_trial(
            optuna.trial.create_trial(
                value=float(roc_auc_score(y, positive)),
                params={"x": float(number)},
                distributions={"x": optuna.distributions.FloatDistribution(0, 100)},
                user_attrs={
                    "defaults": number == 0,
                    "metrics": {"auc_std": 0.01},  # one-se would always keep the best here
                    "out_of_fold": {"bags": bags.tolist(), "outputs": outputs.tolist()},
                },
            )
        )
    return study


def test_picking_the_luckiest_of_many_noise_trials_gains_nothing_over_real_defaults():
    # 40 bags; the defaults have a modest real signal, 49 trials are noise, and the luckiest of
    # them scores above the defaults on these bags (what a small study's best trial often is).
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 20)
    bags = np.arange(40)
    defaults = 1 / (1 + np.exp(-(0.6 * (y - 0.5) + rng.normal(size=40))))
    noise = [rng.uniform(size=40) for _ in range(49)]
    study = _study_of([defaults, *noise], bags, y)
    assert study.best_trial.number != 0  # the lucky one leads inside the study
    comparison = bootstrap_comparison(study, BINARY, y, bags.astype(object), "auc", seed=1)
    assert comparison["gain"] < 0 and comparison["samples"] > 250
    assert comparison["tuned"] < study.best_value - 0.05  # corrected for the luck of the pick
    assert chosen_trial(study, "auc", 5, "bootstrap", comparison).number == 0
    assert chosen_trial(study, "auc", 5, "one-se", comparison).number == study.best_trial.number
    assert chosen_trial(study, "auc", 5, "best", comparison).number == study.best_trial.number
    assert comparison["blend_gain"] < 0  # half the weight on noise still loses to the defaults
    assert [t.number for t in kept_trials(study, "auc", 5, "blend", comparison)] == [0]


def test_a_trial_clearly_better_than_the_defaults_is_kept():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    bags = np.arange(100, 160)  # the study's bags need not start at 0: they index the cohort
    labels = np.zeros(160, dtype=np.int64)
    labels[bags] = y
    weak = 1 / (1 + np.exp(-(0.3 * (y - 0.5) + rng.normal(size=60))))
    strong = 1 / (1 + np.exp(-(3.0 * (y - 0.5) + rng.normal(size=60))))
    study = _study_of([weak, *[rng.uniform(size=60) for _ in range(10)], strong], bags, y)
    comparison = bootstrap_comparison(study, BINARY, labels, np.arange(160).astype(object), "auc")
    assert comparison["gain"] > 0.2
    assert chosen_trial(study, "auc", 5, "bootstrap", comparison).number == 11
    assert comparison["blend_gain"] > 0.1
    assert [t.number for t in kept_trials(study, "auc", 5, "blend", comparison)] == [0, 11]
    assert [t.number for t in kept_trials(study, "auc", 5, "bootstrap", comparison)] == [11]


def test_the_blend_comparison_equals_a_plain_bootstrap_of_averaged_outputs():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 15)
    bags = np.arange(30)
    trials = [1 / (1 + np.exp(-(s * (y - 0.5) + rng.normal(size=30)))) for s in (0.5, 1.0, 1.5, 0.2)]
    study = _study_of(trials, bags, y)
    comparison = bootstrap_comparison(study, BINARY, y, bags.astype(object), "auc", seed=3)
    blends, picks = [], []
    for inside, outside in zip(*_resamples(bags.astype(object), 300, seed=3), strict=True):
        if len(set(y[inside])) < 2 or len(set(y[outside])) < 2:
            continue
        inner = np.array([roc_auc_score(y[inside], t[inside]) for t in trials])
        pick = int(np.flatnonzero(inner >= inner.max() - 1e-12)[0])  # the first of tied trials
        picks.append(roc_auc_score(y[outside], trials[pick][outside]))
        blends.append(roc_auc_score(y[outside], (trials[pick][outside] + trials[0][outside]) / 2))
    assert comparison["samples"] == len(blends)
    assert comparison["tuned"] == pytest.approx(np.mean(picks))
    assert comparison["blend"] == pytest.approx(np.mean(blends))
    assert comparison["blend_gain"] == pytest.approx(np.mean(blends) - comparison["defaults"])
    kept = [study.trials[0], study.trials[2]]
    assert blend_score(kept, BINARY, y, "auc") == pytest.approx(roc_auc_score(y, (trials[0] + trials[2]) / 2))


def test_without_stored_outputs_bootstrap_keeps_what_one_se_keeps():
    study = optuna.create_study(direction="maximize")
    for number, value in enumerate((0.80, 0.90)):
        study.add_trial(
            optuna.trial.create_trial(value=value, user_attrs={"defaults": number == 0, "metrics": {"auc_std": 0.05}})
        )
    assert bootstrap_comparison(study, BINARY, np.zeros(4), np.arange(4), "auc") is None
    assert chosen_trial(study, "auc", 5, "bootstrap", None).number == 1  # 0.10 is 4 standard errors
    assert [t.number for t in kept_trials(study, "auc", 5, "blend", None)] == [1]  # no outputs to blend


def test_a_minimised_metric_gains_when_the_pick_is_lower():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 25)
    bags = np.arange(50)
    vague = np.full(50, 0.5) + rng.normal(scale=0.01, size=50)
    sharp = np.clip(np.where(y == 1, 0.9, 0.1) + rng.normal(scale=0.05, size=50), 0.01, 0.99)
    study = _study_of([vague, sharp], bags, y, direction="minimize")  # values are AUCs; only the outputs count
    comparison = bootstrap_comparison(study, BINARY, y, bags.astype(object), "log_loss")
    assert comparison["gain"] > 0.3 and comparison["tuned"] < comparison["defaults"]


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_scores_of_many_trials_at_once_equal_sklearn_with_ties_and_repeated_bags(kind):
    rng = np.random.default_rng(3)
    classes = [0, 1] if kind == "binary" else [0, 1, 2]
    task = Task(kind, classes)
    y = rng.integers(0, len(classes), 30)
    outputs = rng.dirichlet(np.ones(len(classes)), size=(4, 30)).round(1)  # rounding makes ties
    outputs /= outputs.sum(-1, keepdims=True)
    drawn = rng.integers(0, 30, 30)  # a bootstrap resample repeats bags
    got = _scores(task, "auc", y[drawn], outputs[:, drawn])
    for trial in range(4):
        expected = task.metrics(y[drawn], outputs[trial, drawn], only="auc")["auc"]
        assert got[trial] == pytest.approx(expected)


def test_a_patient_is_drawn_or_left_out_with_all_of_its_slides():
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4"], dtype=object)
    inside, outside = _resamples(groups, 50, seed=0)
    for drawn, left in zip(inside, outside, strict=True):
        assert set(drawn).isdisjoint(left) and set(drawn) | set(left) == set(range(7))
        for patient in ("p1", "p3"):
            slides = np.flatnonzero(groups == patient)
            counts = np.bincount(drawn, minlength=7)[slides]
            assert len(set(counts)) == 1  # every slide of the patient as often as the others


def test_a_best_trial_without_stored_outputs_is_judged_by_one_se_and_kept_alone():
    # A resumed study: its best trial came from an older milcache run that stored no out-of-fold
    # outputs, the others did. The bootstrap compared another pick, so it cannot judge this one,
    # and there is nothing to blend it with.
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 20)
    bags = np.arange(40)
    trials = [1 / (1 + np.exp(-(s * (y - 0.5) + rng.normal(size=40)))) for s in (1.0, 0.2, 0.4)]
    study = _study_of(trials, bags, y)
    study.add_trial(
        optuna.trial.create_trial(
            value=0.99,
            params={"x": 50.0},
            distributions={"x": optuna.distributions.FloatDistribution(0, 100)},
            user_attrs={"defaults": False, "metrics": {"auc_std": 0.01}},
        )
    )
    comparison = bootstrap_comparison(study, BINARY, y, bags.astype(object), "auc")
    assert comparison is None  # its resamples would pick among the other trials, not as the study did
    assert chosen_trial(study, "auc", 5, "bootstrap", comparison).number == 3  # one-se: far ahead
    assert [t.number for t in kept_trials(study, "auc", 5, "blend", comparison)] == [3]

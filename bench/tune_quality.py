"""Does `milcache tune` beat the defaults? Nested cross-validation on the calibration sets of
bench/quality.py: in each outer fold, a study of ``--trials`` trials (the default search space,
the defaults and every other head as its first trials, TPE, median pruning, 5 inner folds,
exactly what `milcache tune` runs) sees only the outer training bags; the configuration it keeps
(by each ``--select`` rule), refit on them as tune refits it, is scored on the outer test bags,
and so is the model `milcache train-head` makes with its defaults from the same bags (a CV for
the epochs, then a refit). No score of a study's choice is ever computed on bags the study saw,
so the comparison is unbiased; the study's own best inner-CV score is printed beside it to show
how optimistic it is.

    python bench/tune_quality.py --datasets mnist_bags,ucsb_breast_cancer --trials 50
    python bench/tune_quality.py --datasets protein --outer 3 --trials 20     # a quicker look
    python bench/tune_quality.py --datasets web_recommendation_1 --outer 3 --every-trial
    python bench/tune_quality.py --datasets web_recommendation_1 --outer 3 --outer-repeats 3  # less noise

Each row gives the AUC gain over the defaults fold by fold (mean ± standard error of the paired
differences), how many outer folds the tuned model won, and how often the study kept its defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.run import cross_validate, refit
from milcache.aggregator.trainer import infer
from milcache.tuning.selection import bootstrap_comparison, kept_score, kept_trials
from milcache.tuning.settings import SELECTIONS
from milcache.tuning.space import load_space
from milcache.tuning.study import (
    TuneSettings,
    _pruner,
    enqueue_start,
    make_objective,
    refit_kept,
    start_trials,
)
from quality import DATASETS, bench_splits, cohort_of, load_dataset


def _scores(cohort, model, config: TrainConfig, test: np.ndarray) -> dict:
    logits, _ = infer(model, cohort.data, test, config)
    return _metrics(cohort, logits, test)


def _metrics(cohort, logits: torch.Tensor, test: np.ndarray) -> dict:
    outputs = cohort.task.outputs(logits).cpu().numpy()
    metrics = cohort.task.metrics(cohort.y[test], outputs)
    return {**{k: metrics[k] for k in ("accuracy", "auc")}, "outputs": np.round(outputs, 5).tolist()}


def defaults_fold(cohort, train: np.ndarray, test: np.ndarray, seed: int) -> dict:
    """What `milcache train-head --head gated-attention` makes from ``train``: a 5-fold CV for the
    epochs, a refit on every training bag for their median."""
    config = TrainConfig(head="gated-attention", seed=seed)
    _, _, best_epochs, _ = cross_validate(cohort, config, 5, 1, bags=train)
    model = refit(cohort, config, int(np.median(best_epochs)), bags=train)
    return _scores(cohort, model, config, test)


def tuned_fold(
    cohort,
    train: np.ndarray,
    test: np.ndarray,
    trials: int,
    seed: int,
    studies: Path,
    repeats: int | None = None,
    every_trial: bool = False,
) -> dict:
    """What `milcache tune --n-trials N` makes from ``train``: the study (the defaults and every
    other head its first trials), then the refit of the trial each ``--select`` rule keeps: one study scores them all.
    The study is kept in ``studies`` (SQLite), so a rerun continues it, and reuses it once done.
    ``every_trial`` also refits every complete trial and scores it on ``test``: how well the
    study's ranking of its trials predicts their ranking on bags it never saw."""
    settings = TuneSettings(n_trials=trials, seed=seed, holdout=0.0, repeats=repeats).resolve(len(train))
    space = load_space(None)
    # The study's first trials name its file: a study begun another way is not continued as this one.
    start = hashlib.sha1(json.dumps(start_trials(space), sort_keys=True).encode()).hexdigest()[:8]
    studies.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{studies.resolve() / f'seed{seed}-repeats{settings.repeats}-start{start}.db'}",
        study_name="milcache",
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=_pruner(settings.pruner),
    )

    def said(study, trial) -> None:  # one line a trial: a study of 50 is long on a CPU
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        head = trial.params.get("head")
        value = "" if trial.value is None else f"{trial.value:.4f}"
        print(f"    trial {trial.number:3d} {trial.state.name:8s} {head!s:16s} {value:6s} {seconds:6.1f}s", flush=True)

    if not study.trials:
        enqueue_start(study, space, trials)
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):  # a killed run's trial
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(states=done))
    if remaining > 0:
        study.optimize(
            make_objective(cohort, space, settings, train), n_trials=remaining, catch=(RuntimeError,), callbacks=[said]
        )
    comparison = bootstrap_comparison(study, cohort.task, cohort.y, cohort.groups, settings.metric, seed)
    result = {"comparison": comparison}
    for selection in SELECTIONS:
        kept = kept_trials(study, settings.metric, settings.folds, selection, comparison)
        result[selection] = {
            **_metrics(cohort, refit_kept(kept, cohort, train, test), test),
            "inner_auc": kept_score(kept, cohort.task, cohort.y, settings.metric),
            "head": "+".join(TrainConfig.from_stored(t.user_attrs["config"]).head for t in kept),
            "trial": kept[-1].number,
            "repeats": settings.repeats,
        }
    if every_trial:
        result["ranking"] = _ranking(cohort, study, train, test)
    return result


def study_dir(studies: Path, name: str, outer: int, trials: int, fold: int) -> Path:
    """Where outer fold ``fold``'s study of data set ``name`` is kept (bench/tune_rules.py reads it)."""
    return studies / f"{name}-outer{outer}-trials{trials}-fold{fold}"


def _ranking(cohort, study, train: np.ndarray, test: np.ndarray) -> dict:
    """Every complete trial refit on ``train`` and scored on ``test``: the Spearman correlation of
    its inner-CV score with its outside AUC, and the outside AUC of the best and the median trial."""
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    outside = [_metrics(cohort, refit_kept([trial], cohort, train, test), test) for trial in complete]
    inner = [t.value for t in complete]
    auc = np.array([o["auc"] for o in outside])
    return {
        "numbers": [t.number for t in complete],
        "outside": outside,
        "trials": len(complete),
        "spearman": float(spearmanr(inner, auc).statistic),
        "best_outside": float(auc.max()),
        "median_outside": float(np.median(auc)),
    }


def _fold_line(defaults: dict, tuned: dict) -> str:
    line = f"defaults {defaults['accuracy']:.3f} / {defaults['auc']:.3f}"
    for selection in SELECTIONS:
        kept = tuned[selection]
        line += f"; {selection} trial {kept['trial']} {kept['head']} {kept['accuracy']:.3f} / {kept['auc']:.3f}"
        line += f" (inner {kept['inner_auc']:.3f})"
    comparison = tuned["comparison"]
    if comparison is not None:
        line += f"; bootstrap gain {comparison['gain']:+.3f} (blend {comparison['blend_gain']:+.3f})"
        line += f", tuned {comparison['tuned']:.3f}"
        line += f" vs defaults {comparison['defaults']:.3f} out of bootstrap"
    ranking = tuned.get("ranking")
    if ranking is not None:
        line += f"; {ranking['trials']} complete trials outside: median AUC {ranking['median_outside']:.3f}, "
        line += f"best {ranking['best_outside']:.3f}, Spearman of inner and outside {ranking['spearman']:+.2f}"
    return line


def _signed_mean_se(values) -> str:
    text = _mean_se(values)
    return text if text.startswith("-") else "+" + text


def _mean_se(values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return f"{values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--outer", type=int, default=5, help="outer folds")
    parser.add_argument(
        "--outer-repeats",
        type=int,
        default=1,
        help="repeats of the outer CV with other splits (an outer fold of a small set measures AUC to about "
        "±0.1; the first repeat's studies are those of a run without repeats)",
    )
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument(
        "--repeats", default="auto", help="of each study's inner CV, as tune --repeats: auto or a number"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--json", type=Path, help="also write every fold's scores here")
    parser.add_argument(
        "--studies", type=Path, default=Path(".bench-cache/studies"), help="where each outer fold's study is kept"
    )
    parser.add_argument(
        "--every-trial",
        action="store_true",
        help="also refit every complete trial and score it outside its study (how much its ranking means)",
    )
    args = parser.parse_args()
    if args.outer < 2 or args.outer_repeats < 1 or args.trials < 1:
        parser.error("--outer takes 2 or more, --outer-repeats and --trials 1 or more")
    repeats = None if args.repeats == "auto" else int(args.repeats)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    outer = f"{args.outer} outer folds" + (f" × {args.outer_repeats}" if args.outer_repeats > 1 else "")
    print(f"nested CV, {outer}, {args.trials} trials × {args.repeats} inner repeats, CPU ({threads})")
    header = f"{'data set':22s} {'selection':9s} | {'defaults acc':>13s} {'AUC':>13s} | {'tuned acc':>13s} "
    header += f"{'AUC':>13s} {'inner AUC':>13s} | {'AUC gain':>14s} {'tuned wins':>10s} {'kept defaults':>13s} "
    header += f"{'s':>6s}"
    print(header)
    print("-" * len(header))
    everything = {}
    for name in args.datasets.split(","):
        bags, y = load_dataset(name, args.cache)
        cohort = cohort_of(bags, y)
        splits = bench_splits(y, args.outer, args.outer_repeats, args.seed)  # repeat 0 first, as without repeats
        start = time.perf_counter()
        ours, tuned = [], []
        for k, (train, test) in enumerate(splits):
            ours.append(defaults_fold(cohort, train, test, args.seed + k))
            studies = study_dir(args.studies, name, args.outer, args.trials, k)
            tuned.append(
                tuned_fold(cohort, train, test, args.trials, args.seed + k, studies, repeats, args.every_trial)
            )
            print(f"  {name} fold {k}: {_fold_line(ours[-1], tuned[-1])}", flush=True)
        seconds = time.perf_counter() - start
        for selection in SELECTIONS:
            kept = [t[selection] for t in tuned]
            wins = sum(t["auc"] > d["auc"] for t, d in zip(kept, ours, strict=True))
            row = f"{name:22s} {selection:9s} | {_mean_se([d['accuracy'] for d in ours]):>13s} "
            row += f"{_mean_se([d['auc'] for d in ours]):>13s} | "
            row += f"{_mean_se([t['accuracy'] for t in kept]):>13s} {_mean_se([t['auc'] for t in kept]):>13s} "
            gains = [t["auc"] - d["auc"] for t, d in zip(kept, ours, strict=True)]  # paired, fold by fold
            row += f"{_mean_se([t['inner_auc'] for t in kept]):>13s} | {_signed_mean_se(gains):>14s} "
            row += f"{wins:>4d} of {len(splits):<3d} "
            row += f"{sum(t['trial'] == 0 for t in kept):>6d} of {len(splits):<3d} {seconds:6.0f}"
            print(row, flush=True)
        everything[name] = {"defaults": ours, "tuned": tuned, "seconds": seconds}
        if args.json:
            args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()

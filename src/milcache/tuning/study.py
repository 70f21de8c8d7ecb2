"""`milcache tune`: an Optuna study over aggregator heads on embeddings loaded once per process."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from milcache import checks
from milcache.aggregator.config import MINIMISED, TrainConfig
from milcache.aggregator.model import save_blend
from milcache.aggregator.plots import plot_kaplan_meier, pyplot
from milcache.aggregator.run import Cohort, cross_validate, load_cohort, planned_task, refit, train_head
from milcache.aggregator.splits import validation_split
from milcache.aggregator.survival import SurvivalSpec
from milcache.aggregator.tasks import Task, per_patient
from milcache.aggregator.trainer import infer
from milcache.errors import MilcacheError, OptionError
from milcache.tuning.selection import bootstrap_comparison, kept_score, kept_trials
from milcache.tuning.settings import PRUNERS, TuneSettings
from milcache.tuning.space import default_params, head_params, load_space, sample_config, swept_heads

if TYPE_CHECKING:  # optuna is imported where it is used: `import milcache` stays light
    from optuna.trial import FrozenTrial


def safe_url(url: str) -> str:
    """A storage URL fit to print: the password replaced by ***."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show only its scheme
        return url.split("://", 1)[0] + "://***"


_STORAGE_ATTEMPTS = 5


def open_storage(url: str):
    """A SQLAlchemy URL (sqlite:///…, postgresql://…) or ``journal:PATH`` (a journal file, which
    several processes on one machine or a shared file system can append to safely)."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise OptionError(f"--storage {url}: no folder {path.parent}; create it or give another path")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    import sqlalchemy.exc

    for attempt in range(_STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
            # Workers started together race to create optuna's tables and types in an empty
            # database ("already exists"; SQLite says so as an OperationalError, or finds the file
            # locked by the winner); the loser finds them made on its next try. Other operational
            # errors (a file that cannot be opened, a server down) are not a race.
            racing = not isinstance(exc, sqlalchemy.exc.OperationalError) or any(
                sign in str(exc) for sign in ("already exists", "database is locked")
            )
            if not racing:
                raise MilcacheError(
                    f"cannot open the study storage {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                ) from None
            if attempt + 1 == _STORAGE_ATTEMPTS:
                raise MilcacheError(
                    f"cannot create the study tables in {safe_url(url)}: {str(exc).splitlines()[0]}"
                ) from None
            time.sleep(0.5 + random.random())
        except Exception as exc:  # driver missing, server down, bad credentials …
            raise MilcacheError(
                f"cannot open the study storage {safe_url(url)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None
    raise AssertionError("unreachable")


def _pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise MilcacheError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


def _finished(study) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _fail_interrupted(study) -> int:
    """Trials left RUNNING by a killed process of ours become FAIL, so the study can go on."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(running)


_MAX_FAILURES_IN_A_ROW = 5


def _stop_after_failures(limit: int):
    """A callback that stops the study after ``limit`` failed trials in a row (a systematic error)."""
    import optuna

    streak = [0]

    def callback(study, trial) -> None:
        streak[0] = streak[0] + 1 if trial.state == optuna.trial.TrialState.FAIL else 0
        if streak[0] >= limit:
            study.stop()

    return callback


class TrialBar:
    """One bar over the study's trials that moves with every fold-epoch a trial finishes, so its
    rate and ETA are right long before the first trial ends; a pruned or failed trial jumps to
    its end. Shows the best value so far. Safe with ``--jobs`` > 1 (trials run in threads)."""

    def __init__(self, trials: int, metric: str, enabled: bool) -> None:
        import threading

        from tqdm import tqdm

        bar_format = "{l_bar}{bar}| {n:.1f}/{total_fmt} trials [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        self._bar = tqdm(total=trials, desc="tune", unit="trial", disable=not enabled, bar_format=bar_format)
        self._metric = metric
        self._lock = threading.Lock()
        self._done: dict[int, float] = {}  # trial number -> fraction of it reported
        self.trials = 0.0  # trials' worth of work finished (tqdm counts nothing when disabled)

    def epochs(self, trial: int, done: int, total: int) -> None:
        with self._lock:
            step = min(done / max(total, 1), 1.0 - self._done.get(trial, 0.0))
            self._done[trial] = self._done.get(trial, 0.0) + step
            self._advance(step)

    def finished(self, study, trial) -> None:
        """An optuna callback: the rest of the trial (a failed one is taken back: another trial
        replaces it), and the best value in the bar's postfix."""
        import optuna

        with self._lock:
            done = self._done.pop(trial.number, 0.0)
            self._advance(-done if trial.state == optuna.trial.TrialState.FAIL else 1.0 - done)
            with contextlib.suppress(ValueError):  # no trial completed yet
                self._bar.set_postfix_str(f"best {self._metric} {study.best_value:.4f}", refresh=False)
            self._bar.refresh()

    def _advance(self, trials: float) -> None:
        self.trials += trials
        self._bar.update(trials)

    def close(self) -> None:
        self._bar.close()


def make_objective(
    cohort: Cohort, space: dict, settings: TuneSettings, bags: np.ndarray | None = None, bar: TrialBar | None = None
):
    import optuna

    settings = settings.for_task(cohort.task.kind)

    def objective(trial: optuna.Trial) -> float:
        config = sample_config(trial, space, settings.seed)
        trial.set_user_attr("config", {**config.to_dict()})
        on_epoch = None if bar is None else (lambda done, total: bar.epochs(trial.number, done, total))
        # The first trials (the defaults, one of each head) run to the end: a pruner judging them by
        # their early epochs would rule out a slow-starting head (noisy-and) for the whole study.
        prunable = not (trial.user_attrs.get("defaults") or trial.user_attrs.get("sweep"))

        def report(step: int, value: float) -> None:
            if np.isfinite(value):
                trial.report(float(value), step)
            if prunable and trial.should_prune():
                raise optuna.TrialPruned()

        try:
            metrics, out_of_fold, best_epochs, _ = cross_validate(
                cohort,
                config,
                settings.folds,
                settings.repeats,
                report,
                settings.metric,
                bags=bags,
                on_epoch=on_epoch,
            )
        except RuntimeError as exc:  # out of memory and friends: a failed trial, and the study goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        value = metrics[settings.metric]  # a metric of this task (checked before the study ran)
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if k != "folds"})
        trial.set_user_attr("epochs", int(np.median(best_epochs)))  # what a refit of this trial trains for
        trial.set_user_attr("out_of_fold", out_of_fold_outputs(cohort, out_of_fold))
        return float(value)

    return objective


def out_of_fold_outputs(cohort: Cohort, table: pl.DataFrame) -> dict:
    """A trial's out-of-fold outputs, each bag's averaged over the repeats, stored with the trial
    (4 decimals: a few bytes a bag) for the bootstrap selection: {"bags": cohort indices, "outputs"}."""
    columns = cohort.task.output_columns
    mean = table.group_by("bag_id", maintain_order=True).agg(pl.col(columns).mean())
    index = {bag_id: i for i, bag_id in enumerate(cohort.data.bag_ids)}
    return {
        "bags": [index[b] for b in mean["bag_id"]],
        "outputs": np.round(mean.select(columns).to_numpy(), 4).tolist(),
    }


def tune(
    store_dir: str | Path,
    labels: str | Path,
    out: str | Path,
    settings: TuneSettings,
    space_file: str | Path | None = None,
    fixed: dict | None = None,
    task_kind: str | None = None,
    device: str = "auto",
    progress: bool = False,
    classes: list | None = None,
    *,
    survival: SurvivalSpec | None = None,
) -> dict:
    """Run (or resume) a study, then write best.json, trials.parquet, plots and RUN/best/.

    ``settings.holdout`` of the bags (grouped by patient, stratified) never reach the study: the
    best configuration, refit on the study's bags, is scored on them, an unbiased estimate beside
    the study's best cross-validated score (which the choice among trials makes optimistic)."""
    import optuna

    out = checks.output_dir(out)
    task_kind = planned_task(labels, task_kind, "label", survival)
    settings = settings.for_task(task_kind)
    if task_kind == "survival":  # known from the table's header: refused before the study is made
        _check_metric(settings.metric, Task("survival", [], survival or SurvivalSpec()))
    space = load_space(space_file, fixed, task_kind=task_kind)
    out.mkdir(parents=True, exist_ok=True)
    url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = open_storage(url)
    direction = "minimize" if settings.metric in MINIMISED else "maximize"
    exists = settings.study_name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    shared = settings.storage is not None
    if exists and not (settings.resume or shared):
        raise MilcacheError(
            f"study {settings.study_name!r} already exists in {safe_url(url)}; "
            "use --resume to continue it or another --study-name"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = _create_if_new(storage, settings.study_name, direction)
    study = optuna.load_study(
        storage=storage,
        study_name=settings.study_name,
        sampler=optuna.samplers.TPESampler(seed=None if shared else settings.seed),
        pruner=_pruner(settings.pruner),
    )
    if settings.resume and not shared:
        _fail_interrupted(study)
    if created or not shared:  # one worker of a shared study: Optuna's skip_if_exists is no lock
        enqueue_start(study, space, settings.n_trials)
    _check_scoring(study, settings, url)  # what the options fix, before the cohort is read
    start = time.perf_counter()
    cohort = load_cohort(
        store_dir,
        labels,
        task_kind,
        device,
        progress=progress,
        classes=classes,
        skip_duplicates=settings.skip_duplicates,
        survival=survival,
    )
    try:
        _check_metric(settings.metric, cohort.task)
    except MilcacheError:
        if created and not study.trials[1:]:  # made by this run for nothing: a corrected rerun starts anew
            optuna.delete_study(study_name=settings.study_name, storage=storage)
        raise
    study_bags, held_out = holdout_split(cohort, settings.holdout, settings.seed)
    settings = settings.resolve(len(study_bags))
    _check_scoring(study, settings, url)  # and the repeats chosen from the cohort
    remaining = settings.n_trials - _finished(study)
    if remaining > 0:
        bar = TrialBar(remaining, settings.metric, progress)
        # No trial count here: the callbacks stop once n_trials are finished, so a failed trial is
        # replaced by another, and a run of failures stops the study instead of looping.
        try:
            study.optimize(
                make_objective(cohort, space, settings, study_bags, bar),
                n_trials=None,
                timeout=settings.timeout,
                n_jobs=settings.jobs,
                catch=(RuntimeError,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(
                        settings.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                    ),
                    _stop_after_failures(_MAX_FAILURES_IN_A_ROW),
                    bar.finished,
                ],
            )
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    summary, kept = _report(study, cohort, store_dir, labels, out, settings, task_kind, device, seconds, progress)
    summary["holdout"] = _holdout_estimate(kept, cohort, study_bags, held_out, settings, out)
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_metric(metric: str, task: Task) -> None:
    if metric not in task.metric_names:
        raise MilcacheError(
            f"--metric {metric!r} is not computed for a {task.kind} task; use one of {', '.join(task.metric_names)}"
        )


def _create_if_new(storage, name: str, direction: str) -> bool:
    """Creates the study unless it exists; True for the one process that created it. The storage
    makes this atomic (a unique name in a database, the first entry in a journal), so among workers
    starting a shared study together exactly one gets True."""
    import optuna

    try:
        storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], name)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


# What makes two trials' values comparable: every run of a study (a resume, a worker sharing it)
# must score its trials the same way.
_SCORING = ("metric", "folds", "repeats", "holdout", "seed", "skip_duplicates")


def _check_scoring(study, settings: TuneSettings, url: str) -> None:
    """Records how the study scores its trials on its first run, and refuses a run that would
    score them otherwise: its values would be compared with the others' and the wrong trial kept.
    Settings still to be chosen from the cohort (None) are not compared, nor recorded."""
    wanted = {name: getattr(settings, name) for name in _SCORING}
    recorded = study.user_attrs.get("scoring")
    if recorded is None and None in wanted.values():
        return
    if recorded is None:  # a new study, or one made before this record: from now on, these settings
        study.set_user_attr("scoring", wanted)
        recorded = study.user_attrs["scoring"]  # read back: a worker starting at once may have won
    differ = [
        f"--{n.replace('_', '-')} {recorded[n]} (this run: {wanted[n]})"
        for n in _SCORING
        if n in recorded and wanted[n] is not None and recorded[n] != wanted[n]
    ]
    if differ:
        raise MilcacheError(
            f"study {settings.study_name!r} in {safe_url(url)} scores its trials with {'; '.join(differ)}: "
            "run with its settings, or start another --study-name"
        )


def enqueue_start(study, space: dict, trials: int | None = None) -> None:
    """The study's first trials: the calibrated defaults (the baseline every other trial must beat,
    and the one ``chosen_trial`` may keep), then every other head the space searches, each with
    its default options and the default training settings. The sweep stands in for the sampler's
    random start-up trials: ten random draws over ten heads often miss the head that suits a data
    set, and TPE, which samples near what it has seen, may then never try it (on one of
    web_recommendation_1's outer folds 50 trials never tried noisy-and, the best head of the other
    two). No pruner stops them (see ``make_objective``). At most ``trials`` are enqueued (a short
    study runs no more than it asked for; a resume asking for more enqueues the rest). Of workers
    sharing a study only its creator calls this, so each runs once."""
    for params, marks in start_trials(space)[:trials]:
        study.enqueue_trial(params, user_attrs=marks, skip_if_exists=True)


def start_trials(space: dict) -> list[tuple[dict, dict]]:
    """What ``enqueue_start`` enqueues: (parameters, user attributes) of each first trial."""
    defaults = default_params(space)
    first = [] if defaults is None else [(defaults, {"defaults": True})]
    return first + [(head_params(space, head), {"sweep": True}) for head in swept_heads(space)]


def holdout_split(cohort: Cohort, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(study bags, held-out bags): grouped by patient and stratified, the same on every worker."""
    every = np.arange(len(cohort.y))
    if cohort.split is not None and fraction > 0:  # a fixed split column: its test bags are the held-out part
        test = np.char.lower(cohort.split.astype(str)) == "test"
        return every[~test], every[test]
    study, held_out = validation_split(cohort.task.strata(cohort.y), cohort.groups, every, fraction, seed + 7919)
    return study, held_out


def _holdout_estimate(
    kept: list, cohort: Cohort, study_bags: np.ndarray, held_out: np.ndarray, settings, out: Path
) -> dict | None:
    """The kept trials' configurations refit on the study's bags and scored on the held-out ones
    (for survival, per patient, with the Kaplan–Meier curves of their risk groups in
    kaplan_meier_holdout.png)."""
    if not len(held_out):
        return None
    outputs = cohort.task.outputs(refit_kept(kept, cohort, study_bags, held_out)).cpu().numpy()
    y, groups = cohort.y[held_out], cohort.groups[held_out]
    metrics = cohort.task.metrics(y, outputs, groups=groups)
    estimate = {"bags": len(held_out), "metrics": metrics, "value": metrics.get(settings.metric)}
    if cohort.task.kind == "survival":
        y, outputs = per_patient(y, outputs, groups)
        estimate["kaplan_meier"] = plot_kaplan_meier(
            y[:, 0],
            y[:, 1],
            outputs[:, 0],
            out / "kaplan_meier_holdout.png",
            title=f"held-out risk · {len(y)} patients",
            groups=cohort.task.survival.risk_groups,
        )
    return estimate


def refit_kept(kept: list, cohort: Cohort, bags: np.ndarray, scored: np.ndarray):
    """The kept trials' configurations refit on ``bags`` as tune refits them, and their logits on
    ``scored`` (a blend's combined as predict combines them)."""
    logits = []
    for trial in kept:
        config = TrainConfig.from_stored(trial.user_attrs["config"])
        model = refit(cohort, config, int(trial.user_attrs.get("epochs", config.epochs)), bags=bags)
        logits.append(infer(model, cohort.data, scored, config)[0])
    return logits[0] if len(logits) == 1 else cohort.task.combine_streams(logits)


def _report(
    study, cohort, store_dir, labels, out: Path, settings, task_kind, device, seconds: float, progress: bool = False
) -> tuple[dict, list[FrozenTrial]]:
    """best.json, the trials' table and plots, and RUN/best; returns the summary and the kept trials."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise MilcacheError(f"no trial of study {settings.study_name!r} completed; see {out / 'trials.parquet'}")
    table = trials_table(study)
    table.write_parquet(out / "trials.parquet")
    best = study.best_trial
    # Chosen once, here: a worker sharing the study may finish a better trial meanwhile, and
    # best.json, RUN/best and the held-out estimate must all be of the same configuration.
    comparison = bootstrap_comparison(study, cohort.task, cohort.y, cohort.groups, settings.metric, settings.seed)
    kept = kept_trials(study, settings.metric, settings.folds, settings.selection, comparison)
    chosen = kept[-1]
    config = TrainConfig.from_stored(chosen.user_attrs["config"])
    blended = len(kept) > 1
    summary = {
        "metric": settings.metric,
        "value": kept_score(kept, cohort.task, cohort.y, settings.metric),
        "trial": chosen.number,
        "defaults": bool(chosen.user_attrs.get("defaults")),
        "blend": [t.number for t in kept] if blended else None,
        "selection": settings.selection,
        "best_trial": {
            "trial": best.number,
            "value": best.value,
            "head": TrainConfig.from_stored(best.user_attrs["config"]).head,
        },
        "bootstrap": comparison,
        "head": config.head,
        "config": config.to_dict(),
        "metrics": chosen.user_attrs.get("metrics", {}),
        "trials": {state: int((table["state"] == state).sum()) for state in ("COMPLETE", "PRUNED", "FAIL")},
        "folds": settings.folds,
        "repeats": settings.repeats,
        "seconds": round(seconds, 1),
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    plot_history(table, settings.metric, out / "history.png")
    plot_importances(study, out / "importances.png")
    _write_kept(kept, out / "best", cohort, store_dir, labels, settings, task_kind, device, progress)
    return summary, kept


def _write_kept(kept: list, best_dir: Path, cohort, store_dir, labels, settings, task_kind, device, progress) -> None:
    """RUN/best: the kept configuration retrained as train-head would (its own CV, its own bar,
    after the trials'), or for a blend each member so in a subdirectory and blend.json naming them.
    What an earlier run of the study left there goes first: a stale blend.json would outrank it."""
    if best_dir.is_dir():
        shutil.rmtree(best_dir)
    members = [""] if len(kept) == 1 else [_member_name(t) for t in kept]
    for trial, member in zip(kept, members, strict=True):
        config = TrainConfig.from_stored(trial.user_attrs["config"])
        train_head(
            store_dir,
            labels,
            best_dir / member,
            config,
            settings.folds,
            settings.repeats,
            task_kind,
            device,
            cohort=cohort,
            progress=progress,
        )
    if len(kept) > 1:
        save_blend(best_dir, members)


def _member_name(trial) -> str:
    return "defaults" if trial.user_attrs.get("defaults") else f"trial-{trial.number}"


def trials_table(study) -> pl.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "seconds": seconds,
                "params": json.dumps(t.params),
                "head": t.params.get("head"),
                "error": t.user_attrs.get("error"),  # why a trial failed (out of memory …)
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "number": pl.Int64,
            "state": pl.Utf8,
            "value": pl.Float64,
            "seconds": pl.Float64,
            "params": pl.Utf8,
            "head": pl.Utf8,
            "error": pl.Utf8,
        },
    )


def plot_history(table: pl.DataFrame, metric: str, path: Path) -> None:
    plt = pyplot()
    done = table.filter(pl.col("state") == "COMPLETE").sort("number")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    values = done["value"].to_numpy()
    best = np.minimum.accumulate(values) if metric in MINIMISED else np.maximum.accumulate(values)
    ax.scatter(done["number"], values, s=14, label="trial")
    ax.step(done["number"], best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"optimisation history ({len(done)} complete of {table.height})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_importances(study, path: Path) -> None:
    import optuna

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        with warnings.catch_warnings():  # optuna warns about sparse regimes; the plot says enough
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # too few trials, or a single parameter value
        importances = {}
        ax.text(0.5, 0.5, f"parameter importances unavailable:\n{exc}", ha="center", va="center", wrap=True)
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (optuna's default evaluator)", title="parameter importances")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

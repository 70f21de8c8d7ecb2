import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import polars as pl
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.heads import list_heads
from milcache.aggregator.model import load_model
from milcache.aggregator.run import load_cohort, train_head
from milcache.cli import cli
from milcache.errors import MilcacheError
from milcache.store.synthetic import make_synthetic_store
from milcache.tuning.selection import chosen_trial, kept_score
from milcache.tuning.space import _admits, default_params, load_space, sample_config
from milcache.tuning.study import TuneSettings, enqueue_start, safe_url, start_trials, tune

POSTGRES_URL = os.environ.get(
    "MILCACHE_TEST_POSTGRES_URL", "postgresql+psycopg://milcache:milcache@127.0.0.1:5432/milcache"
)
SMALL = {"epochs": 8, "instances": 0}  # fixed: every trial short, all instances


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    labels = make_synthetic_store(root / "store", bags=100, instances=(8, 30), dim=16, seed=3, signal=2.0)
    labels.write_csv(root / "labels.csv")
    return root


def _tune_command(cohort, out, *extra):
    return [
        sys.executable,
        "-m",
        "milcache.cli",
        "tune",
        "--store",
        str(cohort / "store"),
        "--labels",
        str(cohort / "labels.csv"),
        "--out",
        str(out),
        "--folds",
        "2",
        "--set",
        "epochs=3",  # the subprocess tests check the study's bookkeeping, not its quality
        "--set",
        "instances=0",
        "--device",
        "cpu",
        *extra,
    ]


def test_study_beats_mean_pooling_and_best_rebuilds(cohort, tmp_path):
    baseline = train_head(
        cohort / "store",
        cohort / "labels.csv",
        tmp_path / "mean",
        TrainConfig(head="mean", epochs=8, instances=None),
        folds=2,
        device="cpu",
    )
    settings = TuneSettings(n_trials=8, folds=2, pruner="none", holdout=0.0)  # the same bags as the baseline
    best = tune(cohort / "store", cohort / "labels.csv", tmp_path / "study", settings, fixed=SMALL, device="cpu")
    assert best["value"] > baseline["auc"]
    assert best["holdout"] is None
    for name in ("best.json", "trials.parquet", "history.png", "importances.png", "study.db"):
        assert (tmp_path / "study" / name).is_file(), name
    saved = json.loads((tmp_path / "study" / "best.json").read_text())
    # The default rule may keep a blend: the kept trial is then the member beside the defaults.
    kept_dir = tmp_path / "study" / "best" / (f"trial-{saved['trial']}" if saved["blend"] else "")
    _, config, _ = load_model(kept_dir)
    assert config["head"] == saved["head"]
    chosen = {k: v for k, v in saved["config"].items() if v is not None}  # None: resolved from the cohort
    assert {k: config["train"][k] for k in chosen} == chosen
    assert config["train"]["batch_size"] is not None and config["train"]["val_fraction"] is not None
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            str(tmp_path / "study" / "best"),
            "--store",
            str(cohort / "store"),
            "--out",
            str(tmp_path / "p.csv"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(MilcacheError, match="already exists.*--resume"):
        tune(cohort / "store", cohort / "labels.csv", tmp_path / "study", settings, fixed=SMALL, device="cpu")


def _finished(storage, name="milcache"):
    study = optuna.load_study(study_name=name, storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(states=states))


def test_killed_study_resumes_to_the_asked_number_of_trials(cohort, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _tune_command(cohort, out, "--n-trials", "6"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    deadline = time.time() + 180
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            if _finished(url) >= 2:
                break
        except (KeyError, Exception):  # the study is not created yet
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _finished(url)
    assert 2 <= done < 6
    result = subprocess.run(
        _tune_command(cohort, out, "--n-trials", "6", "--resume"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert _finished(url) == 6 and (out / "best" / "model.safetensors").is_file()
    trials = optuna.load_study(study_name="milcache", storage=url).trials
    assert [t.number for t in trials if t.user_attrs.get("defaults")] == [0]  # not enqueued again on resume


def _two_workers(cohort, tmp_path, storage):
    commands = [
        _tune_command(
            cohort, tmp_path / f"worker{i}", "--n-trials", "4", "--storage", storage, "--study-name", "shared"
        )
        for i in range(2)
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate(timeout=400) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
    return outputs


def test_two_processes_share_one_journal_study(cohort, tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    _two_workers(cohort, tmp_path, storage)
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(
        study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    )
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) >= 4  # both stop once four are finished (one may finish its last running trial)
    assert len(study.trials) < 8
    assert sum(bool(t.user_attrs.get("defaults")) for t in study.trials) == 1  # enqueued once, not per worker
    assert study.user_attrs["scoring"]["folds"] == 2  # how its trials are scored, for later joiners and resumes


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_of_workers_opening_one_study_together_exactly_one_creates_it(tmp_path, kind):
    # The one that creates it enqueues the defaults: Optuna's enqueue_trial(skip_if_exists=True) is
    # a check then an add, so two workers both enqueuing could both add it (this test's flakiness
    # before). Workers wait for a start file so that their create calls overlap.
    url = f"journal:{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    go = tmp_path / "go"
    code = (
        "import os, time; from milcache.tuning.study import open_storage, _create_if_new\n"
        f"storage = open_storage({url!r})\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "print(_create_if_new(storage, 'shared', 'maximize'))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(3)  # every worker has imported and opened the storage
    go.touch()
    answers = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(answers) == ["False", "False", "False", "True"]


def test_a_worker_that_loses_sqlites_race_to_create_the_tables_retries_and_other_errors_do_not(tmp_path, monkeypatch):
    """SQLite reports the schema race of workers started together as an OperationalError ("table …
    already exists", or the file locked): retried, as PostgreSQL's IntegrityError is. A file that
    cannot be opened is not a race: refused at once, naming the storage."""
    import sqlalchemy.exc

    import milcache.tuning.study as study_module

    calls, real = [], optuna.storages.RDBStorage

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert study_module.open_storage(url) is not None and len(calls) == 2

    def unopenable(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception("unable to open database file"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", unopenable)
    with pytest.raises(MilcacheError, match="cannot open the study storage sqlite:///.*unable to open database file"):
        study_module.open_storage(url)
    assert len(calls) == 1


def _postgres_reachable() -> str | None:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return None
    except Exception as exc:  # driver missing, no server, refused
        return f"no PostgreSQL server at {safe_url(POSTGRES_URL)} ({type(exc).__name__}); .ci/postgres starts one"


@pytest.mark.skipif(_postgres_reachable() is not None, reason=str(_postgres_reachable()))
def test_two_processes_share_one_postgres_study(cohort, tmp_path):
    import sqlalchemy

    with sqlalchemy.create_engine(POSTGRES_URL).begin() as conn:  # a clean database for this test
        conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    outputs = _two_workers(cohort, tmp_path, POSTGRES_URL)
    assert all("milcache:***@" in out for out, _ in outputs)  # the password is never printed
    assert all("milcache:milcache@" not in out + err for out, err in outputs)
    assert _finished(POSTGRES_URL, "shared") >= 4


def test_space_file_narrows_and_validates(tmp_path):
    (tmp_path / "space.toml").write_text(
        'head = ["attention", "mean"]\nlr = {type = "float", low = 1e-3, high = 1e-2}\n'
    )
    space = load_space(tmp_path / "space.toml", {"epochs": 5})
    assert space["head"] == ["attention", "mean"] and space["epochs"] == 5 and space["lr"]["low"] == 1e-3
    (tmp_path / "bad.yaml").write_text("head: [nope]\n")
    with pytest.raises(MilcacheError, match="unknown head 'nope'"):
        load_space(tmp_path / "bad.yaml")


def test_safe_url_hides_passwords():
    assert safe_url("postgresql+psycopg://bob:s3cret@db.example:5432/studies") == (
        "postgresql+psycopg://bob:***@db.example:5432/studies"
    )
    assert "s3cret" not in safe_url("postgresql://bob:s3cret@host/db")


def test_a_failed_trial_is_recorded_and_the_study_goes_on(cohort, tmp_path, monkeypatch):
    import milcache.tuning.study as study_module

    real = study_module.cross_validate
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "cross_validate", flaky)
    settings = TuneSettings(n_trials=3, folds=2, pruner="none")
    best = tune(
        cohort / "store", cohort / "labels.csv", tmp_path / "s", settings, fixed={**SMALL, "epochs": 3}, device="cpu"
    )
    assert best["trials"] == {"COMPLETE": 3, "PRUNED": 0, "FAIL": 1}
    trials = pl.read_parquet(tmp_path / "s" / "trials.parquet")
    assert "out of memory (simulated)" in trials.filter(pl.col("state") == "FAIL")["error"][0]


@pytest.mark.skipif(_postgres_reachable() is not None, reason=str(_postgres_reachable()))
def test_workers_started_together_on_an_empty_database_all_open_it():
    import sqlalchemy

    code = f"from milcache.tuning.study import open_storage; open_storage({POSTGRES_URL!r})"
    for _ in range(3):  # the table-creation race shows up in some rounds only
        with sqlalchemy.create_engine(POSTGRES_URL).begin() as conn:
            conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr


def test_study_never_sees_its_held_out_bags_and_scores_the_best_on_them(cohort, tmp_path, monkeypatch):
    import milcache.tuning.study as study_module

    seen = set()
    real = study_module.cross_validate

    def watching(cohort_, config, *args, bags=None, **kwargs):
        seen.update(np.asarray(bags).tolist())
        return real(cohort_, config, *args, bags=bags, **kwargs)

    monkeypatch.setattr(study_module, "cross_validate", watching)
    settings = TuneSettings(n_trials=3, folds=2, pruner="none", holdout=0.25)
    best = tune(cohort / "store", cohort / "labels.csv", tmp_path / "study", settings, fixed=SMALL, device="cpu")
    held = best["holdout"]
    assert held["bags"] == 25 and 0.0 <= held["value"] <= 1.0
    loaded = study_module.load_cohort(cohort / "store", cohort / "labels.csv", device="cpu")
    study_bags, held_out = study_module.holdout_split(loaded, 0.25, 0)
    assert len(held_out) == 25 and not seen & set(held_out.tolist())  # the study trained on none of them
    assert json.loads((tmp_path / "study" / "best.json").read_text())["holdout"]["bags"] == 25


def test_one_bar_over_the_trials_moves_with_every_fold_epoch(cohort, tmp_path, monkeypatch, capsys):
    import milcache.tuning.study as study_module

    real = study_module.cross_validate
    seen: list[tuple[int, int]] = []  # (done, total) as the bar heard them
    calls = []

    def flaky(*args, on_epoch=None, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            on_epoch(2, 6)  # a third of the trial done, then it fails: the bar takes it back
            raise RuntimeError("CUDA out of memory (simulated)")

        def heard(done, total):
            seen.append((done, total))
            on_epoch(done, total)

        return real(*args, on_epoch=heard, **kwargs)

    monkeypatch.setattr(study_module, "cross_validate", flaky)
    settings = TuneSettings(n_trials=3, folds=2, pruner="none", holdout=0.0)
    tune(
        cohort / "store",
        cohort / "labels.csv",
        tmp_path / "s",
        settings,
        fixed={**SMALL, "epochs": 3, "head": "mean"},  # the bar's bookkeeping, not the heads: quick trials
        device="cpu",
        progress=True,
    )
    # Each finished trial reported its 2 folds × 3 epochs, as they finished.
    assert sum(done for done, _ in seen) == 3 * 6 and {total for _, total in seen} == {6}
    assert len(seen) >= 3 * 3  # at least once per epoch of each trial: the bar moves inside a trial
    err = capsys.readouterr().err
    assert "tune" in err and "3.0/3 trials" in err and "best auc" in err
    assert "4.0/3" not in err  # the failed trial was replaced, not counted
    assert "train: 100%" in err  # then the best configuration's own CV (out/best) shows its bar


def test_trial_bar_counts_a_pruned_trial_whole():
    from types import SimpleNamespace

    from milcache.tuning.study import TrialBar

    bar = TrialBar(2, "auc", enabled=False)
    study = SimpleNamespace(best_value=0.9)
    bar.epochs(0, 3, 12)
    bar.epochs(0, 3, 12)
    assert bar.trials == pytest.approx(0.5)
    bar.finished(study, SimpleNamespace(number=0, state=optuna.trial.TrialState.PRUNED))
    assert bar.trials == pytest.approx(1.0)
    bar.epochs(1, 20, 12)  # never more than the whole trial
    assert bar.trials == pytest.approx(2.0)
    bar.finished(study, SimpleNamespace(number=1, state=optuna.trial.TrialState.COMPLETE))
    assert bar.trials == pytest.approx(2.0)


def test_the_defaults_lie_in_the_default_space_and_sample_back_to_themselves():
    space = load_space(None)
    params = default_params(space)
    config = sample_config(optuna.trial.FixedTrial(params), space)
    assert config == TrainConfig(head_options=config.head_options)  # every train field is the default
    from milcache.aggregator.heads import resolved_options

    assert config.head_options == {k: v for k, v in resolved_options("gated-attention", {}).items() if k in space}
    fixed_head = default_params(load_space(None, {"head": "mean", "epochs": 5}))
    assert "head" not in fixed_head and "epochs" not in fixed_head and fixed_head["hidden"] == 128
    assert default_params(load_space(None, {"head": ["mean", "max"]})) is None  # no default head to try


def test_a_study_starts_with_the_defaults_then_every_other_head_once_with_the_default_training():
    space = load_space(None)
    start = start_trials(space)
    heads = [params["head"] for params, _ in start]
    assert heads == ["gated-attention"] + [h for h in list_heads() if h != "gated-attention"]
    assert start[0][1] == {"defaults": True} and all(marks == {"sweep": True} for _, marks in start[1:])
    from milcache.aggregator.heads import resolved_options

    # As a study asks for them: each its head with its default options (those the space admits; the
    # sampler draws the rest), and every training setting the defaults'.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_start(study, space, 50)
    for head in heads:
        trial = study.ask()
        config = sample_config(trial, space)
        assert config.head == head
        assert dataclasses.replace(config, head=TrainConfig.head, head_options={}) == TrainConfig()
        options = resolved_options(head, {})
        assert {k: config.head_options[k] for k in options if k in space and _admits(space[k], options[k])} == {
            k: v for k, v in options.items() if k in space and _admits(space[k], v)
        }
        study.tell(trial, 0.5)
    # A list of heads without the default one: no defaults trial, a sweep of the listed heads.
    assert [p["head"] for p, _ in start_trials(load_space(None, {"head": ["mean", "max"]}))] == ["mean", "max"]
    assert len(start_trials(load_space(None, {"head": "mean"}))) == 1  # a fixed head: the defaults alone


def test_a_short_study_enqueues_no_more_first_trials_than_it_runs_and_a_resume_the_rest():
    study = optuna.create_study()
    space = load_space(None)
    enqueue_start(study, space, 3)
    assert [t.params.get("head") or t.system_attrs["fixed_params"]["head"] for t in study.trials] == [
        "gated-attention",
        "attention",
        "clam-sb",
    ]
    enqueue_start(study, space, 50)  # a resume asking for more: the rest of the sweep, nothing twice
    assert len(study.trials) == len(list_heads())


class _PruneEverything(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_no_pruner_stops_the_first_trials_so_every_head_is_judged_on_a_whole_trial(cohort):
    from milcache.aggregator.run import load_cohort
    from milcache.tuning.study import make_objective

    loaded = load_cohort(cohort / "store", cohort / "labels.csv", device="cpu")
    space = load_space(None, {**SMALL, "head": ["gated-attention", "mean", "max"], "epochs": 3})
    study = optuna.create_study(direction="maximize", pruner=_PruneEverything())
    enqueue_start(study, space, 50)
    settings = TuneSettings(n_trials=4, folds=2, repeats=1, holdout=0.0)
    study.optimize(make_objective(loaded, space, settings), n_trials=4)
    states = [(t.params["head"], t.state.name) for t in study.trials]
    assert states[:3] == [("gated-attention", "COMPLETE"), ("mean", "COMPLETE"), ("max", "COMPLETE")]
    assert states[3][1] == "PRUNED"  # a sampled trial is the pruner's


def _study_of(values_and_stds, direction="maximize"):
    """A study whose trial 0 is the defaults, with (value, fold std) per trial."""
    study = optuna.create_study(direction=direction)
    for number, (value, std) in enumerate(values_and_stds):
        study.add_trial(
            optuna.trial.create_trial(
                value=value,
                params={"x": float(number)},
                distributions={"x": optuna.distributions.FloatDistribution(0, 100)},
                user_attrs={"defaults": number == 0, "metrics": {"auc": value, "auc_std": std}},
            )
        )
    return study


def test_one_se_keeps_the_defaults_unless_the_best_trial_clearly_beats_them():
    # 5 folds, population std 0.05: one standard error is 0.05 / 2 = 0.025.
    assert chosen_trial(_study_of([(0.80, 0.05), (0.82, 0.05), (0.70, 0.1)]), "auc", 5, "one-se").number == 0
    assert chosen_trial(_study_of([(0.80, 0.05), (0.83, 0.05)]), "auc", 5, "one-se").number == 1
    assert chosen_trial(_study_of([(0.80, 0.05), (0.82, 0.05)]), "auc", 5, "best").number == 1
    assert chosen_trial(_study_of([(0.85, 0.05), (0.82, 0.05)]), "auc", 5, "one-se").number == 0  # defaults best
    minimised = _study_of([(0.40, 0.05), (0.39, 0.05), (0.30, 0.05)], direction="minimize")
    assert chosen_trial(minimised, "auc", 5, "one-se").number == 2  # lower is better: 0.10 is 4 SE
    study = optuna.create_study(direction="maximize")  # without a defaults trial (a space that leaves out their head)
    for value in (0.80, 0.81):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"metrics": {"auc_std": 0.05}}))
    assert chosen_trial(study, "auc", 5, "one-se").number == 1


def test_tune_tries_the_defaults_first_and_says_which_trial_it_kept(cohort, tmp_path):
    settings = TuneSettings(n_trials=3, folds=2, pruner="none", holdout=0.0)
    best = tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", settings, fixed=SMALL, device="cpu")
    study = optuna.load_study(study_name="milcache", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    first = study.trials[0]
    assert first.user_attrs["defaults"] and first.params["head"] == "gated-attention"
    assert first.params["lr"] == TrainConfig.lr and first.params["weight_decay"] == TrainConfig.weight_decay
    assert best["best_trial"]["value"] == study.best_value and best["selection"] == "blend"
    # Every trial keeps each study bag's out-of-fold outputs, which the bootstrap comparison reads.
    stored = first.user_attrs["out_of_fold"]
    assert sorted(stored["bags"]) == list(range(100)) and np.asarray(stored["outputs"]).shape == (100, 2)
    assert np.allclose(np.asarray(stored["outputs"]).sum(1), 1, atol=1e-3)
    assert best["bootstrap"]["samples"] > 200 and 0 <= best["bootstrap"]["tuned"] <= 1
    kept = study.trials[best["trial"]]
    members = [study.trials[n] for n in best["blend"]] if best["blend"] else [kept]
    loaded = load_cohort(cohort / "store", cohort / "labels.csv", device="cpu")
    assert best["value"] == kept_score(members, loaded.task, loaded.y, "auc")
    assert best["defaults"] == (kept.number == 0) and (not best["blend"] or members[0].number == 0)
    from milcache.cli import _chosen_line

    line = _chosen_line(
        {
            **best,
            "trial": 0,
            "defaults": True,
            "blend": None,
            "value": 0.8,
            "best_trial": {"trial": 2, "value": 0.81, "head": "max"},
        }
    )
    assert "the calibrated defaults" in line and "trial 2 (max, 0.8100)" in line and "--select best" in line
    assert f"bias-corrected auc of picking the best trial: {best['bootstrap']['tuned']:.4f}" in line
    line = _chosen_line(
        {
            **best,
            "selection": "bootstrap",
            "trial": 0,
            "defaults": True,
            "blend": None,
            "best_trial": {"trial": 2, "value": 0.81, "head": "max"},
        }
    )
    assert "gains nothing over them on the bags that bootstrap resamples of the study leave out" in line
    line = _chosen_line(
        {**best, "trial": 0, "defaults": True, "blend": None, "best_trial": {"trial": 2, "value": 0.81, "head": "max"}}
    )
    assert "(max, 0.8100) blended with them gains nothing on the bags that bootstrap resamples" in line
    assert "2-fold CV × 1" in line  # 100 study bags: auto chose one repeat
    assert "the best trial, so optimistic" in _chosen_line(
        {**best, "defaults": False, "blend": None, "trial": 2, "best_trial": {"trial": 2, "value": 0.81, "head": "max"}}
    )


def test_repeats_score_every_trial_on_folds_times_repeats_splits(cohort, tmp_path):
    settings = TuneSettings(n_trials=2, folds=2, repeats=3, pruner="none", holdout=0.0)
    best = tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", settings, fixed=SMALL, device="cpu")
    study = optuna.load_study(study_name="milcache", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    assert best["repeats"] == 3 and study.user_attrs["scoring"]["repeats"] == 3
    # A trial's value is the mean over its 6 splits; the kept configuration's own CV is the same one.
    refit = json.loads((tmp_path / "s" / "best" / "metrics.json").read_text())
    assert len(refit["folds"]) == 6
    assert refit["auc"] == pytest.approx(study.trials[best["trial"]].value, abs=1e-6)


def test_a_run_that_would_score_trials_otherwise_is_refused_by_option(cohort, tmp_path):
    settings = TuneSettings(n_trials=1, folds=2, pruner="none", holdout=0.0)
    tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", settings, fixed=SMALL, device="cpu")
    url = f"sqlite:///{tmp_path / 's' / 'study.db'}"
    other = TuneSettings(n_trials=2, folds=3, repeats=2, pruner="none", holdout=0.0, resume=True)
    with pytest.raises(MilcacheError, match=r"--folds 2 \(this run: 3\); --repeats 1 \(this run: 2\)"):
        tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", other, fixed=SMALL, device="cpu")
    assert _finished(url) == 1  # nothing ran, nothing lost
    # A study made before the record (none in its attributes) takes the resuming run's settings.
    study = optuna.load_study(study_name="milcache", storage=url)
    study._storage.set_study_user_attr(study._study_id, "scoring", None)
    resumed = TuneSettings(n_trials=2, folds=2, pruner="none", holdout=0.0, resume=True)
    tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", resumed, fixed=SMALL, device="cpu")
    assert _finished(url) == 2


def test_a_metric_the_task_lacks_is_refused_before_any_trial_and_a_corrected_rerun_starts(
    cohort, tmp_path, monkeypatch
):
    import milcache.tuning.study as study_module

    trained = []
    monkeypatch.setattr(study_module, "cross_validate", lambda *a, **k: trained.append(1))
    settings = TuneSettings(n_trials=1, folds=2, pruner="none", holdout=0.0, metric="r2")
    with pytest.raises(MilcacheError, match="--metric 'r2' is not computed for a binary task; use one of auc, "):
        tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", settings, fixed=SMALL, device="cpu")
    assert not trained
    monkeypatch.undo()
    fixed = TuneSettings(n_trials=1, folds=2, pruner="none", holdout=0.0, metric="accuracy")
    tune(cohort / "store", cohort / "labels.csv", tmp_path / "s", fixed, fixed=SMALL, device="cpu")  # no "exists"
    assert _finished(f"sqlite:///{tmp_path / 's' / 'study.db'}") == 1


def test_tune_cli_takes_repeats(cohort, tmp_path):
    result = subprocess.run(
        _tune_command(cohort, tmp_path / "run", "--n-trials", "1", "--repeats", "2", "--holdout", "0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "best.json").read_text())["repeats"] == 2


def test_auto_repeats_grow_as_the_cohort_shrinks():
    chosen = {n: TuneSettings().resolve(n).repeats for n in (5, 39, 46, 50, 60, 100, 2000)}
    assert chosen == {5: 5, 39: 3, 46: 3, 50: 2, 60: 2, 100: 1, 2000: 1}
    assert TuneSettings(repeats=4).resolve(2000).repeats == 4  # a number given is kept
    with pytest.raises(MilcacheError, match="--repeats"):
        TuneSettings(repeats=0)


@pytest.mark.parametrize("value", ["0", "two"])
def test_tune_cli_refuses_a_repeats_that_is_neither_auto_nor_a_count(cohort, tmp_path, value):
    args = _tune_command(cohort, tmp_path / "run", "--repeats", value)[3:]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--repeats" in result.output and "auto" in result.output
    assert not (tmp_path / "run").exists()


def test_a_kept_blend_is_written_as_one_model_that_predicts_and_is_scored_on_the_held_out_bags(
    cohort, tmp_path, monkeypatch
):
    """--select blend keeps the defaults and the best trial together when the blend gains (the rule
    is tested in test_selection): RUN/best then holds both retrained as train-head would, and
    predict on RUN/best averages them; best.json names both and scores their averaged outputs."""
    import milcache.tuning.study as study_module
    from milcache.aggregator.predict import predict

    monkeypatch.setattr(study_module, "kept_trials", lambda study, *args: [study.trials[0], study.trials[1]])
    settings = TuneSettings(n_trials=2, folds=2, pruner="none", holdout=0.25, selection="blend")
    out = tmp_path / "study"
    (out / "best").mkdir(parents=True)
    (out / "best" / "stale.txt").write_text("from an earlier run of the study")
    best = tune(cohort / "store", cohort / "labels.csv", out, settings, fixed=SMALL, device="cpu")
    study = optuna.load_study(study_name="milcache", storage=f"sqlite:///{out / 'study.db'}")
    assert best["blend"] == [0, 1] and best["trial"] == 1 and best["head"] == study.trials[1].params["head"]
    y = study_module.load_cohort(cohort / "store", cohort / "labels.csv", device="cpu").y
    stored = [study.trials[k].user_attrs["out_of_fold"] for k in (0, 1)]
    assert stored[0]["bags"] == stored[1]["bags"]
    mean = (np.asarray(stored[0]["outputs"])[:, 1] + np.asarray(stored[1]["outputs"])[:, 1]) / 2
    assert best["value"] == pytest.approx(roc_auc_score(y[stored[0]["bags"]], mean))  # the blend's own CV score
    assert 0.0 <= best["holdout"]["value"] <= 1.0 and best["holdout"]["bags"] == 25
    assert sorted(p.name for p in (out / "best").iterdir()) == ["blend.json", "defaults", "trial-1"]
    ids = pl.read_csv(cohort / "labels.csv")["bag_id"].to_list()[:10]
    each = [
        predict(out / "best" / name, cohort / "store", bag_ids=ids, device="cpu") for name in ("defaults", "trial-1")
    ]
    table = predict(out / "best", cohort / "store", bag_ids=ids, device="cpu")
    expected = (each[0]["prob_1"].to_numpy() + each[1]["prob_1"].to_numpy()) / 2
    np.testing.assert_allclose(table["prob_1"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    from milcache.cli import _chosen_line

    assert "a blend of the calibrated defaults and trial 1" in _chosen_line(best)

"""`train-head`: labels + store → cross-validated metrics, out-of-fold predictions, a refit model."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from milcache import __version__, checks
from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import Bags, load_bags
from milcache.aggregator.heads import check_head, resolved_options
from milcache.aggregator.memory import check_bags_fit, default_budget, measure_head
from milcache.aggregator.model import MILModel, build_model, save_fold_models, save_model
from milcache.aggregator.plots import plot_kaplan_meier, plot_regression, plot_roc
from milcache.aggregator.splits import cv_splits, validation_split
from milcache.aggregator.survival import COX_BATCH, SurvivalSpec
from milcache.aggregator.tasks import Task, per_patient
from milcache.aggregator.trainer import Report, fit, fit_stacked, infer
from milcache.devices import resolve_device
from milcache.errors import LabelError
from milcache.store import FeatureStore, read_labels
from milcache.store.instance_index import duplicate_instances
from milcache.store.tables import read_survival_labels, survival_columns


@dataclass
class Cohort:
    """The labelled bags of a store, resident in memory, with encoded targets."""

    data: Bags
    task: Task
    y: np.ndarray
    groups: np.ndarray
    split: np.ndarray | None
    labels: list
    unlabelled: int  # bags in the store without a label (not used)
    store_meta: dict
    notes: list[str] = dataclasses.field(default_factory=list)  # things the user should know


def load_cohort(
    store_dir: str | Path,
    labels_path: str | Path,
    task_kind: str | None = None,
    device: str = "auto",
    label_column: str = "label",
    progress: bool = False,
    regime: str = "auto",
    classes: list | None = None,
    skip_duplicates: bool = False,
    *,
    survival: SurvivalSpec | None = None,
) -> Cohort:
    """Match labels to store bags (refusing labels of unknown bags) and load those bags once.
    ``classes`` orders the classes (ordinal labels that are text need it). Times to an event
    (the columns ``survival`` names) make a survival task, trained as ``survival`` says."""
    survival = survival or SurvivalSpec()
    if planned_task(labels_path, task_kind, label_column, survival) == "survival":
        labels = read_survival_labels(labels_path, survival.time_column, survival.event_column)
        raw = list(zip(labels["time"].to_list(), labels["event"].to_list(), strict=True))
        task = Task.for_survival(labels["time"].to_numpy(), labels["event"].to_numpy(), survival)
    else:
        labels = read_labels(labels_path, label_column)
        raw = labels["label"].to_list()
        task = Task.infer(raw, task_kind, classes)
    with FeatureStore(store_dir) as store:
        in_store = set(store.bag_ids())
        missing = [b for b in labels["bag_id"].to_list() if b not in in_store]
        if missing:
            shown = ", ".join(missing[:20]) + (f" ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise LabelError(f"{len(missing)} labelled bag(s) are not in the store {store_dir}: {shown}")
        ids = labels["bag_id"].to_list()
        skip = duplicate_instances(store) if skip_duplicates else None
        data = load_bags(store, ids, resolve_device(device), progress, regime, skip)
        store_meta = store.metadata.embedding.to_dict()  # what the run's model input means
        unlabelled = len(in_store) - len(ids)
    grouped = "group" in labels.columns
    groups = np.asarray(labels["group"].to_list() if grouped else ids, dtype=object)
    split = np.asarray(labels["split"].to_list(), dtype=object) if "split" in labels.columns else None
    notes = [] if grouped or split is not None else [grouping_hint(ids)]
    return Cohort(data, task, task.encode(raw), groups, split, raw, unlabelled, store_meta, notes)


def planned_task(labels, task_kind: str | None, label_column: str, survival: SurvivalSpec | None) -> str | None:
    """The task asked for, or "survival" when the labels hold times to an event (read from the
    table's header: what the checks before loading a cohort need to know)."""
    survival = survival or SurvivalSpec()
    columns = survival_columns(
        labels,
        task_kind=task_kind,
        label_column=label_column,
        time_column=survival.time_column,
        event_column=survival.event_column,
    )
    return "survival" if columns is not None else task_kind


def check_model_input(recorded: dict, store, *, model_dir: Path, what: str = "predict") -> None:
    """Refuse a store whose embeddings mean something else than those ``model_dir``'s model was
    trained on (another encoder, weights, preprocessing, token rule or source geometry), naming the
    field and both values. Runs of older versions recorded fewer fields: those are compared."""
    from milcache.store.spec import EmbeddingSpec

    trained = EmbeddingSpec.from_dict(recorded)
    recorded_names = set(recorded) | ({"encoder"} if "backbone" in recorded else set())
    fields = tuple(name for name in EmbeddingSpec.__dataclass_fields__ if name in recorded_names)
    trained.require_same(
        store.metadata.embedding,
        this="model trained on",
        that="store has",
        advice=f"the model in {model_dir} cannot {what} the embeddings of {store.path}: extract them with the "
        "model's encoder, weights, preprocessing, token rule and source settings",
        fields=fields,
    )


_TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-", re.IGNORECASE)


def grouping_hint(bag_ids: list[str]) -> str:
    """What to do when the labels have no ``group`` column: folds are then per bag, and two slides
    of one patient in different folds make the scores optimistic."""
    hint = (
        "the labels have no group column, so folds are drawn per bag; if a patient has several bags, "
        "add a group column with the patient id so that one patient's bags stay in one fold"
    )
    patients = [m.group(1).upper() for b in bag_ids if (m := _TCGA_BARCODE.match(b))]
    if patients and len(patients) == len(bag_ids):
        example = bag_ids[0]
        hint += (
            f" (these bag ids are TCGA barcodes: the patient is their first 12 characters, e.g. "
            f"{example[:12]} for {example}; {len(set(patients))} patients for {len(bag_ids)} bags)"
        )
    return hint


def _initial_model(config: TrainConfig, cohort: Cohort, seed: int | None = None) -> MILModel:
    """A freshly initialised model; seeded, so a run with the same --seed gives the same results."""
    torch.manual_seed(config.seed if seed is None else seed)
    return build_model(config.head, config.head_options, cohort.data.dim, cohort.task)


def _fixed_split(cohort: Cohort) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    split = np.char.lower(cohort.split.astype(str))
    unknown = sorted(set(split) - {"train", "val", "test"})
    if unknown:
        raise LabelError(f"the split column may hold train, val and test, not {', '.join(unknown)}")
    train, val, test = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    if not len(train) or not len(test):
        raise LabelError("a fixed split needs bags marked train and bags marked test")
    return train, test, (val if len(val) else None)


def _summarise(fold_metrics: list[dict]) -> dict:
    keys = fold_metrics[0].keys()
    out = {}
    for key in keys:
        values = np.array([m[key] for m in fold_metrics], dtype=float)
        out[key] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
        out[f"{key}_std"] = float(np.nanstd(values)) if not np.isnan(values).all() else float("nan")
    return out


def _models_per_stack(config: TrainConfig, data: Bags, step_tokens: int) -> int:
    """How many fold models train side by side: as many as keep a stacked step within
    ``step_tokens`` padded instances (each model's batch is at most ``max_tokens``)."""
    longest = int(data.lengths.max()) if len(data.lengths) else 1
    per_model = min(config.max_tokens, config.batch_size * min(longest, config.instances or longest))
    return max(1, step_tokens // max(per_model, 1))


def fit_memory(config: TrainConfig, cohort: Cohort, model: MILModel) -> tuple[TrainConfig, int]:
    """``config`` with ``max_tokens`` lowered so that a step fits the memory budget, and the padded
    instances a stacked step of several fold models may hold; refuses bags that cannot fit."""
    data = cohort.data
    budget = config.memory_budget or default_budget(data.device)
    memory = measure_head(model.head, data.dim)
    check_bags_fit(memory, budget, data.lengths, data.bag_ids, config.head, cap=config.instances)
    longest = int(data.lengths.max()) if len(data.lengths) else 1
    longest = min(longest, config.instances or longest)
    step_tokens = memory.tokens_within(budget, longest)
    config = dataclasses.replace(config, max_tokens=max(1, min(config.max_tokens, step_tokens)))
    return config, min(8 * config.max_tokens, step_tokens)


def cross_validate(
    cohort: Cohort,
    config: TrainConfig,
    folds: int = 5,
    repeats: int = 1,
    report: Report | None = None,
    monitor: str = "auc",
    progress: bool = False,
    bags: np.ndarray | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[dict, pl.DataFrame, list[int], list[MILModel]]:
    """Metrics per fold and their mean ± std, out-of-fold predictions, each fold's best epoch and
    each fold's trained model. The folds train together as stacked models.

    ``report(epoch, value)`` gets the ``monitor`` metric of each epoch, averaged over the folds
    (on their validation splits, or on their test folds when they have none). ``bags`` restricts
    the CV to those bags (tune keeps a held-out part out of its study this way). ``on_epoch(done,
    total)`` is told of the fold-epochs as they finish, out of ``total`` (tune's bar over its
    trials); without it, ``progress`` shows this CV's own bar."""
    from tqdm import tqdm

    task, y, groups = cohort.task, cohort.y, cohort.groups
    strata = task.strata(y)
    if cohort.split is not None:
        train, test, val = _fixed_split(cohort)
        plans = [(train, test, val)]
        config = resolved(config, task, len(train))
    else:
        bags = np.arange(len(y)) if bags is None else np.asarray(bags)
        splits = cv_splits(None if strata is None else strata[bags], groups[bags], folds, repeats, config.seed)
        config = resolved(config, task, min(len(train) for train, _ in splits))
        plans = []
        for k, (train, test) in enumerate(splits):
            train, test = bags[train], bags[test]
            fit_on, val = validation_split(strata, groups, train, config.val_fraction, config.seed + k)
            plans.append((fit_on, test, val))
    models = [_initial_model(config, cohort, config.seed + k) for k in range(len(plans))]
    config, step_tokens = fit_memory(config, cohort, models[0])
    results = []
    per_stack = _models_per_stack(config, cohort.data, step_tokens)
    total = len(plans) * config.epochs
    disable = not progress or on_epoch is not None
    with tqdm(total=total, desc="train", unit="epoch", disable=disable) as bar:
        tick = bar.update if on_epoch is None else (lambda n: on_epoch(n, total))
        for start in range(0, len(plans), per_stack):
            chunk = range(start, min(start + per_stack, len(plans)))
            watch = [plans[k][1] for k in chunk] if report is not None else None
            results += fit_stacked(
                [models[k] for k in chunk],
                cohort.data,
                task,
                y,
                [plans[k][0] for k in chunk],
                [plans[k][2] if plans[k][2] is not None and len(plans[k][2]) else None for k in chunk],
                config,
                seeds=[config.seed + k for k in chunk],
                report=report,
                monitor=monitor,
                watch=watch,
                on_epoch=tick,
            )
    fold_metrics, oof, best_epochs = [], [], []
    for k, ((_, test, _), model, result) in enumerate(zip(plans, models, results, strict=True)):
        best_epochs.append(result["best_epoch"])
        logits, _ = infer(model, cohort.data, test, config)
        outputs = task.outputs(logits).cpu().numpy()
        scores = task.metrics(y[test], outputs, groups=groups[test])
        fold_metrics.append({"fold": k, "best_epoch": result["best_epoch"], **scores})
        oof.append(
            _prediction_table(cohort, test, outputs).with_columns(
                pl.lit(k // max(folds, 1) if cohort.split is None else 0).alias("repeat"), pl.lit(k).alias("fold")
            )
        )
    summary = _summarise([{k: v for k, v in m.items() if k not in ("fold", "best_epoch")} for m in fold_metrics])
    return {**summary, "folds": fold_metrics}, pl.concat(oof), best_epochs, models


def _prediction_table(cohort: Cohort, indices: np.ndarray, outputs: np.ndarray) -> pl.DataFrame:
    table = {"bag_id": [cohort.data.bag_ids[i] for i in indices]}
    if cohort.task.kind == "survival":
        table.update(time=cohort.y[indices, 0], event=cohort.y[indices, 1].astype(np.int8))
        table["group"] = [str(g) for g in cohort.groups[indices]]
    else:
        table["label"] = [cohort.labels[i] for i in indices]
    table.update(zip(cohort.task.output_columns, outputs.T, strict=True))
    if cohort.task.has_classes:
        table["predicted"] = [cohort.task.classes[c] for c in outputs.argmax(1)]
    return pl.DataFrame(table)


def resolved(config: TrainConfig, task: Task, training_bags: int) -> TrainConfig:
    """``config.resolve`` for folds of ``training_bags``, where the Cox loss gets batches large enough
    to be risk sets: ``COX_BATCH`` bags, or the whole fold when it is smaller."""
    if config.batch_size is None and task.kind == "survival" and task.survival.loss == "cox":
        config = dataclasses.replace(config, batch_size=max(1, min(training_bags, COX_BATCH)))
    return config.resolve(training_bags)


def refit(cohort: Cohort, config: TrainConfig, epochs: int, bags: np.ndarray | None = None) -> MILModel:
    """The final model: trained on every labelled bag (or ``bags``) for ``epochs`` (the folds'
    median best epoch)."""
    bags = np.arange(len(cohort.y)) if bags is None else np.asarray(bags)
    final = dataclasses.replace(resolved(config, cohort.task, len(bags)), epochs=max(1, epochs))
    model = _initial_model(config, cohort)
    fit(model, cohort.data, cohort.task, cohort.y, bags, None, final)
    return model


def train_head(
    store_dir: str | Path,
    labels_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    folds: int = 5,
    repeats: int = 1,
    task_kind: str | None = None,
    device: str = "auto",
    label_column: str = "label",
    cohort: Cohort | None = None,
    progress: bool = False,
    regime: str = "auto",
    classes: list | None = None,
    skip_duplicates: bool = False,
    *,
    survival: SurvivalSpec | None = None,
) -> dict:
    """Cross-validate a head, refit it on all labelled bags, and write the run directory. A
    survival task (``survival``: its columns, loss, risk groups) draws the Kaplan–Meier curves of
    the out-of-fold risk groups."""
    config = config or TrainConfig()
    checks.whole("--folds", folds, 2)
    checks.whole("--repeats", repeats, 1)
    if cohort is None:
        task_kind = planned_task(labels_path, task_kind, label_column, survival)
    check_head(config.head, config.head_options, cohort.task.kind if cohort else task_kind)
    checks.output_dir(out_dir)
    start = time.perf_counter()
    cohort = cohort or load_cohort(
        store_dir,
        labels_path,
        task_kind,
        device,
        progress=progress,
        regime=regime,
        classes=classes,
        label_column=label_column,
        skip_duplicates=skip_duplicates,
        survival=survival,
    )
    check_head(config.head, config.head_options, cohort.task.kind)
    metrics, oof, best_epochs, fold_models = cross_validate(cohort, config, folds, repeats, progress=progress)
    if cohort.split is not None:  # the split's one model: trained on the train bags, test bags kept out
        model = fold_models[0]
        final = "model trained on the split's train bags (test bags kept out)"
    else:
        model = refit(cohort, config, int(np.median(best_epochs)))
        final = f"refit on all {len(cohort.y)} labelled bags for {max(1, int(np.median(best_epochs)))} epochs"
    out = Path(out_dir)
    # The bags the saved model trained on, so the recorded choices are the ones it was trained with.
    trained_bags = len(cohort.y) if cohort.split is None else len(_fixed_split(cohort)[0])
    model_config = {  # resolved values only: the run rebuilds the same model after a default changes
        "head": config.head,
        "head_options": resolved_options(config.head, config.head_options),
        "dim": cohort.data.dim,
        "task": cohort.task.to_dict(),
        "store": cohort.store_meta,
        "train": resolved(config, cohort.task, trained_bags).to_dict(),
        "milcache_version": __version__,
    }
    save_model(model.cpu(), out, model_config)
    if cohort.split is None:
        save_fold_models(fold_models, out)
    metrics.update(
        {
            "final_model": final,
            "fold_models": len(fold_models) if cohort.split is None else 0,  # in folds.safetensors: predict --ensemble
            "bags": len(cohort.y),
            "unlabelled_bags": cohort.unlabelled,
            "task": cohort.task.kind,
            "classes": cohort.task.classes,
            "notes": cohort.notes,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    oof.write_parquet(out / "oof.parquet")
    kaplan_meier = _plot(cohort, oof, out)
    if kaplan_meier is not None:
        metrics["kaplan_meier"] = kaplan_meier
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not isinstance(labels_path, (str, Path)):  # a DataFrame: kept in the run, so fine-tune finds it
        from milcache.store.tables import read_table

        read_table(labels_path, ("bag_id", "group", "split")).write_parquet(out / "labels.parquet")
        labels_path = (out / "labels.parquet").absolute()
    settings = {
        "store": str(store_dir),
        "labels": str(labels_path),
        "folds": folds,
        "repeats": repeats,
        "task": task_kind,
        "device": device,
        "label_column": label_column,
        "classes": classes,
        "survival": None if cohort.task.survival is None else cohort.task.survival.to_dict(),
        "skip_duplicates": skip_duplicates,
        **config.to_dict(),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    return metrics


def _plot(cohort: Cohort, oof: pl.DataFrame, out: Path) -> dict | None:
    """The out-of-fold figure: a ROC, a scatter of values, or Kaplan–Meier curves of risk groups
    (of patients: a patient's risk is the mean over its bags and repeats), whose test it returns."""
    title = f"out-of-fold · {len(oof)} predictions"
    if cohort.task.kind == "survival":
        y, risk = per_patient(
            oof.select("time", "event").to_numpy(), oof.select("risk").to_numpy(), oof["group"].to_numpy()
        )
        title = f"out-of-fold risk · {len(y)} patients"
        groups = cohort.task.survival.risk_groups
        return plot_kaplan_meier(y[:, 0], y[:, 1], risk[:, 0], out / "kaplan_meier.png", title=title, groups=groups)
    y = cohort.task.encode(oof["label"].to_list())
    if cohort.task.kind == "regression":
        plot_regression(y, oof["prediction"].to_numpy(), out / "predictions.png", title)
    else:
        outputs = oof.select(cohort.task.output_columns).to_numpy()
        plot_roc(y, outputs, cohort.task.classes, out / "roc.png", title)

"""The Python API: one function per command, the very functions the CLI calls.

Keyword arguments are named like the CLI's options (``--tile-size`` → ``tile_size``, ``--memory`` →
``memory``); every function raises the project's errors (``milcache.MilcacheError`` and its kinds)
for a user's mistake, and returns a result object instead of printing::

    import milcache

    milcache.extract("slides.csv", "store", backbone="resnet50", weights="r50.safetensors", mpp=0.5)
    result = milcache.train_head("store", "labels.csv", "runs/gated", head="gated-attention")
    result.metrics["auc"]
    table = milcache.predict("runs/gated", "store", bags=["slide-7"])   # a polars DataFrame
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from milcache.errors import OptionError
from milcache.tuning.settings import DEFAULT_SELECTION

if TYPE_CHECKING:
    import polars as pl

    from milcache.extractor.loop import ExtractSummary

PathLike = str | Path


@dataclass
class TrainResult:
    """What ``train_head`` wrote: the cross-validated metrics (also in RUN/metrics.json)."""

    metrics: dict
    run_dir: Path

    @property
    def oof(self) -> pl.DataFrame:
        """The out-of-fold predictions, one row per bag and repeat."""
        import polars as pl

        return pl.read_parquet(self.run_dir / "oof.parquet")


@dataclass
class TuneResult:
    """What ``tune`` wrote: the chosen trial (RUN/best.json) and its retrained model in RUN/best."""

    best: dict
    run_dir: Path

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "best"

    @property
    def trials(self) -> pl.DataFrame:
        import polars as pl

        return pl.read_parquet(self.run_dir / "trials.parquet")


def extract(
    manifest: PathLike,
    out: PathLike,
    *,
    backbone: str,
    source: str = "tiles",
    weights: PathLike | None = None,
    pretrained: bool = False,
    batch_size: int = 64,
    workers: int = 4,
    precision: str = "auto",
    compile: bool = False,
    decode: str = "auto",
    dtype: str = "float16",
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    backbone_args: dict | None = None,
    token_rule: str | None = None,
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    reextract_changed: bool = False,
    device: str = "auto",
    progress: bool = False,
    **source_options,
) -> ExtractSummary:
    """Embed every instance of every bag of ``manifest`` into the store ``out`` (resumable).
    ``backbone`` is an encoder preset (``uni2-h`` …; ``milcache encoders``), a timm name,
    ``hf-hub:ORG/NAME`` or ``local-dir:FOLDER``; ``backbone_args`` are architecture arguments
    (``{"init_values": 1e-5, "mlp_layer": "swiglu_packed"}``) and ``token_rule`` how tokens become
    the embedding (pooled, cls, mean, cls+mean). ``source_options`` are the chosen source's options
    (``tile_size``, ``mpp``, ``regions`` …)."""
    from milcache.extractor.loop import ExtractConfig
    from milcache.extractor.loop import extract as run_extraction
    from milcache.extractor.sources import create_source

    if source == "cam":  # --pretrained also names where --cam-model's weights come from
        source_options["pretrained"] = pretrained
    config = ExtractConfig(
        backbone=backbone,
        weights=str(weights) if weights else None,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        compile=compile,
        decode=decode,
        dtype=dtype,
        shard=_shard(shard),
        overwrite=overwrite,
        reextract_changed=reextract_changed,
        backbone_args=dict(backbone_args or {}),
        token_rule=token_rule,
        preprocessing={
            k: v
            for k, v in {
                "input_size": (input_size, input_size) if input_size is not None else None,
                "mean": list(mean) if mean is not None else None,
                "std": list(std) if std is not None else None,
                "interpolation": interpolation,
                "crop_pct": crop_pct,
            }.items()
            if v is not None
        },
    )
    return run_extraction(manifest, out, create_source(source, **source_options), config, progress=progress)


def _shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        index, count = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise OptionError(f"--shard expects i/n (e.g. 0/4), got {shard!r}") from None
    return index, count


def train_head(
    store: PathLike,
    labels: PathLike,
    out: PathLike,
    *,
    head: str = "gated-attention",
    folds: int = 5,
    repeats: int = 1,
    task: str | None = None,
    classes: Sequence | None = None,
    label_column: str = "label",
    hidden: int | None = None,
    dropout: float | None = None,
    head_options: dict | None = None,
    memory: str = "auto",
    skip_duplicates: bool = False,
    device: str = "auto",
    progress: bool = False,
    time_column: str = "time",
    event_column: str = "event",
    survival_loss: str = "cox",
    ties: str = "efron",
    bins: int = 4,
    alpha: float = 0.0,
    risk_groups: int = 2,
    **train_options,
) -> TrainResult:
    """Cross-validate a head on cached embeddings, refit it on every labelled bag, write the run
    directory ``out``. ``train_options`` are TrainConfig's fields (``epochs``, ``lr``, ``instances``
    (0 = every instance), ``memory_budget`` ("8GiB") …); options left as None keep their defaults.
    Labels with ``time_column`` and ``event_column`` (and no label column), or ``task="survival"``,
    make a survival task: ``survival_loss`` cox (``ties`` efron or breslow) or nll (``bins``
    intervals, ``alpha`` the weight of its uncensored term), Kaplan–Meier plots of ``risk_groups``."""
    from milcache.aggregator.run import train_head as run_training
    from milcache.aggregator.survival import SurvivalSpec

    survival = SurvivalSpec(
        loss=survival_loss,
        ties=ties,
        bins=bins,
        alpha=alpha,
        time_column=time_column,
        event_column=event_column,
        risk_groups=risk_groups,
    )
    config = train_config(head, hidden, dropout, head_options, train_options)
    metrics = run_training(
        store,
        labels,
        out,
        config,
        folds,
        repeats,
        task,
        device,
        label_column,
        progress=progress,
        regime=memory,
        classes=list(classes) if classes is not None else None,
        skip_duplicates=skip_duplicates,
        survival=survival,
    )
    return TrainResult(metrics=metrics, run_dir=Path(out))


def train_config(
    head: str,
    hidden: int | None = None,
    dropout: float | None = None,
    head_options: dict | None = None,
    train_options: dict | None = None,
):
    """A TrainConfig from options as the CLI names them (None: the default; ``instances=0``: all)."""
    from dataclasses import fields

    from milcache.aggregator.config import TrainConfig

    options = {k: v for k, v in (train_options or {}).items() if v is not None}
    _refuse_unknown(options, {f.name for f in fields(TrainConfig)} - {"head", "head_options"}, "training")
    if options.get("instances") == 0:
        options["instances"] = None
    if "memory_budget" in options:
        from milcache.aggregator.memory import parse_size

        options["memory_budget"] = parse_size(options["memory_budget"])
    head_options = dict(head_options or {})
    head_options.update({k: v for k, v in (("hidden", hidden), ("dropout", dropout)) if v is not None})
    return TrainConfig(head=head, head_options=head_options, **options)


def tune(
    store: PathLike,
    labels: PathLike,
    out: PathLike,
    *,
    n_trials: int = 50,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str = "milcache",
    metric: str | None = None,
    pruner: str = "median",
    jobs: int = 1,
    resume: bool = False,
    folds: int = 5,
    repeats: int | None = None,
    space: PathLike | None = None,
    set: dict | None = None,  # noqa: A002  (named like the CLI's --set)
    holdout: float = 0.2,
    task: str | None = None,
    classes: Sequence | None = None,
    seed: int = 0,
    memory_budget: str | int | None = None,
    skip_duplicates: bool = False,
    select: str = DEFAULT_SELECTION,
    device: str = "auto",
    progress: bool = False,
    time_column: str = "time",
    event_column: str = "event",
    survival_loss: str = "cox",
    ties: str = "efron",
    bins: int = 4,
    alpha: float = 0.0,
    risk_groups: int = 2,
) -> TuneResult:
    """Run (or resume) an Optuna study over heads and hyper-parameters; retrain the chosen
    configuration into ``out/best``. ``set`` fixes parameters instead of searching them
    (``{"head": "attention"}``). The study's first trial is the calibrated defaults, the next ones
    every other head with its defaults (never pruned); ``select`` "blend" (the default) keeps the
    defaults and the best trial together (outputs averaged) unless that blend gains nothing on
    out-of-bootstrap bags, "bootstrap" the defaults alone unless the best trial alone gains so, "one-se"
    the defaults unless the best trial beats them by more than a standard error, "best" the best
    trial (see milcache.tuning.selection). ``repeats`` of the inner CV: None chooses them from the cohort
    (more for fewer bags). ``metric`` None: auc, or c_index for a survival task (whose options are
    ``train_head``'s)."""
    from milcache.aggregator.survival import SurvivalSpec
    from milcache.tuning.settings import TuneSettings
    from milcache.tuning.study import tune as run_study

    survival = SurvivalSpec(
        loss=survival_loss,
        ties=ties,
        bins=bins,
        alpha=alpha,
        time_column=time_column,
        event_column=event_column,
        risk_groups=risk_groups,
    )
    settings = TuneSettings(
        n_trials=n_trials,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        metric=metric,
        pruner=pruner,
        jobs=jobs,
        resume=resume,
        folds=folds,
        repeats=repeats,
        seed=seed,
        holdout=holdout,
        skip_duplicates=skip_duplicates,
        selection=select,
    )
    fixed = dict(set or {})
    if memory_budget is not None:
        from milcache.aggregator.memory import parse_size

        fixed["memory_budget"] = parse_size(memory_budget)
    best = run_study(
        store,
        labels,
        out,
        settings,
        space,
        fixed,
        task,
        device,
        progress=progress,
        classes=list(classes) if classes is not None else None,
        survival=survival,
    )
    return TuneResult(best=best, run_dir=Path(out))


def predict(
    model: PathLike,
    store: PathLike,
    out: PathLike | None = None,
    *,
    bags: Sequence[str] | PathLike | None = None,
    top_k: int = 5,
    heatmaps: PathLike | None = None,
    geojson: PathLike | None = None,
    scores: PathLike | None = None,
    memory_budget: str | int | None = None,
    device: str = "auto",
    ensemble: bool = False,
) -> pl.DataFrame:
    """Predict the bags of ``store`` (or ``bags``: ids, or a table with a bag_id column) with the
    run ``model`` (or, with ``ensemble``, its cross-validation's fold models averaged); returns the
    predictions (and writes them to ``out`` when given). For a survival model and a ``bags`` table
    with a group column, the patients' risks (the mean over their bags) go beside ``out``, as
    OUT.patients.csv (or .parquet)."""
    from milcache.aggregator.memory import parse_size
    from milcache.aggregator.predict import predict as run_prediction

    budget = None if memory_budget is None else parse_size(memory_budget)
    return run_prediction(
        model,
        store,
        out,
        bag_list(bags),
        top_k,
        heatmaps,
        geojson,
        device,
        scores,
        budget,
        ensemble,
        groups=bag_groups(bags),
    )


def _refuse_unknown(options: dict, known: set[str], what: str) -> None:
    """Keyword options that a function passes on as ``**options`` must be known ones, by name."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def bag_list(bags: Sequence[str] | PathLike | pl.DataFrame | None) -> list[str] | None:
    """Bag ids as a notebook passes them: a list (or polars / pandas Series), one id, a table with a
    bag_id column (a DataFrame, or a CSV / parquet file's path)."""
    if bags is None:
        return None
    if isinstance(bags, str) and not (Path(bags).suffix.lower() in _TABLE_SUFFIXES or Path(bags).is_file()):
        return [bags]  # one bag id
    if isinstance(bags, (str, Path)) or hasattr(bags, "columns"):
        from milcache.store.tables import read_table

        table = read_table(bags)
        if "bag_id" not in table.columns:
            raise OptionError(f"--bags {_shown(bags)}: no bag_id column (columns: {', '.join(table.columns)})")
        return table["bag_id"].cast(str).to_list()
    if not hasattr(bags, "__iter__"):
        raise OptionError(f"bags: expected bag ids (a list, one id, or a table with bag_id), got {type(bags).__name__}")
    return [str(b) for b in bags]


def bag_groups(bags) -> dict[str, str] | None:
    """Each bag's patient, when ``bags`` is a table with a group column (else None)."""
    if not (isinstance(bags, Path) or hasattr(bags, "columns") or (isinstance(bags, str) and Path(bags).is_file())):
        return None
    from milcache.store.tables import read_table

    table = read_table(bags, ("bag_id", "group"))
    if "group" not in table.columns:
        return None
    return dict(zip(table["bag_id"].to_list(), table["group"].to_list(), strict=True))


def _shown(table) -> str:
    return str(table) if isinstance(table, (str, Path)) else "(the DataFrame given)"


def fine_tune(
    model: PathLike,
    manifest: PathLike,
    out: PathLike,
    *,
    store: PathLike | None = None,
    labels: PathLike | None = None,
    weights: PathLike | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
    **settings,
):
    """Fine-tune the store's backbone and the head of the run ``model`` end to end on the images of
    ``manifest``; ``settings`` are FineTuneSettings' fields (``epochs``, ``instances``, ``freeze``,
    ``lr``, ``backbone_lr``, ``accumulate``, ``pool_maps``, ``checkpointing`` …). Writes
    ``out/backbone.safetensors`` and a run directory that ``predict`` accepts with a store
    re-extracted by that backbone (``extract(..., weights=out/"backbone.safetensors")``)."""
    from dataclasses import fields

    from milcache.aggregator.config import FineTuneSettings
    from milcache.aggregator.finetune import fine_tune as run_fine_tune

    _refuse_unknown(settings, {f.name for f in fields(FineTuneSettings)}, "fine-tune")
    chosen = FineTuneSettings(**{k: v for k, v in settings.items() if v is not None})
    return run_fine_tune(model, manifest, out, chosen, store, labels, weights, device, resume, progress)

"""The `milcache` command line: each command parses options, calls one public function, prints.

Heavy imports (torch, polars, lmdb) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from milcache import __version__
from milcache.aggregator.config import (
    METRICS,
    OPTIMIZERS,
    POOL_MAPS,
    REGIMES,
    SURVIVAL_LOSSES,
    TASK_KINDS,
    TIES,
    TRAIN_PRECISIONS,
    FineTuneSettings,
    TrainConfig,
)
from milcache.devices import DECODE_CHOICES, PRECISION_HELP, PRECISIONS
from milcache.errors import MilcacheError
from milcache.tuning.settings import AUTO_REPEATS_BAGS, DEFAULT_SELECTION, MAX_AUTO_REPEATS, PRUNERS, SELECTIONS


class _Group(click.Group):
    """Prints a user's mistake (a MilcacheError) as one message and exits 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MilcacheError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _csv_list(_ctx, _param, value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _float_list(ctx, param, value: str | None) -> list[float] | None:
    names = _csv_list(ctx, param, value)
    try:
        return None if names is None else [float(v) for v in names]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


class _LazyChoice(click.Choice):
    """Choices read only when needed (from a registry or a module that imports torch)."""

    def __init__(self, names) -> None:
        self._names = names
        super().__init__([])

    @property
    def choices(self):
        return self._names()

    @choices.setter
    def choices(self, _value) -> None:
        pass


def _head_names() -> list[str]:
    from milcache.aggregator.heads import list_heads

    return list_heads()


def _source_names() -> list[str]:
    from milcache.extractor.sources import list_sources

    return list_sources()


def _index_kinds() -> tuple[str, ...]:
    from milcache.store.instance_index import KINDS

    return KINDS


def _index_metrics() -> tuple[str, ...]:
    from milcache.store.instance_index import METRICS

    return METRICS


class _ExtractCommand(click.Command):
    """`extract`, whose per-source options are made from the registered sources' signatures when
    the command is used (they import torch), so that each option is typed once, where its source
    takes it."""

    _added = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._added:
            self._added = True
            position = next(i for i, p in enumerate(self.params) if p.name == "batch_size")
            self.params[position:position] = _source_click_options()
        return super().get_params(ctx)


def _source_click_options() -> list[click.Option]:
    from pathlib import Path as _Path

    from milcache.extractor.sources import source_options

    made = []
    for option in source_options():
        hint = "" if option.default in (None, False) or "[" in option.help else f" [{_shown(option.default)}]"
        help_text = f"{', '.join(option.kinds)}: {option.help}{hint}."
        if option.type is bool:
            made.append(click.Option([option.flag], is_flag=True, default=None, help=help_text))
            continue
        kind = existing_path if option.type is _Path else option.type
        made.append(click.Option([option.flag], type=kind, nargs=option.nargs, default=None, help=help_text))
    return made


def _shown(value) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _load_config(ctx: click.Context, _param, path: Path | None) -> Path | None:
    """--config FILE (TOML or YAML): its keys become the command's defaults; the command line wins."""
    if path is None:
        return None
    from milcache.settings_files import read_settings

    try:
        normalised = read_settings(path)
    except MilcacheError as exc:
        raise click.BadParameter(str(exc)) from None
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}")
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    for name in repeatable & set(normalised):
        if isinstance(normalised[name], dict):  # a table of KEY = VALUE for a repeatable KEY=VALUE option
            normalised[name] = [f"{key}={json.dumps(value)}" for key, value in normalised[name].items()]
    ctx.default_map = {**(ctx.default_map or {}), **normalised}
    return path


def _repeats(_ctx, _param, value: str) -> int | None:
    """``auto`` (None: chosen from the cohort) or a whole number of repeats, at least 1."""
    if value == "auto":
        return None
    try:
        repeats = int(value)
    except ValueError:
        repeats = 0
    if repeats < 1:
        raise click.BadParameter(f"{value!r}: expected auto or a whole number, at least 1")
    return repeats


def _key_values(_ctx, _param, values: tuple[str, ...]) -> dict:
    """KEY=VALUE options, with values parsed as JSON where they can be (numbers, true/false)."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


_DEFAULTS = TrainConfig()
_FINE = FineTuneSettings()
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when available), cuda, cuda:N or cpu."
)
existing_path = click.Path(exists=True, path_type=Path)
output_path = click.Path(path_type=Path)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="milcache")
def cli() -> None:
    """milcache: multiple-instance learning on cached backbone embeddings.

    Stage 1 (`extract`) embeds every instance of every bag once into an LMDB store; stage 2
    (`train-head`, `tune`, `predict`) trains aggregator heads on that store in seconds.
    """


@cli.group(cls=_Group)
def store() -> None:
    """Inspect, check, import and export feature stores."""


@store.command("info")
@click.argument("store_dir", type=existing_path)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def store_info(store_dir: Path, as_json: bool) -> None:
    """Show a store's backbone, dims, bag and instance counts, size and failures."""
    from milcache.store import FeatureStore
    from milcache.store.inspect import summarize

    with FeatureStore(store_dir) as fs:
        summary = summarize(fs)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    per_bag = summary["instances_per_bag"]
    click.echo(f"store       {summary['path']}")
    click.echo(f"backbone    {summary['backbone']}  ({summary['dim']}-d {summary['dtype']})")
    click.echo(f"bags        {summary['bags']}  in {summary['shards']} shard(s)")
    click.echo(
        f"instances   {summary['instances']}  (per bag: min {per_bag['min']}, "
        f"median {per_bag['median']:g}, max {per_bag['max']})"
    )
    click.echo(f"coords      {', '.join(summary['coords']) or '-'}")
    click.echo(f"source      {json.dumps(summary['metadata']['source'])}")
    click.echo(f"on disk     {_human_bytes(summary['disk_bytes'])}")
    click.echo(f"failures    {len(summary['failures'])}")
    for bag_id, reason in summary["failures"].items():
        click.echo(f"  {bag_id}: {reason}")


@store.command("verify")
@click.argument("store_dir", type=existing_path)
def store_verify(store_dir: Path) -> None:
    """Check every record's checksum, shapes and finiteness; exit 1 naming bad bags."""
    from milcache.store import FeatureStore
    from milcache.store.inspect import verify

    with FeatureStore(store_dir) as fs:
        problems = verify(fs, progress=sys.stderr.isatty())
        total = len(fs)
    for bag_id, problem in problems.items():
        click.echo(f"BAD {bag_id}: {problem}")
    click.echo(f"{total - len(problems)} of {total} bags are sound")
    if problems:
        sys.exit(1)


@store.command("import")
@click.argument("src", type=existing_path)
@click.option("--out", required=True, type=output_path, help="Store to create or add to.")
@click.option("--backbone", default="imported", show_default=True, help="Name of the model that made the features.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--bag-column", default="bag_id", show_default=True, help="Table input: the bag id column.")
@click.option("--label-column", default="label", show_default=True, help="Table input: kept as the bag label.")
@click.option(
    "--feature-columns",
    callback=_csv_list,
    help="Table input: comma-separated feature columns (default: every other numeric column).",
)
@click.option("--coord-columns", callback=_csv_list, help="Table input: comma-separated coordinate columns.")
@click.option("--overwrite", is_flag=True, help="Start the store over instead of adding to it.")
def store_import(src: Path, out: Path, **options) -> None:
    """Import embeddings from SRC: a folder of CLAM/TRIDENT .h5 files or of .pt/.npy files
    (one per bag, bag id = file name), or one CSV/parquet table with one row per instance.

    All or nothing: a failure leaves OUT as it was. Into an existing store the new bags come in
    together; a bag it already holds is skipped if identical and refused if changed."""
    from milcache.store import import_embeddings

    report = import_embeddings(src, out, progress=sys.stderr.isatty(), **options)
    held = f"; {report.unchanged} already there, unchanged" if report.unchanged else ""
    click.echo(f"imported {report.bags} bags, {report.instances} instances of dim {report.dim} into {out}{held}")
    for what, why in report.skipped.items():
        click.echo(f"  skipped {what}: {why}")


@store.command("export")
@click.argument("store_dir", type=existing_path)
@click.option("--out", required=True, type=output_path, help="Folder for one .h5 file per bag.")
def store_export(store_dir: Path, out: Path) -> None:
    """Export a store as one CLAM/TRIDENT-style .h5 per bag (datasets `features`, `coords`)."""
    from milcache.store import export_h5

    count = export_h5(store_dir, out, progress=sys.stderr.isatty())
    click.echo(f"exported {count} bags to {out}")


@store.command("synth")
@click.argument("out", type=output_path)
@click.option("--bags", default=200, show_default=True, type=click.IntRange(min=2))
@click.option(
    "--instances",
    nargs=2,
    type=click.IntRange(min=1),
    default=(20, 100),
    show_default=True,
    help="Min and max per bag.",
)
@click.option("--dim", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--groups", type=int, help="Number of patient groups (default: one per bag).")
@click.option("--seed", default=0, show_default=True)
@click.option("--labels", type=output_path, help="Where to write the labels table (default: OUT/labels.csv).")
@click.option("--overwrite", is_flag=True)
def store_synth(out: Path, labels: Path | None, **options) -> None:
    """Write a synthetic MIL cohort (positive bags hold a few shifted key instances) and its labels."""
    from milcache.store.synthetic import make_synthetic_store

    table = make_synthetic_store(out, **options)
    labels = labels or out / "labels.csv"
    table.write_csv(labels)
    click.echo(f"wrote {table.height} bags to {out}, labels to {labels}")


@cli.group(cls=_Group)
def index() -> None:
    """A faiss index over a store's instances: similar-instance search, k-means prototype bags."""


@index.command("build")
@click.argument("store_dir", type=existing_path)
@click.option(
    "--kind",
    type=_LazyChoice(_index_kinds),
    default="flat",
    show_default=True,
    help="flat: exact; ivf-pq: compressed codes for stores of hundreds of millions of instances.",
)
@click.option("--metric", type=_LazyChoice(_index_metrics), default="cosine", show_default=True)
@click.option("--bags", "bag_list", type=existing_path, help="Only the bag ids of this table's bag_id column.")
@click.option("--gpu", is_flag=True, help="Run faiss's training on the GPUs (needs the gpu extra: faiss-gpu).")
def index_build(store_dir: Path, kind: str, metric: str, bag_list: Path | None, gpu: bool) -> None:
    """Index every instance embedding of STORE (saved in STORE/index, checked against the store)."""
    from milcache import index

    info = index.build(store_dir, kind=kind, metric=metric, bags=bag_list, gpu=gpu)
    click.echo(
        f"indexed {info.instances} instances of {info.bags} bags ({kind}, {metric}) "
        f"in {info.seconds:.1f}s → {info.path}"
    )


@index.command("search")
@click.argument("store_dir", type=existing_path)
@click.option("--bag", help="Bag of the query instance.")
@click.option("--instance", type=click.IntRange(min=0), help="Its index within the bag.")
@click.option("--image", type=existing_path, help="Or a query image, embedded as the store's instances were.")
@click.option("--weights", type=existing_path, help="With --image: the weights file the store was extracted with.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Neighbours wanted.")
@click.option("--out", type=output_path, help="Also write the neighbours as .csv or .parquet.")
@click.option("--thumbnails", type=output_path, help="Folder for a contact sheet of the neighbours (PNG).")
@device_option
def index_search(store_dir: Path, **options) -> None:
    """The K nearest instances of an instance (or an image) across the cohort: bag, coordinates, distance."""
    import polars as pl

    from milcache import index

    table = index.search(store_dir, **options)
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True):
        click.echo(str(table))
    if options["thumbnails"]:
        click.echo(f"contact sheet → {Path(options['thumbnails']) / 'neighbours.png'}")


@index.command("kmeans")
@click.argument("store_dir", type=existing_path)
@click.option("--k", "k", required=True, type=click.IntRange(min=2), help="Clusters (the most instances a bag keeps).")
@click.option("--out", required=True, type=output_path, help="The prototype store to write.")
@click.option("--seed", default=0, show_default=True)
@click.option("--gpu", is_flag=True, help="Run faiss's training on the GPUs (needs the gpu extra: faiss-gpu).")
def index_kmeans(store_dir: Path, k: int, out: Path, seed: int, gpu: bool) -> None:
    """faiss k-means over STORE's instances; write a store whose bags are their per-cluster means."""
    from milcache import index

    summary = index.kmeans(store_dir, k=k, out=out, seed=seed, gpu=gpu)
    click.echo(f"{summary['bags']} bags of {summary['instances']} instances → ≤ {k} prototypes each in {out}")


@index.command("dedup")
@click.argument("store_dir", type=existing_path)
@click.option(
    "--threshold",
    default=0.95,
    show_default=True,
    type=float,
    help="Cosine similarity at or above which two instances are near-duplicates (squared distance at or "
    "below, with --metric l2).",
)
@click.option("--metric", type=_LazyChoice(_index_metrics), default="cosine", show_default=True)
@click.option(
    "--across-bags",
    is_flag=True,
    help="Also list near-identical instances of different bags (a leakage risk between folds); needs the index.",
)
def index_dedup(store_dir: Path, threshold: float, metric: str, across_bags: bool) -> None:
    """Mark near-duplicate instances within each bag, for `train-head --skip-duplicates`."""
    from milcache import index

    report = index.dedup(store_dir, threshold=threshold, metric=metric, across_bags=across_bags)
    click.echo(
        f"{report.duplicates} of {report.instances} instances are near-duplicates, in {report.bags_with_duplicates} "
        f"bag(s) → {report.path}"
    )
    if report.cross_bag_pairs is not None:
        click.echo(f"{report.cross_bag_pairs} near-identical pairs across bags → {report.cross_bag_path}")


store_option = click.option(
    "--store", "store_dir", required=True, type=existing_path, help="Feature store (made by extract or store import)."
)
labels_option = click.option(
    "--labels",
    required=True,
    type=existing_path,
    help="CSV/parquet with bag_id, label [, group, split], or the manifest.",
)
task_option = click.option(
    "--task", "task_kind", type=click.Choice(TASK_KINDS), help="Default: inferred from the labels."
)


def _class_list(ctx, param, value):
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) < 2:
        raise click.BadParameter(f"give two classes at least, comma-separated (e.g. low,medium,high), not {value!r}")
    return names


skip_duplicates_option = click.option(
    "--skip-duplicates",
    is_flag=True,
    help="Leave out the near-duplicate instances `milcache index dedup` marked (overlapping tiles …).",
)
memory_budget_option = click.option(
    "--memory-budget",
    help="Memory a training step may use, e.g. 8GiB [80% of the GPU, or half the free host memory]; "
    "bags that cannot fit are refused before training.",
)
classes_option = click.option(
    "--classes",
    callback=_class_list,
    metavar="A,B,C",
    help="Class order, low to high (ordinal labels that are text need it, e.g. low,medium,high).",
)


def survival_options(command):
    """The options of a survival task (train-head, tune), applied in reading order."""
    options = [
        click.option(
            "--time",
            "time_column",
            default="time",
            show_default=True,
            help="Survival: the column of times to the event or censoring (> 0).",
        ),
        click.option(
            "--event",
            "event_column",
            default="event",
            show_default=True,
            help="Survival: the column of event indicators, 1 observed, 0 censored. Labels with both "
            "columns and no label column are a survival task.",
        ),
        click.option(
            "--survival-loss",
            type=click.Choice(SURVIVAL_LOSSES),
            default="cox",
            show_default=True,
            help="cox: partial likelihood over each step's batch (its risk set: 64 bags, or the whole fold); "
            "nll: discrete-time likelihood over --bins intervals.",
        ),
        click.option(
            "--ties", type=click.Choice(TIES), default="efron", show_default=True, help="Cox: tied event times."
        ),
        click.option(
            "--bins",
            default=4,
            show_default=True,
            type=click.IntRange(min=2),
            help="nll: time intervals, at quantiles of the observed event times.",
        ),
        click.option(
            "--alpha",
            default=0.0,
            show_default=True,
            type=click.FloatRange(0.0, 1.0),
            help="nll: weight of the uncensored bags' term (censored bags weigh 1 - alpha; Zadeh & Schmid 2020).",
        ),
        click.option(
            "--risk-groups",
            default=2,
            show_default=True,
            type=click.IntRange(min=2),
            help="Kaplan-Meier plot: risk groups at quantiles of the predicted risk (2: a median split).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("train-head")
@store_option
@labels_option
@click.option("--head", default=_DEFAULTS.head, show_default=True, type=_LazyChoice(_head_names))
@click.option("--out", required=True, type=output_path, help="Run directory to write.")
@click.option(
    "--folds",
    default=5,
    show_default=True,
    type=click.IntRange(min=2),
    help="Cross-validation folds (grouped by `group`).",
)
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="Repeated cross-validation.")
@task_option
@classes_option
@click.option("--label-column", default="label", show_default=True)
@survival_options
@click.option("--epochs", type=int, help=f"Most epochs per fold [{_DEFAULTS.epochs}].")
@click.option("--lr", type=float, help=f"Learning rate [{_DEFAULTS.lr:g}].")
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    help=f"adam: weight decay as an L2 term in the gradient; adamw: decoupled [{_DEFAULTS.optimizer}].",
)
@click.option("--weight-decay", type=float, help=f"Weight decay [{_DEFAULTS.weight_decay:g}].")
@click.option("--batch-size", type=int, help="Bags per step [about 32 steps an epoch, 2 to 16 bags].")
@click.option(
    "--instances",
    type=click.IntRange(min=0),
    help=f"Random instances per bag per training step, 0 = all [{_DEFAULTS.instances}].",
)
@click.option(
    "--schedule", type=click.Choice(["cosine", "constant"]), help=f"Learning-rate schedule [{_DEFAULTS.schedule}]."
)
@click.option("--patience", type=int, help=f"Early-stopping patience in epochs [{_DEFAULTS.patience}].")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 0.5),
    help="Share of each training fold held out for early stopping (with --patience); 0: fixed epochs "
    f"[{_DEFAULTS.val_fraction:g}].",
)
@click.option(
    "--elastic-net", type=float, help=f"Strength of the L1/L2 penalty on weights [{_DEFAULTS.elastic_net:g}]."
)
@click.option("--l1-ratio", type=float, help=f"L1 share of the elastic-net penalty [{_DEFAULTS.l1_ratio:g}].")
@click.option("--class-weights/--no-class-weights", default=None, help="Weight the loss by inverse class frequency.")
@click.option("--balanced-sampling/--no-balanced-sampling", default=None, help="Draw class-balanced bags.")
@click.option("--hidden", type=int, help="Instance embedding size of the head [128].")
@click.option("--dropout", type=float, help="Dropout of the head [0.25].")
@click.option(
    "--head-option",
    "head_options",
    multiple=True,
    callback=_key_values,
    metavar="KEY=VALUE",
    help="A head-specific option, e.g. attention_dim=128 (repeatable).",
)
@click.option("--seed", type=int, help="Random seed [0].")
@click.option(
    "--precision",
    type=click.Choice(TRAIN_PRECISIONS),
    help=f"{PRECISION_HELP[:-1]} (bf16 on a CPU with AMX halves big-bag epochs; README).",
)
@skip_duplicates_option
@memory_budget_option
@click.option(
    "--memory",
    "regime",
    type=click.Choice(REGIMES),
    default="auto",
    show_default=True,
    help="Where embeddings live: auto picks GPU memory, host memory or streaming from the store by cohort size.",
)
@device_option
def train_head_command(store_dir, labels, out, task_kind, regime, **options) -> None:
    """Cross-validate an aggregator head on cached embeddings, refit it on all labelled bags, and
    write RUN: model, metrics.json, out-of-fold predictions, ROC curve (Kaplan-Meier curves for survival)."""
    from milcache.api import train_head

    result = train_head(store_dir, labels, out, task=task_kind, memory=regime, progress=sys.stderr.isatty(), **options)
    metrics, head = result.metrics, options["head"]
    shown = [k for k in METRICS if k in metrics]
    click.echo(f"{head} · {metrics['bags']} bags · {len(metrics['folds'])} fold(s) · {metrics['seconds']:.1f}s")
    for key in shown:
        click.echo(f"  {key:<18} {metrics[key]:.4f} ± {metrics[key + '_std']:.4f}")
    if "kaplan_meier" in metrics:
        km = metrics["kaplan_meier"]
        click.echo(f"  log-rank p (out-of-fold risk groups {km['sizes']}) {km['log_rank_p']:.3g}")
    if metrics["unlabelled_bags"]:
        click.echo(f"  ({metrics['unlabelled_bags']} bags of the store have no label and were not used)")
    for note in metrics["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"final model: {metrics['final_model']}; written to {out}")


@cli.command("predict")
@click.option("--model", "model_dir", required=True, type=existing_path, help="Run directory of train-head.")
@click.option("--store", "store_dir", required=True, type=existing_path, help="Feature store to predict.")
@click.option("--out", required=True, type=output_path, help="Predictions table (.csv or .parquet).")
@click.option("--bags", "bag_list", type=existing_path, help="Only the bag ids of this table's bag_id column.")
@click.option(
    "--top-k", default=5, show_default=True, type=click.IntRange(min=0), help="Most attended instances listed per bag."
)
@click.option("--heatmaps", type=output_path, help="Folder for one PNG heatmap of instance scores per bag.")
@click.option("--geojson", type=output_path, help="Folder for one QuPath-importable GeoJSON per bag.")
@click.option("--scores", "scores_file", type=output_path, help="Parquet of every instance's score and coordinates.")
@click.option("--memory-budget", help="Memory prediction may use, e.g. 8GiB [as train-head].")
@click.option(
    "--ensemble",
    is_flag=True,
    help="Average the run's cross-validation fold models (probabilities and instance scores) instead of "
    "using its model refit on every bag.",
)
@device_option
def predict_command(
    model_dir, store_dir, out, bag_list, top_k, heatmaps, geojson, scores_file, memory_budget, ensemble, device
) -> None:
    """Predict bag probabilities with a trained head; list top instances; draw heatmaps."""
    from milcache.api import predict

    table = predict(
        model_dir,
        store_dir,
        out,
        bags=bag_list,
        top_k=top_k,
        heatmaps=heatmaps,
        geojson=geojson,
        scores=scores_file,
        memory_budget=memory_budget,
        device=device,
        ensemble=ensemble,
    )
    click.echo(f"predicted {table.height} bags → {out}" + (" (fold ensemble)" if ensemble else ""))
    for folder in (heatmaps, geojson, scores_file):
        if folder:
            click.echo(f"  {folder}")


@cli.command("tune")
@store_option
@labels_option
@click.option("--out", required=True, type=output_path, help="Run directory (study, best.json, plots, best/).")
@click.option(
    "--n-trials",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Finished trials (complete or pruned) wanted. The first are the calibrated defaults and then "
    "every other head with its defaults, never pruned; the sampler takes over after them.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop starting trials after this many seconds."
)
@click.option(
    "--storage",
    help="SQLAlchemy URL (e.g. postgresql://user@host/db) or journal:PATH, to share one study "
    "between processes or machines [sqlite file in --out].",
)
@click.option("--study-name", default="milcache", show_default=True)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    help="Cross-validated metric to optimise [auc; c_index for survival].",
)
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Trials run at once in this process (one GPU).",
)
@click.option("--resume", is_flag=True, help="Continue the study of an earlier (killed) run.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2))
@click.option(
    "--repeats",
    default="auto",
    show_default=True,
    callback=_repeats,
    help="Repeated inner CV: each trial is scored on folds × repeats splits (steadier choices on small "
    f"cohorts, at repeats × the cost); auto: until the test folds hold {AUTO_REPEATS_BAGS} bags together "
    f"(1 to {MAX_AUTO_REPEATS}).",
)
@click.option("--space", "space_file", type=existing_path, help="TOML/YAML that narrows or widens the search space.")
@click.option(
    "--set",
    "fixed",
    multiple=True,
    callback=_key_values,
    metavar="KEY=VALUE",
    help="Fix a parameter instead of searching it (repeatable), e.g. --set head=gated-attention.",
)
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 0.5),
    help="Share of the bags (grouped, stratified) kept out of the study and used to score its kept "
    "configuration: an unbiased estimate beside the optimistic best CV score; 0 turns it off.",
)
@click.option(
    "--select",
    type=click.Choice(SELECTIONS),
    default=DEFAULT_SELECTION,
    show_default=True,
    help="Which trial to keep. The first trial is the calibrated defaults (when the space holds "
    "their head); blend keeps them together with the best trial (outputs averaged) unless that blend "
    "gains nothing on the bags that bootstrap resamples of the trials' out-of-fold outputs leave out; "
    "bootstrap keeps the defaults alone unless picking the best trial alone gains so; one-se keeps them "
    "unless the best trial beats them by more than one standard error of its CV score; best keeps the "
    "best trial (whose score is the most optimistic).",
)
@task_option
@classes_option
@survival_options
@click.option("--seed", default=0, show_default=True)
@skip_duplicates_option
@memory_budget_option
@device_option
def tune_command(
    store_dir, labels, out, space_file, fixed, task_kind, classes, memory_budget, device, **settings
) -> None:
    """Search aggregator heads and hyper-parameters with Optuna; retrain the best into RUN/best."""
    from milcache.api import tune
    from milcache.tuning.study import safe_url

    storage = settings["storage"]
    where = safe_url(storage) if storage else f"sqlite file {out / 'study.db'}"
    click.echo(f"study {settings['study_name']!r} in {where}")
    best = tune(
        store_dir,
        labels,
        out,
        space=space_file,
        set=fixed,
        task=task_kind,
        classes=classes,
        memory_budget=memory_budget,
        device=device,
        progress=sys.stderr.isatty(),
        **settings,
    ).best
    trials = best["trials"]
    click.echo(
        f"{trials['COMPLETE']} complete, {trials['PRUNED']} pruned, {trials['FAIL']} failed trials "
        f"in {best['seconds']:.0f}s"
    )
    click.echo(_chosen_line(best))
    held = best["holdout"]
    if held is None:
        click.echo("no held-out estimate (--holdout 0, or too few bags to hold any out)")
    elif held["value"] is not None:
        click.echo(
            f"held-out {best['metric']} {held['value']:.4f} on {held['bags']} bags the study never saw "
            "(the unbiased estimate)"
        )
    click.echo(f"wrote {out / 'best.json'}, trials.parquet, history.png, importances.png and the model {out / 'best'}")


def _chosen_line(best: dict) -> str:
    """Which trial the study kept and why, from best.json."""
    top, metric = best["best_trial"], best["metric"]
    scored = f"cross-validated on the study's bags, {best['folds']}-fold CV × {best['repeats']}"
    if best.get("blend"):
        line = (
            f"kept: a blend of the calibrated defaults and trial {best['trial']} ({best['head']}), outputs averaged, "
            f"{metric} {best['value']:.4f} ({scored}; the best trial alone {top['value']:.4f}, so optimistic)"
        )
    elif not best["defaults"] or top["trial"] == best["trial"]:
        kept = "the calibrated defaults" if best["defaults"] else best["head"]
        score = f"{metric} {best['value']:.4f}"
        line = f"kept: trial {best['trial']}, {kept}, {score} ({scored}: the best trial, so optimistic)"
    else:
        left_out = "on the bags that bootstrap resamples of the study leave out"
        why = {
            "blend": f"blended with them gains nothing {left_out}",
            "bootstrap": f"gains nothing over them {left_out}",
        }.get(
            best.get("selection"),
            "leads by less than one standard error of its score, which the choice among many trials inflates",
        )
        line = (
            f"kept: trial {best['trial']}, the calibrated defaults, {metric} {best['value']:.4f} ({scored}); "
            f"the best trial {top['trial']} ({top['head']}, {top['value']:.4f}) {why} (--select best keeps it)"
        )
    comparison = best.get("bootstrap")
    if comparison:
        line += (
            f"\nbias-corrected {metric} of picking the best trial: {comparison['tuned']:.4f}, of blending it with "
            f"the defaults: {comparison['blend']:.4f}, of the defaults: {comparison['defaults']:.4f} "
            f"(on bags left out of {comparison['samples']} bootstrap resamples)"
        )
    return line


@cli.command("extract", cls=_ExtractCommand)
@click.argument("manifest", type=existing_path)
@click.option(
    "--config",
    type=existing_path,
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML/YAML file of option values (the command line wins), to repeat a run exactly.",
)
@click.option(
    "--source",
    "source_kind",
    default="tiles",
    show_default=True,
    type=_LazyChoice(_source_names),
    help="tiles: slides and large images; cam: CAM-selected regions + global view; volume: 3D patches.",
)
@click.option("--out", required=True, type=output_path, help="Store to create or resume.")
@click.option(
    "--backbone",
    required=True,
    help="The encoder: a preset (uni2-h, virchow2, h-optimus-0 …: `milcache encoders`), a timm name "
    "(resnet50 …), hf-hub:ORG/NAME (from the local Hugging Face cache), local-dir:FOLDER (timm's layout), "
    "or tv:r3d_18, tv:mc3_18, tv:r2plus1d_18 (3D, for volumes).",
)
@click.option(
    "--backbone-args",
    multiple=True,
    callback=_key_values,
    metavar="KEY=VALUE",
    help="An architecture argument of the timm model (repeatable; a table in --config): init_values=1e-5, "
    "reg_tokens=4, mlp_layer=swiglu_packed, act_layer=silu, no_embed_class=true …",
)
@click.option(
    "--token-rule",
    type=click.Choice(["pooled", "cls", "mean", "cls+mean"]),
    help="How a transformer's tokens become the embedding [the preset's; else pooled: the model's own pooling].",
)
@click.option("--weights", type=existing_path, help="Local weights: a .safetensors / .pth / .bin file or a folder.")
@click.option(
    "--pretrained",
    is_flag=True,
    help="The preset's (or timm's) weights from the local Hugging Face cache only; also --cam-model's.",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True, help="Reading/decoding processes.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help=PRECISION_HELP,
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the backbone.")
@click.option(
    "--decode",
    type=click.Choice(DECODE_CHOICES),
    default="auto",
    show_default=True,
    help="Where JPEG tiles of pyramidal TIFFs and Aperio SVS are decoded: cpu (the workers) or gpu "
    "(nvjpeg, batched); auto: gpu on CUDA.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Stored embedding dtype.",
)
@click.option("--input-size", type=int, help="Backbone input side [timm's data config].")
@click.option("--mean", callback=_float_list, help="Normalisation mean, comma-separated [timm's data config].")
@click.option("--std", callback=_float_list, help="Normalisation std, comma-separated [timm's data config].")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic"]), help="Resize filter [timm's].")
@click.option(
    "--crop-pct",
    type=float,
    help="Resize to input-size / crop-pct, then crop the centre [the preset's or timm's; 1: resize only].",
)
@click.option("--shard", help="i/n: this process takes every n-th bag from the i-th (default from torchrun).")
@click.option("--overwrite", is_flag=True, help="Start the store over instead of resuming it.")
@click.option(
    "--reextract-changed",
    is_flag=True,
    help="Re-extract finished bags whose image files changed since (a rerun refuses them otherwise).",
)
@device_option
def extract_command(manifest, source_kind, out, compile_model, **options) -> None:
    """Embed every instance of every bag of MANIFEST with a backbone into an LMDB store.

    Resumable: a rerun skips finished bags and retries failed ones. Exits 1 when bags failed."""
    from milcache.api import extract

    summary = extract(
        manifest,
        out,
        source=source_kind,
        progress=sys.stderr.isatty(),
        compile=compile_model,
        **options,
    )
    click.echo(
        f"{summary.bags} bags, {summary.instances} instances in {summary.seconds:.1f}s "
        f"({summary.instances_per_second:.1f} instances/s); {summary.skipped} already done; "
        f"{len(summary.failures)} failed"
        + (f"; {summary.decoded_on_device} decoded on the GPU" if summary.decoded_on_device else "")
    )
    if options.get("decode") == "gpu" and summary.instances and not summary.decoded_on_device:
        click.echo("note: --decode gpu: no slide had JPEG-tiled levels (pyramidal TIFF, SVS); the workers decoded all")
    for bag_id, reason in summary.failures.items():
        click.echo(f"  FAILED {bag_id}: {reason}")
    if summary.failures:
        sys.exit(1)


@cli.command("fine-tune")
@click.option("--model", "model_dir", required=True, type=existing_path, help="Run directory of train-head or tune.")
@click.option("--manifest", required=True, type=existing_path, help="The images (the manifest extract read).")
@click.option("--out", required=True, type=output_path, help="Run directory to write (with backbone.safetensors).")
@click.option("--store", "store_dir", type=existing_path, help="The store the run was trained on [from the run].")
@click.option("--labels", type=existing_path, help="Labels [the run's].")
@click.option("--weights", type=existing_path, help="The weights file the store was extracted with.")
@click.option("--epochs", type=click.IntRange(min=1), help=f"Most epochs [{_FINE.epochs}].")
@click.option(
    "--instances", type=click.IntRange(min=1), help=f"Instances sampled per bag per step [{_FINE.instances}]."
)
@click.option("--freeze", help=f"none, all, or N: the backbone's first N stages (timm feature_info) [{_FINE.freeze}].")
@click.option("--lr", type=float, help=f"The head's learning rate [{_FINE.lr:g}].")
@click.option("--backbone-lr", type=float, help=f"The backbone's learning rate [{_FINE.backbone_lr:g}].")
@click.option("--weight-decay", type=float, help=f"AdamW weight decay [{_FINE.weight_decay:g}].")
@click.option("--accumulate", type=click.IntRange(min=1), help=f"Bags per optimizer step [{_FINE.accumulate}].")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 0.5),
    help=f"Bags held out for early stopping [{_FINE.val_fraction:g}].",
)
@click.option("--patience", type=click.IntRange(min=1), help=f"Early-stopping patience in epochs [{_FINE.patience}].")
@click.option(
    "--pool-maps",
    type=click.Choice(POOL_MAPS),
    help="Pool the instances' last feature maps across the bag before global pooling (2D sources).",
)
@click.option("--checkpointing", is_flag=True, default=None, help="Gradient checkpointing in the backbone.")
@click.option("--precision", type=click.Choice(TRAIN_PRECISIONS), help=PRECISION_HELP)
@click.option("--workers", type=click.IntRange(min=0), help=f"Image-reading processes [{_FINE.workers}].")
@click.option("--seed", type=int, help=f"Random seed [{_FINE.seed}].")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last finished epoch.")
@device_option
def fine_tune_command(model_dir, manifest, out, store_dir, labels, weights, resume, device, **settings) -> None:
    """Train the backbone and a trained head together on the original images (each step re-reads
    K sampled instances of a bag through the coordinates kept in the store)."""
    from milcache.api import fine_tune

    result = fine_tune(
        model_dir,
        manifest,
        out,
        store=store_dir,
        labels=labels,
        weights=weights,
        resume=resume,
        device=device,
        progress=sys.stderr.isatty(),
        **settings,
    )
    for row in result.history:
        val = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        click.echo(f"  epoch {row['epoch'] + 1}: train loss {row['train_loss']:.4f}, val loss {val}")
    click.echo(f"best epoch {result.best_epoch + 1}; {len(result.frozen)} backbone tensors frozen")
    click.echo(f"backbone → {result.backbone} (re-extract with: milcache extract ... --weights {result.backbone})")
    click.echo(f"head → {result.run_dir} (predict on a store re-extracted with that backbone)")


@cli.command("encoders")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per preset instead of a table.")
def encoders_command(as_json: bool) -> None:
    """List the encoder presets: name, embedding dim, parameters, input size, magnification, token rule,
    licence and where the weights come from. Any timm model works too (e.g. --backbone resnet50)."""
    from milcache.extractor.presets import preset_rows

    rows = preset_rows()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    click.echo(
        "\nAlso: any timm model by name (timm.list_models(); --pretrained for timm's weights from the local "
        "cache), hf-hub:ORG/NAME and local-dir:FOLDER in timm's layout, with --backbone-args for its arguments."
    )


@cli.command("demo")
@click.option(
    "--out", type=output_path, default=Path("milcache-demo"), show_default=True, help="Folder for everything."
)
@click.option("--bags", default=120, show_default=True, help="Slides in the cohort.")
@click.option("--trials", default=4, show_default=True, help="Tuning trials.")
@click.option(
    "--task",
    type=click.Choice(("binary", "survival")),
    default="binary",
    show_default=True,
    help="binary: a slide is positive when it holds a 9; survival: a patient's event comes sooner the more "
    "9s its slides hold (a time and an event per patient).",
)
@device_option
def demo_command(out: Path, bags: int, trials: int, task: str, device: str) -> None:
    """Run the whole pipeline on an embedded cohort (MNIST-bags from scikit-learn's digits): extract,
    tune, train-head, predict with heatmaps; ends with held-out AUC and accuracy (concordance and
    Kaplan-Meier curves with --task survival)."""
    from milcache.demo import run_demo

    run_demo(out, device, bags, trials, echo=click.echo, progress=sys.stderr.isatty(), task=task)


def main() -> None:
    cli(prog_name="milcache")


if __name__ == "__main__":
    main()

"""The `milcache` command line: each command parses options, calls one public function, prints.

Heavy imports (torch, polars, lmdb) happen inside the commands so that `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from milcache import __version__
from milcache.errors import MilcacheError


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


class _HeadChoice(click.Choice):
    """The registered head names, read from the registry only when needed (it imports torch)."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self):  # noqa: D401 - click reads this attribute
        from milcache.aggregator.heads import list_heads

        return list_heads()

    @choices.setter
    def choices(self, _value) -> None:
        pass


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
    (one per bag, bag id = file name), or one CSV/parquet table with one row per instance."""
    from milcache.store import import_embeddings

    report = import_embeddings(src, out, progress=sys.stderr.isatty(), **options)
    click.echo(f"imported {report.bags} bags, {report.instances} instances of dim {report.dim} into {out}")
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
@click.option("--bags", default=200, show_default=True)
@click.option("--instances", nargs=2, type=int, default=(20, 100), show_default=True, help="Min and max per bag.")
@click.option("--dim", default=64, show_default=True)
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


device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when available), cuda, cuda:N or cpu."
)


@cli.command("train-head")
@click.option("--store", "store_dir", required=True, type=existing_path, help="Feature store.")
@click.option(
    "--labels",
    required=True,
    type=existing_path,
    help="CSV/parquet with bag_id, label [, group, split], or the manifest.",
)
@click.option("--head", default="gated-attention", show_default=True, type=_HeadChoice())
@click.option("--out", required=True, type=output_path, help="Run directory to write.")
@click.option("--folds", default=5, show_default=True, help="Cross-validation folds (grouped by `group`).")
@click.option("--repeats", default=1, show_default=True, help="Repeated cross-validation.")
@click.option(
    "--task",
    "task_kind",
    type=click.Choice(["binary", "multiclass", "ordinal", "regression"]),
    help="Default: inferred from the labels.",
)
@click.option("--label-column", default="label", show_default=True)
@click.option("--epochs", type=int, help="Most epochs per fold [40].")
@click.option("--lr", type=float, help="AdamW learning rate [2e-3].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [1e-2].")
@click.option("--batch-size", type=int, help="Bags per step [16].")
@click.option("--instances", type=int, help="Random instances per bag per training step, 0 = all [1024].")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), help="Learning-rate schedule [cosine].")
@click.option("--patience", type=int, help="Early-stopping patience in epochs [10].")
@click.option("--elastic-net", type=float, help="Strength of the L1/L2 penalty on weights [0].")
@click.option("--l1-ratio", type=float, help="L1 share of the elastic-net penalty [0.5].")
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
@device_option
def train_head_command(
    store_dir,
    labels,
    head,
    out,
    folds,
    repeats,
    task_kind,
    label_column,
    device,
    hidden,
    dropout,
    head_options,
    **train_options,
) -> None:
    """Cross-validate an aggregator head on cached embeddings, refit it on all labelled bags, and
    write RUN: model, metrics.json, out-of-fold predictions, ROC curve."""
    from milcache.aggregator.run import train_head
    from milcache.aggregator.trainer import TrainConfig

    options = {k: v for k, v in train_options.items() if v is not None}
    if options.get("instances") == 0:
        options["instances"] = None
    head_options = {**head_options, **{k: v for k, v in (("hidden", hidden), ("dropout", dropout)) if v is not None}}
    config = TrainConfig(head=head, head_options=head_options, **options)
    metrics = train_head(
        store_dir, labels, out, config, folds, repeats, task_kind, device, label_column, progress=sys.stderr.isatty()
    )
    shown = [
        k
        for k in ("auc", "accuracy", "balanced_accuracy", "f1", "log_loss", "kappa", "mse", "r2", "pearson_r")
        if k in metrics
    ]
    click.echo(f"{head} · {metrics['bags']} bags · {len(metrics['folds'])} fold(s) · {metrics['seconds']:.1f}s")
    for key in shown:
        click.echo(f"  {key:<18} {metrics[key]:.4f} ± {metrics[key + '_std']:.4f}")
    if metrics["unlabelled_bags"]:
        click.echo(f"  ({metrics['unlabelled_bags']} bags of the store have no label and were not used)")
    click.echo(f"final model: {metrics['final_model']}; written to {out}")


@cli.command("predict")
@click.option("--model", "model_dir", required=True, type=existing_path, help="Run directory of train-head.")
@click.option("--store", "store_dir", required=True, type=existing_path, help="Feature store to predict.")
@click.option("--out", required=True, type=output_path, help="Predictions table (.csv or .parquet).")
@click.option("--bags", "bag_list", type=existing_path, help="Only the bag ids of this table's bag_id column.")
@click.option("--top-k", default=5, show_default=True, help="Most attended instances listed per bag.")
@click.option("--heatmaps", type=output_path, help="Folder for one PNG heatmap of instance scores per bag.")
@click.option("--geojson", type=output_path, help="Folder for one QuPath-importable GeoJSON per bag.")
@device_option
def predict_command(model_dir, store_dir, out, bag_list, top_k, heatmaps, geojson, device) -> None:
    """Predict bag probabilities with a trained head; list top instances; draw heatmaps."""
    from milcache.aggregator.predict import predict
    from milcache.store.tables import read_table

    bag_ids = read_table(bag_list)["bag_id"].to_list() if bag_list else None
    table = predict(model_dir, store_dir, out, bag_ids, top_k, heatmaps, geojson, device)
    click.echo(f"predicted {table.height} bags → {out}")
    for folder in (heatmaps, geojson):
        if folder:
            click.echo(f"  {folder}")


def main() -> None:
    cli(prog_name="milcache")


if __name__ == "__main__":
    main()

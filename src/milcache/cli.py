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


def main() -> None:
    cli(prog_name="milcache")


if __name__ == "__main__":
    main()

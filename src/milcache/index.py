"""``milcache.index``: the Python side of ``milcache index`` (build, search, kmeans, dedup), the functions
its CLI calls. The faiss work itself lives in ``milcache.store.instance_index``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from milcache.api import PathLike, bag_list

if TYPE_CHECKING:
    import polars as pl

    from milcache.store.instance_index import DedupReport, IndexInfo


def build(
    store: PathLike,
    *,
    kind: str = "flat",
    metric: str = "cosine",
    bags: Sequence[str] | PathLike | None = None,
    seed: int = 0,
    gpu: bool = False,
) -> IndexInfo:
    """Index every instance embedding of ``store`` (or of ``bags``), saved in STORE/index; ``gpu``
    trains IVF-PQ's coarse quantizer on the GPUs (faiss-gpu, the ``gpu`` extra)."""
    from milcache.store.instance_index import build_index

    return build_index(store, kind, metric, bag_list(bags), seed, gpu)


def search(
    store: PathLike,
    *,
    bag: str | None = None,
    instance: int | None = None,
    image: PathLike | None = None,
    weights: PathLike | None = None,
    k: int = 10,
    out: PathLike | None = None,
    thumbnails: PathLike | None = None,
    device: str = "auto",
) -> pl.DataFrame:
    """The ``k`` nearest instances across the cohort (rank, bag, instance, coordinates, distance) of
    instance ``instance`` of ``bag``, or of an ``image`` file embedded as the store's instances were
    (the store's backbone and preprocessing; ``weights``: the file it was extracted with). Also
    written to ``out`` (.csv or .parquet), and with ``thumbnails`` drawn as a contact sheet of the
    neighbours read again from their source images (``thumbnails/neighbours.png``)."""
    from milcache import checks
    from milcache.errors import OptionError
    from milcache.store.instance_index import InstanceIndex

    if (image is None) == (bag is None) or (bag is None) != (instance is None):
        raise OptionError("give either --bag with --instance, or --image")
    if out is not None:
        checks.output_file(out, "--out", (".csv", ".parquet"))
    if thumbnails is not None:
        checks.output_dir(thumbnails, "--thumbnails")
    with InstanceIndex(store) as index:
        if image is None:
            table = index.neighbours(bag, instance, k)
        else:
            table = index.nearest(_embed_file(index.store, image, weights, device), k)
        if thumbnails is not None:
            _contact_sheet(index.store, table, Path(thumbnails) / "neighbours.png", bag, instance, image)
    if out is not None:
        table.write_csv(out) if Path(out).suffix.lower() == ".csv" else table.write_parquet(out)
    return table


def _embed_file(store, image: PathLike, weights: PathLike | None, device: str):
    from milcache.devices import resolve_device
    from milcache.errors import OptionError
    from milcache.extractor.reread import embed_images, read_image, store_backbone

    pixels = read_image(image)
    settings = store.metadata.source
    side = settings.get("tile_size") or settings.get("region_size")
    height, width = pixels.shape[1:3]
    if side and not (side / 2 <= min(height, width) and max(height, width) <= 2 * side):
        raise OptionError(
            f"--image {image}: {width} x {height} pixels, but the instances of {store.path} are {side} x {side} "
            "(read at its resolution): give an image of about that size"
        )
    return embed_images(store_backbone(store, weights), pixels, resolve_device(device))[0]


def _contact_sheet(store, table: pl.DataFrame, path: Path, bag, instance, image) -> None:
    import numpy as np

    from milcache.aggregator.plots import contact_sheet
    from milcache.extractor.reread import reread, source_of

    source = source_of(store)
    try:
        tiles = [None] * table.height
        for (bag_id,), group in table.with_row_index("row").group_by("bag_id", maintain_order=True):
            pixels = reread(store, source, bag_id, group["instance"].to_numpy())
            for row, tile in zip(group["row"].to_list(), pixels, strict=True):
                tiles[row] = tile
    finally:
        source.close()
    titles = [f"{b} #{i}\nd={d:.3f}" for b, i, d in table.select("bag_id", "instance", "distance").iter_rows()]
    query = f"{bag} #{instance}" if image is None else Path(image).name
    contact_sheet(np.stack(tiles), titles, path, f"nearest instances of {query}")


def kmeans(store: PathLike, *, k: int, out: PathLike, seed: int = 0, gpu: bool = False) -> dict:
    """faiss k-means over the instances of ``store``; writes the prototype store ``out`` whose bags
    are their per-cluster means (≤ k instances each)."""
    from milcache.store.instance_index import prototype_store

    return prototype_store(store, k, out, seed, gpu=gpu)


def dedup(
    store: PathLike, *, threshold: float = 0.95, metric: str = "cosine", across_bags: bool = False
) -> DedupReport:
    """Mark near-duplicate instances within each bag of ``store`` (for ``skip_duplicates``); with
    ``across_bags``, also list near-identical instances of different bags (needs the built index)."""
    from milcache.store.instance_index import find_duplicates

    return find_duplicates(store, threshold, metric, across_bags)

"""Bring embeddings users already have into a store, and export a store in the CLAM/TRIDENT layout.

Supported inputs:
* a folder of ``.h5`` files, one per slide, with datasets ``features`` (n × d) and ``coords``
  (n × k), as CLAM and TRIDENT write them; the bag id is the file stem;
* a folder of ``.pt`` / ``.npy`` / ``.npz`` files, one per bag: an (n × d) array, or a mapping with
  ``features`` and optionally ``coords``;
* one CSV/parquet table with one row per instance.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from milcache import checks
from milcache.errors import ManifestError, StoreError
from milcache.store.lmdb_store import FeatureStore, StoreWriter, add_shard, publish_store, staging_dir
from milcache.store.metadata import METADATA_FILE, StoreMetadata
from milcache.store.tables import read_table

ARRAY_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


@dataclass
class ImportedBag:
    bag_id: str
    features: np.ndarray
    coords: np.ndarray | None = None
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class ImportReport:
    bags: int
    instances: int
    dim: int
    skipped: dict[str, str]  # file or bag → why it was not imported
    unchanged: int = 0  # bags the store already held, identical


def _as_2d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    while array.ndim > 2 and array.shape[0] == 1:  # some tools save (1, n, d)
        array = array[0]
    if array.ndim != 2:
        raise StoreError(f"{what}: expected an (instances × dim) array, got shape {array.shape}")
    if array.shape[1] == 0:
        raise StoreError(f"{what}: an array of shape {array.shape} has no features per instance")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise StoreError(f"{what}: expected numbers, got an array of {array.dtype}")
    return array


def _jsonable(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        value = value.item() if isinstance(value, np.generic) else value
        value = value.tolist() if isinstance(value, np.ndarray) else value
        value = value.decode() if isinstance(value, bytes) else value
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _read_h5(path: Path) -> ImportedBag:
    import h5py

    with h5py.File(path, "r") as handle:
        if "features" not in handle:
            raise StoreError(f"{path}: no 'features' dataset (found: {', '.join(handle.keys()) or 'none'})")
        features = _as_2d(handle["features"][()], str(path))
        coords = attrs = None
        meta = {}
        if "coords" in handle:
            coords = _as_2d(handle["coords"][()], f"{path} coords")
            meta = _jsonable(handle["coords"].attrs)
        if "attrs" in handle:  # written by our own export
            attrs = {name: handle["attrs"][name][()] for name in handle["attrs"]}
        if "milcache_meta" in handle.attrs:
            meta = json.loads(handle.attrs["milcache_meta"])
    return ImportedBag(path.stem, features, coords, attrs or {}, meta)


def _read_array_file(path: Path) -> ImportedBag:
    if path.suffix in (".pt", ".pth"):
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle user files
        except Exception as exc:  # torch raises many kinds here; all mean "not a plain tensor file"
            raise StoreError(f"{path}: cannot load as tensors ({type(exc).__name__}: {exc})") from None
    else:
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as archive:
                    data = {k: archive[k] for k in archive.files}
            else:
                data = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:  # EOFError: an empty or cut file
            why = f"{type(exc).__name__}: {exc or 'empty file'}"
            raise StoreError(f"{path}: cannot load as a numpy array ({why})") from None
    if isinstance(data, dict):
        if "features" not in data:
            raise StoreError(f"{path}: a mapping without 'features' (keys: {', '.join(map(str, data))})")
        features, coords = data["features"], data.get("coords")
    else:
        features, coords = data, None
    as_numpy = lambda a: a.numpy() if hasattr(a, "numpy") else np.asarray(a)  # noqa: E731
    coords = None if coords is None else _as_2d(as_numpy(coords), f"{path} coords")
    return ImportedBag(path.stem, _as_2d(as_numpy(features), str(path)).astype(np.float32), coords)


def _bags_from_folder(src: Path, skipped: dict[str, str]) -> Iterator[ImportedBag]:
    suffixes = (".h5", ".hdf5", *ARRAY_SUFFIXES)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    for other in sorted(p for p in src.iterdir() if p not in files and not p.name.startswith(".")):
        skipped[str(other)] = "not an embeddings file (.h5, .pt, .npy or .npz)"
    if not files:
        raise StoreError(f"{src}: no .h5, .pt, .npy or .npz files to import")
    by_bag: dict[str, list[Path]] = {}
    for path in files:
        by_bag.setdefault(path.stem, []).append(path)
    twice = {bag: paths for bag, paths in by_bag.items() if len(paths) > 1}
    if twice:
        shown = "; ".join(f"{bag}: {', '.join(p.name for p in paths)}" for bag, paths in list(twice.items())[:5])
        raise StoreError(f"{src}: {len(twice)} bag id(s) come from more than one file ({shown}); keep one file per bag")
    for path in files:
        try:
            yield _read_h5(path) if path.suffix.lower() in (".h5", ".hdf5") else _read_array_file(path)
        except OSError as exc:
            skipped[str(path)] = f"unreadable: {exc}"


def _bags_from_table(
    src: Path,
    bag_column: str,
    label_column: str | None,
    feature_columns: list[str] | None,
    coord_columns: list[str] | None,
) -> Iterator[ImportedBag]:
    table = read_table(src, (bag_column,))
    coord_columns = list(coord_columns or [])
    missing = [c for c in [bag_column, *coord_columns, *(feature_columns or [])] if c not in table.columns]
    if missing:
        raise ManifestError(f"{src}: missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    has_label = label_column is not None and label_column in table.columns
    if feature_columns is None:
        taken = {bag_column, label_column, *coord_columns}
        feature_columns = [c for c, t in table.schema.items() if c not in taken and t.is_numeric()]
    if not feature_columns:
        raise ManifestError(f"{src}: no numeric feature columns besides {bag_column!r}")
    nulls = table.filter(pl.col(bag_column).is_null())
    if nulls.height:
        raise ManifestError(f"{src}: {nulls.height} row(s) have an empty {bag_column!r}")
    for (bag_id,), rows in table.partition_by(bag_column, maintain_order=True, as_dict=True).items():
        meta = {}
        if has_label:
            labels = rows[label_column].unique().to_list()
            if len(labels) != 1:
                raise ManifestError(f"{src}: rows of bag {bag_id!r} disagree on {label_column}: {labels}")
            meta["label"] = labels[0]
        features = rows.select(feature_columns).to_numpy().astype(np.float32)
        coords = rows.select(coord_columns).to_numpy() if coord_columns else None
        yield ImportedBag(str(bag_id), features, coords, {}, meta)


def import_embeddings(
    src: str | Path,
    out: str | Path,
    *,
    backbone: str = "imported",
    dtype: str = "float16",
    bag_column: str = "bag_id",
    label_column: str | None = "label",
    feature_columns: list[str] | None = None,
    coord_columns: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ImportReport:
    """Import a folder of per-bag files or one instance table into the store at ``out``.

    An import is a unit: the bags are written into a staging store beside ``out`` and published
    only once every one of them was read and checked, so a failure (or a kill) leaves ``out`` as it
    was. A new store appears whole; into an existing store the new bags come in as one more shard,
    moved in by one rename. A bag the store already holds is skipped when it is identical and
    refused when it changed (``overwrite`` starts the store over)."""
    src, out = Path(src), Path(out)
    checks.output_dir(out)
    skipped: dict[str, str] = {}
    if src.is_dir():
        bags, kind = _bags_from_folder(src, skipped), "folder"
    elif src.is_file():
        bags = _bags_from_table(src, bag_column, label_column, feature_columns, coord_columns)
        kind = "table"
    else:
        raise StoreError(f"{src}: no such file or folder")
    existing = None if overwrite or not (out / METADATA_FILE).exists() else FeatureStore(out)
    prefix = ".import-" if existing is not None else f".{out.name}.import-"
    staging = staging_dir(out if existing is not None else out.parent, prefix=prefix)
    try:
        settings = {"backbone": backbone, "dtype": dtype, "kind": kind, "coord_columns": coord_columns}
        report = _stage(bags, staging, existing, settings, skipped, progress)
        if report.bags == 0 and not report.unchanged:
            raise StoreError(f"{src}: nothing could be imported: {report.skipped}")
        if existing is not None:
            existing.close()
            add_shard(out, staging)
        else:
            publish_store(staging, out, overwrite=overwrite)
    finally:
        if existing is not None:
            existing.close()
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _stage(bags, staging: Path, existing: FeatureStore | None, settings: dict, skipped: dict, progress: bool):
    """Write every bag into the staging store; bags ``existing`` holds are compared, not written."""
    from tqdm import tqdm

    writer, n_bags, n_instances, dim, unchanged = None, 0, 0, 0, 0
    try:
        for bag in tqdm(bags, desc="import", unit="bag", disable=not progress):
            if writer is None:
                dim = bag.features.shape[1]
                metadata = _metadata(bag, dim, settings)
                if existing is not None:
                    metadata.check_compatible(existing.metadata, existing.path)
                writer = StoreWriter(staging, metadata)
            if bag.features.shape[1] != dim:
                raise StoreError(
                    f"bag {bag.bag_id!r} has {bag.features.shape[1]}-d features; the first bag had {dim}-d"
                )
            if not _is_file_name(bag.bag_id):
                raise StoreError(
                    f"bag id {bag.bag_id!r} cannot be a file name (store export writes one file per bag): rename it"
                )
            if bag.features.shape[0] == 0:
                skipped[bag.bag_id] = "no instances"
                continue
            if existing is not None and bag.bag_id in existing:
                _require_unchanged(existing, bag)
                unchanged += 1
                continue
            writer.put(bag.bag_id, bag.features, bag.coords, bag.attrs, meta=bag.meta)
            n_bags += 1
            n_instances += bag.features.shape[0]
    finally:
        if writer is not None:
            writer.close()
    return ImportReport(n_bags, n_instances, dim, skipped, unchanged)


def _metadata(bag: ImportedBag, dim: int, settings: dict) -> StoreMetadata:
    k = 0 if bag.coords is None else bag.coords.shape[1]
    names = ["x", "y"] if k == 2 else list(settings["coord_columns"] or [f"c{i}" for i in range(k)])
    return StoreMetadata(
        backbone=settings["backbone"],
        dim=dim,
        dtype=settings["dtype"],
        source={"kind": "import", "format": settings["kind"]},
        coords=names,
    )


def _is_file_name(bag_id: str) -> bool:
    """Whether a bag id can name its file in an export (one file per bag)."""
    return "/" not in bag_id and bag_id not in (".", "..")


def _require_unchanged(store: FeatureStore, bag: ImportedBag) -> None:
    """A bag imported again must be the one the store holds (as extract refuses a changed slide)."""
    held = store.get(bag.bag_id)
    features = bag.features.astype(held.embeddings.dtype)
    same = held.embeddings.shape == features.shape and np.array_equal(held.embeddings, features, equal_nan=True)
    if same and bag.coords is not None:
        same = np.array_equal(np.asarray(held.coords), np.asarray(bag.coords).astype(held.coords.dtype))
    if not same:
        raise StoreError(
            f"bag {bag.bag_id!r} is already in {store.path} with other embeddings; nothing was imported. "
            "Import into a new store, or start this one over with --overwrite"
        )


def export_h5(store_dir: str | Path, out_dir: str | Path, progress: bool = False) -> int:
    """Write one CLAM/TRIDENT-style ``.h5`` per bag (``features``, ``coords``); returns the bag count."""
    import h5py
    from tqdm import tqdm

    out_dir = checks.output_dir(out_dir)
    with FeatureStore(store_dir) as store:
        out_dir.mkdir(parents=True, exist_ok=True)
        for bag in tqdm(store, total=len(store), desc="export", unit="bag", disable=not progress):
            if not _is_file_name(bag.bag_id):
                raise StoreError(f"bag id {bag.bag_id!r} cannot be a file name; export stops there")
            tmp = out_dir / f".{bag.bag_id}.h5.part"
            with h5py.File(tmp, "w") as handle:
                handle.create_dataset("features", data=bag.embeddings)
                coords = handle.create_dataset("coords", data=bag.coords)
                coords.attrs["columns"] = json.dumps(store.metadata.coords)
                group = handle.create_group("attrs")
                for name, values in bag.attrs.items():
                    group.create_dataset(name, data=values)
                handle.attrs["milcache_meta"] = json.dumps(bag.meta)
                handle.attrs["backbone"] = store.metadata.backbone
            tmp.replace(out_dir / f"{bag.bag_id}.h5")
        return len(store)

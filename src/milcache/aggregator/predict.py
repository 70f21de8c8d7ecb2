"""`predict`: bag probabilities, the most attended instances, heatmaps (PNG) and QuPath GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from milcache import checks
from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import load_bags
from milcache.aggregator.memory import check_bags_fit, default_budget, measure_head
from milcache.aggregator.model import Ensemble, MILModel, load_model
from milcache.aggregator.plots import pyplot
from milcache.aggregator.run import check_model_input
from milcache.aggregator.trainer import infer
from milcache.devices import resolve_device
from milcache.errors import MilcacheError
from milcache.store import FeatureStore
from milcache.store.record import Bag


def predict(
    model_dir: str | Path,
    store_dir: str | Path,
    out_file: str | Path | None = None,
    bag_ids: list[str] | None = None,
    top_k: int = 5,
    heatmaps: str | Path | None = None,
    geojson: str | Path | None = None,
    device: str = "auto",
    scores_file: str | Path | None = None,
    memory_budget: int | None = None,
    ensemble: bool = False,
    *,
    groups: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Predict every bag of the store (or ``bag_ids``); write the table to ``out_file`` (.csv/.parquet)
    and, with ``scores_file``, every instance's score with its coordinates (parquet). With
    ``ensemble``, the run's cross-validation fold models predict together (probabilities and
    instance scores averaged) instead of its refit model. With ``groups`` (bag → patient), a
    survival model's patient risks are written beside ``out_file`` (``patients_file``)."""
    model_dir = Path(model_dir)
    if out_file is not None:
        checks.output_file(out_file, "--out", (".csv", ".parquet", ".pq"))
    if scores_file is not None:
        checks.output_file(scores_file, "--scores", (".parquet", ".pq"))
    for folder, option in ((heatmaps, "--heatmaps"), (geojson, "--geojson")):
        if folder is not None:
            checks.output_dir(folder, option)
    checks.at_least("--top-k", top_k, 0)
    torch_device = resolve_device(device)
    model, config, task = load_model(model_dir, torch_device, ensemble)
    if (heatmaps or geojson) and not model.head.has_instance_scores:
        raise MilcacheError(
            f"--heatmaps and --geojson draw instance scores, and the {config['head']!r} head of {model_dir} "
            "gives none; leave them out, or train a head with instance scores (attention, gated-attention …)"
        )
    with FeatureStore(store_dir) as store:
        check_model_input(config["store"], store, model_dir=model_dir)
        ids = store.select(bag_ids, "to predict")
        sizes = store.sizes()
        budget = memory_budget or default_budget(torch_device)
        lengths = np.array([sizes[b] for b in ids])
        for name, head in _heads(model, config):  # a blend's members run one after the other
            check_bags_fit(measure_head(head, head.in_dim), budget, lengths, ids, name, training=False)
        data = load_bags(store, ids, torch_device)
        train = TrainConfig.from_stored(config["train"])
        logits, scores = infer(model, data, np.arange(len(ids)), train, scores=True)
        outputs = task.outputs(logits).cpu().numpy()
        bags = [store[bag_id] for bag_id in ids]  # views: coordinates, thumbnails, no copies
        names = store.metadata.coords
        table = _table(ids, outputs, task, scores, bags, names, top_k)
        if scores_file is not None:
            _instance_scores(scores, bags, names).write_parquet(scores_file)
        for bag, bag_scores in zip(bags, scores, strict=True):
            if bag_scores is None:
                continue
            if heatmaps:
                draw_heatmap(bag, bag_scores, store.metadata.source, Path(heatmaps) / f"{bag.bag_id}.png")
            if geojson:
                write_geojson(bag, bag_scores, store.metadata.source, Path(geojson) / f"{bag.bag_id}.geojson")
    if out_file is not None:
        _write_table(table, Path(out_file))
        if task.kind == "survival" and groups:
            _write_table(patient_risks(table, groups, task.output_columns), patients_file(Path(out_file)))
    return table


def _write_table(table: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        table.write_csv(path)
    else:
        table.write_parquet(path)


def patients_file(out_file: Path) -> Path:
    """Where a survival prediction's per-patient table goes: OUT.patients.csv beside OUT.csv."""
    return out_file.with_name(f"{out_file.stem}.patients{out_file.suffix}")


def patient_risks(table: pl.DataFrame, groups: dict[str, str], columns: list[str]) -> pl.DataFrame:
    """One row per patient: its bags' mean risk (and survival curve), the rule train-head scores by."""
    grouped = table.with_columns(pl.col("bag_id").replace_strict(groups, default=None).alias("group"))
    unknown = grouped.filter(pl.col("group").is_null())["bag_id"].to_list()
    if unknown:
        raise MilcacheError(f"--bags: no group for bag(s) {', '.join(unknown[:10])}")
    return (
        grouped.group_by("group", maintain_order=True)
        .agg(pl.len().alias("bags"), pl.col(columns).mean())
        .sort("risk", descending=True)
    )


def _heads(model: MILModel | Ensemble, config: dict) -> list[tuple[str, torch.nn.Module]]:
    """(name, head) of each head a prediction runs: one per member of a blend (its fold models share
    their member's head and size)."""
    if "blend" not in config:
        return [(config["head"], model.head)]
    return [
        (name, _first_model(member).head) for name, member in zip(config["blend"].values(), model.members, strict=True)
    ]


def _first_model(model: MILModel | Ensemble) -> MILModel:
    return model.members[0] if isinstance(model, Ensemble) else model


def _table(ids, outputs, task, scores, bags: list[Bag], names: list[str], top_k: int) -> pl.DataFrame:
    columns: dict = {"bag_id": ids, **dict(zip(task.output_columns, outputs.T, strict=True))}
    if task.has_classes:
        columns["predicted"] = [task.classes[c] for c in outputs.argmax(1)]
    tops = []
    for bag, s in zip(bags, scores, strict=True):
        if s is None:
            tops.append("[]")
            continue
        order = np.argsort(-s)[:top_k]
        coords = bag.coords
        tops.append(
            json.dumps(
                [
                    {
                        "index": int(i),
                        "score": round(float(s[i]), 6),
                        **dict(zip(names, coords[i].tolist(), strict=True)),
                    }
                    for i in order
                ]
            )
        )
    columns["top_instances"] = tops
    return pl.DataFrame(columns)


def _instance_scores(scores: list, bags: list[Bag], names: list[str]) -> pl.DataFrame:
    parts = []
    for bag, s in zip(bags, scores, strict=True):
        if s is None:
            continue
        columns = {"bag_id": [bag.bag_id] * len(s), "index": np.arange(len(s)), "score": s}
        columns.update({name: bag.coords[:, k] for k, name in enumerate(names)})
        parts.append(pl.DataFrame(columns))
    if not parts:
        raise MilcacheError("this head gives no per-instance scores (choose an attention-type head for them)")
    return pl.concat(parts)


def _tile_extent(bag: Bag, source: dict) -> float:
    """Side of one instance in coordinate units: from the store's settings, else the grid spacing."""
    size = bag.meta.get("tile_size_level0") or source.get("tile_size_level0")
    if size:
        return float(size)
    xy = bag.coords[:, :2].astype(np.float64)
    gaps = [np.diff(np.unique(xy[:, axis])) for axis in (0, 1)]
    gaps = np.concatenate([g[g > 0] for g in gaps]) if any(len(g) for g in gaps) else np.array([])
    return float(gaps.min()) if gaps.size else 1.0


def draw_heatmap(bag: Bag, scores: np.ndarray, source: dict, path: Path) -> None:
    """Per-instance scores as squares at the instance coordinates, over the bag's thumbnail if the
    store kept one."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if bag.coords.shape[1] < 2:
        return
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    side = _tile_extent(bag, source)
    xy = bag.coords[:, :2].astype(np.float64)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    thumbnail = bag.extras.get("thumbnail")
    scale = bag.meta.get("thumbnail_downsample") or source.get("thumbnail_downsample")
    if thumbnail is not None and scale:
        h, w = thumbnail.shape[:2]
        scale = float(scale)
        ax.imshow(thumbnail, extent=(0, w * scale, h * scale, 0))
    norm = (scores - scores.min()) / max(float(np.ptp(scores)), 1e-12)
    patches = PatchCollection([Rectangle((x, y), side, side) for x, y in xy], cmap="inferno", alpha=0.55)
    patches.set_array(norm)
    ax.add_collection(patches)
    ax.set_xlim(xy[:, 0].min() - side, xy[:, 0].max() + 2 * side)
    ax.set_ylim(xy[:, 1].max() + 2 * side, xy[:, 1].min() - side)
    ax.set_aspect("equal")
    ax.set_title(f"{bag.bag_id}: instance scores")
    fig.colorbar(patches, ax=ax, fraction=0.046, label="score (min–max scaled)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_geojson(bag: Bag, scores: np.ndarray, source: dict, path: Path) -> None:
    """Each instance as a square polygon (level-0 pixels) carrying its score, for QuPath's import."""
    if bag.coords.shape[1] < 2:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    side = _tile_extent(bag, source)
    features = []
    for (x, y), score in zip(bag.coords[:, :2].tolist(), scores.tolist(), strict=True):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "name": "instance", "measurements": {"score": score}},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

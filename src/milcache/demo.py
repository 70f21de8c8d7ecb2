"""`milcache demo`: the whole pipeline on the MNIST-bags task, made from scikit-learn's bundled digits.

Each "slide" is a pyramidal TIFF: digits stained purple on a white background, scattered over a grid
whose cells are exactly one tile. A slide is positive when it holds at least one 9. The backbone is a
small timm CNN briefly trained on a part of the digits that no slide uses (the MNIST-bags recipe),
saved as safetensors and passed with --weights. Then the real commands run in order: extract, tune,
train-head with the best configuration, and predict with heatmaps on held-out slides.

The survival task (``--task survival``): each patient's two slides hold 0 to 3 nines, and the
patient's time to the event is exponential with a hazard that doubles with every nine; a uniform
censoring time hides some events. The same commands then train and score a risk (concordance, and
the Kaplan–Meier curves of the held-out patients' risk groups).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from milcache import checks

BACKBONE = "test_resnet"
CELL = 32  # pixels per digit cell = tile size
GRID = 8  # cells per slide side
_STAIN = np.array([120, 40, 160], dtype=np.float64)
TASKS = ("binary", "survival")
_LOG_HAZARD_PER_NINE = float(np.log(2.0))
_CENSORING_HORIZON = 2.0  # censoring time ~ U(0, 2): a fifth of the events are censored


def render_digit(image: np.ndarray) -> np.ndarray:
    """An 8 × 8 digit (0-16) as a CELL × CELL RGB cell: stain on white, like tissue on glass."""
    from PIL import Image

    ink = (
        np.asarray(Image.fromarray((image / 16 * 255).astype(np.uint8)).resize((CELL - 4, CELL - 4), Image.BILINEAR))
        / 255.0
    )
    alpha = np.zeros((CELL, CELL))
    alpha[2:-2, 2:-2] = ink
    return (255 * (1 - alpha[..., None]) + _STAIN * alpha[..., None]).astype(np.uint8)


def pretrain_backbone(cells: np.ndarray, digits: np.ndarray, path: Path, epochs: int = 6) -> Path:
    """Train the demo backbone to recognise digits (on digits no slide uses); save its weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, num_classes=10)
    x = torch.from_numpy(cells).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    y = torch.from_numpy(digits).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(y)), max(1, len(y) // 64)):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def build_cohort(
    root: Path, cells: np.ndarray, digits: np.ndarray, bags: int, seed: int = 0, *, task: str = "binary"
) -> dict:
    """Write the slides, the manifest, train / held-out labels (split by patient) and a table of
    which digit lies in which tile. ``task`` survival labels each patient (two slides) with a time
    and an event instead of a class."""
    from milcache.extractor.pyramids import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    nines, others = np.flatnonzero(digits == 9), np.flatnonzero(digits != 9)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    manifest, tiles, outcomes = [], [], {}
    for i in range(bags):
        positive = i % 2 == 1
        n = int(rng.integers(6, 15))
        chosen = list(rng.choice(others, n, replace=False))
        k = int(rng.integers(1, 3)) if positive else 0
        if task == "survival":
            k = _patient_outcome(outcomes, i // 2, rng)["nines"]
        if k:
            chosen[:k] = rng.choice(nines, k, replace=False)
        places = rng.choice(GRID * GRID, n, replace=False)
        slide = np.full((GRID * CELL, GRID * CELL, 3), 255, np.uint8)
        bag_id = f"slide-{i:03d}"
        for sample, place in zip(chosen, places, strict=True):
            row, col = divmod(int(place), GRID)
            slide[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = cells[sample]
            tiles.append((bag_id, col * CELL, row * CELL, int(digits[sample])))
        path = write_pyramid_tiff(root / "slides" / f"{bag_id}.tif", slide, mpp=0.5, levels=2, tile=64)
        label = (outcomes[i // 2]["time"], outcomes[i // 2]["event"]) if task == "survival" else (int(positive),)
        manifest.append((bag_id, f"slides/{path.name}", *label, f"patient-{i // 2:03d}"))
    label_columns = ["time", "event"] if task == "survival" else ["label"]
    table = pl.DataFrame(manifest, schema=["bag_id", "path", *label_columns, "group"], orient="row")
    table.write_csv(root / "slides.csv")
    patients = table["group"].unique(maintain_order=True).to_list()
    held = set(patients[int(len(patients) * 0.75) :])
    is_held = pl.col("group").is_in(list(held))
    table.filter(~is_held).select("bag_id", *label_columns, "group").write_csv(root / "train_labels.csv")
    table.filter(is_held).select("bag_id", *label_columns, "group").write_csv(root / "heldout_labels.csv")
    pl.DataFrame(tiles, schema=["bag_id", "x", "y", "digit"], orient="row").write_parquet(root / "tiles.parquet")
    return {"bags": bags, "train": int((~table.select(is_held).to_series()).sum()), "heldout": len(held) * 2}


def _patient_outcome(outcomes: dict, patient: int, rng: np.random.Generator) -> dict:
    """A patient's nines (0 to 3, on each of its slides), event time and censoring, drawn once."""
    if patient not in outcomes:
        nines = int(rng.integers(0, 4))
        event_time = rng.exponential(1.0 / np.exp(_LOG_HAZARD_PER_NINE * nines))
        censored_at = rng.uniform(0, _CENSORING_HORIZON)
        outcomes[patient] = {
            "nines": nines,
            "time": round(max(float(min(event_time, censored_at)), 1e-3), 4),
            "event": int(event_time <= censored_at),
        }
    return outcomes[patient]


def _step(command: str, function: Callable, paths: dict, options: dict, echo: Callable[[str], None]):
    """Run one step through the Python API, printed as the equivalent `milcache` command line.
    ``paths`` are the function's positional arguments, keyed by the CLI option that takes each
    ("" for a CLI argument)."""
    given = [item for flag, path in paths.items() for item in ([flag, str(path)] if flag else [str(path)])]
    echo(f"\n$ {shlex.join(['milcache', command, *given, *_as_flags(options)])}")
    return function(*paths.values(), **options)


def _as_flags(options: dict) -> list[str]:
    """API keyword arguments as the CLI spells them."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "progress" or value is None:
            continue
        if key in ("head_options", "set"):
            flag = "--head-option" if key == "head_options" else "--set"
            for name, item in value.items():
                flags += [flag, f"{name}={json.dumps(item)}"]
        elif isinstance(value, bool):
            flags += [flag] if value else ([f"--no-{key.replace('_', '-')}"] if key == "class_weights" else [])
        else:
            flags += [flag, str(value)]
    return flags


def _train_options(config: dict) -> dict:
    """train_head options that reproduce a configuration from best.json."""
    options = {"head": config["head"]}
    for key in ("lr", "optimizer", "weight_decay", "epochs", "batch_size", "patience", "elastic_net", "seed"):
        if config[key] is not None:  # None: chosen from the cohort
            options[key] = config[key]
    options["instances"] = config["instances"] or 0
    options["class_weights"] = bool(config["class_weights"])
    options["head_options"] = config["head_options"]
    return options


def run_demo(
    out: str | Path = "milcache-demo",
    device: str = "auto",
    bags: int = 120,
    trials: int = 4,
    echo: Callable[[str], None] = print,
    progress: bool = False,
    task: str = "binary",
) -> dict:
    """Build the MNIST-bags cohort in ``out`` and run extract → tune → train-head → predict on it
    through the Python API (each step printed as its command line); returns the held-out scores.
    ``task`` survival labels patients with times to an event set by their nines (see the module)."""
    from sklearn.datasets import load_digits

    import milcache

    start = time.perf_counter()
    checks.one_of("--task", task, TASKS)
    root = checks.output_dir(out, "--out")
    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    cells = np.stack([render_digit(image) for image in digits.images])
    order = np.random.default_rng(0).permutation(len(cells))
    pretrain, cohort = order[: len(order) // 2], order[len(order) // 2 :]  # disjoint digit images
    meaning = (
        "a patient's event comes sooner the more 9s its slides hold"
        if task == "survival"
        else "positive when one is a 9"
    )
    echo(f"Building the MNIST-bags cohort in {root}: {bags} slides of scattered digits, {meaning}")
    weights = pretrain_backbone(cells[pretrain], digits.target[pretrain], root / "backbone.safetensors")
    echo(f"Pretrained the {BACKBONE} backbone on {len(pretrain)} digits that no slide uses → {weights}")
    sizes = build_cohort(root, cells[cohort], digits.target[cohort], bags, task=task)
    (root / "space.toml").write_text('head = ["attention", "gated-attention"]\nepochs = 30\ninstances = 0\n')
    summary = _step(
        "extract",
        milcache.extract,
        {"": root / "slides.csv", "--out": root / "store"},
        {
            "backbone": BACKBONE,
            "weights": weights,
            "tile_size": CELL,
            "input_size": CELL,
            "tissue_threshold": 0.1,
            "workers": 2,
            "overwrite": True,
            "device": device,
            "progress": progress,
        },
        echo,
    )
    echo(f"  {summary.bags} bags, {summary.instances} tiles in {summary.seconds:.1f}s")
    study = _step(
        "tune",
        milcache.tune,
        {"--store": root / "store", "--labels": root / "train_labels.csv", "--out": root / "study"},
        {
            "n_trials": trials,
            "folds": 3,
            "space": root / "space.toml",
            "pruner": "none",
            "device": device,
            "resume": (root / "study" / "study.db").exists(),
            "progress": progress,
        },
        echo,
    )
    best = study.best
    kept = f"the defaults blended with {best['head']}" if best["blend"] else best["head"]
    echo(f"  kept of {trials} trials: {kept}, cross-validated {best['metric']} {best['value']:.3f}")
    trained = _step(
        "train-head",
        milcache.train_head,
        {"--store": root / "store", "--labels": root / "train_labels.csv", "--out": root / "model"},
        {"folds": 3, **_train_options(best["config"]), "device": device, "progress": progress},
        echo,
    )
    metric = best["metric"]
    echo(f"  cross-validated {metric} {trained.metrics[metric]:.3f} ± {trained.metrics[metric + '_std']:.3f}")
    predictions = _step(
        "predict",
        milcache.predict,
        {"--model": root / "model", "--store": root / "store", "--out": root / "heldout_predictions.csv"},
        {
            "bags": root / "heldout_labels.csv",
            "heatmaps": root / "heatmaps",
            "scores": root / "heldout_scores.parquet",
            "device": device,
        },
        echo,
    )
    echo(f"  predicted {predictions.height} held-out bags, heatmaps in {root / 'heatmaps'}")
    labels = pl.read_csv(root / "heldout_labels.csv", schema_overrides={"bag_id": pl.Utf8})
    predictions = pl.read_csv(root / "heldout_predictions.csv", schema_overrides={"bag_id": pl.Utf8}).join(
        labels, on="bag_id"
    )
    scores = _survival_scores(predictions, root) if task == "survival" else _class_scores(predictions)
    attention = _attention_on_nines(root, labels)
    result = {
        "task": task,
        "heldout_bags": predictions.height,
        **scores,
        "attention_on_nines": attention["nines"],
        "attention_on_others": attention["others"],
        "heatmaps": sorted(str(h) for h in (root / "heatmaps").glob("*.png")),
        "seconds": time.perf_counter() - start,
        "cohort": sizes,
        "best_trial": best,
    }
    (root / "demo.json").write_text(json.dumps({k: v for k, v in result.items() if k != "best_trial"}, indent=2))
    echo("\nHeld-out slides (patients never seen in training or tuning):")
    echo(f"  {'bags':<28}{predictions.height}")
    for name, value in scores.items():
        shown = _SHOWN.get(name, name.replace("_", "-"))
        text = value if not isinstance(value, float) else f"{value:.3g}" if name == "log_rank_p" else f"{value:.3f}"
        echo(f"  {shown:<28}{text}")
    echo(
        f"  {'mean attention on 9 tiles':<28}{attention['nines']:.3f}  (other tiles of positive slides: "
        f"{attention['others']:.3f})"
    )
    positives = _slides_with_nines(root, labels)[:3]
    echo(f"  heatmaps                    {root / 'heatmaps'} (e.g. {', '.join(f'{b}.png' for b in positives)})")
    echo(f"done in {result['seconds']:.0f}s")
    return result


def _class_scores(predictions: pl.DataFrame) -> dict:
    from sklearn.metrics import accuracy_score, roc_auc_score

    y, p = predictions["label"].to_numpy(), predictions["prob_1"].to_numpy()
    return {"auc": float(roc_auc_score(y, p)), "accuracy": float(accuracy_score(y, p > 0.5))}


def _survival_scores(predictions: pl.DataFrame, root: Path) -> dict:
    """Harrell's C of the held-out patients' risks (each the mean over its slides), and the
    Kaplan–Meier curves of their two risk groups with the log-rank p-value (a PNG)."""
    from milcache.aggregator.plots import plot_kaplan_meier
    from milcache.aggregator.survival import harrell_c
    from milcache.aggregator.tasks import per_patient

    y, risk = per_patient(
        predictions.select("time", "event").to_numpy(),
        predictions.select("risk").to_numpy(),
        predictions["group"].to_numpy(),
    )
    time, event, risk = y[:, 0], y[:, 1], risk[:, 0]
    groups = plot_kaplan_meier(
        time, event, risk, root / "heldout_kaplan_meier.png", title=f"held-out patients · {len(y)}"
    )
    return {
        "c_index": harrell_c(time, event > 0, risk),
        "log_rank_p": groups["log_rank_p"],
        "kaplan_meier": str(root / "heldout_kaplan_meier.png"),
    }


_SHOWN = {
    "auc": "AUC",
    "accuracy": "accuracy",
    "c_index": "C-index (patients)",
    "log_rank_p": "log-rank p",
    "kaplan_meier": "Kaplan-Meier curves",
}


def _slides_with_nines(root: Path, labels: pl.DataFrame) -> list[str]:
    """The held-out slides holding at least one 9 (the positives of the binary task)."""
    tiles = pl.read_parquet(root / "tiles.parquet")
    with_nines = set(tiles.filter(pl.col("digit") == 9)["bag_id"].to_list())
    return [b for b in labels["bag_id"].to_list() if b in with_nines]


def _attention_on_nines(root: Path, labels: pl.DataFrame) -> dict:
    """Mean instance score of tiles holding a 9 against the other tiles, in held-out bags with a 9."""
    scores = pl.read_parquet(root / "heldout_scores.parquet")
    tiles = pl.read_parquet(root / "tiles.parquet")
    positive = _slides_with_nines(root, labels)
    same = [pl.col("x").cast(pl.Int64), pl.col("y").cast(pl.Int64)]  # older polars joins only equal dtypes
    scores, tiles = scores.with_columns(same), tiles.with_columns(same)
    joined = scores.filter(pl.col("bag_id").is_in(positive)).join(tiles, on=["bag_id", "x", "y"], how="left")
    nine = joined["digit"] == 9
    return {"nines": float(joined.filter(nine)["score"].mean()), "others": float(joined.filter(~nine)["score"].mean())}

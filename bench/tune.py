"""Trials per minute of `milcache tune` on resident embeddings: with and without concurrent trials
(--jobs) and pruning, all in one run on the same cohort (random embeddings, a marked-instance task).

    python bench/tune.py --bags 1000 --instances 8000 --dim 1024 --trials 100 --device cuda   # the issue's size
    python bench/tune.py --bags 200 --instances 200 --dim 256 --trials 12 --device cpu       # a CPU-sized run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optuna
import torch

from milcache.aggregator.data import BagTensor
from milcache.aggregator.run import Cohort
from milcache.aggregator.tasks import Task
from milcache.devices import resolve_device
from milcache.tuning.space import load_space
from milcache.tuning.study import TuneSettings, _pruner, make_objective


def cohort(bags: int, instances: int, dim: int, device: torch.device) -> Cohort:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, bags)
    features = torch.randn(bags * instances, dim, dtype=torch.float16)
    direction = torch.randn(dim, dtype=torch.float16)
    for i in np.flatnonzero(y):  # one marked instance per positive bag
        features[i * instances + int(rng.integers(instances))] += 3 * direction
    lengths = np.full(bags, instances, dtype=np.int64)
    offsets = torch.arange(bags + 1, dtype=torch.int64) * instances
    data = BagTensor(features.to(device), offsets.to(device), lengths, [f"b{i}" for i in range(bags)], device)
    return Cohort(data, Task("binary", [0, 1]), y, np.arange(bags).astype(object), None, list(y), 0, {})


def run(c: Cohort, trials: int, jobs: int, pruner: str, epochs: int, folds: int) -> tuple[float, int]:
    settings = TuneSettings(n_trials=trials, folds=folds, pruner=pruner, jobs=jobs)
    space = load_space(None, {"epochs": epochs, "instances": 512})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", pruner=_pruner(pruner), sampler=optuna.samplers.TPESampler(seed=0)
    )
    start = time.perf_counter()
    study.optimize(make_objective(c, space, settings), n_trials=trials, n_jobs=jobs, catch=(RuntimeError,))
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return trials / ((time.perf_counter() - start) / 60), pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    c = cohort(args.bags, args.instances, args.dim, device)
    print(
        f"{args.bags} bags × {args.instances} × {args.dim}-d, {args.trials} trials of ≤{args.epochs} epochs × "
        f"{args.folds} folds on {name}"
    )
    base = None
    for jobs, pruner in ((1, "none"), (1, "median"), (args.jobs, "none"), (args.jobs, "median")):
        rate, pruned = run(c, args.trials, jobs, pruner, args.epochs, args.folds)
        base = base or rate
        print(f"jobs={jobs} pruner={pruner:<6}: {rate:7.2f} trials/min ({pruned} pruned)  ratio {rate / base:.2f}")


if __name__ == "__main__":
    main()

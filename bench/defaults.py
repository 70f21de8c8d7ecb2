"""How train-head's defaults were chosen: gated attention with the default configuration against
variations of the learning rate, on synthetic cohorts at a small and a larger size (CPU-sized here;
rerun on a GPU with --large-bags 5000 --large-instances 2000 for the many-slide end).

    python bench/defaults.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.run import load_cohort, train_head
from milcache.store.synthetic import make_synthetic_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-bags", type=int, default=1000)
    parser.add_argument("--large-instances", type=int, default=400)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cohorts = {
        "small: 200 bags × 20-100 × 32-d": dict(bags=200, instances=(20, 100), dim=32),
        f"large: {args.large_bags} bags × {args.large_instances // 2}-{args.large_instances} × 128-d": dict(
            bags=args.large_bags, instances=(args.large_instances // 2, args.large_instances), dim=128
        ),
    }
    default = TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in cohorts.items():
            root = Path(tmp) / name.split(":")[0]
            make_synthetic_store(root / "store", seed=0, **size).write_csv(root / "labels.csv")
            cohort = load_cohort(root / "store", root / "labels.csv", device=args.device)
            print(name)
            for lr in (5e-4, default.lr, 1e-2):
                config = TrainConfig(lr=lr)
                start = time.perf_counter()
                m = train_head(
                    root / "store",
                    root / "labels.csv",
                    root / f"run-{lr}",
                    config,
                    folds=3,
                    cohort=cohort,
                    device=args.device,
                )
                best = [f["best_epoch"] for f in m["folds"]]
                mark = " (default)" if lr == default.lr else ""
                print(
                    f"  lr {lr:g}{mark}: AUC {m['auc']:.3f}  accuracy {m['accuracy']:.3f}  log loss "
                    f"{m['log_loss']:.3f}  best epochs {best}  {time.perf_counter() - start:.0f}s"
                )


if __name__ == "__main__":
    main()

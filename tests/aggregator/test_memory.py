"""Memory is bounded by construction: every head trains and predicts on a whole-slide-sized bag
(50,000 instances) within a stated budget, measured as the peak resident memory of a process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BUDGET_MIB = 4096  # on the CPU; the transformer's N × N attention alone would need 10 GB per head

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np, polars as pl
    from milcache.aggregator.config import TrainConfig
    from milcache.aggregator.heads import list_heads
    from milcache.aggregator.predict import predict
    from milcache.aggregator.run import train_head
    from milcache.store import StoreWriter
    from milcache.store.metadata import read_metadata
    from milcache.store.synthetic import make_synthetic_store

    root = Path(sys.argv[1])
    labels = make_synthetic_store(root / "store", bags=7, instances=(20, 40), dim=64, seed=0)
    rng = np.random.default_rng(1)
    with StoreWriter(root / "store", read_metadata(root / "store")) as writer:
        writer.put("slide-50k", rng.standard_normal((50_000, 64)).astype(np.float32))
    big = pl.DataFrame({"bag_id": ["slide-50k"], "label": [1], "group": ["slide-50k"]})
    labels = pl.concat([labels, big.select(labels.columns).cast(dict(labels.schema))])
    labels.write_csv(root / "labels.csv")
    peaks = {}
    for head in list_heads():
        start = time.perf_counter()
        options = {"hidden": 32, **({"heads": 1} if head == "transformer" else {})}  # small: the test's time
        config = TrainConfig(head=head, epochs=1, head_options=options)
        train_head(root / "store", root / "labels.csv", root / head, config, folds=2, device="cpu")
        predict(root / head, root / "store", root / f"{head}.csv", device="cpu")
        peaks[head] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
    print(json.dumps(peaks))
    """
)


def test_every_head_trains_and_predicts_a_50k_bag_within_budget(tmp_path):
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    worst = max(mib for mib, _ in peaks.values())
    assert worst < BUDGET_MIB, peaks

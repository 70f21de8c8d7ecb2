"""A synthetic MIL cohort written straight into a store: for trying stage 2, tests and benchmarks.

A bag is positive when it holds at least one *key* instance; key instances are ordinary Gaussian
embeddings shifted along one fixed direction, so a head must find them among the others. In a
survival cohort the number of key instances sets the bag's hazard (see
``make_synthetic_survival_store``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from milcache.errors import OptionError
from milcache.store.lmdb_store import StoreWriter
from milcache.store.metadata import StoreMetadata


def make_synthetic_store(
    out: str | Path,
    bags: int = 200,
    instances: tuple[int, int] = (20, 100),
    dim: int = 64,
    positive_fraction: float = 0.5,
    signal: float = 1.5,
    groups: int | None = None,
    seed: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
) -> pl.DataFrame:
    """Write the cohort and return its labels (``bag_id``, ``label``, ``group``).

    Each instance carries the attribute ``key`` (1 for key instances), so a test can check where
    a head's attention goes. Coordinates are a (row, column) position on a square grid.
    """
    rng = np.random.default_rng(seed)

    def label_of(i: int) -> dict:
        return {"label": int(rng.random() < positive_fraction)}

    def keys_of(fields: dict, n: int) -> int:
        return int(rng.integers(1, max(2, n // 10) + 1)) if fields["label"] else 0

    return _write_cohort(
        out, bags, instances, dim, signal, groups, seed, dtype, overwrite, rng, (label_of, keys_of), columns=("label",)
    )


def make_synthetic_survival_store(
    out: str | Path,
    bags: int = 200,
    instances: tuple[int, int] = (20, 100),
    dim: int = 64,
    signal: float = 1.5,
    groups: int | None = None,
    seed: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
    most_keys: int = 5,
    log_hazard_per_key: float = 0.6,
    censoring: float = 0.3,
) -> pl.DataFrame:
    """Write a survival cohort and return its labels (``bag_id``, ``time``, ``event``, ``group``,
    and ``keys``: what an oracle knows). A bag holds 0 to ``most_keys`` key instances; its event
    time is exponential with log hazard ``log_hazard_per_key`` per key instance (proportional
    hazards); a uniform censoring time hides about ``censoring`` of the events. Bags of one
    patient (``groups``) share the patient's keys, time and event, as slides of one patient do."""
    rng = np.random.default_rng(seed)
    patients: dict[str, dict] = {}
    horizon = _censoring_horizon(most_keys, log_hazard_per_key, censoring)

    def label_of(i: int) -> dict:
        patient = f"patient-{i % groups:04d}" if groups else str(i)
        if patient not in patients:
            keys = int(rng.integers(0, most_keys + 1))
            event_time = rng.exponential(1.0 / np.exp(log_hazard_per_key * keys))
            censored_at = rng.uniform(0, horizon) if censoring > 0 else np.inf
            time = max(float(min(event_time, censored_at)), 1e-3)
            patients[patient] = {"time": round(time, 4), "event": int(event_time <= censored_at), "keys": keys}
        return patients[patient]

    return _write_cohort(
        out,
        bags,
        instances,
        dim,
        signal,
        groups,
        seed,
        dtype,
        overwrite,
        rng,
        (label_of, lambda fields, n: min(fields["keys"], n)),
        columns=("time", "event", "keys"),
    )


def _censoring_horizon(most_keys: int, log_hazard: float, share: float, draws: int = 200_000) -> float:
    """The horizon H of a uniform(0, H) censoring time that censors about ``share`` of the events
    (found by bisection on a fixed Monte Carlo sample of the cohort's event times)."""
    if share <= 0:
        return np.inf
    sample = np.random.default_rng(1)
    keys = sample.integers(0, most_keys + 1, draws)
    times = sample.exponential(1.0 / np.exp(log_hazard * keys))
    low, high = 1e-6, float(times.max()) * 10
    for _ in range(60):
        mid = (low + high) / 2
        censored = np.mean(np.minimum(times / mid, 1))  # P(C < T) for C ~ U(0, mid)
        low, high = (mid, high) if censored > share else (low, mid)
    return (low + high) / 2


def _write_cohort(
    out, bags, instances, dim, signal, groups, seed, dtype, overwrite, rng, draw, *, columns: tuple[str, ...]
) -> pl.DataFrame:
    """Write ``bags`` bags; ``draw`` is (label_of(i) → bag i's label fields, keys_of(fields, n) → its
    number of key instances among n), called before and after its instances are drawn."""
    label_of, keys_of = draw
    low, high = instances
    if not 1 <= low <= high:
        raise OptionError(f"--instances takes MIN MAX with 1 <= MIN <= MAX, got {low} {high}")
    direction = rng.standard_normal(dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    metadata = StoreMetadata(
        backbone="synthetic",
        dim=dim,
        dtype=dtype,
        coords=["x", "y"],
        source={"kind": "synthetic", "signal": signal, "seed": seed},
    )
    rows = []
    with StoreWriter(out, metadata, overwrite=overwrite) as writer:
        for i in range(bags):
            n = int(rng.integers(instances[0], instances[1] + 1))
            fields = label_of(i)
            x = rng.standard_normal((n, dim)).astype(np.float32)
            key = np.zeros(n, np.uint8)
            keys = keys_of(fields, n)
            if keys:
                chosen = rng.choice(n, size=keys, replace=False)
                key[chosen] = 1
                x[chosen] += signal * np.sqrt(dim) * direction * 0.5
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int32)
            bag_id = f"bag-{i:05d}"
            group = f"patient-{i % groups:04d}" if groups else bag_id
            writer.put(bag_id, x, coords, {"key": key}, meta={c: fields[c] for c in columns})
            rows.append((bag_id, *(fields[c] for c in columns), group))
    return pl.DataFrame(rows, schema=["bag_id", *columns, "group"], orient="row")

"""Memory is bounded by construction: every head trains and predicts on a whole-slide-sized bag
(50,000 instances) within a stated budget, measured as the peak resident memory of a process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

BUDGET_MIB = 4096  # on the CPU; the transformer's N × N attention alone would need 10 GB per head

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np, polars as pl
    from milcache.aggregator.config import TrainConfig
    from milcache.aggregator.heads import head_class, list_heads
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
        options = {k: v for k, v in options.items() if k in head_class(head).options()}
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


def test_sizes_parse_and_bad_ones_are_named():
    from milcache.aggregator.memory import parse_size
    from milcache.errors import OptionError

    assert parse_size("8GiB") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GB") == 3 << 29
    assert parse_size("2") == 2 << 30 and parse_size(4) == 4 << 30
    for bad in ("lots", "-1G", "10KiB"):
        with pytest.raises(OptionError, match="--memory-budget"):
            parse_size(bad)


def test_measured_memory_is_linear_for_every_head_and_quadratic_for_pairwise_attention():
    from milcache.aggregator.heads import Head, HeadOutput, create_head, list_heads
    from milcache.aggregator.memory import measure_head

    for name in list_heads():
        memory = measure_head(create_head(name, 32, 1), 32)
        assert memory.per_pair == 0 and 32 * 4 < memory.per_instance < 1 << 16, (name, memory)

    class PairwiseHead(Head):  # full N × N attention, as the naive transformer did
        def aggregate(self, h, mask):
            weights = torch.softmax(h @ h.transpose(1, 2), -1)
            return HeadOutput((weights @ h).mean(1)[:, :1], None)

    memory = measure_head(PairwiseHead(32, 1, hidden=16), 32)
    assert memory.per_pair >= 4  # at least one float32 N × N matrix kept for backward
    assert memory.bag_bytes(50_000) > 10 * (1 << 30)


def test_a_budget_shrinks_batches_and_a_bag_that_cannot_fit_is_refused_before_training(tmp_path):
    from click.testing import CliRunner

    from milcache.cli import cli
    from milcache.store.synthetic import make_synthetic_store

    labels = make_synthetic_store(tmp_path / "store", bags=12, instances=(500, 3000), dim=64, seed=0)
    labels.write_csv(tmp_path / "labels.csv")
    common = ["--store", tmp_path / "store", "--labels", tmp_path / "labels.csv", "--epochs", "1", "--folds", "2"]
    common = [str(a) for a in common] + ["--device", "cpu", "--instances", "0"]
    result = CliRunner().invoke(cli, ["train-head", *common, "--out", str(tmp_path / "small"), "--memory-budget", "2M"])
    assert result.exit_code == 2, result.output
    assert "do not fit in --memory-budget 2.0 MiB" in result.output and "instances)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "small" / "metrics.json").exists()

    from milcache.aggregator.config import TrainConfig
    from milcache.aggregator.run import _initial_model, fit_memory, load_cohort

    cohort = load_cohort(tmp_path / "store", tmp_path / "labels.csv", device="cpu")
    config = TrainConfig(instances=None, batch_size=4)
    model = _initial_model(config, cohort)
    roomy, _ = fit_memory(dataclasses.replace(config, memory_budget=8 << 30), cohort, model)
    tight, step = fit_memory(dataclasses.replace(config, memory_budget=64 << 20), cohort, model)
    assert roomy.max_tokens == config.max_tokens and tight.max_tokens < 20_000 and step <= tight.max_tokens * 8
    result = CliRunner().invoke(cli, ["train-head", *common, "--out", str(tmp_path / "ok"), "--memory-budget", "64MiB"])
    assert result.exit_code == 0, result.output


_FAULTS_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    from milcache.devices import retain_freed_host_memory

    def faults_of_fresh_tensors():
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):  # a training step's activations: 64 MB, allocated, used, freed
            torch.ones(16 << 20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    before = faults_of_fresh_tensors()
    retained = retain_freed_host_memory()
    faults_of_fresh_tensors()  # the heap grows once
    print(json.dumps({"retained": retained, "before": before, "after": faults_of_fresh_tensors()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_host_memory_is_reused_without_page_faults():
    """Training's fresh tensors each step reuse freed pages instead of faulting in new ones."""
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    faults = json.loads(result.stdout.strip().splitlines()[-1])
    if not faults["retained"]:
        pytest.skip("not glibc (mallopt unavailable)")
    pages = 10 * (64 << 20) // 4096
    assert faults["before"] > pages / 2  # each 64 MB tensor was mapped afresh: a fault per 4 KB page
    assert faults["after"] < pages / 20


_RELEASE_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch
    from milcache.devices import release_free_host_memory, retain_freed_host_memory

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    retain_freed_host_memory()
    torch.ones(64 << 20).sum()  # 256 MB used and freed: kept by the process
    kept = resident_mb()
    released = release_free_host_memory()
    print(json.dumps({"released": released, "kept": kept, "after": resident_mb()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_retained_memory_goes_back_to_the_kernel_before_workers_fork():
    """What a parent keeps free is released before its workers fork, so that its next batches do
    not copy those pages on write (see ``release_free_host_memory``)."""
    result = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], capture_output=True, text=True, check=True)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    if not memory["released"]:
        pytest.skip("not glibc (malloc_trim unavailable)")
    assert memory["kept"] - memory["after"] > 200  # MB

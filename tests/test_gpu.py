"""The CUDA paths against the CPU ones: extraction (fp32, bf16, compiled, padded batches spanning
bags, JPEG tiles decoded by nvjpeg), head training and prediction, stacked fold models,
fine-tuning. Skipped without a GPU; run on one with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import milcache
from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import BagTensor
from milcache.aggregator.tasks import Task
from milcache.aggregator.trainer import fit, fit_stacked, infer
from milcache.store.synthetic import make_synthetic_store
from tests.aggregator.test_stacked import _cohort, _model
from tests.conftest import tissue_image, write_pyramid_tiff
from tests.test_finetune import cohort  # noqa: F401  (the fine-tuning fixture, reused on CUDA)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TILES = {"source": "tiles", "tile_size": 64, "input_size": 64, "workers": 2, "dtype": "float32"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-slides")
    sizes = {"a": (128, 192), "b": (256, 320), "c": (192, 256)}
    for name, (h, w) in sizes.items():
        write_pyramid_tiff(root / f"{name}.tif", tissue_image(h, w, seed=h + w))
    pl.DataFrame({"bag_id": list(sizes), "path": [f"{n}.tif" for n in sizes]}).write_csv(root / "slides.csv")
    return root


def _embeddings(store: Path) -> dict[str, np.ndarray]:
    with milcache.FeatureStore(store) as s:
        return {b: s[b].embeddings.astype(np.float32) for b in s.bag_ids()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("precision", "compile", "batch_size", "least_cosine"),
    [("fp32", False, 8, 0.9999), ("fp32", False, 1, 0.9999), ("bf16", False, 8, 0.99), ("bf16", True, 16, 0.99)],
)
def test_cuda_extraction_matches_the_cpu(slides, tmp_path, precision, compile, batch_size, least_cosine):
    """Batches spanning bags, padded to one shape on CUDA, give the CPU's embeddings bag by bag."""
    cpu = milcache.extract(slides / "slides.csv", tmp_path / "cpu", backbone="test_resnet", device="cpu", **TILES)
    gpu = milcache.extract(
        slides / "slides.csv",
        tmp_path / "gpu",
        backbone="test_resnet",
        device="cuda",
        precision=precision,
        compile=compile,
        batch_size=batch_size,
        **{k: v for k, v in TILES.items() if k != "batch_size"},
    )
    assert gpu.bags == cpu.bags == 3 and gpu.instances == cpu.instances and not gpu.failures
    reference, found = _embeddings(tmp_path / "cpu"), _embeddings(tmp_path / "gpu")
    for bag, expected in reference.items():
        assert found[bag].shape == expected.shape
        assert _cosine(found[bag], expected).min() > least_cosine, bag


def test_nvjpeg_tiles_equal_the_cpu_decoders_within_jpeg_tolerance(tmp_path):
    """--decode gpu: file tiles decoded by nvjpeg, pasted across seams and edges on the device,
    against the workers' pixels (libjpeg-turbo through tifffile). JPEG decoders may differ in the
    IDCT and chroma upsampling by a few levels, not more."""
    from milcache.extractor.jpeg import decode_tiles
    from milcache.extractor.sources import create_source
    from milcache.store.tables import BagSpec

    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(300, 410), compression="jpeg", tile=64)
    source = create_source("tiles", tile_size=48, tissue_threshold=0.0)
    bag = BagSpec("b", [path])
    plan = source.plan(bag)
    indices = np.arange(len(plan))
    cpu = source.read(bag, plan, indices)
    gpu = decode_tiles(source.read_encoded(bag, plan, indices), torch.device("cuda")).cpu().numpy()
    difference = np.abs(gpu.astype(int) - cpu.astype(int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99.9) <= 8, (difference.mean(), difference.max())


def test_cuda_extraction_with_gpu_decoding_matches_the_cpu(tmp_path):
    root = tmp_path / "jpeg"
    root.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_pyramid_tiff(root / f"{name}.tif", tissue_image(256, 320, seed=seed), compression="jpeg", tile=64)
    pl.DataFrame({"bag_id": ["a", "b"], "path": ["a.tif", "b.tif"]}).write_csv(root / "slides.csv")
    cpu = milcache.extract(root / "slides.csv", tmp_path / "cpu", backbone="test_resnet", device="cpu", **TILES)
    gpu = milcache.extract(
        root / "slides.csv", tmp_path / "gpu", backbone="test_resnet", device="cuda", decode="gpu", **TILES
    )
    assert gpu.bags == 2 and gpu.decoded_on_device == gpu.instances == cpu.instances
    reference, found = _embeddings(tmp_path / "cpu"), _embeddings(tmp_path / "gpu")
    for bag, expected in reference.items():
        assert _cosine(found[bag], expected).min() > 0.999, bag


def test_cuda_training_and_prediction_agree_with_the_cpu(tmp_path):
    labels = make_synthetic_store(tmp_path / "store", bags=80, instances=(5, 40), dim=32, seed=2, signal=2.0)
    labels.write_csv(tmp_path / "labels.csv")
    options = {"head": "gated-attention", "folds": 3, "epochs": 15, "seed": 0}
    on_gpu = milcache.train_head(
        tmp_path / "store", tmp_path / "labels.csv", tmp_path / "gpu", device="cuda", **options
    )
    on_cpu = milcache.train_head(tmp_path / "store", tmp_path / "labels.csv", tmp_path / "cpu", device="cpu", **options)
    assert on_gpu.metrics["auc"] > 0.85 and abs(on_gpu.metrics["auc"] - on_cpu.metrics["auc"]) < 0.05
    # The same saved model predicts alike on both devices.
    a = milcache.predict(tmp_path / "gpu", tmp_path / "store", device="cuda").sort("bag_id")
    b = milcache.predict(tmp_path / "gpu", tmp_path / "store", device="cpu").sort("bag_id")
    np.testing.assert_allclose(a["prob_1"].to_numpy(), b["prob_1"].to_numpy(), atol=2e-3)


def test_each_stacked_model_equals_training_it_alone_on_cuda():
    cpu_data, y = _cohort()
    device = torch.device("cuda")
    data = BagTensor(
        cpu_data.features.to(device), cpu_data.offsets.to(device), cpu_data.lengths, cpu_data.bag_ids, device
    )
    task = Task("binary", [0, 1])
    # float32: in bf16 a stack (batched matmuls) and a lone model round differently, and six epochs
    # of training carry that difference far beyond any fixed tolerance.
    config = TrainConfig(
        head_options={"dropout": 0.0}, epochs=6, batch_size=4, instances=None, patience=2, lr=5e-3, precision="fp32"
    )
    order = np.random.default_rng(1).permutation(len(y))
    trains, vals = [order[:40], order[10:47]], [order[40:55], None]
    stacked = [_model(config, task, data.dim, seed).to(device) for seed in range(2)]
    results = fit_stacked(stacked, data, task, y, trains, vals, config, seeds=[10, 11])
    for k in range(2):
        alone = _model(config, task, data.dim, k).to(device)
        result = fit(alone, data, task, y, trains[k], vals[k], config, seed=10 + k)
        assert result["best_epoch"] == results[k]["best_epoch"]
        a, _ = infer(alone, data, np.arange(len(y)), config)
        b, _ = infer(stacked[k], data, np.arange(len(y)), config)
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_fine_tuning_on_cuda_in_bf16_lowers_the_loss(cohort, tmp_path):  # noqa: F811
    root, weights = cohort
    result = milcache.fine_tune(
        root / "frozen",
        root / "slides.csv",
        tmp_path / "tuned",
        weights=weights,
        epochs=6,
        instances=16,
        lr=1e-4,
        backbone_lr=1e-4,
        accumulate=2,
        val_fraction=0.0,
        precision="bf16",
        workers=2,
        device="cuda",
    )
    losses = [row["train_loss"] for row in result.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]), losses

"""`milcache fine-tune`: backbone and head trained end to end on re-read pixels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

import milcache
from milcache.cli import cli
from milcache.demo import CELL, build_cohort, pretrain_backbone, render_digit

TILES = {"tile_size": CELL, "input_size": CELL, "tissue_threshold": 0.1, "workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """MNIST-bags slides; a backbone pretrained for one epoch on other digits (weak, as an ImageNet
    backbone is for pathology); a gated-attention head trained on its frozen features."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("finetune")
    digits = load_digits()
    cells = np.stack([render_digit(image) for image in digits.images])
    order = np.random.default_rng(0).permutation(len(cells))
    weights = pretrain_backbone(cells[order[:300]], digits.target[order[:300]], root / "w.safetensors", epochs=1)
    build_cohort(root, cells[order[300:]], digits.target[order[300:]], 120, seed=1)
    milcache.extract(root / "slides.csv", root / "store", backbone="test_resnet", weights=weights, **TILES)
    milcache.train_head(
        root / "store",
        root / "train_labels.csv",
        root / "frozen",
        head="attention",
        folds=3,
        epochs=30,
        instances=0,
        device="cpu",
    )
    return root, weights


def _held_out_auc(run: Path, store: Path, root: Path) -> float:
    held = pl.read_csv(root / "heldout_labels.csv", schema_overrides={"bag_id": pl.Utf8})
    table = milcache.predict(run, store, bags=held["bag_id"].to_list(), device="cpu")
    return roc_auc_score(held["label"].to_numpy(), table["prob_1"].to_numpy())


def test_fine_tuning_lowers_the_loss_and_keeps_the_held_out_ranking(cohort):
    root, weights = cohort
    result = milcache.fine_tune(
        root / "frozen",
        root / "slides.csv",
        root / "tuned",
        weights=weights,
        epochs=10,
        instances=16,
        lr=1e-4,
        backbone_lr=1e-4,
        accumulate=4,
        val_fraction=0.0,
        workers=0,
        device="cpu",
    )
    losses = [row["train_loss"] for row in result.history]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses  # measured: 0.32 → 0.12
    milcache.extract(root / "slides.csv", root / "store2", backbone="test_resnet", weights=result.backbone, **TILES)
    with milcache.FeatureStore(root / "store") as old, milcache.FeatureStore(root / "store2") as new:
        bag = old.bag_ids()[0]
        assert old.get(bag).embeddings.shape == new.get(bag).embeddings.shape
        assert not np.allclose(old.get(bag).embeddings, new.get(bag).embeddings, atol=1e-3)
    frozen, tuned = (
        _held_out_auc(root / "frozen", root / "store", root),
        _held_out_auc(result.run_dir, root / "store2", root),
    )
    # Fine-tuning keeps the held-out ranking (no collapse of the head on the moving backbone). That
    # it improves it is not established on this toy cohort: 0.773 → 0.827 from one frozen head,
    # 0.764 → 0.733 / 0.760 / 0.751 (fine-tune seeds 0-2) from the next trainer's frozen head.
    assert tuned > 0.7 and tuned > frozen - 0.06, (frozen, tuned)
    with pytest.raises(milcache.StoreMismatchError, match="weights_digest"):  # the old store does not fit the new head
        milcache.predict(result.run_dir, root / "store", device="cpu")


def test_freeze_leaves_exactly_the_named_stages_unchanged(cohort, tmp_path):
    root, weights = cohort
    args = [
        "fine-tune",
        "--model",
        str(root / "frozen"),
        "--manifest",
        str(root / "slides.csv"),
        "--weights",
        str(weights),
    ]
    args += ["--out", str(tmp_path / "ft"), "--epochs", "1", "--freeze", "2", "--backbone-lr", "1e-3", "--workers", "0"]
    result = CliRunner().invoke(cli, [*args, "--device", "cpu", "--pool-maps", "max"])
    assert result.exit_code == 0, result.output
    before, after = load_file(weights), load_file(tmp_path / "ft" / "backbone.safetensors")
    frozen = [k for k in after if k.startswith(("conv1.", "bn1.", "layer1."))]
    trained = [k for k in after if k.startswith(("layer2.", "layer3.", "layer4.")) and k.endswith("weight")]
    assert frozen and trained
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in frozen)
    assert all(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in trained if "bn" not in k)
    base = args[:7]  # fine-tune --model … --manifest … --weights …
    bad = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "x"), "--freeze", "9", "--device", "cpu"])
    assert bad.exit_code == 2 and "--freeze 9: this backbone has stages 1..5" in bad.output
    bad = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "y"), "--resume", "--device", "cpu"])
    assert (
        bad.exit_code == 2
        and "--resume: no checkpoint in" in bad.output
        and not (tmp_path / "y" / "model.safetensors").exists()
    )


def _subset(root: Path) -> Path:
    """The first 40 slides: the resume test checks bookkeeping, not learning."""
    path = root / "slides-40.csv"
    if not path.exists():
        pl.read_csv(root / "slides.csv").head(40).write_csv(path)
    return path


def _command(root, weights, out, *extra):
    return [
        sys.executable,
        "-m",
        "milcache.cli",
        "fine-tune",
        "--model",
        str(root / "frozen"),
        "--manifest",
        str(_subset(root)),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--workers",
        "0",
        "--backbone-lr",
        "1e-4",
        "--patience",
        "10",
        "--device",
        "cpu",
        *extra,
    ]


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(cohort, tmp_path):
    root, weights = cohort
    whole = subprocess.run(_command(root, weights, tmp_path / "whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(
        _command(root, weights, tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.is_file():  # the first epoch is checkpointed
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["epoch"] < 1, "the run finished before it could be killed"
    again = subprocess.run(_command(root, weights, tmp_path / "cut"), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(_command(root, weights, tmp_path / "cut", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("backbone.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def _cam_cohort(root: Path) -> dict:
    from PIL import Image

    rows = []
    for b in range(4):
        for view in ("cc", "mlo"):
            image = np.zeros((256, 192), np.uint16)
            image[20:230, 10:150] = 20_000 + np.random.default_rng(b).integers(0, 5000 + 3000 * (b % 2), (210, 140))
            Image.fromarray(image).save(root / f"{b}-{view}.png")
            rows.append((f"breast-{b}", f"{b}-{view}.png", b % 2))
    pl.DataFrame(rows, schema=["bag_id", "path", "label"], orient="row").write_csv(root / "m.csv")
    return {"source": "cam", "global_size": 64, "region_size": 64, "regions": 2, "input_size": 64}


def _volume_cohort(root: Path) -> dict:
    import nibabel as nib

    rows = []
    for b in range(4):
        volume = np.zeros((16, 48, 48), np.float32)
        volume[2:14, 4:44, 4:44] = 100 + (10 + 20 * (b % 2)) * np.random.default_rng(b).random((12, 40, 40))
        nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), str(root / f"v{b}.nii.gz"))
        rows.append((f"case-{b}", f"v{b}.nii.gz", b % 2))
    pl.DataFrame(rows, schema=["bag_id", "path", "label"], orient="row").write_csv(root / "m.csv")
    return {"source": "volume", "patch_size": (4, 24, 24), "min_foreground": 0.2, "input_size": 32}


@pytest.mark.parametrize("make", [_cam_cohort, _volume_cohort], ids=["cam", "volume"])
def test_fine_tune_works_for_cam_regions_and_volume_patches(tmp_path, make):
    options = make(tmp_path)
    milcache.extract(tmp_path / "m.csv", tmp_path / "store", backbone="test_resnet", workers=0, device="cpu", **options)
    milcache.train_head(tmp_path / "store", tmp_path / "m.csv", tmp_path / "run", head="mean", folds=2, epochs=2)
    result = milcache.fine_tune(
        tmp_path / "run",
        tmp_path / "m.csv",
        tmp_path / "tuned",
        epochs=1,
        instances=3,
        backbone_lr=1e-3,
        val_fraction=0.0,
        workers=0,
        device="cpu",
    )
    before = {k: v.numpy() for k, v in _random_init_state().items()}
    after = load_file(result.backbone)
    assert any(not np.array_equal(before[k], after[k].numpy()) for k in after if k.endswith("weight"))
    assert (result.run_dir / "model.safetensors").is_file() and len(result.history) == 1


def _random_init_state():
    from milcache.extractor.encoders import create_encoder

    return create_encoder("test_resnet").model.state_dict()


def test_the_api_and_the_cli_fine_tune_alike(cohort, tmp_path):
    root, weights = cohort
    options = {"epochs": 1, "instances": 4, "workers": 0, "val_fraction": 0.0, "backbone_lr": 1e-4}
    milcache.fine_tune(root / "frozen", _subset(root), tmp_path / "api", weights=weights, device="cpu", **options)
    args = ["fine-tune", "--model", root / "frozen", "--manifest", _subset(root), "--weights", weights]
    args += ["--out", tmp_path / "cli", "--epochs", "1", "--instances", "4", "--workers", "0", "--val-fraction", "0"]
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--backbone-lr", "1e-4", "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    a, b = load_file(tmp_path / "api" / "backbone.safetensors"), load_file(tmp_path / "cli" / "backbone.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_each_epoch_releases_kept_host_memory_before_its_workers_fork(cohort, tmp_path, monkeypatch):
    """A fine-tuning epoch's workers fork after the previous epoch's training: what the process
    keeps free is released first, so that training does not copy those pages on write."""
    import milcache.devices

    root, weights = cohort
    released = []
    monkeypatch.setattr(milcache.devices, "release_free_host_memory", lambda: released.append(1) or True)
    args = ["fine-tune", "--model", str(root / "frozen"), "--manifest", str(root / "slides.csv")]
    args += ["--weights", str(weights), "--epochs", "2", "--instances", "4", "--val-fraction", "0"]
    args += ["--out", str(tmp_path / "ft"), "--workers", "1", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(released) >= 2  # at least once an epoch


def test_a_blend_is_refused_naming_its_members(tmp_path):
    from milcache.aggregator.model import save_blend

    for name in ("defaults", "trial-3"):
        (tmp_path / "best" / name).mkdir(parents=True)
    save_blend(tmp_path / "best", ["defaults", "trial-3"])
    args = ["fine-tune", "--model", tmp_path / "best", "--manifest", tmp_path / "m.csv", "--out", tmp_path / "ft"]
    (tmp_path / "m.csv").write_text("bag_id,path\n")
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2 and "is a blend of several models" in result.output
    assert str(tmp_path / "best" / "trial-3") in result.output and not (tmp_path / "ft").exists()


def test_resume_from_another_fine_tunings_checkpoint_is_refused_by_name(tmp_path):
    """A checkpoint knows the fine-tuning it belongs to; another model's tensors are named, not a traceback."""
    import torch

    from milcache.aggregator.finetune import _Checkpoint

    def parts(width: int):
        net = torch.nn.Linear(4, width)
        return net, torch.optim.AdamW(net.parameters())

    mine = {"model": "/runs/a", "store": "/stores/s", "lr": 1e-3}
    net, optimizer = parts(2)
    _Checkpoint(tmp_path / "ck", mine).save(net, optimizer, 0, [], {"epoch": 0, "loss": 1.0})
    assert _Checkpoint(tmp_path / "ck", mine).load(*parts(2))[0] == 1
    other = {**mine, "model": "/runs/b", "lr": 1e-4}
    expected = r"another fine-tuning \(lr: checkpoint 0.001, this run 0.0001; model"
    with pytest.raises(milcache.MilcacheError, match=expected):
        _Checkpoint(tmp_path / "ck", other).load(*parts(2))
    with pytest.raises(milcache.MilcacheError, match="does not fit this model"):
        _Checkpoint(tmp_path / "ck", mine).load(*parts(3))

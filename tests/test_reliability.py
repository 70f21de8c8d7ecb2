"""Nothing silent, nothing lost: every bad input to every command → exit 2, one line naming the
option / file / bag and what is expected, no traceback, and not one byte on disk changed."""

from __future__ import annotations

import hashlib
import multiprocessing
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

from milcache.cli import cli
from milcache.errors import StoreError, StoreMismatchError
from milcache.store import FeatureStore, StoreWriter
from milcache.store.synthetic import make_synthetic_store
from tests.conftest import make_meta, tissue_image, write_pyramid_tiff


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A store, its labels, two trained runs (attention and mean pooling), a slide manifest and
    the files a user gets wrong: a plain file where a folder belongs, a read-only folder."""
    root = tmp_path_factory.mktemp("world")
    labels = make_synthetic_store(root / "store", bags=24, instances=(5, 20), dim=8, seed=1)
    labels.write_csv(root / "labels.csv")
    runner = CliRunner()
    for head in ("gated-attention", "mean"):
        result = runner.invoke(
            cli,
            ["train-head", "--store", root / "store", "--labels", root / "labels.csv", "--head", head]
            + ["--out", root / f"run-{head}", "--epochs", "2", "--folds", "2", "--device", "cpu"],
        )
        assert result.exit_code == 0, result.output
    write_pyramid_tiff(root / "slide.tif", tissue_image(128, 128))
    pl.DataFrame({"bag_id": ["s"], "path": ["slide.tif"]}).write_csv(root / "manifest.csv")
    (root / "a-file").write_text("not a folder\n")
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    (root / "space.toml").write_text('lr = {type = "float", low = 1e-4, high = 1e-2}\nlearning_rate = 0.1\n')
    (root / "wrong.safetensors").write_bytes(b"")
    import torch
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(2, 7), "fc.bias": torch.zeros(2)}, root / "wrong.safetensors")
    _bad_inputs(root, labels["bag_id"].to_list())
    other = make_meta(dim=8, backbone="synthetic", preprocessing={"mean": [0.1, 0.2, 0.3]})
    with StoreWriter(root / "other-preprocessing", other) as writer:
        writer.put("x", np.ones((3, 8), np.float32))
    return {"root": root}


def _bad_inputs(root: Path, ids: list[str]) -> None:
    """Label tables, manifests and embedding files that are wrong in the ways users' files are."""

    def labels(name: str, cells: list[str], header: str = "bag_id,label") -> None:
        (root / name).write_text(header + "\n" + "".join(f"{b},{c}\n" for b, c in zip(ids, cells, strict=False)))

    labels("inf-label.csv", ["inf"] + [str(i % 2) for i in range(1, len(ids))])
    (root / "header-only.csv").write_text("bag_id,label\n")
    labels(
        "empty-group.csv", [f"{i % 2},{'' if i == 3 else f'p{i // 2}'}" for i in range(len(ids))], "bag_id,label,group"
    )
    labels("mixed-labels.csv", [["1", "1.0", "yes", "0"][i % 4] for i in range(len(ids))])
    labels("spaced-labels.csv", [[" 0", "1"][i % 2] for i in range(len(ids))])
    text = [["1", "1.0", "0"][i % 3] for i in range(len(ids))]  # a text column: "1" and "1.0" are two strings
    pl.DataFrame({"bag_id": ids, "label": text}).write_parquet(root / "two-ways.parquet")
    (root / "empty-manifest.csv").write_text("bag_id,path\n")
    for name, save in (
        ("empty-npy", lambda folder: (folder / "a.npy").write_bytes(b"")),
        ("text-npz", lambda folder: np.savez(folder / "a.npz", features=np.array(["x", "y"]))),
        ("no-features-npy", lambda folder: np.save(folder / "a.npy", np.zeros((0, 0)))),
    ):
        (root / name).mkdir()
        save(root / name)
    pl.DataFrame({"bag_id": ["a/b", "a/b"], "f0": [1.0, 2.0], "f1": [0.0, 1.0]}).write_csv(root / "slash-id.csv")
    times = [f"{1 + i},{i % 2}" for i in range(len(ids))]
    for name, row, cell in (
        ("negative-time", 2, "-3,1"),
        ("zero-time", 5, "0,0"),
        ("missing-time", 1, ",1"),
        ("event-two", 3, "4,2"),
        ("text-time", 4, "soon,1"),
    ):
        labels(f"{name}.csv", [cell if i == row else t for i, t in enumerate(times)], "bag_id,time,event")
    labels(
        "patient-two-times.csv",
        [f"{t},{'p0' if i < 2 else f'p{i}'}" for i, t in enumerate(times)],
        "bag_id,time,event,group",
    )
    labels("survival.csv", times, "bag_id,time,event")


def _train(*extra):
    return ["train-head", "--store", "{root}/store", "--labels", "{root}/labels.csv", "--out", "{root}/new-run", *extra]


def _labels(name: str, *extra):
    """train-head with another labels table."""
    return _train()[:4] + ["{root}/" + name] + _train()[5:] + list(extra)


def _predict(*extra, run="run-gated-attention", store="store"):
    return ["predict", "--model", f"{{root}}/{run}", "--store", f"{{root}}/{store}", *extra]


def _tune(*extra):
    return ["tune", "--store", "{root}/store", "--labels", "{root}/labels.csv", "--out", "{root}/study", *extra]


def _extract(*extra):
    return ["extract", "{root}/manifest.csv", "--out", "{root}/new-store", "--backbone", "test_resnet", *extra]


def _index(command, *extra):
    return ["index", command, "{root}/store", *extra]


def _fine_tune(*extra):
    return [
        "fine-tune",
        "--model",
        "{root}/run-gated-attention",
        "--out",
        "{root}/tuned",
        "--manifest",
        "{root}/manifest.csv",
        *extra,
    ]


CASES = {
    # option values out of range, refused by name (never read as something else)
    "train --epochs 0": (_train("--epochs", "0"), "--epochs"),
    "train --batch-size 0": (_train("--batch-size", "0"), "--batch-size"),
    "train --lr -1": (_train("--lr", "-1"), "--lr"),
    "train --weight-decay -1": (_train("--weight-decay", "-1"), "--weight-decay"),
    "train --dropout 2": (_train("--dropout", "2"), "dropout"),
    "train --hidden 0": (_train("--hidden", "0"), "hidden"),
    "train --instances -5": (_train("--instances", "-5"), "--instances"),
    "train --repeats 0": (_train("--repeats", "0"), "--repeats"),
    "train --folds 1": (_train("--folds", "1"), "--folds"),
    "train --patience 0": (_train("--patience", "0"), "--patience"),
    "train --val-fraction 0.9": (_train("--val-fraction", "0.9"), "--val-fraction"),
    "train --l1-ratio 3": (_train("--l1-ratio", "3"), "--l1-ratio"),
    "train unknown head option": (_train("--head-option", "bogus=1"), "bogus"),
    "train head option of wrong kind": (_train("--head-option", "attention_dim=wide"), "attention_dim"),
    "train --out is a file": (_train()[:-1] + ["{root}/a-file"], "a-file"),
    "train --out read-only": (_train()[:-1] + ["{root}/readonly/run"], "not writable"),
    "predict --top-k -3": (_predict("--out", "{root}/p.csv", "--top-k", "-3"), "--top-k"),
    "predict --out is a folder": (_predict("--out", "{root}/readonly"), "is a folder"),
    "predict --out .txt": (_predict("--out", "{root}/p.txt"), ".csv or .parquet"),
    "predict --out read-only": (_predict("--out", "{root}/readonly/p.csv"), "not writable"),
    "predict --heatmaps is a file": (_predict("--out", "{root}/p.csv", "--heatmaps", "{root}/a-file"), "--heatmaps"),
    "predict --heatmaps, no instance scores": (
        _predict("--out", "{root}/p.csv", "--heatmaps", "{root}/maps", run="run-mean"),
        "gives none",
    ),
    "predict a store of other preprocessing": (
        _predict("--out", "{root}/p.csv", store="other-preprocessing"),
        "preprocessing.mean: model trained on",
    ),
    "tune --jobs 0": (_tune("--jobs", "0"), "--jobs"),
    "tune --n-trials 0": (_tune("--n-trials", "0"), "--n-trials"),
    "tune --holdout 0.9": (_tune("--holdout", "0.9"), "--holdout"),
    "tune --set unknown key": (_tune("--set", "learning_rate=0.1"), "learning_rate"),
    "tune --set out of range": (_tune("--set", "lr=-1"), "--lr"),
    "tune --set epochs text": (_tune("--set", "epochs=many"), "--epochs"),
    "tune --space unknown key": (_tune("--space", "{root}/space.toml"), "learning_rate"),
    "tune --out is a file": (_tune()[:-1] + ["{root}/a-file"], "a-file"),
    "extract --scale 0": (_extract("--scale", "0"), "--scale"),
    "extract --mpp 0": (_extract("--mpp", "0"), "--mpp"),
    "extract --mpp -1": (_extract("--mpp", "-1"), "--mpp"),
    "extract --max-tiles 0": (_extract("--max-tiles", "0"), "--max-tiles"),
    "extract --max-tiles -1": (_extract("--max-tiles", "-1"), "--max-tiles"),
    "extract --input-size 0": (_extract("--input-size", "0"), "--input-size"),
    "extract --batch-size 0": (_extract("--batch-size", "0"), "--batch-size"),
    "extract --workers -1": (_extract("--workers", "-1"), "--workers"),
    "extract --std 0,0,0": (_extract("--std", "0,0,0"), "--std"),
    "extract --std text": (_extract("--std", "a,b,c"), "--std"),
    "extract --tile-size 4": (_extract("--tile-size", "4"), "--tile-size"),
    "extract --tissue-threshold 2": (_extract("--tissue-threshold", "2"), "--tissue-threshold"),
    "extract --out is a file": (_extract()[:3] + ["{root}/a-file"] + _extract()[4:], "a-file"),
    "extract --out read-only": (_extract()[:3] + ["{root}/readonly/s"] + _extract()[4:], "not writable"),
    "extract cam --regions 0": (_extract("--source", "cam", "--regions", "0"), "--regions"),
    "extract cam weights that do not fit": (
        _extract("--source", "cam", "--cam-model", "resnet18", "--cam-weights", "{root}/wrong.safetensors"),
        "does not fit --cam-model resnet18",
    ),
    "store import --out is a file": (["store", "import", "{root}/store", "--out", "{root}/a-file"], "a-file"),
    "store export --out is a file": (["store", "export", "{root}/store", "--out", "{root}/a-file"], "a-file"),
    "store synth --bags 0": (["store", "synth", "{root}/synth", "--bags", "0"], "--bags"),
    # label tables, manifests and files checked before any work
    "train an infinite label": (_train()[:4] + ["{root}/inf-label.csv"] + _train()[5:], "infinite label"),
    "train labels with only a header": (_train()[:4] + ["{root}/header-only.csv"] + _train()[5:], "has no rows"),
    "train an empty group cell": (_train()[:4] + ["{root}/empty-group.csv"] + _train()[5:], "row 4: bag 'bag-00003'"),
    "train labels of numbers and words": (_train()[:4] + ["{root}/mixed-labels.csv"] + _train()[5:], "mixes numbers"),
    "train labels with spaces": (_train()[:4] + ["{root}/spaced-labels.csv"] + _train()[5:], "' 0'"),
    "train one label written two ways": (_train()[:4] + ["{root}/two-ways.parquet"] + _train()[5:], "1 and 1.0"),
    "survival: a negative time": (_labels("negative-time.csv"), "row 3: bag 'bag-00002'"),
    "survival: a zero time": (_labels("zero-time.csv"), "row 6: bag 'bag-00005'"),
    "survival: a missing time": (_labels("missing-time.csv"), "row 2: bag 'bag-00001'"),
    "survival: event 2": (_labels("event-two.csv"), "row 4: bag 'bag-00003'"),
    "survival: a time in words": (_labels("text-time.csv"), "row 5: bag 'bag-00004'"),
    "survival: one patient, two times": (_labels("patient-two-times.csv"), "patient 'p0'"),
    "survival: clam-sb": (_labels("survival.csv", "--head", "clam-sb"), "'clam-sb' adds an instance loss"),
    "survival: --bins 1": (_labels("survival.csv", "--survival-loss", "nll", "--bins", "1"), "--bins"),
    "survival: --alpha 2": (_labels("survival.csv", "--alpha", "2"), "--alpha"),
    "survival: --time not a column": (_labels("survival.csv", "--time", "days"), "days"),
    "tune survival: --metric auc": (_tune()[:4] + ["{root}/survival.csv"] + _tune()[5:] + ["--metric", "auc"], "auc"),
    "extract a manifest without rows": (["extract", "{root}/empty-manifest.csv"] + _extract()[2:], "has no rows"),
    "extract --mean of two values": (_extract("--mean", "0.5,0.5"), "--mean has 2 values"),
    "store import an empty .npy": (["store", "import", "{root}/empty-npy", "--out", "{root}/s"], "a.npy"),
    "store import a text .npz": (["store", "import", "{root}/text-npz", "--out", "{root}/s"], "a.npz"),
    "store import a (0, 0) array": (["store", "import", "{root}/no-features-npy", "--out", "{root}/s"], "a.npy"),
    "store import a bag id with /": (["store", "import", "{root}/slash-id.csv", "--out", "{root}/s"], "'a/b'"),
    "store synth --instances 10 5": (["store", "synth", "{root}/synth", "--instances", "10", "5"], "--instances"),
    "tune a journal in a missing folder": (_tune("--storage", "journal:{root}/none/j.log"), "--storage"),
    "demo --out is a file": (["demo", "--out", "{root}/a-file"], "a-file"),
    # memory budget, duplicates, the index, fine-tuning
    "train --memory-budget lots": (_train("--memory-budget", "lots"), "--memory-budget"),
    "train --skip-duplicates before dedup": (_train("--skip-duplicates"), "index dedup"),
    "predict --memory-budget 0": (_predict("--out", "{root}/p.csv", "--memory-budget", "0"), "--memory-budget"),
    "index search without an index": (_index("search", "--bag", "bag-00000", "--instance", "0"), "has no index"),
    "index search with no query": (_index("search"), "--image"),
    "index dedup --threshold 2": (_index("dedup", "--threshold", "2"), "--threshold"),
    "index dedup --across-bags without index": (_index("dedup", "--across-bags"), "has no index"),
    "index kmeans --k 0": (_index("kmeans", "--k", "0", "--out", "{root}/protos"), "--k"),
    "fine-tune --freeze abc": (_fine_tune("--freeze", "abc"), "--freeze"),
    "fine-tune --epochs 0": (_fine_tune("--epochs", "0"), "--epochs"),
    "fine-tune --out is a file": (_fine_tune()[:4] + ["{root}/a-file"] + _fine_tune()[5:], "a-file"),
    "fine-tune an imported store": (_fine_tune(), "not made by `milcache extract`"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's digest, but LMDB's reader table (``*-lock``), which any reader updates."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("-lock")
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_name_and_changes_nothing(world, case):
    args, named = CASES[case]
    if named == "not writable" and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    root = world["root"]
    before = _snapshot(root)
    result = CliRunner().invoke(cli, [a.format(root=root) for a in args])
    assert isinstance(result.exception, SystemExit), f"{case}: a traceback:\n{result.output}"
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}"
    message = result.output.strip().splitlines()
    errors = [line for line in message if line.lower().startswith("error:") or "Invalid value" in line]
    assert errors, result.output
    assert named in result.output, f"{case}: {named!r} not named in:\n{result.output}"
    assert "Traceback" not in result.output
    assert _snapshot(root) == before, f"{case} changed files on disk"


def test_a_corrupt_record_stops_train_head_and_predict_by_name(tmp_path):
    labels = make_synthetic_store(tmp_path / "store", bags=12, instances=(300, 300), dim=8, seed=2)
    labels.write_csv(tmp_path / "labels.csv")
    runner = CliRunner()
    common = ["--store", tmp_path / "store", "--device", "cpu"]
    train = ["train-head", *common, "--labels", tmp_path / "labels.csv", "--epochs", "1", "--folds", "2"]
    assert runner.invoke(cli, [*train, "--out", tmp_path / "run"]).exit_code == 0
    with FeatureStore(tmp_path / "store") as store:
        victim = store.bag_ids()[3]
        needle = bytes(store.get(victim).embeddings[100:110].tobytes())
    shard = tmp_path / "store" / "shard-00000.mdb"
    data = bytearray(shard.read_bytes())
    data[data.find(needle) + 5] ^= 0x40
    shard.write_bytes(bytes(data))
    for args in (
        [*train, "--out", tmp_path / "run2"],
        ["predict", *common, "--model", tmp_path / "run", "--out", tmp_path / "p.csv"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and f"bag '{victim}'" in result.output and "checksum" in result.output
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "run2").exists()


def _writer(path: str, backbone: str, barrier, results) -> None:
    barrier.wait()
    try:
        with StoreWriter(path, make_meta(backbone=backbone)) as writer:
            time.sleep(0.2)
            writer.put(f"from-{backbone}", np.ones((2, 16), np.float32))
        results.put(("ok", backbone))
    except StoreMismatchError as exc:
        results.put(("refused", str(exc)))


def test_two_writers_with_different_settings_on_one_new_store(tmp_path):
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        path = str(tmp_path / f"store-{attempt}")
        barrier, results = context.Barrier(2), context.Queue()
        procs = [context.Process(target=_writer, args=(path, name, barrier, results)) for name in ("net-a", "net-b")]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert [kind for kind, _ in outcomes] == ["ok", "refused"]
        winner = outcomes[0][1]
        assert "encoder: store has" in outcomes[1][1]
        with FeatureStore(path) as store:
            assert store.metadata.backbone == winner and store.bag_ids() == [f"from-{winner}"]


def test_overwrite_of_a_store_being_written_is_refused(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta()) as writer:
        writer.put("kept", np.ones((2, 16), np.float32))
        with pytest.raises(StoreError, match="another process is writing"):
            StoreWriter(tmp_path / "s", make_meta(), overwrite=True)
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == ["kept"]


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_decode_workers_die_with_a_killed_extract(tmp_path):
    for i in range(8):
        write_pyramid_tiff(tmp_path / f"s{i}.tif", tissue_image(512, 512, seed=i))
    pl.DataFrame({"bag_id": [f"s{i}" for i in range(8)], "path": [f"s{i}.tif" for i in range(8)]}).write_csv(
        tmp_path / "m.csv"
    )
    command = [sys.executable, "-m", "milcache.cli", "extract", str(tmp_path / "m.csv"), "--out", str(tmp_path / "st")]
    command += ["--backbone", "test_resnet", "--tile-size", "32", "--workers", "2", "--batch-size", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        time.sleep(0.2)
        workers = _children(proc.pid)
    assert len(workers) >= 2, "the workers never started"
    for worker in workers:  # opened no store before forking
        links = {os.readlink(f) for f in Path(f"/proc/{worker}/fd").iterdir() if f.is_symlink()}
        assert not any(".mdb" in link for link in links), links
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "decode workers outlived their parent"

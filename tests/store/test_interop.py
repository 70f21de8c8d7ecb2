import h5py
import numpy as np
import polars as pl
import pytest
import torch

from milcache.errors import StoreError
from milcache.store import FeatureStore, export_h5, import_embeddings
from tests.conftest import random_bags


def _check_same(store_dir, bags, dtype=np.float16):
    with FeatureStore(store_dir) as store:
        assert store.bag_ids() == sorted(bags)
        for bag_id, (emb, coords, _) in bags.items():
            np.testing.assert_array_equal(store[bag_id].embeddings, emb.astype(dtype))
            if coords is not None:
                np.testing.assert_array_equal(store[bag_id].coords, coords)


def test_import_clam_h5_folder(tmp_path):
    bags = random_bags(6, dim=32)
    (tmp_path / "h5").mkdir()
    for bag_id, (emb, coords, _) in bags.items():
        with h5py.File(tmp_path / "h5" / f"{bag_id}.h5", "w") as f:
            f.create_dataset("features", data=emb)
            f.create_dataset("coords", data=coords).attrs["patch_size"] = 256
    report = import_embeddings(tmp_path / "h5", tmp_path / "s", backbone="uni")
    assert (report.bags, report.dim) == (6, 32)
    _check_same(tmp_path / "s", bags)
    with FeatureStore(tmp_path / "s") as store:
        assert store.metadata.backbone == "uni" and store.metadata.coords == ["x", "y"]
        assert store["bag-0000"].meta == {"patch_size": 256}


def test_import_pt_and_npy_folder(tmp_path):
    bags = random_bags(4, dim=8)
    (tmp_path / "pt").mkdir()
    for i, (bag_id, (emb, _, _)) in enumerate(bags.items()):
        if i % 2:
            torch.save(torch.from_numpy(emb), tmp_path / "pt" / f"{bag_id}.pt")
        else:
            np.save(tmp_path / "pt" / f"{bag_id}.npy", emb)
    import_embeddings(tmp_path / "pt", tmp_path / "s", dtype="float32")
    _check_same(tmp_path / "s", {k: (v[0], None, None) for k, v in bags.items()}, np.float32)


def test_pt_with_pickled_objects_is_refused(tmp_path):
    (tmp_path / "pt").mkdir()
    torch.save({"features": torch.zeros(2, 4), "evil": object()}, tmp_path / "pt" / "x.pt")
    with pytest.raises(StoreError, match="x.pt: cannot load as tensors"):
        import_embeddings(tmp_path / "pt", tmp_path / "s")


def test_import_instance_table_keeps_order_and_label(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for bag, n, label in (("s2", 3, 1), ("s1", 2, 0)):
        for i in range(n):
            features = {f"f{j}": float(rng.standard_normal()) for j in range(5)}
            rows.append({"slide": bag, "label": label, "x": i, "y": 2 * i, **features})
    table = pl.DataFrame(rows)
    table.write_parquet(tmp_path / "t.parquet")
    import_embeddings(
        tmp_path / "t.parquet", tmp_path / "s", bag_column="slide", coord_columns=["x", "y"], dtype="float32"
    )
    with FeatureStore(tmp_path / "s") as store:
        bag = store["s2"]
        expected = table.filter(pl.col("slide") == "s2").select([f"f{j}" for j in range(5)]).to_numpy()
        np.testing.assert_allclose(bag.embeddings, expected, rtol=1e-6)
        np.testing.assert_array_equal(bag.coords, [[0, 0], [1, 2], [2, 4]])
        assert bag.meta == {"label": 1} and store["s1"].meta == {"label": 0}
        assert store.metadata.dim == 5  # x, y and label are not features


def test_table_rows_of_a_bag_must_agree_on_label(tmp_path):
    pl.DataFrame({"bag_id": ["a", "a"], "label": [0, 1], "f": [1.0, 2.0]}).write_csv(tmp_path / "t.csv")
    with pytest.raises(Exception, match="bag 'a' disagree on label"):
        import_embeddings(tmp_path / "t.csv", tmp_path / "s")


def test_export_then_import_gives_identical_embeddings(small_store, tmp_path):
    path, bags = small_store
    assert export_h5(path, tmp_path / "h5") == len(bags)
    with h5py.File(tmp_path / "h5" / "bag-0001.h5") as f:  # the CLAM layout
        assert f["features"].shape == bags["bag-0001"][0].shape and f["coords"].shape[1] == 2
    import_embeddings(tmp_path / "h5", tmp_path / "back", backbone="test-net")
    with FeatureStore(path) as a, FeatureStore(tmp_path / "back") as b:
        for bag_id in a.bag_ids():
            np.testing.assert_array_equal(a[bag_id].embeddings, b[bag_id].embeddings)
            np.testing.assert_array_equal(a[bag_id].coords, b[bag_id].coords)
            np.testing.assert_array_equal(a[bag_id].attrs["tissue"], b[bag_id].attrs["tissue"])


def test_two_files_of_one_bag_are_refused_and_junk_is_named(tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", np.ones((3, 4), np.float32))
    torch.save(torch.ones(3, 4), tmp_path / "in" / "a.pt")
    with pytest.raises(StoreError, match=r"bag id\(s\) come from more than one file \(a: a.npy, a.pt\)"):
        import_embeddings(tmp_path / "in", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    (tmp_path / "in" / "a.pt").unlink()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    report = import_embeddings(tmp_path / "in", tmp_path / "store")
    assert report.bags == 1 and "not an embeddings file" in report.skipped[str(tmp_path / "in" / "notes.txt")]


def test_an_output_on_a_full_disk_is_refused_before_work(tmp_path, monkeypatch):
    import shutil

    from milcache import checks
    from milcache.errors import OptionError

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OptionError, match="has only 1 MiB free"):
        checks.output_dir(tmp_path / "store")


# --- an import is a unit ----------------------------------------------------------------------------


def _h5_folder(folder, bags: dict) -> None:
    folder.mkdir(exist_ok=True)
    for bag_id, (emb, coords, _) in bags.items():
        with h5py.File(folder / f"{bag_id}.h5", "w") as f:
            f.create_dataset("features", data=emb)
            f.create_dataset("coords", data=coords)


def _disk(folder) -> dict:
    """Every file under ``folder`` (its lock files aside) with its bytes' digest."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-lock", ".lock"))
    }


def _break(folder, how: str) -> None:
    """Make the second file of ``folder`` bad in one of the ways a user's files are."""
    victim = sorted(folder.iterdir())[1]
    with h5py.File(victim, "r") as f:
        emb, coords = f["features"][:], f["coords"][:]
    victim.unlink()
    with h5py.File(victim, "w") as f:
        if how == "nan":
            emb[0, 0] = np.nan
        if how != "no-features":
            f.create_dataset("features", data=emb[:, :-1] if how == "dim" else emb)
        f.create_dataset("coords", data=coords[:, :1] if how == "coords" else coords)


@pytest.mark.parametrize("how", ["nan", "dim", "coords", "no-features"])
def test_a_failed_import_leaves_no_store_and_an_existing_store_unchanged(tmp_path, how):
    bags = random_bags(4, dim=8, seed=1)
    _h5_folder(tmp_path / "bad", bags)
    _break(tmp_path / "bad", how)
    with pytest.raises(StoreError):
        import_embeddings(tmp_path / "bad", tmp_path / "new")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]

    first = dict(list(random_bags(3, dim=8, seed=2).items()))
    first = {f"old-{k}": v for k, v in first.items()}
    _h5_folder(tmp_path / "first", first)
    import_embeddings(tmp_path / "first", tmp_path / "store")
    before = _disk(tmp_path / "store")
    with pytest.raises(StoreError):
        import_embeddings(tmp_path / "bad", tmp_path / "store")
    assert _disk(tmp_path / "store") == before
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == sorted(first)


def test_an_import_into_a_store_adds_every_bag_as_one_shard_and_refuses_a_changed_bag(tmp_path):
    old = random_bags(3, dim=8, seed=3)
    _h5_folder(tmp_path / "a", old)
    import_embeddings(tmp_path / "a", tmp_path / "store")
    new = {f"new-{k}": v for k, v in random_bags(2, dim=8, seed=4).items()}
    _h5_folder(tmp_path / "b", new)
    first = next(iter(old))
    with h5py.File(tmp_path / "b" / f"{first}.h5", "w") as f:  # the same bag again, unchanged
        f.create_dataset("features", data=old[first][0])
        f.create_dataset("coords", data=old[first][1])
    report = import_embeddings(tmp_path / "b", tmp_path / "store")
    assert (report.bags, report.unchanged) == (2, 1)
    _check_same(tmp_path / "store", {**old, **new})
    assert sorted(p.name for p in (tmp_path / "store").glob("shard-*.mdb")) == ["shard-00000.mdb", "shard-00001.mdb"]
    assert not list((tmp_path / "store").glob(".import-*"))

    before = _disk(tmp_path / "store")
    with h5py.File(tmp_path / "b" / f"{first}.h5", "w") as f:  # now changed
        f.create_dataset("features", data=old[first][0] + 1)
        f.create_dataset("coords", data=old[first][1])
    with pytest.raises(StoreError, match=f"bag '{first}' is already in .* with other embeddings"):
        import_embeddings(tmp_path / "b", tmp_path / "store")
    assert _disk(tmp_path / "store") == before
    import_embeddings(tmp_path / "b", tmp_path / "store", overwrite=True)
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == sorted([first, *new])


def test_an_import_killed_half_way_leaves_nothing_readable_and_the_rerun_completes(tmp_path):
    """kill -9 after the first bags are staged: no store appears; the rerun clears the staging."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    bags = random_bags(6, dim=8, seed=5)
    _h5_folder(tmp_path / "h5", bags)
    script = textwrap.dedent(
        f"""
        import time
        import milcache.store.interop as interop
        original = interop._bags_from_folder
        def slow(src, skipped):
            for i, bag in enumerate(original(src, skipped)):
                if i == 3:
                    open({str(tmp_path / "staged")!r}, "w").close()
                    time.sleep(60)
                yield bag
        interop._bags_from_folder = slow
        interop.import_embeddings({str(tmp_path / "h5")!r}, {str(tmp_path / "store")!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (tmp_path / "staged").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / "staged").exists(), "the child never staged its bags"
    assert not (tmp_path / "store").exists()
    assert len(list(tmp_path.glob(".store.import-*"))) == 1  # the dead process's staging
    import_embeddings(tmp_path / "h5", tmp_path / "store")
    _check_same(tmp_path / "store", bags)
    assert not list(tmp_path.glob(".store.import-*"))

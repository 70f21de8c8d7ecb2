import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from milcache.errors import StoreError, StoreMismatchError
from milcache.store import FeatureStore, StoreWriter
from milcache.store.inspect import verify
from milcache.store.metadata import read_metadata
from tests.conftest import make_meta, random_bags, write_store


def test_round_trip_many_bags_of_different_sizes(tmp_path):
    bags = random_bags(200, sizes=(1, 300))
    write_store(tmp_path / "s", bags)
    with FeatureStore(tmp_path / "s") as store:
        assert len(store) == 200
        assert store.bag_ids() == sorted(bags)
        assert [b.bag_id for b in store] == sorted(bags)  # iteration in key order
        for bag_id, (emb, coords, attrs) in bags.items():
            bag = store[bag_id]
            assert bag.embeddings.dtype == np.float16
            np.testing.assert_array_equal(bag.embeddings, emb.astype(np.float16))
            np.testing.assert_array_equal(bag.coords, coords)
            np.testing.assert_array_equal(bag.attrs["tissue"], attrs["tissue"])
            np.testing.assert_array_equal(bag.attrs["kind"], attrs["kind"])
            assert not bag.embeddings.flags.writeable  # a view of the memory map, not a copy
            loaded = store.get(bag_id, copy=True, check=True)  # read with pread, detached
            np.testing.assert_array_equal(loaded.embeddings, bag.embeddings)
            np.testing.assert_array_equal(loaded.attrs["kind"], attrs["kind"])
        assert all(shard._env.base is not None for shard in store._shards)  # the pread path is taken
        assert store.sizes() == {k: v[0].shape[0] for k, v in bags.items()}
        assert verify(store) == {}


def test_float32_store_keeps_exact_values(tmp_path):
    bags = random_bags(5)
    write_store(tmp_path / "s", bags, make_meta(dtype="float32"))
    with FeatureStore(tmp_path / "s") as store:
        for bag_id, (emb, _, _) in bags.items():
            assert store[bag_id].embeddings.dtype == np.float32
            np.testing.assert_array_equal(store[bag_id].embeddings, emb)


def test_extras_and_meta_round_trip(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta()) as w:
        cam = np.arange(12, dtype=np.float32).reshape(3, 4)
        w.put("a", np.ones((2, 16)), extras={"cam": cam}, meta={"label": 1, "files": ["x.dcm"]})
    with FeatureStore(tmp_path / "s") as store:
        bag = store["a"]
        np.testing.assert_array_equal(bag.extras["cam"], cam)
        assert bag.meta == {"label": 1, "files": ["x.dcm"]}
        assert bag.coords.shape == (2, 2)
        copy = bag.copy()
    assert copy.embeddings.sum() == 32  # a copy outlives the store
    del store
    import gc

    gc.collect()
    assert bag.embeddings.sum() == 32 and bag.extras["cam"][2, 3] == 11  # and so do views (no crash)


def test_multi_shard_read_as_one_store(tmp_path):
    bags = random_bags(30)
    ids = sorted(bags)
    for shard in range(3):
        write_store(tmp_path / "s", {k: bags[k] for k in ids[shard::3]}, shard=shard)
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == ids
        np.testing.assert_array_equal(store[ids[4]].embeddings, bags[ids[4]][0].astype(np.float16))


def test_a_shard_a_writer_has_just_created_reads_as_empty_until_its_first_commit(tmp_path):
    """A reader that opens the store between a new shard's file and its databases (a writer's first
    moments, in another process) sees that shard empty, not an error; a later look sees its bags."""
    from milcache.store.lmdb_store import shard_path

    bags = random_bags(6)
    write_store(tmp_path / "s", bags)
    new_shard = shard_path(tmp_path / "s", 1)

    def writer_does(code: str) -> None:
        opened = f"import lmdb; env = lmdb.open({str(new_shard)!r}, subdir=False, max_dbs=2); "
        subprocess.run([sys.executable, "-c", opened + code], check=True, timeout=60)

    writer_does("env.close()")  # the file, no database yet
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == sorted(bags) and store.failures() == {}
        writer_does("env.open_db(b'bags')")  # half-way: one of the two databases
        store.refresh()
        assert store.bag_ids() == sorted(bags)
    writer_does("env.open_db(b'bags'); env.open_db(b'failures')")  # committed, still no bag
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == sorted(bags) and verify(store) == {}


def test_bag_in_two_shards_is_an_error(tmp_path):
    bags = random_bags(3)
    write_store(tmp_path / "s", bags, shard=0)
    write_store(tmp_path / "s", {"bag-0001": bags["bag-0001"]}, shard=1)
    with pytest.raises(StoreError, match="bag-0001.*two shards"):
        FeatureStore(tmp_path / "s")


def test_refuses_mismatched_backbone_naming_both(tmp_path):
    write_store(tmp_path / "s", random_bags(2))
    with pytest.raises(StoreMismatchError, match="encoder: store has 'test-net', this run has 'other-net'"):
        StoreWriter(tmp_path / "s", make_meta(backbone="other-net"))
    with pytest.raises(StoreMismatchError, match="dim"):
        StoreWriter(tmp_path / "s", make_meta(dim=32))
    with pytest.raises(StoreMismatchError, match="preprocessing"):
        StoreWriter(tmp_path / "s", make_meta(preprocessing={"mean": [0.5, 0.5, 0.5]}))
    with StoreWriter(tmp_path / "s", make_meta(backbone="other-net"), overwrite=True) as w:
        w.put("new", np.zeros((1, 16)))
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == ["new"] and store.metadata.backbone == "other-net"


def test_map_grows_past_initial_size(tmp_path):
    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "s", make_meta(dim=256), map_size=64 * 1024) as w:
        for i in range(20):  # 20 × 500 × 256 × 2 bytes ≈ 5 MB, far past 64 KiB
            w.put(f"b{i}", rng.standard_normal((500, 256)))
    with FeatureStore(tmp_path / "s") as store:
        assert len(store) == 20 and verify(store) == {}


def test_failures_are_recorded_and_cleared_by_success(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta()) as w:
        w.fail("slide-1", "no tissue found")
        w.fail("slide-2", "file missing: /data/slide-2.svs")
        w.put("slide-2", np.ones((3, 16)))  # a retry that worked
    with FeatureStore(tmp_path / "s") as store:
        assert store.failures() == {"slide-1": "no tissue found"}
        assert store.bag_ids() == ["slide-2"]


def test_bad_bags_are_refused_with_their_id(tmp_path):
    with StoreWriter(tmp_path / "s", make_meta()) as w:
        with pytest.raises(StoreError, match="'nan-bag'.*NaN"):
            w.put("nan-bag", np.full((2, 16), np.nan))
        with pytest.raises(StoreError, match="'empty'.*no instances"):
            w.put("empty", np.zeros((0, 16)))
        with pytest.raises(StoreError, match=r"'wide'.*\(n, 16\)"):
            w.put("wide", np.zeros((3, 17)))
        with pytest.raises(StoreError, match="'coords'.*coords must be"):
            w.put("coords", np.zeros((3, 16)), coords=np.zeros((3, 3)))
        with pytest.raises(StoreError, match="overflow float16"):
            w.put("big", np.full((1, 16), 1e6))
    with FeatureStore(tmp_path / "s") as store:
        assert len(store) == 0


def test_store_json_describes_the_store(tmp_path):
    write_store(tmp_path / "s", random_bags(1), make_meta(preprocessing={"size": [224, 224]}, weights_digest="abc"))
    data = json.loads((tmp_path / "s" / "store.json").read_text())
    assert data["backbone"] == "test-net" and data["dim"] == 16 and data["dtype"] == "float16"
    assert data["weights_digest"] == "abc" and data["preprocessing"] == {"size": [224, 224]}
    assert data["schema_version"] == 1 and "numpy" in data["versions"] and data["created"]
    assert read_metadata(tmp_path / "s").coords == ["x", "y"]


@pytest.mark.parametrize("where", ["embeddings", "meta"])
def test_a_corrupt_record_is_refused_by_every_reader_and_named_by_verify(tmp_path, where):
    bags = random_bags(5)
    marker = np.full((1000, 16), 1234.0, np.float32)  # large: lives in overflow pages, written once
    with StoreWriter(tmp_path / "s", make_meta()) as writer:
        for bag_id, (emb, coords, attrs) in bags.items():
            writer.put(bag_id, emb, coords, attrs)
        writer.put("bag-0002", marker, np.zeros((1000, 2), np.int32), meta={"label": "tumour-positive"})
    path = tmp_path / "s" / "shard-00000.mdb"
    data = bytearray(path.read_bytes())
    needle = marker.astype(np.float16).tobytes() if where == "embeddings" else b"tumour-positive"
    at = data.find(needle)
    assert at > 0
    data[at + 3] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with FeatureStore(tmp_path / "s") as store:
        problems = verify(store)
        assert list(problems) == ["bag-0002"] and "checksum" in problems["bag-0002"]
        for copy in (False, True):
            with pytest.raises(StoreError, match="bag 'bag-0002'.*corrupt.*checksum"):
                store.get("bag-0002", copy=copy)
        store.get("bag-0001")  # the others stay readable


def test_a_store_opens_twice_in_one_process_and_snapshots_stay_put(tmp_path):
    bags = random_bags(3)
    write_store(tmp_path / "s", bags)
    first = FeatureStore(tmp_path / "s")
    second = FeatureStore(tmp_path / "s")  # LMDB allows one environment per file: it is shared
    old = first["bag-0001"]
    first.refresh()
    second.close()
    np.testing.assert_array_equal(old.embeddings, bags["bag-0001"][0].astype(np.float16))
    first.close()


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="store.json is missing"):
        FeatureStore(tmp_path)


_WRITER = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from milcache.store import StoreWriter
from tests.conftest import make_meta
rng = np.random.default_rng(0)
with StoreWriter(sys.argv[1], make_meta(dim=512)) as w:
    for i in range(100000):
        w.put(f"bag-{i:06d}", rng.standard_normal((int(rng.integers(200, 2000)), 512)))
        if i == 5:
            print("ready", flush=True)
"""


def _start_writer(store: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store), str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkill_mid_write_leaves_only_complete_bags(tmp_path):
    proc = _start_writer(tmp_path / "s")
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with FeatureStore(tmp_path / "s") as store:
        assert len(store) > 5
        assert verify(store) == {}
        last = store.bag_ids()[-1]
        assert store.bag_ids() == [f"bag-{i:06d}" for i in range(len(store))]
        assert store[last].embeddings.shape[1] == 512
    # and the store can be written again afterwards (resume)
    with StoreWriter(tmp_path / "s", make_meta(dim=512)) as w:
        w.put("after", np.zeros((1, 512)))


def test_concurrent_reader_sees_complete_bags_only(tmp_path):
    proc = _start_writer(tmp_path / "s")
    try:
        seen = 0
        with FeatureStore(tmp_path / "s") as store:
            for _ in range(10):
                store.refresh()
                assert verify(store) == {}
                seen = max(seen, len(store))
                time.sleep(0.1)
        assert seen > 5
    finally:
        proc.kill()
        proc.wait()


def _read_in_process(path, bag_id, queue):
    with FeatureStore(path) as store:
        queue.put(float(store[bag_id].embeddings.astype(np.float32).sum()))


def test_store_opens_in_a_spawned_worker(small_store):
    path, bags = small_store
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_read_in_process, args=(path, "bag-0003", queue))
    proc.start()
    proc.join(60)
    assert queue.get(timeout=5) == pytest.approx(float(bags["bag-0003"][0].astype(np.float16).astype(np.float32).sum()))


def test_a_writer_whose_shard_another_writer_grew_goes_on(tmp_path):
    """Two processes write one shard; the other grows its map past this one's: LMDB says the map
    was resized, and the writer adopts the new size instead of reporting a full disk."""
    import multiprocessing

    meta = make_meta(dim=256, dtype="float32")
    with StoreWriter(tmp_path / "s", meta, map_size=1 << 20) as writer:
        writer.put("small", np.ones((2, 256), np.float32))
        context = multiprocessing.get_context("spawn")
        other = context.Process(target=_write_big, args=(tmp_path / "s", meta))
        other.start()
        other.join(60)
        assert other.exitcode == 0
        writer.put("after", np.ones((2, 256), np.float32))
    with FeatureStore(tmp_path / "s") as store:
        assert store.bag_ids() == ["after", "big", "small"]


def _write_big(path, meta):
    with StoreWriter(path, meta, map_size=1 << 20) as writer:
        writer.put("big", np.ones((4096, 256), np.float32))  # 4 MiB: past the 1 MiB map


def test_overwrite_of_one_shard_is_refused_while_another_process_writes_it(tmp_path):
    """extract --overwrite with several shards starts only its own shard over, under the shard's
    writer lock: refused while another writer holds that shard, other shards untouched."""
    bags = random_bags(4)
    for shard in (0, 1):
        write_store(tmp_path / "s", dict(list(bags.items())[2 * shard : 2 * shard + 2]), shard=shard)
    holder = StoreWriter(tmp_path / "s", make_meta(), shard=1)  # another process's writer of shard 1
    try:
        with pytest.raises(StoreError, match="shard-00001.mdb .* another process is writing it"):
            StoreWriter(tmp_path / "s", make_meta(), shard=1, restart_shard=True)
        with StoreWriter(tmp_path / "s", make_meta(), shard=0, restart_shard=True):
            pass  # shard 0 is nobody else's: started over
    finally:
        holder.close()
    with FeatureStore(tmp_path / "s") as store:
        assert sorted(store.bag_ids()) == sorted(list(bags)[2:])

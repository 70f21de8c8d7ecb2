import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from milcache.cli import cli
from milcache.errors import ExtractionError
from milcache.extractor.encoders import create_encoder
from milcache.extractor.loop import ExtractConfig, extract
from milcache.extractor.slides import open_slide
from milcache.extractor.sources import create_source
from milcache.store import FeatureStore
from milcache.store.inspect import verify
from milcache.store.tables import BagSpec
from tests.conftest import tissue_image, write_pyramid_tiff

BACKBONE = "test_resnet"
FAST = {"input_size": (64, 64)}


def _manifest(folder: Path, names: dict[str, str]) -> Path:
    pl.DataFrame({"bag_id": list(names), "path": list(names.values())}).write_csv(folder / "manifest.csv")
    return folder / "manifest.csv"


def _plan(path, **settings):
    source = create_source("tiles", **settings)
    return source, source.plan(BagSpec("b", [Path(path)]))


def test_grid_counts_coordinates_and_white_edge_padding(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(650, 1050))
    source, plan = _plan(path, tile_size=100, tissue_threshold=0.1)
    assert len(plan) == 11 * 7  # edge tiles (partly outside the image) are kept, not dropped
    assert set(plan.coords[:, 0]) == set(range(0, 1100, 100)) and set(plan.coords[:, 1]) == set(range(0, 700, 100))
    edge = np.flatnonzero((plan.coords[:, 0] == 1000) & (plan.coords[:, 1] == 0))
    tile = source.read(BagSpec("b", [path]), plan, edge)[0]
    assert (tile[:, 50:] == 255).all() and (tile[:, :50] != 255).any()  # white beyond the image edge
    assert plan.attrs["tissue"][edge][0] == pytest.approx(0.5, abs=0.05)
    _, overlap = _plan(path, tile_size=100, stride=50, tissue_threshold=0.1)
    assert len(overlap) == 21 * 13


def test_offset_grid_adds_half_shifted_tiles(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(400, 400))
    _, plan = _plan(path, tile_size=100, offset_grid=True, tissue_threshold=0.1)
    main, shifted = plan.coords[plan.attrs["offset_grid"] == 0], plan.coords[plan.attrs["offset_grid"] == 1]
    assert len(main) == 16 and len(shifted) == 16  # the shifted grid's last row/column is half outside
    assert set(shifted[:, 0]) == {50, 150, 250, 350}


def test_tissue_filter_drops_blank_tiles_and_blank_slides_fail(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(800, 800, box=(0, 0, 300, 300)))
    _, plan = _plan(path, tile_size=100, tissue_threshold=0.5)
    assert len(plan) == 9 and plan.coords[:, :2].max() == 200
    blank = write_pyramid_tiff(tmp_path / "blank.tif", np.full((400, 400, 3), 250, np.uint8))
    with pytest.raises(ExtractionError, match="no tissue"):
        _plan(blank, tile_size=100)


def test_top_k_keeps_most_tissue_first(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(400, 400, box=(0, 0, 250, 150)))
    _, plan = _plan(path, tile_size=100, tissue_threshold=0.01, max_tiles=4)
    assert len(plan) == 4
    assert np.all(np.diff(plan.attrs["tissue"]) <= 0) and plan.attrs["tissue"][1] > 0.9
    assert {tuple(c) for c in plan.coords[:2, :2]} == {(0, 0), (0, 100)}  # the two fully covered tiles
    assert {tuple(c) for c in plan.coords[2:, :2]} == {(100, 0), (100, 100)}  # then the half covered


def test_mpp_chooses_the_pyramid_level(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(1024, 1024), mpp=0.25, levels=3)
    reader = open_slide(path)
    assert reader.mpp == pytest.approx(0.25) and reader.downsamples == [1.0, 2.0, 4.0]
    _, plan = _plan(path, tile_size=64, mpp=1.0)
    assert set(plan.coords[:, 2]) == {2} and plan.meta["images"][0]["tile_size_level0"] == 256
    source, plan = _plan(path, tile_size=64, mpp=0.75)  # 3× level 0: read level 1, resize the rest
    assert set(plan.coords[:, 2]) == {1} and set(np.diff(np.unique(plan.coords[:, 0]))) == {192}
    assert source.read(BagSpec("b", [path]), plan, np.arange(2)).shape == (2, 64, 64, 3)
    bare = write_pyramid_tiff(tmp_path / "bare.tif", tissue_image(256, 256), mpp=None)
    with pytest.raises(ExtractionError, match="no microns-per-pixel.*--level or --scale"):
        _plan(bare, tile_size=64, mpp=0.5)
    _, plan = _plan(bare, tile_size=64, level=1)
    assert plan.meta["images"][0]["tile_size_level0"] == 128


def test_embeddings_equal_a_direct_backbone_call(tmp_path):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(256, 320))
    manifest = _manifest(tmp_path, {"slide": "s.tif"})
    source = create_source("tiles", tile_size=64)
    summary = extract(
        manifest, tmp_path / "store", source, ExtractConfig(BACKBONE, workers=0, dtype="float32"), progress=False
    )
    assert summary.bags == 1 and summary.instances == 20
    backbone = create_encoder(BACKBONE)
    with FeatureStore(tmp_path / "store") as store:
        bag = store["slide"]
        pixels = source.read(BagSpec("slide", [path]), source.plan(BagSpec("slide", [path])), np.arange(len(bag)))
        assert store.metadata.preprocessing["input_size"] == [160, 160]
        assert store.metadata.source["tile_size"] == 64 and store.metadata.coords == ["x", "y", "level"]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (backbone.mean, backbone.std))
    with torch.no_grad():
        direct = backbone.model((x - mean) / std).numpy()
    np.testing.assert_allclose(bag.embeddings, direct, rtol=1e-3, atol=1e-4)


def test_workers_never_read_through_files_their_parent_opened(tmp_path):
    # Forked workers inherit the parent's open files with their shared read offsets: reading
    # through them corrupted tiles ("Not a JPEG file") when a source had planned a bag before.
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(256, 320), compression="jpeg", tile=64)
    manifest = _manifest(tmp_path, {"a": "s.tif", "b": "s.tif"})
    source = create_source("tiles", tile_size=64)
    source.plan(BagSpec("preview", [path]))  # a preview in the parent opens the slide
    inherited = source.reader(path)

    def refuse(*args, **kwargs):
        raise AssertionError("a worker read through the parent's file handle")

    inherited.read_region = refuse
    config = ExtractConfig(BACKBONE, workers=2, preprocessing=FAST)
    summary = extract(manifest, tmp_path / "store", source, config, progress=False)
    assert summary.bags == 2 and not summary.failures


def test_extraction_on_the_cpu_keeps_freed_host_memory(tmp_path, monkeypatch):
    # Each batch's activations then reuse the last batch's pages (bench/extract.py --allocator).
    import milcache.extractor.loop as loop

    calls = []
    monkeypatch.setattr(loop, "retain_freed_host_memory", lambda: calls.append(True) or True)
    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128))
    config = ExtractConfig(BACKBONE, device="cpu", workers=0, preprocessing=FAST)
    extract(
        _manifest(tmp_path, {"a": "s.tif"}),
        tmp_path / "store",
        create_source("tiles", tile_size=64),
        config,
        progress=False,
    )
    assert calls == [True]


def test_extraction_releases_kept_host_memory_before_its_workers_fork(tmp_path, monkeypatch):
    import milcache.extractor.loop as loop

    calls = []
    monkeypatch.setattr(loop, "release_free_host_memory", lambda: calls.append("release") or True)
    real_iter = loop.DataLoader.__iter__
    monkeypatch.setattr(loop.DataLoader, "__iter__", lambda self: calls.append("fork") or real_iter(self))
    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128))
    source = create_source("tiles", tile_size=64)
    for workers, expected in ((2, ["release", "fork"]), (0, ["fork"])):
        calls.clear()
        config = ExtractConfig(BACKBONE, device="cpu", workers=workers, preprocessing=FAST, overwrite=True)
        extract(_manifest(tmp_path, {"a": "s.tif"}), tmp_path / "store", source, config, progress=False)
        assert calls == expected


def test_real_image_from_scikit_image(tmp_path):
    from skimage import data

    ihc = data.immunohistochemistry()  # a real stained tissue image (512 × 512)
    path = write_pyramid_tiff(tmp_path / "ihc.tif", ihc, mpp=0.5, levels=2)
    _, plan = _plan(path, tile_size=64, tissue_threshold=0.5)
    assert 10 < len(plan) <= 64 and plan.attrs["tissue"].min() >= 0.5
    _, all_tiles = _plan(path, tile_size=64, tissue_threshold=0.0)
    assert len(all_tiles) >= len(plan)


def test_failed_bags_are_recorded_and_retried(tmp_path):
    write_pyramid_tiff(tmp_path / "good.tif", tissue_image(200, 200))
    write_pyramid_tiff(tmp_path / "blank.tif", np.full((200, 200, 3), 255, np.uint8))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    manifest = _manifest(
        tmp_path, {"good": "good.tif", "blank": "blank.tif", "broken": "broken.tif", "gone": "missing.tif"}
    )
    args = [
        "extract",
        str(manifest),
        "--out",
        str(tmp_path / "store"),
        "--backbone",
        BACKBONE,
        "--tile-size",
        "64",
        "--workers",
        "0",
        "--input-size",
        "64",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "FAILED gone: " in result.output and "file missing" in result.output
    assert "FAILED blank: " in result.output and "no tissue" in result.output
    assert "FAILED broken: " in result.output
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == ["good"] and set(store.failures()) == {"blank", "broken", "gone"}
    write_pyramid_tiff(tmp_path / "missing.tif", tissue_image(200, 200))  # the user fixes one file
    result = CliRunner().invoke(cli, args)
    assert "1 bags" in result.output and "1 already done" in result.output
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == ["gone", "good"] and set(store.failures()) == {"blank", "broken"}


def test_other_backbone_into_the_same_store_is_refused(tmp_path):
    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128))
    manifest = _manifest(tmp_path, {"s": "s.tif"})
    base = ["extract", str(manifest), "--out", str(tmp_path / "store"), "--tile-size", "64", "--workers", "0"]
    assert CliRunner().invoke(cli, [*base, "--backbone", BACKBONE, "--input-size", "64"]).exit_code == 0
    result = CliRunner().invoke(cli, [*base, "--backbone", "test_vit"])
    assert result.exit_code == 2 and "encoder: store has 'test_resnet', this run has 'test_vit'" in result.output


def test_config_file_sets_options(tmp_path):
    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128))
    manifest = _manifest(tmp_path, {"s": "s.tif"})
    (tmp_path / "run.toml").write_text('backbone = "test_resnet"\ntile-size = 64\nworkers = 0\ninput_size = 64\n')
    result = CliRunner().invoke(
        cli, ["extract", str(manifest), "--out", str(tmp_path / "store"), "--config", str(tmp_path / "run.toml")]
    )
    assert result.exit_code == 0, result.output
    with FeatureStore(tmp_path / "store") as store:
        assert store.metadata.source["tile_size"] == 64 and len(store["s"]) == 4


def test_resume_after_sigkill_finishes_every_bag(tmp_path):
    for i in range(6):
        write_pyramid_tiff(tmp_path / f"s{i}.tif", tissue_image(256, 512, seed=i))
    manifest = _manifest(tmp_path, {f"s{i}": f"s{i}.tif" for i in range(6)})
    command = [
        sys.executable,
        "-m",
        "milcache.cli",
        "extract",
        str(manifest),
        "--out",
        str(tmp_path / "store"),
        "--backbone",
        BACKBONE,
        "--tile-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and written < 1:
        time.sleep(0.2)
        if (tmp_path / "store" / "shard-00000.mdb").exists():
            with FeatureStore(tmp_path / "store") as store:
                written = len(store)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with FeatureStore(tmp_path / "store") as store:
        first = len(store)
        assert verify(store) == {}
    assert 1 <= first < 6
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{first} already done" in result.stdout
    with FeatureStore(tmp_path / "store") as store:
        assert len(store) == 6 and verify(store) == {}
        assert all(len(store[f"s{i}"]) == 128 for i in range(6))


def test_sharded_processes_write_one_store(tmp_path):
    for i in range(4):
        write_pyramid_tiff(tmp_path / f"s{i}.tif", tissue_image(128, 128, seed=i))
    manifest = _manifest(tmp_path, {f"s{i}": f"s{i}.tif" for i in range(4)})
    source = create_source("tiles", tile_size=64)
    for shard in range(2):
        extract(
            manifest,
            tmp_path / "store",
            source,
            ExtractConfig(BACKBONE, workers=0, shard=(shard, 2), preprocessing=FAST),
            progress=False,
        )
    assert sorted(p.name for p in (tmp_path / "store").glob("shard-*.mdb")) == ["shard-00000.mdb", "shard-00001.mdb"]
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == ["s0", "s1", "s2", "s3"]


def _aperio_svs(path: Path, image: np.ndarray, mpp: float = 0.499) -> Path:
    """A small Aperio-style SVS (levels as successive pages, Aperio descriptions) that OpenSlide reads."""
    import tifffile

    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for level, step in enumerate((1, 4)):
            note = (
                f"{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
                if level == 0
                else f"{w}x{h} -> {w // step}x{h // step}"
            )
            tif.write(
                np.ascontiguousarray(image[::step, ::step]),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                metadata=None,
                description=f"Aperio Image Library v10.0.50\n{note}|AppMag = 20|MPP = {mpp}",
            )
    return path


def test_vendor_slide_through_openslide(tmp_path):
    from milcache.extractor.slides import OpenSlideReader

    image = tissue_image(512, 768, box=(0, 0, 256, 384))
    path = _aperio_svs(tmp_path / "slide.svs", image)
    reader = open_slide(path)
    assert isinstance(reader, OpenSlideReader)
    assert reader.mpp == pytest.approx(0.499) and reader.downsamples == [1.0, 4.0]
    region = reader.read_region(700, 0, 0, 100, 64)
    assert region.shape == (64, 100, 3) and (region[:, 68:] == 255).all()  # white beyond the scan, not black
    source, plan = _plan(path, tile_size=64, mpp=2.0)  # 4× level 0: level 1 read directly
    assert set(plan.coords[:, 2]) == {1} and plan.coords[:, :2].max() < 384
    tiles = source.read(BagSpec("b", [path]), plan, np.arange(len(plan)))
    assert tiles.shape == (len(plan), 64, 64, 3) and tiles.mean() < 200  # stained tissue, not white


def test_sixteen_bit_tiles_are_scaled_by_the_slide_not_the_tile(tmp_path):
    import tifffile

    image = np.full((128, 128), 4000, np.uint16)
    image[:, 64:] = 40000  # a faint half and a bright half
    tifffile.imwrite(tmp_path / "deep.tif", image, tile=(64, 64))
    reader = open_slide(tmp_path / "deep.tif")
    faint, bright = reader.read_region(0, 0, 0, 64, 64), reader.read_region(64, 0, 0, 64, 64)
    assert faint.max() == round(4000 * 255 / 40000) and bright.max() == 255  # faint stays faint


@pytest.mark.parametrize("kind", ["jpeg", "raw", "grey16-zlib"])
def test_tiles_read_straight_from_the_file_equal_zarr_reads(tmp_path, kind):
    """Tiled levels are decoded tile by tile from the file (with a cache of decoded tiles); any
    window, inside, across tile seams or past the edges, equals the same read through zarr."""
    import tifffile

    path = tmp_path / f"{kind}.tif"
    if kind == "grey16-zlib":
        image = np.random.default_rng(0).integers(0, 4000, (300, 420)).astype(np.uint16)
        tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="minisblack")
    else:
        write_pyramid_tiff(path, tissue_image(500, 620), compression="jpeg" if kind == "jpeg" else None, tile=128)
    direct, through_zarr = open_slide(path), open_slide(path)
    assert all(page is not None for page in direct._tiled)
    through_zarr._tiled = [None] * len(through_zarr._tiled)
    rng = np.random.default_rng(1)
    for _ in range(60):
        level = int(rng.integers(0, len(direct.dimensions)))
        x, y = (int(v) for v in rng.integers(-150, 650, 2))
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        np.testing.assert_array_equal(
            direct.read_region(x, y, level, w, h), through_zarr.read_region(x, y, level, w, h)
        )
    assert 0 < len(direct._cache) <= direct._CACHED_TILES


def test_a_rerun_names_bags_whose_files_changed(tmp_path):
    write_pyramid_tiff(tmp_path / "a.tif", tissue_image(128, 128, seed=1))
    write_pyramid_tiff(tmp_path / "b.tif", tissue_image(128, 128, seed=2))
    manifest = _manifest(tmp_path, {"a": "a.tif", "b": "b.tif"})
    base = ["extract", str(manifest), "--out", str(tmp_path / "store"), "--tile-size", "64", "--workers", "0"]
    base += ["--backbone", BACKBONE, "--input-size", "64"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    with FeatureStore(tmp_path / "store") as store:
        before = store["a"].embeddings.copy()
        assert store["a"].meta["files"][0]["bytes"] == (tmp_path / "a.tif").stat().st_size
    (tmp_path / "moved").mkdir()
    (tmp_path / "b.tif").rename(tmp_path / "moved" / "b.tif")  # a move keeps the file: not a change
    write_pyramid_tiff(tmp_path / "c.tif", tissue_image(128, 128, seed=3))
    manifest = _manifest(tmp_path, {"a": "c.tif", "b": "moved/b.tif"})  # the user points bag a elsewhere
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 2 and "1 finished bag(s)" in result.output and "a:" in result.output
    assert "c.tif" in result.output and "--reextract-changed" in result.output
    result = CliRunner().invoke(cli, [*base, "--reextract-changed"])
    assert result.exit_code == 0 and "1 already done" in result.output, result.output
    with FeatureStore(tmp_path / "store") as store:
        assert not np.array_equal(store["a"].embeddings, before)


def test_batches_span_bags_with_one_shape_and_every_mix_gives_the_same_store(tmp_path, monkeypatch):
    """Bags of 6, 20 and 12 tiles: batches of 8 hold the instances of several bags, only the last
    batch of the cohort is short, and the store equals one written bag by bag (batch 1) and with
    another batch size and worker mix, within float tolerance."""
    from milcache.extractor import loop

    sizes = {"a": (128, 192), "b": (256, 320), "c": (192, 256)}
    for name, (h, w) in sizes.items():
        write_pyramid_tiff(tmp_path / f"{name}.tif", tissue_image(h, w, seed=len(name) + h))
    manifest = _manifest(tmp_path, {name: f"{name}.tif" for name in sizes})
    shapes = []
    real_call = loop.Embedder.__call__

    def spy(self, batch):
        shapes.append(tuple(batch.shape))
        return real_call(self, batch)

    monkeypatch.setattr(loop.Embedder, "__call__", spy)
    stores = {}
    for batch_size, workers in ((8, 0), (1, 0), (5, 2), (64, 2)):
        out = tmp_path / f"store-{batch_size}-{workers}"
        config = ExtractConfig(BACKBONE, batch_size=batch_size, workers=workers, dtype="float32")
        shapes.clear()
        summary = extract(manifest, out, create_source("tiles", tile_size=64), config, progress=False)
        total = summary.instances
        assert summary.bags == 3 and not summary.failures
        assert len(shapes) == -(-total // batch_size)  # no ragged batch per bag: bags share batches
        assert all(shape[0] == batch_size for shape in shapes[:-1])  # only the cohort's last batch is short
        assert shapes[-1][0] == total - batch_size * (len(shapes) - 1)  # (padded on CUDA: see below)
        with FeatureStore(out) as store:
            stores[(batch_size, workers)] = {b: (store[b].embeddings.copy(), store[b].coords.copy()) for b in sizes}
    assert [len(stores[(8, 0)][b][0]) for b in sizes] == [6, 20, 12]
    reference = stores[(1, 0)]  # bag by bag, one instance at a time
    for key, found in stores.items():
        for bag in sizes:
            assert np.array_equal(found[bag][1], reference[bag][1]), (key, bag)
            np.testing.assert_allclose(found[bag][0], reference[bag][0], rtol=1e-4, atol=1e-5, err_msg=str(key))


def test_padded_batches_have_one_shape_and_deliver_only_real_rows():
    """On CUDA (or under --compile) the last batch is padded: every model call sees one shape."""
    from milcache.extractor.loop import _Batches

    class Doubling:
        device = torch.device("cpu")
        calls: list = []

        def __call__(self, batch):
            self.calls.append(tuple(batch.shape))
            return batch.float().mean((1, 2, 3)).unsqueeze(1) * 2

    got = {}
    embedder = Doubling()
    batches = _Batches(
        embedder, 4, np.float32, lambda i, pos, rows: got.setdefault(i, []).append((pos, rows)), pad=True
    )
    batches.add(0, np.arange(3), torch.full((3, 2, 2, 3), 1, dtype=torch.uint8))
    batches.add(1, np.arange(6), torch.full((6, 2, 2, 3), 2, dtype=torch.uint8))
    batches.finish()
    assert embedder.calls == [(4, 2, 2, 3)] * 3  # 9 instances: 3 batches of one shape
    positions = {i: np.concatenate([p for p, _ in parts]).tolist() for i, parts in got.items()}
    values = {i: np.concatenate([r for _, r in parts])[:, 0].tolist() for i, parts in got.items()}
    assert positions == {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5]} and values == {0: [2.0] * 3, 1: [4.0] * 6}


def test_tissue_closing_equals_scipys_on_the_edge_padded_mask():
    from scipy import ndimage

    from milcache.extractor.tiles import _closing

    rng = np.random.default_rng(0)
    for _ in range(25):  # shapes down to one pixel, sparse to dense masks, tissue touching the edges
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        mask = rng.random((h, w)) < rng.random()
        padded = np.pad(mask, 6, mode="edge")  # wider than the closing reaches
        np.testing.assert_array_equal(_closing(mask, 2), ndimage.binary_closing(padded, iterations=2)[6:-6, 6:-6])
    full = np.ones((40, 30), bool)
    assert _closing(full, 2).all()  # tissue to the image's edges stays tissue (scipy's erodes 2 pixels)
    assert not ndimage.binary_closing(full, iterations=2)[0].any()


def test_tissue_is_detected_at_32_thumbnail_pixels_a_tile_within_2048():
    from PIL import Image
    from skimage import data

    from milcache.extractor.tiles import make_grid, thumbnail_side, tissue_fractions, tissue_mask

    assert thumbnail_side(100_000, 80_000, 448) == 2048  # a slide: as fine as the cap allows
    assert thumbnail_side(8192, 6000, 224) == 1171
    assert thumbnail_side(2048, 2048, 224) == 512  # never coarser than the heatmap thumbnail
    # A real stained image at 2048²: fractions from the smaller thumbnail match full resolution's.
    image = np.asarray(Image.fromarray(data.immunohistochemistry()).resize((2048, 2048), Image.BILINEAR))
    for tile in (64, 224):
        grid = make_grid(2048, 2048, tile, tile, False)
        full = tissue_fractions(tissue_mask(image), 1.0, grid, tile)
        side = thumbnail_side(2048, 2048, tile)
        small = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
        coarse = tissue_fractions(tissue_mask(small), 2048 / side, grid, tile)
        assert np.abs(full - coarse).mean() < 0.02
        assert ((full >= 0.5) != (coarse >= 0.5)).mean() <= 0.01


def test_an_extract_that_fails_before_its_first_write_leaves_no_store(tmp_path, monkeypatch):
    """A failure after the store's settings were written but before any bag (the model failing to
    start): no folder with only store.json is left, so a corrected rerun with other settings starts
    anew; a store that holds bags is never removed, nor a user's other files."""
    import milcache
    from milcache.extractor import loop

    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128, seed=1))
    (tmp_path / "slides.csv").write_text(f"bag_id,path\ns,{tmp_path / 's.tif'}\n")

    def broken(*args, **kwargs):
        raise RuntimeError("the model failed to start")

    run = lambda out, **options: milcache.extract(  # noqa: E731
        tmp_path / "slides.csv", out, backbone="test_resnet", tile_size=64, workers=0, device="cpu", **options
    )
    with monkeypatch.context() as patched:
        patched.setattr(loop, "Embedder", broken)
        with pytest.raises(RuntimeError, match="failed to start"):
            run(tmp_path / "new")
        assert not (tmp_path / "new").exists()
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        with pytest.raises(RuntimeError):
            run(tmp_path / "mine")
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    run(tmp_path / "new")  # the rerun: a store with its bag
    with monkeypatch.context() as patched:
        patched.setattr(loop, "Embedder", broken)
        with pytest.raises(RuntimeError):
            run(tmp_path / "new", reextract_changed=True)
    with milcache.FeatureStore(tmp_path / "new") as store:
        assert store.bag_ids() == ["s"]

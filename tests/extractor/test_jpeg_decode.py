"""JPEG tiles decoded on the compute device (--decode gpu): the path runs here on the CPU
(torchvision's decode_jpeg, libjpeg-turbo), which makes it the same code as on CUDA bar the
decoder; tests/test_gpu.py compares nvjpeg's pixels with the CPU path's on a GPU machine."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import milcache.extractor.loop as loop
from milcache.cli import cli
from milcache.extractor.jpeg import EncodedTiles, complete_stream, decode_tiles
from milcache.extractor.loop import ExtractConfig, extract
from milcache.extractor.slides import open_slide
from milcache.extractor.sources import create_source
from milcache.store import FeatureStore
from milcache.store.tables import BagSpec
from tests.conftest import tissue_image, write_pyramid_tiff
from tests.extractor.test_tiles import BACKBONE, _manifest

CPU = torch.device("cpu")


def _both_ways(source, path: Path) -> tuple[np.ndarray, np.ndarray, EncodedTiles]:
    bag = BagSpec("b", [path])
    plan = source.plan(bag)
    indices = np.arange(len(plan))
    encoded = source.read_encoded(bag, plan, indices)
    assert encoded is not None
    return source.read(bag, plan, indices), decode_tiles(encoded, CPU).numpy(), encoded


def test_device_decoded_tiles_equal_the_workers_pixels(tmp_path):
    """Output tiles of 48 px on file tiles of 64: windows across file-tile seams and past the
    slide's edges (white), each file tile sent once per batch."""
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(300, 410), compression="jpeg", tile=64)
    cpu, device, encoded = _both_ways(create_source("tiles", tile_size=48, tissue_threshold=0.0), path)
    assert cpu.shape == device.shape and device.dtype == np.uint8
    np.testing.assert_array_equal(device, cpu)
    used = encoded.cells[encoded.cells >= 0]
    assert len(encoded.streams) == len(np.unique(used)) <= 5 * 7  # each file tile sent once per batch
    assert encoded.cells.shape[1:] == (2, 2)  # a 48-pixel window spans at most 2 × 2 file tiles of 64
    assert (cpu[-1] == 255).any()  # the last tile reaches past the slide: white there in both


def test_one_batch_from_images_with_other_tile_sizes(tmp_path):
    """A bag of two images whose files are tiled at 64 and 128 pixels: one batch, file tiles of
    both sizes stacked together, the same pixels as the workers'."""
    a = write_pyramid_tiff(tmp_path / "a.tif", tissue_image(200, 260, seed=1), compression="jpeg", tile=64)
    b = write_pyramid_tiff(tmp_path / "b.tif", tissue_image(300, 220, seed=2), compression="jpeg", tile=128)
    source = create_source("tiles", tile_size=48, tissue_threshold=0.0)
    bag = BagSpec("b", [a, b])
    plan = source.plan(bag)
    indices = np.arange(len(plan))
    encoded = source.read_encoded(bag, plan, indices)
    assert set(map(tuple, encoded.tile_shapes)) == {(64, 64), (128, 128)}
    np.testing.assert_array_equal(decode_tiles(encoded, CPU).numpy(), source.read(bag, plan, indices))


def test_device_decoded_tiles_resized_like_the_workers(tmp_path):
    """A scale between pyramid levels: the window read is resized to the tile size, by PIL in the
    workers and by torch's antialiased bilinear on the device: equal within 2 of 255."""
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(400, 400), compression="jpeg", tile=64)
    cpu, device, encoded = _both_ways(create_source("tiles", tile_size=40, scale=1.5, tissue_threshold=0.0), path)
    assert (encoded.sides == 60).all()
    difference = np.abs(device.astype(int) - cpu.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.3


@pytest.mark.parametrize(
    ("settings", "tolerance"), [({"tile_size": 48}, 0), ({"tile_size": 64, "level": 1}, 0), ({"mpp": 0.5}, 2)]
)
def test_aperio_svs_tiles_decoded_on_the_device_equal_openslides(tmp_path, settings, tolerance):
    """Aperio SVS, read through OpenSlide: its levels' JPEG tiles go to the device as they are
    (level 0; level 1; --mpp 0.5 on a 0.499 scan, 225-pixel windows resized to 224) and decode to
    OpenSlide's pixels. A window that would start between a level's pixels (OpenSlide renders
    it at a sub-pixel offset) stays with the workers."""
    from milcache.extractor.slides import OpenSlideReader
    from tests.extractor.test_tiles import _aperio_svs

    path = _aperio_svs(tmp_path / "s.svs", tissue_image(512, 768, box=(0, 0, 256, 384)))
    source = create_source("tiles", tissue_threshold=0.0, **settings)
    cpu, device, encoded = _both_ways(source, path)
    reader = source.reader(path)
    assert isinstance(reader, OpenSlideReader) and len(encoded.streams) > 0
    assert np.abs(device.astype(int) - cpu.astype(int)).max() <= tolerance
    assert reader.encoded_region(2, 0, 1, 64, 64) is None  # level 1 pixel 0.5: sub-pixel in OpenSlide


def test_tables_spliced_into_abbreviated_tiles():
    """Slides written by vips or scanners keep one JPEGTables for all tiles; a tile is then an
    abbreviated stream. Spliced together they decode to the full stream's pixels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(tissue_image(64, 64)).save(buffer, "JPEG", quality=80)
    full = buffer.getvalue()
    segments, position = [], 2  # split into marker segments up to the start of scan
    while full[position + 1] != 0xDA:
        length = int.from_bytes(full[position + 2 : position + 4], "big")
        segments.append(full[position : position + 2 + length])
        position += 2 + length
    tables = [s for s in segments if s[1] in (0xDB, 0xC4)]  # quantisation and Huffman tables
    others = [s for s in segments if s[1] not in (0xDB, 0xC4)]
    jpegtables = b"\xff\xd8" + b"".join(tables) + b"\xff\xd9"
    abbreviated = b"\xff\xd8" + b"".join(others) + full[position:]
    stream = np.frombuffer(bytearray(complete_stream(abbreviated, jpegtables)), np.uint8)
    whole = np.frombuffer(bytearray(full), np.uint8)

    def one_tile(s):  # a 64-pixel window on a 64 × 64 level of one file tile
        at, shape = np.array([[0, 0]]), np.array([[64, 64]])
        return EncodedTiles([s], np.zeros((1, 1, 1), np.int64), at, shape, shape, np.array([64]), 64)

    spliced, reference = decode_tiles(one_tile(stream), CPU), decode_tiles(one_tile(whole), CPU)
    torch.testing.assert_close(spliced, reference, atol=0, rtol=0)
    assert complete_stream(full, None) == full
    with pytest.raises(ValueError, match="JPEG tables"):
        complete_stream(b"not a jpeg", jpegtables)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_levels_that_are_not_jpeg_are_left_to_the_workers(tmp_path, compression):
    path = write_pyramid_tiff(tmp_path / "s.tif", tissue_image(200, 200), compression=compression, tile=64)
    assert open_slide(path).encoded_region(0, 0, 0, 64, 64) is None
    source = create_source("tiles", tile_size=64)
    bag = BagSpec("b", [path])
    assert source.read_encoded(bag, source.plan(bag), np.arange(2)) is None


def _extract(tmp_path, name, manifest, on_device: bool, monkeypatch, workers=2):
    # The CUDA check of --decode is bypassed so that the device path runs on the CPU.
    monkeypatch.setattr(loop, "decode_on_device", lambda choice, device: on_device)
    fast = {"input_size": (64, 64)}
    config = ExtractConfig(BACKBONE, workers=workers, batch_size=7, dtype="float32", preprocessing=fast)
    return extract(manifest, tmp_path / name, create_source("tiles", tile_size=48), config, progress=False)


def test_store_decoded_on_the_device_equals_the_workers_store(tmp_path, monkeypatch):
    """A cohort mixing a JPEG-tiled TIFF (decoded on the device) and a PNG (no JPEG tiles: the
    workers decode it): the same store either way, batches spanning both bags."""
    from PIL import Image

    write_pyramid_tiff(tmp_path / "a.tif", tissue_image(200, 260, seed=1), compression="jpeg", tile=64)
    Image.fromarray(tissue_image(150, 170, seed=2)).save(tmp_path / "b.png")
    manifest = _manifest(tmp_path, {"jpeg": "a.tif", "png": "b.png"})
    workers = _extract(tmp_path, "cpu", manifest, False, monkeypatch)
    device = _extract(tmp_path, "device", manifest, True, monkeypatch)
    assert workers.decoded_on_device == 0 and workers.bags == device.bags == 2
    with FeatureStore(tmp_path / "cpu") as a, FeatureStore(tmp_path / "device") as b:
        assert device.decoded_on_device == len(b["jpeg"]) and len(b["png"]) > 0
        for bag_id in ("jpeg", "png"):
            np.testing.assert_allclose(a[bag_id].embeddings, b[bag_id].embeddings, rtol=1e-4, atol=1e-5)


def test_a_corrupt_jpeg_tile_fails_its_bag_only(tmp_path, monkeypatch):
    from milcache.extractor.slides import TiffReader

    write_pyramid_tiff(tmp_path / "bad.tif", tissue_image(200, 200, seed=1), compression="jpeg", tile=64)
    write_pyramid_tiff(tmp_path / "good.tif", tissue_image(200, 200, seed=2), compression="jpeg", tile=64)
    real = TiffReader.jpeg_stream

    def broken_for_bad(self, key):  # the bad slide's tiles arrive damaged (a bad sector, a truncated copy)
        stream = real(self, key)
        return b"\x00\x00" + stream[2:] if self.path.name == "bad.tif" else stream

    monkeypatch.setattr(TiffReader, "jpeg_stream", broken_for_bad)
    manifest = _manifest(tmp_path, {"bad": "bad.tif", "good": "good.tif"})
    summary = _extract(tmp_path, "store", manifest, True, monkeypatch, workers=0)
    assert summary.bags == 1 and list(summary.failures) == ["bad"]
    assert summary.failures["bad"].startswith("decoding instances 0.. on cpu:")
    with FeatureStore(tmp_path / "store") as store:
        assert store.bag_ids() == ["good"]


def test_decode_gpu_without_cuda_is_refused_before_any_work(tmp_path):
    write_pyramid_tiff(tmp_path / "s.tif", tissue_image(128, 128), compression="jpeg")
    manifest = _manifest(tmp_path, {"s": "s.tif"})
    args = ["extract", str(manifest), "--out", str(tmp_path / "store"), "--backbone", BACKBONE, "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--decode", "gpu"])
    assert result.exit_code == 2, result.output
    assert "--decode gpu needs a CUDA device" in result.output and "--decode cpu" in result.output
    assert not (tmp_path / "store").exists()


def test_auto_falls_back_to_the_workers_when_the_device_cannot_decode(monkeypatch):
    import milcache.extractor.jpeg as jpeg
    from milcache.errors import OptionError

    cuda = torch.device("cuda")
    monkeypatch.setattr(jpeg, "decoder_problem", lambda device: "RuntimeError: built without nvjpeg")
    assert jpeg.decode_on_device("auto", cuda) is False
    with pytest.raises(OptionError, match="built without nvjpeg.*--decode cpu"):
        jpeg.decode_on_device("gpu", cuda)
    monkeypatch.setattr(jpeg, "decoder_problem", lambda device: None)
    assert jpeg.decode_on_device("auto", cuda) is True and jpeg.decode_on_device("cpu", cuda) is False
    assert jpeg.decode_on_device("auto", CPU) is False
    monkeypatch.undo()
    assert jpeg.decoder_problem(CPU) is None  # the real probe, where torchvision decodes

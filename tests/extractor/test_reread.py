"""From a store back to pixels (the same source, the coordinates kept) and from pixels into the
store's embedding space (the same backbone, weights and preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import milcache
from milcache.cli import cli
from milcache.errors import StoreMismatchError
from milcache.extractor.reread import reread, source_of, store_backbone
from tests.conftest import tissue_image, write_pyramid_tiff


@pytest.fixture(scope="module")
def tile_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reread")
    for i in range(3):
        write_pyramid_tiff(root / f"s{i}.tif", tissue_image(160, 224, seed=i))
    (root / "slides.csv").write_text("bag_id,path\n" + "".join(f"s{i},{root / f's{i}.tif'}\n" for i in range(3)))
    milcache.extract(
        root / "slides.csv",
        root / "store",
        backbone="test_resnet",
        tile_size=32,
        workers=0,
        device="cpu",
        dtype="float32",
    )
    milcache.index.build(root / "store")
    return root


def test_reread_gives_the_pixels_that_were_embedded(tile_store):
    with milcache.FeatureStore(tile_store / "store") as store:
        source = source_of(store)
        bag = store.get("s1")
        pixels = reread(store, source, "s1", np.array([0, 3]))
        x, y, _ = bag.coords[3]
        assert pixels.shape == (2, 32, 32, 3)
        assert np.array_equal(pixels[1], tissue_image(160, 224, seed=1)[y : y + 32, x : x + 32])


def test_search_by_image_finds_the_instance_it_was_cut_from(tile_store, tmp_path):
    with milcache.FeatureStore(tile_store / "store") as store:
        pixels = reread(store, source_of(store), "s2", np.array([4]))
    Image.fromarray(pixels[0]).save(tmp_path / "query.png")
    args = ["index", "search", str(tile_store / "store"), "--image", str(tmp_path / "query.png"), "-k", "4"]
    args += ["--thumbnails", str(tmp_path / "sheet"), "--out", str(tmp_path / "n.csv"), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    table = milcache.index.search(tile_store / "store", image=tmp_path / "query.png", k=4, device="cpu")
    assert (table["bag_id"][0], table["instance"][0]) == ("s2", 4) and table["distance"][0] < 1e-4
    sheet = Image.open(tmp_path / "sheet" / "neighbours.png")
    assert sheet.size[0] > 400 and "contact sheet" in result.output


def test_an_image_is_embedded_only_with_the_weights_the_store_was_made_with(tile_store, tmp_path):
    from safetensors.torch import save_file

    other = {k: v + 0.1 if v.is_floating_point() else v for k, v in _state().items()}
    save_file(other, tmp_path / "other.safetensors")
    with milcache.FeatureStore(tile_store / "store") as store:
        assert store_backbone(store).weights_digest == "random-init"
        with pytest.raises(StoreMismatchError, match="weights_digest: store has 'random-init'"):
            store_backbone(store, tmp_path / "other.safetensors")
    result = CliRunner().invoke(cli, ["index", "search", str(tile_store / "store"), "--bag", "s0"])
    assert result.exit_code == 2 and "either --bag with --instance, or --image" in result.output


def test_an_image_far_from_the_instances_size_is_refused(tile_store, tmp_path):
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "tiny.png")
    result = CliRunner().invoke(
        cli, ["index", "search", str(tile_store / "store"), "--image", str(tmp_path / "tiny.png")]
    )
    assert result.exit_code == 2 and "tiny.png: 7 x 5 pixels, but the instances of" in result.output
    assert "are 32 x 32" in result.output


def _state():
    import timm

    return {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}

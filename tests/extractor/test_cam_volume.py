import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from milcache.errors import ExtractionError
from milcache.extractor.cam import CamSource, read_image
from milcache.extractor.encoders import create_encoder
from milcache.extractor.loop import Embedder, ExtractConfig, extract
from milcache.extractor.sources import create_source
from milcache.extractor.volume import VolumeSource
from milcache.store import FeatureStore
from milcache.store.tables import BagSpec


def _nifti(path: Path, volume_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    affine = np.diag([*spacing[::-1], 1.0])  # nibabel's axes are x, y, z
    nib.save(nib.Nifti1Image(np.transpose(volume_zyx, (2, 1, 0)).astype(np.float32), affine), str(path))
    return path


def _cube(shape=(40, 64, 64), box=((8, 24), (0, 32), (0, 32)), value=100.0) -> np.ndarray:
    volume = np.zeros(shape, np.float32)
    (z0, z1), (y0, y1), (x0, x1) = box
    volume[z0:z1, y0:y1, x0:x1] = value + np.random.default_rng(0).random((z1 - z0, y1 - y0, x1 - x0))
    return volume


def test_volume_patch_grid_and_foreground_filter(tmp_path):
    path = _nifti(tmp_path / "v.nii.gz", _cube())
    source = VolumeSource(patch_size=(16, 32, 32), min_foreground=0.0)
    plan = source.plan(BagSpec("v", [path]))
    assert len(plan) == 2 * 1 * 1  # only the patches touching the cube (z 0-15 and 16-31, y 0, x 0)
    assert plan.coords.tolist() == [[0, 0, 0], [16, 0, 0]]
    assert plan.attrs["foreground"].tolist() == pytest.approx([0.5, 0.5])
    everything = VolumeSource(patch_size=(16, 32, 32), min_foreground=0.6).plan
    with pytest.raises(ExtractionError, match="no patch reaches 60% foreground"):
        everything(BagSpec("v", [path]))
    pixels = source.read(BagSpec("v", [path]), plan, np.arange(2))
    assert pixels.shape == (2, 1, 16, 32, 32)
    patch = pixels[0, 0].astype(np.float32)
    assert (patch[:8] == 0).all() and patch[8:].std() > 0  # background 0, foreground z-scored


def test_real_brain_volume_from_nilearn(tmp_path):
    from nilearn import datasets

    image = datasets.load_mni152_template(resolution=2)  # bundled with nilearn: a real T1 brain
    image.to_filename(str(tmp_path / "mni.nii.gz"))
    plan = VolumeSource(patch_size=(16, 32, 32), min_foreground=0.3).plan(BagSpec("mni", [tmp_path / "mni.nii.gz"]))
    assert 5 < len(plan) < 60 and plan.attrs["foreground"].min() >= 0.3
    assert set(plan.coords[:, 0] % 16) == {0} and set(plan.coords[:, 1] % 32) == {0}
    resampled = VolumeSource(patch_size=(16, 32, 32), min_foreground=0.3, spacing=(4.0, 4.0, 4.0))
    coarse = resampled.plan(BagSpec("mni", [tmp_path / "mni.nii.gz"]))
    assert len(coarse) < len(plan) and set(coarse.coords[:, 0] % 32) == {0}  # coords in original voxels


def test_modalities_stack_as_channels_and_shapes_must_agree(tmp_path):
    for name in ("t1", "flair"):
        _nifti(tmp_path / f"{name}.nii.gz", _cube())
    _nifti(tmp_path / "small.nii.gz", _cube(shape=(40, 64, 60)))
    bag = BagSpec(
        "case", [tmp_path / "t1.nii.gz", tmp_path / "flair.nii.gz"], rows=[{"channel": "t1"}, {"channel": "flair"}]
    )
    source = VolumeSource(patch_size=(16, 32, 32))
    plan = source.plan(bag)
    assert plan.meta["channels"] == ["t1", "flair"]
    assert source.read(bag, plan, np.arange(1)).shape == (1, 2, 16, 32, 32)
    assert source.backbone_options([bag]) == {"in_chans": 2}
    with pytest.raises(
        ExtractionError, match=r"differ in shape: t1.nii.gz \(40, 64, 64\), small.nii.gz \(40, 64, 60\)"
    ):
        source.plan(BagSpec("bad", [tmp_path / "t1.nii.gz", tmp_path / "small.nii.gz"]))


def test_patch_embedding_is_the_slicewise_backbone_average(tmp_path):
    for name in ("t1", "t2"):
        _nifti(tmp_path / f"{name}.nii.gz", _cube())
    pl.DataFrame({"bag_id": ["case", "case"], "path": ["t1.nii.gz", "t2.nii.gz"], "channel": ["t1", "t2"]}).write_csv(
        tmp_path / "m.csv"
    )
    source = create_source("volume", patch_size=(4, 32, 32), min_foreground=0.2)
    config = ExtractConfig("test_resnet", workers=0, dtype="float32", preprocessing={"input_size": (32, 32)})
    extract(tmp_path / "m.csv", tmp_path / "store", source, config, progress=False)
    backbone = create_encoder("test_resnet", in_chans=2)
    bag = BagSpec("case", [tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"], rows=[{"channel": "t1"}, {"channel": "t2"}])
    plan = source.plan(bag)
    patch = torch.from_numpy(source.read(bag, plan, np.arange(1))[0].astype(np.float32))  # C × D × H × W
    with torch.no_grad():
        direct = backbone.model(patch.permute(1, 0, 2, 3)).mean(0).numpy()  # every slice, then the mean
    with FeatureStore(tmp_path / "store") as store:
        np.testing.assert_allclose(store["case"].embeddings[0], direct, rtol=1e-3, atol=1e-4)
        assert store.metadata.coords == ["z", "y", "x"]


def test_native_3d_backbone(tmp_path):
    _nifti(tmp_path / "v.nii.gz", _cube())
    pl.DataFrame({"bag_id": ["v"], "path": ["v.nii.gz"]}).write_csv(tmp_path / "m.csv")
    source = create_source("volume", patch_size=(8, 32, 32), min_foreground=0.2)
    extract(tmp_path / "m.csv", tmp_path / "store", source, ExtractConfig("tv:r3d_18", workers=0), progress=False)
    with FeatureStore(tmp_path / "store") as store:
        assert store.metadata.dim == 512 and store["v"].coords.tolist() == [[8, 0, 0], [16, 0, 0]]


def test_cam_regions_cover_the_bright_object():
    image = np.zeros((512, 384, 3), np.uint8)
    image[40:500, 20:360] = 60  # the "breast"
    image[270:330, 140:200] = 250  # the bright object, inside the grid square x 128-256, y 256-384
    cam = np.zeros((64, 64), np.float32)  # the CAM of the (square) global view
    cam[34:42, 23:34] = 1.0  # where a classifier looks: the object (y × 64/512, x × 64/384)
    source = CamSource(region_size=128, regions=3)
    boxes, scores = source._regions(image, cam)
    assert boxes[0] == (128, 256, 256, 384)  # the top square holds the object
    assert scores[0] >= scores[1] >= scores[2] and len(set(boxes)) == 3
    empty = np.zeros_like(image)
    assert source._regions(empty, cam) == ([], [])  # squares without foreground are skipped


def test_two_view_bag_keeps_global_and_regions_of_both(tmp_path):
    from PIL import Image

    for view in ("cc", "mlo"):
        image = np.zeros((256, 192), np.uint16)
        image[20:230, 10:150] = 20_000 + np.random.default_rng(0).integers(0, 5000, (210, 140))  # 16-bit
        Image.fromarray(image).save(tmp_path / f"{view}.png")
    pl.DataFrame({"bag_id": ["breast-1", "breast-1"], "path": ["cc.png", "mlo.png"]}).write_csv(tmp_path / "m.csv")
    source = create_source("cam", global_size=64, region_size=64, regions=3)
    config = ExtractConfig("test_resnet", workers=0, preprocessing={"input_size": (64, 64)})
    summary = extract(tmp_path / "m.csv", tmp_path / "store", source, config, progress=False)
    assert summary.failures == {}
    assert torch.is_grad_enabled()  # extraction in this process leaves autograd as it found it
    with FeatureStore(tmp_path / "store") as store:
        bag = store["breast-1"]
        assert bag.attrs["kind"].tolist() == [0, 1, 1, 1, 0, 1, 1, 1]
        assert bag.attrs["image"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        assert bag.coords[0].tolist() == [0, 0, 192, 256] and set(bag.extras) == {"cam_0", "cam_1"}
        assert store.metadata.source["cam"].startswith("saliency")
        assert store.metadata.coords == ["x0", "y0", "x1", "y1"]


def test_saliency_cam_shares_the_global_views_forward_and_stores_the_same(tmp_path, monkeypatch):
    """Global size = region size = input size: one forward gives each view's CAM and embedding, and
    the store equals one written with the CAM network run apart (embeddings, CAMs, regions)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = []
    for bag in range(3):
        for view in ("cc", "mlo"):
            image = np.zeros((200, 150), np.uint16)
            image[10:190, 5:120] = rng.integers(10_000, 30_000, (180, 115))
            Image.fromarray(image).save(tmp_path / f"{bag}{view}.png")
            rows.append((f"breast-{bag}", f"{bag}{view}.png"))
    pl.DataFrame(rows, schema=["bag_id", "path"], orient="row").write_csv(tmp_path / "m.csv")
    settings = {"global_size": 64, "region_size": 64, "regions": 3}
    config = ExtractConfig("test_resnet", workers=0, batch_size=5, preprocessing={"input_size": (64, 64)})
    backbone = create_encoder("test_resnet", input_size=(64, 64))
    embedder = Embedder(backbone, create_source("cam", **settings), torch.device("cpu"), "fp32", False)
    source = create_source("cam", **settings)
    assert source._shares_forward(embedder)
    assert not create_source("cam", **{**settings, "region_size": 32})._shares_forward(embedder)
    images = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8)
    maps, embeddings = embedder.with_feature_maps(images)
    torch.testing.assert_close(embeddings, embedder(images))
    assert maps.ndim == 4 and maps.shape[0] == 4
    views, original = [], Embedder.with_feature_maps
    monkeypatch.setattr(Embedder, "with_feature_maps", lambda self, x: views.append(len(x)) or original(self, x))
    assert extract(tmp_path / "m.csv", tmp_path / "shared", source, config, progress=False).failures == {}
    assert views == [6]  # the bags wait for a batch (5) of views: the three bags' six in one forward
    views.clear()
    one_by_one = dataclasses.replace(config, batch_size=2)
    assert extract(tmp_path / "m.csv", tmp_path / "alone", source, one_by_one, progress=False).failures == {}
    assert views == [2, 2, 2]  # a batch of 2: each bag's two views on their own
    monkeypatch.setattr(CamSource, "_shares_forward", lambda self, embedder: False)
    apart = create_source("cam", **settings)
    assert extract(tmp_path / "m.csv", tmp_path / "apart", apart, config, progress=False).failures == {}
    with (
        FeatureStore(tmp_path / "shared") as shared,
        FeatureStore(tmp_path / "apart") as separate,
        FeatureStore(tmp_path / "alone") as alone,
    ):
        for bag_id in separate.bag_ids():
            one, other = shared[bag_id], separate[bag_id]
            np.testing.assert_allclose(one.embeddings, alone[bag_id].embeddings, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(one.coords, alone[bag_id].coords)
            np.testing.assert_array_equal(one.coords, other.coords)
            np.testing.assert_array_equal(one.attrs["kind"], other.attrs["kind"])
            np.testing.assert_allclose(one.embeddings, other.embeddings, rtol=1e-3, atol=1e-3)
            for key in other.extras:
                np.testing.assert_allclose(one.extras[key], other.extras[key], rtol=1e-3, atol=1e-3)


def test_saliency_cam_of_a_backbone_without_a_feature_map_fails_the_bag_by_name(tmp_path):
    """A ViT's last features are tokens, not a map: the bag fails saying so, on either path."""
    from PIL import Image

    Image.fromarray(np.full((96, 64), 128, np.uint8)).save(tmp_path / "a.png")
    pl.DataFrame({"bag_id": ["b"], "path": ["a.png"]}).write_csv(tmp_path / "m.csv")
    for region in (64, 32):  # the shared forward (64 = the input size), then the CAM network apart
        source = create_source("cam", global_size=64, region_size=region, regions=1)
        config = ExtractConfig("test_vit", workers=0, overwrite=True, preprocessing={"input_size": (64, 64)})
        summary = extract(tmp_path / "m.csv", tmp_path / "store", source, config, progress=False)
        assert "a CAM needs a convolutional model" in summary.failures["b"]


def test_dicom_monochrome1_is_inverted_and_16_bit_scaled(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    pixels = np.array([[0, 1000, 2000, 3000]] * 4, np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "m1.dcm")
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert image[0, :, 0].tolist() == [255, 170, 85, 0]  # low values are bright in MONOCHROME1


def test_options_of_another_source_are_refused():
    with pytest.raises(ExtractionError, match="--patch-size do\\(es\\) not apply to --source tiles"):
        create_source("tiles", patch_size=(1, 2, 3))


def test_cam_is_the_class_weighted_feature_map(tmp_path):
    import timm
    from safetensors.torch import save_file

    from milcache.extractor.cam import _CamNet

    torch.manual_seed(1)
    classifier = timm.create_model("test_resnet", num_classes=3).eval()
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp_path / "cls.safetensors")
    net = _CamNet("test_resnet", str(tmp_path / "cls.safetensors"), cam_class=2, pretrained=False)
    view = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    x = (torch.from_numpy(view).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        features = classifier.forward_features(x)[0]
        expected = torch.relu(torch.einsum("c,chw->hw", classifier.get_classifier().weight[2], features))
    np.testing.assert_allclose(net(view[None])[0], expected.numpy(), rtol=1e-4, atol=1e-5)  # a batch of one view
    with pytest.raises(ExtractionError, match="--cam-class 5 does not exist: test_resnet has 3 classes"):
        _CamNet("test_resnet", str(tmp_path / "cls.safetensors"), cam_class=5, pretrained=False)


def _mammogram_manifest(folder) -> Path:
    from PIL import Image

    image = np.zeros((160, 128), np.uint8)
    image[10:150, 8:100] = np.random.default_rng(3).integers(60, 250, (140, 92))
    Image.fromarray(image).save(folder / "cc.png")
    pl.DataFrame({"bag_id": ["b"], "path": ["cc.png"]}).write_csv(folder / "m.csv")
    return folder / "m.csv"


def _cam_of(manifest, out, weights=None, **preprocessing) -> np.ndarray:
    source = create_source("cam", global_size=96, region_size=32, regions=2)
    config = ExtractConfig("test_resnet", weights=weights, workers=0, preprocessing=preprocessing)
    assert extract(manifest, out, source, config, progress=False).failures == {}
    with FeatureStore(out) as store:
        return store["b"].extras["cam_0"].astype(np.float32)


def test_a_cam_extraction_raises_no_warning(tmp_path, recwarn):
    """Decoders hand out read-only arrays (an RGB PNG's); torch warned about them on every CAM run."""
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 255, (160, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cc.png")
    pl.DataFrame({"bag_id": ["b"], "path": ["cc.png"]}).write_csv(tmp_path / "m.csv")
    _cam_of(tmp_path / "m.csv", tmp_path / "store")
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_saliency_cam_is_the_extraction_encoder_with_its_weights_and_mean(tmp_path):
    """The saliency CAM runs the very encoder that embeds (its weights file, the user's --mean):
    two weight files give two CAMs, and another mean another CAM, each equal to the encoder's own
    channel-mean activation."""
    import timm
    from safetensors.torch import save_file

    manifest = _mammogram_manifest(tmp_path)
    for seed in (7, 8):
        torch.manual_seed(seed)
        trained = timm.create_model("test_resnet", num_classes=0)
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / f"w{seed}.safetensors")
    first = _cam_of(manifest, tmp_path / "s7", tmp_path / "w7.safetensors")
    second = _cam_of(manifest, tmp_path / "s8", tmp_path / "w8.safetensors")
    shifted = _cam_of(manifest, tmp_path / "m7", tmp_path / "w7.safetensors", mean=[0.1, 0.1, 0.1])
    assert not np.allclose(first, second, atol=1e-3)
    assert not np.allclose(first, shifted, atol=1e-3)
    encoder = create_encoder("test_resnet", tmp_path / "w7.safetensors", mean=[0.1, 0.1, 0.1])
    embedder = Embedder(encoder, create_source("cam"), torch.device("cpu"), "fp32", False)
    view = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8))
    x = (view.permute(0, 3, 1, 2).float() / 255 - 0.1) / torch.tensor(encoder.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = encoder.model.forward_features(x)
    torch.testing.assert_close(embedder.feature_maps(view), expected)


def test_cam_model_needs_its_weights_and_they_load_strictly(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(ExtractionError, match="--cam-model test_resnet needs its trained weights"):
        CamSource(cam_model="test_resnet")
    classifier = timm.create_model("test_resnet", num_classes=2)
    partial = {k: v for k, v in classifier.state_dict().items() if not k.startswith("layer")}
    save_file({k: v.contiguous() for k, v in partial.items()}, tmp_path / "partial.safetensors")
    with pytest.raises(ExtractionError, match=r"does not fit --cam-model test_resnet: \d+ of the model's"):
        CamSource(cam_model="test_resnet", cam_weights=str(tmp_path / "partial.safetensors"))
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp_path / "cls.safetensors")
    source = CamSource(cam_model="test_resnet", cam_weights=str(tmp_path / "cls.safetensors"))
    assert source.settings()["cam_weights_digest"].startswith("sha256:")


def test_two_cam_weight_files_give_two_cams(tmp_path):
    import timm
    from safetensors.torch import save_file

    manifest = _mammogram_manifest(tmp_path)
    cams = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        classifier = timm.create_model("test_resnet", num_classes=2)
        classifier.get_classifier().weight.data.uniform_(0, 1)  # a class whose evidence is somewhere
        path = tmp_path / f"cls{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
        cam = {"cam_model": "test_resnet", "cam_weights": path}
        source = create_source("cam", global_size=96, region_size=32, regions=2, **cam)
        config = ExtractConfig("test_resnet", workers=0)
        assert extract(manifest, tmp_path / f"s{seed}", source, config, progress=False).failures == {}
        with FeatureStore(tmp_path / f"s{seed}") as store:
            cams.append(store["b"].extras["cam_0"].astype(np.float32))
    assert not np.allclose(cams[0], cams[1], atol=1e-3)


def test_a_bag_that_fails_its_planning_fails_alone_among_the_bags_planned_together(tmp_path, monkeypatch):
    from PIL import Image

    rows = []
    for bag in range(3):
        for view in ("cc", "mlo"):
            image = np.zeros((120, 90), np.uint16)
            image[10:110, 5:70] = 20_000 + 1_000 * bag
            Image.fromarray(image).save(tmp_path / f"{bag}{view}.png")
            rows.append((f"breast-{bag}", f"{bag}{view}.png"))
    pl.DataFrame(rows, schema=["bag_id", "path"], orient="row").write_csv(tmp_path / "m.csv")
    source = create_source("cam", global_size=64, region_size=64, regions=2)
    original = CamSource._planned

    def planned(self, bag, *args):
        if bag.bag_id == "breast-1":
            raise ValueError("a broken region grid")
        return original(self, bag, *args)

    monkeypatch.setattr(CamSource, "_planned", planned)
    config = ExtractConfig("test_resnet", workers=0, batch_size=8, preprocessing={"input_size": (64, 64)})
    summary = extract(tmp_path / "m.csv", tmp_path / "store", source, config, progress=False)
    assert summary.failures == {"breast-1": "ValueError: a broken region grid"}
    with FeatureStore(tmp_path / "store") as store:
        assert sorted(store.bag_ids()) == ["breast-0", "breast-2"]

"""Encoders: presets as published, weights in the vendors' layouts loaded exactly, strict loading,
and the embedding spec compared wherever embeddings meet a model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import milcache
from milcache.cli import cli
from milcache.errors import ExtractionError, StoreMismatchError
from milcache.extractor.encoders import Blueprint, build_timm, create_encoder, layer_arguments, pool_tokens
from milcache.extractor.presets import PRESETS, Preset
from milcache.extractor.reread import reread, source_of
from tests.conftest import tissue_image, write_pyramid_tiff

TILE = 224
# Shrinks a preset's architecture to CPU-test size, keeping everything else (patch size, registers,
# SwiGLU, layer scale, class token rule, key map).
SHRINK = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True, scope="module")
def _forget_test_presets():
    """The test-size twins this module registers are gone after it (other tests list the presets)."""
    yield
    for name in [n for n in PRESETS.names() if n.startswith("tiny-")]:
        PRESETS._items.pop(name)


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_has_its_published_parameter_count_and_dim(name):
    """Built on the meta device (no memory, no weights) exactly as the model card says."""
    preset = PRESETS.get(name)
    encoder = _meta(preset)
    count = sum(p.numel() for p in encoder.model.parameters())
    published = preset.published_parameters()
    digits = preset.params[:-1].split(".")
    half_unit = 0.5 * 10 ** -(len(digits[1]) if len(digits) > 1 else 0) * (1e9 if preset.params[-1] == "B" else 1e6)
    assert abs(count - published) <= max(half_unit, 0.01 * published), f"{name}: {count:,} parameters"
    assert encoder.dim == preset.dim


def _meta(preset: Preset):
    blueprint = Blueprint(preset.name, preset.architecture, dict(preset.args), preset.data(), preset.token_rule)
    return build_timm(blueprint, args={}, token_rule=None, device="meta")


def test_a_preset_without_weights_is_refused_naming_where_they_come_from():
    with pytest.raises(ExtractionError, match=r"--backbone uni2-h: give its weights .*MahmoodLab/UNI2-h"):
        create_encoder("uni2-h")


def test_encoders_command_lists_every_preset():
    result = CliRunner().invoke(cli, ["encoders", "--json"])
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["name"] for r in rows] == PRESETS.names()
    assert {r["name"]: r["dim"] for r in rows}["virchow2"] == 2560
    table = CliRunner().invoke(cli, ["encoders"]).output
    assert "uni2-h" in table and "CC-BY-NC-ND-4.0" in table and "hf-hub:ORG/NAME" in table


# --- exact loading through `extract` ------------------------------------------------------------------


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("encoder-slides")
    write_pyramid_tiff(root / "s.tif", tissue_image(2 * TILE, 2 * TILE, seed=4))
    (root / "slides.csv").write_text(f"bag_id,path\ns,{root / 's.tif'}\n")
    return root


def _tiny(name: str, **changes) -> str:
    """A test-size twin of preset ``name`` (registered once under ``tiny-NAME``)."""
    preset = PRESETS.get(name)
    tiny = dataclasses.replace(preset, name=f"tiny-{name}", args={**preset.args, **SHRINK, **changes}, hub=None)
    if tiny.name not in PRESETS:
        PRESETS.add(tiny.name, tiny)
    return tiny.name


def _extracted(slides: Path, out: Path, backbone: str, weights=None, **options) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of the slide's tiles (float32) and those tiles' pixels, normalised as the store says."""
    milcache.extract(
        slides / "slides.csv", out, backbone=backbone, weights=weights, tile_size=TILE, workers=0,
        device="cpu", dtype="float32", precision="fp32", **options,
    )  # fmt: skip
    with milcache.FeatureStore(out) as store:
        bag = store.get("s")
        pixels = reread(store, source_of(store), "s", np.arange(len(bag.embeddings)))
        prep = store.metadata.preprocessing
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    side = prep["input_size"][0]
    resized = round(side / prep.get("crop_pct", 1.0))
    if resized != x.shape[-1] or resized != side:  # the card's Resize(input / crop_pct) + CenterCrop(input)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        mode = InterpolationMode.BICUBIC if prep["interpolation"] == "bicubic" else InterpolationMode.BILINEAR
        x = tvf.center_crop(tvf.resize(x, [resized], interpolation=mode, antialias=True), [side])
    x = (x - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / torch.tensor(prep["std"]).view(1, 3, 1, 1)
    return np.asarray(bag.embeddings, np.float32), x


def _timm_twin(preset_name: str, seed: int = 3):
    import timm

    preset = PRESETS.get(preset_name)
    torch.manual_seed(seed)
    model = timm.create_model(preset.architecture, num_classes=0, **layer_arguments(preset.args)).eval()
    for parameter in model.parameters():  # LayerScale's 1e-5 would hide a block that loaded wrong
        parameter.data.add_(torch.randn_like(parameter) * 0.02)
    return model


@torch.no_grad()
def _reference(model, x: torch.Tensor, rule: str) -> np.ndarray:
    out = model(x) if rule == "pooled" else pool_tokens(model.forward_features(x), rule, model.num_prefix_tokens)
    return out.numpy()


@pytest.mark.parametrize("name", ["uni2-h", "virchow2", "h-optimus-0", "prov-gigapath"])
def test_timm_layout_weights_give_timm_embeddings_from_a_file_and_a_local_dir(slides, tmp_path, name):
    """Random weights in timm's layout, as a file (--weights) and as timm's local-dir folder, give the
    embeddings of timm's own model built from the same arguments, through `extract`."""
    tiny = _tiny(name)
    model = _timm_twin(tiny)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    embeddings, x = _extracted(slides, tmp_path / "file", tiny, tmp_path / "w.safetensors")
    preset = PRESETS.get(tiny)
    np.testing.assert_allclose(embeddings, _reference(model, x, preset.token_rule), atol=1e-5, rtol=1e-5)
    folder = tmp_path / "local"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    data = preset.data()
    config = {
        "architecture": preset.architecture,
        "model_args": preset.args,
        "pretrained_cfg": {**data, "input_size": [3, *data["input_size"]]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    local, _ = _extracted(slides, tmp_path / "dir", f"local-dir:{folder}", token_rule=preset.token_rule)
    np.testing.assert_allclose(local, embeddings, atol=1e-5, rtol=1e-5)
    with milcache.FeatureStore(tmp_path / "file") as store:
        assert store.metadata.token_rule == preset.token_rule and store.metadata.encoder_args["embed_dim"] == 32


def test_a_preset_from_a_filled_hugging_face_cache(slides, tmp_path, monkeypatch):
    """`--backbone hf-hub:ORG/NAME` of a preset's repository, and `--pretrained` of the preset, read
    the local cache only; a repository not in it is refused naming it."""
    tiny = _tiny("uni")
    preset = dataclasses.replace(PRESETS.get(tiny), name="tiny-uni-hub", hub="TestLab/tiny-uni")
    PRESETS.add(preset.name, preset) if preset.name not in PRESETS else None
    model = _timm_twin(tiny)
    cache = tmp_path / "hub"
    snapshot = cache / "models--TestLab--tiny-uni" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--TestLab--tiny-uni" / "refs").mkdir()
    (cache / "models--TestLab--tiny-uni" / "refs" / "main").write_text("0123abcd")
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    from_hub, x = _extracted(slides, tmp_path / "hub-store", "hf-hub:TestLab/tiny-uni")
    np.testing.assert_allclose(from_hub, _reference(model, x, "pooled"), atol=1e-5, rtol=1e-5)
    from_flag, _ = _extracted(slides, tmp_path / "flag-store", "tiny-uni-hub", pretrained=True)
    np.testing.assert_array_equal(from_flag, from_hub)
    with pytest.raises(ExtractionError, match="hf-hub:TestLab/absent is not in the local Hugging Face cache"):
        create_encoder("hf-hub:TestLab/absent")


# --- transformers' layout (Phikon-v2, Hibou, Midnight) ---------------------------------------------------


def _dinov2(registers: int = 0, **config):
    transformers = pytest.importorskip("transformers")
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    settings = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "layerscale_value": 0.5, **config}
    if registers:
        settings["num_register_tokens"] = registers
    torch.manual_seed(5)
    model = getattr(transformers, f"{kind}Model")(getattr(transformers, f"{kind}Config")(**settings)).eval()
    for parameter in model.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.02)
    return model


_V4_NAMES = (
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.down_proj", "mlp.weights_out"),
)


def _as_transformers_4(state: dict) -> dict:
    """The names transformers 4.x saved (and the published checkpoints use)."""
    out = {}
    for key, value in state.items():
        for new, old in _V4_NAMES:
            key = key.replace(new, old)
        out[key] = value
    for key in [k for k in out if ".mlp.gate_proj." in k]:
        out[key.replace("gate_proj", "weights_in")] = torch.cat([out.pop(key), out.pop(key.replace("gate", "up"))])
    return out


@pytest.mark.parametrize(
    ("name", "vendor", "changes"),
    [
        # Phikon-v2: a ViT-L/16 Dinov2Model; a checkpoint grid (32 / 16 = 2) other than the input's
        # (224 / 16 = 14) is resampled as transformers does at run time.
        ("phikon-v2", {"patch_size": 16, "image_size": 32}, {}),
        # Midnight: ViT-g/14 with SwiGLU (transformers rounds its hidden size to 8: 88 per half here).
        ("midnight-12k", {"patch_size": 14, "image_size": 224, "use_swiglu_ffn": True}, {"mlp_ratio": 176 / 32}),
        # Hibou: ViT-B/14 with 4 registers.
        ("hibou-b", {"patch_size": 14, "image_size": 224, "registers": 4}, {}),
    ],
)
def test_transformers_layout_gives_the_vendors_embeddings(slides, tmp_path, name, vendor, changes):
    """Weights saved by transformers (its 5.x names, and the 4.x names published checkpoints carry)
    load through the key map onto timm's architecture and give transformers' own embeddings."""
    vendor = dict(vendor)
    model = _dinov2(registers=vendor.pop("registers", 0), **vendor)
    tiny = _tiny(name, **changes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "v5.safetensors")
    save_file({k: v.contiguous() for k, v in _as_transformers_4(state).items()}, tmp_path / "v4.safetensors")
    embeddings, x = _extracted(slides, tmp_path / "v5", tiny, tmp_path / "v5.safetensors")
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    prefix = 1 + model.config.to_dict().get("num_register_tokens", 0)
    expected = pool_tokens(tokens, PRESETS.get(tiny).token_rule, prefix)
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=1e-4)
    old_names, _ = _extracted(slides, tmp_path / "v4", tiny, tmp_path / "v4.safetensors")
    np.testing.assert_allclose(old_names, embeddings, atol=1e-6)


def _conch_reference(state: dict, x: torch.Tensor, trunk) -> torch.Tensor:
    """CONCH v1.5's forward as the vendor's code computes it (TRIDENT's conchv1_5.py): the trunk at
    224 px with DINO's run-time position resampling, then the einsum attentional pooler."""
    import torch.nn.functional as F

    pos = state["trunk.pos_embed"]
    side, grid = int((pos.shape[1] - 1) ** 0.5), x.shape[-1] // 16
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
    pos = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    tokens = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([trunk.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos
    tokens = trunk.norm(trunk.blocks(tokens))
    p = {k.removeprefix("attn_pool_contrast."): v for k, v in state.items() if k.startswith("attn_pool_contrast.")}
    kv = F.layer_norm(tokens, tokens.shape[-1:], p["ln_k.weight"], p["ln_k.bias"])
    q = F.layer_norm(p["query"], p["query"].shape[-1:], p["ln_q.weight"], p["ln_q.bias"]) @ p["to_q.weight"].T
    k, v = (kv @ p["to_kv.weight"].T).chunk(2, dim=-1)
    heads = 8
    q = q.reshape(1, heads, -1).transpose(0, 1)[None].expand(len(x), -1, -1, -1)  # b h 1 d
    k, v = (t.reshape(len(x), -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * (q.shape[-1] ** -0.5)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(len(x), 1, -1) @ p["to_out.weight"].T
    return F.layer_norm(out[:, 0], (768,), state["ln_contrast.weight"], state["ln_contrast.bias"])


def test_conch_v1_5_checkpoint_gives_the_vendors_embedding(slides, tmp_path):
    """The vision tower's checkpoint (its own names, a 224-px position grid) read at 448 px."""
    from milcache.extractor.architectures import ConchVision

    torch.manual_seed(2)
    tower = ConchVision(img_size=224, **SHRINK).eval()  # the vendor's trunk is built at 224
    for parameter in tower.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.02)
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    embeddings, x = _extracted(slides, tmp_path / "conch", _tiny("conch-v1.5"), tmp_path)
    assert embeddings.shape[1] == 768 and x.shape[-1] == 448
    with torch.no_grad():
        expected = _conch_reference(state, x, tower.trunk)
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=1e-4)


def test_ctranspath_checkpoint_of_the_original_swin_layout(slides, tmp_path):
    """CTransPath's checkpoint (the original Swin layout: each stage's downsampling at its end, the
    index and mask buffers saved, under 'model') gives timm's Swin-T with the convolutional stem."""
    from milcache.extractor.architectures import ctranspath_swin_tiny

    torch.manual_seed(4)
    model = ctranspath_swin_tiny("ctranspath_swin_tiny", num_classes=0).eval()
    for parameter in model.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.02)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
    original = {}
    for key, value in model.state_dict().items():
        if ".downsample." in key:  # timm: stage i+1 starts by downsampling; the original: stage i ends so
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        original[key] = value
    for name, buffer in model.named_buffers():
        if "relative_position_index" in name or "attn_mask" in name:
            original[name] = buffer
    torch.save({"model": original}, tmp_path / "ctranspath.pth")
    embeddings, x = _extracted(slides, tmp_path / "ctp", "ctranspath", tmp_path / "ctranspath.pth")
    np.testing.assert_allclose(embeddings, _reference(model, x, "pooled"), atol=1e-5, rtol=1e-4)


# --- strict loading -----------------------------------------------------------------------------------


def _extract_cli(slides: Path, out: Path, *args: str):
    base = ["extract", str(slides / "slides.csv"), "--out", str(out), "--tile-size", "64", "--workers", "0"]
    return CliRunner().invoke(cli, [*base, *args])


def test_weights_that_do_not_fit_are_refused_by_name_and_write_nothing(slides, tmp_path):
    import timm

    torch.manual_seed(0)
    with_layerscale = timm.create_model("test_vit", num_classes=0, init_values=1e-5)
    save_file({k: v.contiguous() for k, v in with_layerscale.state_dict().items()}, tmp_path / "ls.safetensors")
    result = _extract_cli(
        slides, tmp_path / "a", "--backbone", "test_vit", "--weights", str(tmp_path / "ls.safetensors")
    )
    assert result.exit_code == 2 and "tensors unused (blocks.0.ls1.gamma" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a").exists()
    fits = _extract_cli(
        slides, tmp_path / "b", "--backbone", "test_vit", "--backbone-args", "init_values=1e-5",
        "--weights", str(tmp_path / "ls.safetensors"),
    )  # fmt: skip
    assert fits.exit_code == 0, fits.output
    with milcache.FeatureStore(tmp_path / "b") as store:
        assert store.metadata.encoder_args == {"init_values": 1e-5}

    plain = timm.create_model("test_resnet", num_classes=0).state_dict()
    dropped = [k for k in plain if k.endswith("bn2.weight")][-1]
    missing = {k: v for k, v in plain.items() if k != dropped}
    save_file({k: v.contiguous() for k, v in missing.items()}, tmp_path / "missing.safetensors")
    result = _extract_cli(
        slides, tmp_path / "c", "--backbone", "test_resnet", "--weights", str(tmp_path / "missing.safetensors")
    )
    assert result.exit_code == 2 and f"1 of the model's {len(plain)} tensors missing ({dropped})" in result.output
    misshapen = dict(plain)
    key = next(k for k, v in plain.items() if v.ndim == 4)
    misshapen[key] = torch.zeros(*plain[key].shape[:-1], plain[key].shape[-1] + 1)
    save_file({k: v.contiguous() for k, v in misshapen.items()}, tmp_path / "shape.safetensors")
    result = _extract_cli(
        slides, tmp_path / "d", "--backbone", "test_resnet", "--weights", str(tmp_path / "shape.safetensors")
    )
    assert result.exit_code == 2 and f"1 of another shape ({key}: file" in result.output
    assert not any((tmp_path / d).exists() for d in "cd")


def test_classifier_tensors_of_a_full_checkpoint_are_not_needed(tmp_path):
    import timm

    torch.manual_seed(0)
    classifier = timm.create_model("test_resnet", num_classes=5)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp_path / "full.safetensors")
    encoder = create_encoder("test_resnet", tmp_path / "full.safetensors")
    for key, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, classifier.state_dict()[key])


def test_backbone_args_from_a_config_table(slides, tmp_path):
    (tmp_path / "run.toml").write_text("backbone = 'test_vit'\n[backbone_args]\ninit_values = 0.001\n")
    result = _extract_cli(slides, tmp_path / "s", "--config", str(tmp_path / "run.toml"))
    assert result.exit_code == 0, result.output
    with milcache.FeatureStore(tmp_path / "s") as store:
        assert store.metadata.encoder_args == {"init_values": 0.001}
        assert store.metadata.embedding.encoder_args == {"init_values": 0.001}


# --- the embedding spec where embeddings meet a model -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(slides, tmp_path_factory):
    """A head trained on tiles of 64 px at level 0, its store, and the labels."""
    root = tmp_path_factory.mktemp("spec-run")
    for i in range(8):
        write_pyramid_tiff(root / f"s{i}.tif", tissue_image(128, 128, seed=i))
    (root / "slides.csv").write_text("bag_id,path\n" + "".join(f"s{i},{root / f's{i}.tif'}\n" for i in range(8)))
    (root / "labels.csv").write_text("bag_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(8)))
    base = {"backbone": "test_resnet", "workers": 0, "device": "cpu"}
    milcache.extract(root / "slides.csv", root / "store", tile_size=64, **base)
    milcache.train_head(root / "store", root / "labels.csv", root / "run", folds=2, epochs=1, device="cpu")
    return root, base


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"tile_size": 32}, "source.tile_size"),
        ({"tile_size": 64, "mean": [0.4, 0.4, 0.4]}, "preprocessing.mean"),
        ({"tile_size": 64, "input_size": 96}, "preprocessing.input_size"),
        ({"tile_size": 64, "crop_pct": 0.875}, "preprocessing.crop_pct"),
    ],
)
def test_predict_refuses_embeddings_made_otherwise_naming_the_field(trained, tmp_path, options, field):
    root, base = trained
    milcache.extract(root / "slides.csv", tmp_path / "other", **base, **options)
    with pytest.raises(StoreMismatchError, match=rf"{field}: model trained on .*, store has "):
        milcache.predict(root / "run", tmp_path / "other", device="cpu")
    out = ["--out", str(tmp_path / "p.csv")]
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(root / "run"), "--store", str(tmp_path / "other"), *out]
    )
    assert result.exit_code == 2 and field in result.output and not (tmp_path / "p.csv").exists()


def test_predict_refuses_another_token_rule_and_another_mpp(trained, tmp_path):
    root, _ = trained
    recorded = json.loads((root / "run" / "config.json").read_text())["store"]
    assert recorded["token_rule"] == "pooled" and recorded["source"]["tile_size"] == 64
    with milcache.FeatureStore(root / "store") as store:
        from milcache.aggregator.run import check_model_input

        other_mpp = {"source": {**recorded["source"], "mpp": 1.0}}
        for changed, field in (({"token_rule": "cls+mean"}, "token_rule"), (other_mpp, "source.mpp")):
            with pytest.raises(StoreMismatchError, match=field):
                check_model_input({**recorded, **changed}, store, model_dir=root / "run")
        check_model_input(recorded, store, model_dir=root / "run")  # the same spec passes

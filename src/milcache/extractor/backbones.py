"""Backbones: one registry of model families (timm names by default; prefixes such as ``tv:`` for
other families), one ``create_backbone``. Weights come from a local file or an already-filled
Hugging Face cache; nothing is downloaded."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from milcache.errors import ExtractionError
from milcache.registry import Registry

# Families of models by name prefix ("timm" when a name has none); other packages can add one
# through the ``milcache.backbones`` entry-point group.
FAMILIES: Registry[Callable[..., Backbone]] = Registry("backbone family", entry_point_group="milcache.backbones")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass
class Backbone:
    """A model that maps normalised images (B × C × H × W) to embeddings (B × dim)."""

    model: nn.Module
    name: str
    dim: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    weights_digest: str = "random-init"
    extra: dict = field(default_factory=dict)
    _normalisation: dict = field(default_factory=dict, repr=False, compare=False)

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as 1 × C × 1 × 1 tensors on ``device``, built once per device."""
        if device not in self._normalisation:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape)
            self._normalisation[device] = (mean, torch.tensor(self.std, dtype=torch.float32, device=device).view(shape))
        return self._normalisation[device]

    def preprocessing(self) -> dict:
        """What store.json records, so that the preprocessing can be rebuilt from the store alone."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            **self.extra,
        }


def register_family(prefix: str) -> Callable:
    return FAMILIES.register(prefix)


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = False, **overrides) -> Backbone:
    """Build a backbone by name (``resnet50``, ``vit_base_patch16_224``, ``tv:r3d_18`` …)."""
    prefix, _, rest = name.partition(":") if ":" in name else ("timm", "", name)
    if prefix not in FAMILIES:
        raise ExtractionError(f"unknown backbone family {prefix!r} in {name!r}; known: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(prefix)(rest, weights=weights, pretrained=pretrained, **overrides)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or timm-style folder, never unpickling arbitrary objects."""
    if path.is_dir():
        found = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise ExtractionError(f"{path}: no {' or '.join(_WEIGHT_FILES)} in this folder")
        path = found
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds; all mean "not a plain tensor checkpoint"
            raise ExtractionError(f"{path}: cannot load as a weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ExtractionError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def _apply_weights(model: nn.Module, path: Path) -> None:
    state = load_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state]
    if not state or len(missing) > len(own) // 10:
        raise ExtractionError(
            f"{path}: these weights do not fit the model ({len(missing)} of {len(own)} tensors missing, "
            f"e.g. {', '.join(missing[:5])}); is --backbone the architecture they were trained for?"
        )
    model.load_state_dict(state, strict=False)


@register_family("timm")
def timm_backbone(name: str, weights=None, pretrained=False, in_chans: int = 3, **overrides) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    if not timm.list_models(name) and name not in timm.list_models(pretrained=True):
        raise ExtractionError(f"unknown timm model {name!r}; see `timm.list_models()` for the names")
    if pretrained:  # only from an already-filled cache: never from the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)  # random-weight backbones (tests, demos) are then the same in every run
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, in_chans=in_chans)
    except Exception as exc:  # offline cache misses surface as many exception kinds
        raise ExtractionError(
            f"cannot create {name!r} with pretrained weights offline ({exc}); pass the weights file with --weights"
        ) from None
    digest = "random-init"
    if weights is not None:
        weights = Path(weights)
        if not weights.exists():
            raise ExtractionError(f"{weights}: weights file missing")
        _apply_weights(model, weights)
        digest = file_digest(weights)
    elif pretrained:
        digest = f"timm-pretrained:{name}"
    config = resolve_data_config({}, model=model)
    size = overrides.get("input_size") or config["input_size"][1:]
    return Backbone(
        model=model.eval(),
        name=name,
        dim=int(model.num_features),
        input_size=(int(size[0]), int(size[1])),
        mean=tuple(overrides.get("mean") or config["mean"]),
        std=tuple(overrides.get("std") or config["std"]),
        interpolation=overrides.get("interpolation") or config.get("interpolation", "bicubic"),
        weights_digest=digest,
        extra=_channels(in_chans),
    )


def _channels(in_chans: int) -> dict:
    """Input channels other than RGB (volumes' modalities), recorded so the backbone can be rebuilt
    from the store alone (fine-tuning, embedding a query image)."""
    return {} if in_chans == 3 else {"in_chans": in_chans}


_VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18")


@register_family("tv")
def torchvision_video_backbone(name: str, weights=None, pretrained=False, in_chans: int = 3, **overrides) -> Backbone:
    """torchvision's video ResNets as 3D patch encoders, the first convolution adapted to the number
    of modalities (pretrained RGB kernels averaged over their input channels and repeated)."""
    from torchvision.models import video

    if name not in _VIDEO_MODELS:
        raise ExtractionError(f"unknown torchvision 3D model {name!r}; choose one of {', '.join(_VIDEO_MODELS)}")
    if pretrained:
        raise ExtractionError("tv: backbones take local weights only: pass the checkpoint with --weights")
    torch.manual_seed(0)
    model = getattr(video, name)(weights=None)
    digest = "random-init"
    if weights is not None:
        _apply_weights(model, Path(weights))
        digest = file_digest(Path(weights))
    stem = model.stem[0]
    if in_chans != stem.in_channels:
        adapted = nn.Conv3d(in_chans, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
        with torch.no_grad():
            adapted.weight.copy_(stem.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1, 1) * 3 / in_chans)
        model.stem[0] = adapted
    model.fc = nn.Identity()
    size = overrides.get("input_size") or (112, 112)
    return Backbone(
        model=model.eval(),
        name=f"tv:{name}",
        dim=512,
        input_size=(int(size[0]), int(size[1])),
        mean=(0.0,) * in_chans,
        std=(1.0,) * in_chans,
        weights_digest=digest,
        extra={"kind": "video", **_channels(in_chans)},
    )

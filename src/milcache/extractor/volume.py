"""Patches of 3D volumes (the BraTS recipe): NIfTI or .npy, modalities as channels, per-channel
z-score over the foreground, canonical orientation, optional resampling, a 3D patch grid with a
foreground filter; a patch is embedded slice by slice by a 2D backbone (averaged over depth) or in
one pass by a 3D backbone (``tv:r3d_18`` …)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from milcache import checks
from milcache.errors import ExtractionError
from milcache.extractor.sources import BagPlan, Source, register_source
from milcache.store.tables import BagSpec


def _read_channel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file as (channels, z, y, x) float32 in RAS orientation, and its 4 × 4 affine."""
    if not path.exists():
        raise ExtractionError(f"{path}: file missing")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            data, affine = np.load(path, allow_pickle=False).astype(np.float32), np.eye(4)
            data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            image = nib.as_closest_canonical(nib.load(str(path)))
            data, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine
            data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
            data = np.ascontiguousarray(np.transpose(data, (0, 3, 2, 1)))  # x, y, z → z, y, x
        else:
            raise ExtractionError(f"{path}: expected a .nii, .nii.gz or .npy volume")
    except (OSError, ValueError) as exc:
        raise ExtractionError(f"{path}: unreadable volume ({exc})") from None
    if data.ndim != 4:
        raise ExtractionError(f"{path}: expected a 3D volume (or 3D × channels), got shape {data.shape}")
    return data, affine


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along z, y, x from an affine (whose columns are x, y, z)."""
    return np.sqrt((affine[:3, :3] ** 2).sum(0))[::-1]


@register_source("volume")
class VolumeSource(Source):
    coord_names = ["z", "y", "x"]
    option_help = {
        "patch_size": "patch depth, height, width",
        "patch_stride": "step between patches [patch size]",
        "min_foreground": "least foreground fraction of a kept patch",
        "spacing": "resample to this voxel size (z y x) [as read]",
        "slices": "with a 2D backbone: slices per patch, evenly spaced [all]",
    }

    def __init__(
        self,
        patch_size: tuple[int, int, int] = (32, 64, 64),
        patch_stride: tuple[int, int, int] | None = None,
        min_foreground: float = 0.1,
        spacing: tuple[float, float, float] | None = None,
        slices: int | None = None,
    ) -> None:
        self.patch_size = tuple(int(v) for v in patch_size)
        self.patch_stride = tuple(int(v) for v in (patch_stride or patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1 or min(self.patch_stride) < 1:
            raise ExtractionError(
                f"--patch-size and --patch-stride take three positive sizes (D H W), got "
                f"{patch_size} and {patch_stride}"
            )
        checks.within("--min-foreground", min_foreground, 0.0, 1.0)
        for value in spacing or ():
            checks.above("--spacing", value, 0)
        checks.at_least("--slices", slices, 1)
        self.min_foreground, self.spacing, self.slices = min_foreground, spacing, slices
        self._cache: tuple | None = None  # (bag id, volume, foreground, info): reads follow their plan

    def settings(self) -> dict:
        return {
            "kind": self.kind,
            "patch_size": list(self.patch_size),
            "patch_stride": list(self.patch_stride),
            "min_foreground": self.min_foreground,
            "spacing": self.spacing,
            "slices": self.slices,
        }

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}

    def backbone_options(self, bags: list[BagSpec]) -> dict:
        """The backbone's input channels: the first bag's modalities (rows, or a multi-channel file)."""
        if not bags:
            return {}
        first = bags[0]
        channels = len(first.paths) if len(first.paths) > 1 else _read_channel(Path(first.paths[0]))[0].shape[0]
        return {"in_chans": channels}

    def load(self, bag: BagSpec) -> tuple[np.ndarray, np.ndarray, dict]:
        """The bag's normalised volume (C × Z × Y × X), its foreground mask, and its description."""
        if self._cache is not None and self._cache[0] == bag.bag_id:
            return self._cache[1], self._cache[2], self._cache[3]
        parts = [_read_channel(Path(p)) for p in bag.paths]
        shapes = {str(Path(p).name): d.shape[1:] for p, (d, _) in zip(bag.paths, parts, strict=True)}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
            raise ExtractionError(f"bag {bag.bag_id!r}: its channel volumes differ in shape: {listed}")
        volume = np.concatenate([d for d, _ in parts])
        affine = parts[0][1]
        factors = np.ones(3)
        if self.spacing is not None:
            from scipy import ndimage

            factors = _spacing(affine) / np.asarray(self.spacing, dtype=np.float64)
            volume = np.stack([ndimage.zoom(c, factors, order=1) for c in volume])
        foreground = (volume > volume.reshape(len(volume), -1).min(1)[:, None, None, None]).any(0)
        if not foreground.any():
            raise ExtractionError(f"bag {bag.bag_id!r}: the volume is empty (no voxel above its minimum)")
        for channel in volume:  # z-score over the foreground; background becomes 0
            values = channel[foreground]
            channel -= values.mean()
            channel /= max(float(values.std()), 1e-6)
            channel[~foreground] = 0
        names = [str(r.get("channel", i)) for i, r in enumerate(bag.rows)] if len(bag.paths) > 1 else None
        info = {
            "shape": list(volume.shape),
            "factors": factors.tolist(),
            "affine": np.asarray(affine).tolist(),
            "channels": names,
        }
        self._cache = (bag.bag_id, volume, foreground, info)
        return volume, foreground, info

    def plan(self, bag: BagSpec) -> BagPlan:
        volume, foreground, info = self.load(bag)
        starts = [np.arange(0, max(n, 1), s) for n, s in zip(volume.shape[1:], self.patch_stride, strict=True)]
        grid = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, 3)
        table = np.pad(foreground.astype(np.int64), ((1, 0), (1, 0), (1, 0))).cumsum(0).cumsum(1).cumsum(2)
        shape = np.array(foreground.shape)
        lo, hi = grid, np.minimum(grid + self.patch_size, shape)
        z0, y0, x0 = lo.T
        z1, y1, x1 = hi.T
        inside = (
            table[z1, y1, x1]
            - table[z0, y1, x1]
            - table[z1, y0, x1]
            - table[z1, y1, x0]
            + table[z0, y0, x1]
            + table[z0, y1, x0]
            + table[z1, y0, x0]
            - table[z0, y0, x0]
        )
        fraction = (inside / math.prod(self.patch_size)).astype(np.float32)
        keep = fraction >= max(self.min_foreground, 1e-9)
        if not keep.any():
            raise ExtractionError(f"bag {bag.bag_id!r}: no patch reaches {self.min_foreground:.0%} foreground")
        original = np.floor(grid[keep] / np.asarray(info["factors"])).astype(np.int32)  # voxels before resampling
        return BagPlan(original, {"foreground": fraction[keep]}, {}, {**info, "grid": grid[keep].tolist()})

    def read(self, bag: BagSpec, plan: BagPlan, indices: np.ndarray) -> np.ndarray:
        volume, _, _ = self.load(bag)
        d, h, w = self.patch_size
        depth = self._depth_indices()
        out = np.zeros((len(indices), volume.shape[0], len(depth), h, w), np.float16)
        for row, i in enumerate(indices):
            z, y, x = plan.meta["grid"][int(i)]
            patch = volume[:, z : z + d, y : y + h, x : x + w]  # edge patches: zero (background) padded
            full = np.zeros((volume.shape[0], d, h, w), np.float32)
            full[:, : patch.shape[1], : patch.shape[2], : patch.shape[3]] = patch
            out[row] = full[:, depth]
        return out

    def _depth_indices(self) -> np.ndarray:
        d = self.patch_size[0]
        if not self.slices or self.slices >= d:
            return np.arange(d)
        return np.unique(np.linspace(0, d - 1, self.slices).round().astype(int))

    def embed(self, batch: torch.Tensor, forward: Callable, backbone) -> torch.Tensor:
        import torch.nn.functional as F

        x = batch.float()  # B × C × D × H × W, already z-scored
        if backbone.extra.get("kind") == "video":
            return forward(x)
        b, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        if (h, w) != tuple(backbone.input_size):
            slices = F.interpolate(slices, size=backbone.input_size, mode="bilinear", align_corners=False)
        return forward(slices).view(b, d, -1).mean(1)

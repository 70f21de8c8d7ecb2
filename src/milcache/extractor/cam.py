"""CAM-selected regions of 2D images, with the global view (the RSNA mammography recipe).

Each image is embedded whole at ``global_size`` (a global instance). A class activation map of the
global view — from a timm CNN classifier (``cam_model`` + ``cam_weights``, the classifier's weights
for ``cam_class`` applied to its last feature map), or without one the channel-mean activation of the
embedding backbone's last feature map — scores a grid of ``region_size`` squares of the
full-resolution image; the top ``regions`` squares with foreground become region instances.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from milcache import checks
from milcache.errors import ExtractionError
from milcache.extractor.sources import BagPlan, PlannedBag, Source, plan_each, register_source
from milcache.store.tables import BagSpec

_CAM_SIDE = 64  # side of the CAM kept in the store (for drawing)
_FOREGROUND_LEVEL = 0.1  # of the image's range: darker is background (air around the breast)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Any-depth grey or RGB pixels scaled to 0-255 over their own range (16-bit is scaled, not clipped)."""
    array = np.asarray(array, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    return ((array - low) * (255.0 / max(high - low, 1e-12))).round().astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """An image as RGB uint8: DICOM with its VOI LUT / window and MONOCHROME1 inverted, PNG, JPEG, TIFF."""
    if not path.exists():
        raise ExtractionError(f"{path}: file missing")
    suffix = path.suffix.lower()
    try:
        if suffix in (".dcm", ".dicom") or (suffix == "" and _is_dicom(path)):
            import pydicom
            from pydicom.pixels import apply_voi_lut

            ds = pydicom.dcmread(path)
            pixels = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
            if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":  # low values are bright
                pixels = pixels.max() - pixels
            image = _to_uint8(pixels)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
            image = image if image.dtype == np.uint8 else _to_uint8(image)
        else:
            from PIL import Image

            with Image.open(path) as handle:
                raw = np.asarray(handle)
            image = raw if raw.dtype == np.uint8 else _to_uint8(raw)
    except ExtractionError:
        raise
    except Exception as exc:  # decoders raise many kinds for a broken file
        raise ExtractionError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    # Writable and contiguous: decoders hand out read-only views, which torch warns about.
    return image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))  # a writable copy


class _CamNet:
    """The classifier whose last feature map gives the CAM (``--cam-model`` with ``--cam-weights``, or
    timm's pretrained weights from the local cache), on the compute device, with its own
    normalisation. Without ``--cam-model`` the CAM is the embedding encoder's own saliency
    (``Embedder.feature_maps``): the same object, weights and mean / std that embed the instances."""

    def __init__(self, cam_model: str, cam_weights: str | None, cam_class: int, pretrained: bool) -> None:
        import timm

        from milcache.extractor.encoders import load_strictly, read_checkpoint

        state = read_checkpoint(Path(cam_weights)) if cam_weights else None
        try:
            probe = timm.create_model(cam_model, pretrained=False)
        except Exception as exc:  # timm: RuntimeError for an unknown name, others for bad arguments
            raise ExtractionError(f"--cam-model {cam_model!r}: {exc}") from None
        head = probe.default_cfg.get("classifier", "fc")
        classes = state[f"{head}.weight"].shape[0] if state and f"{head}.weight" in state else probe.num_classes
        if state is None:  # timm's pretrained classifier, from the cache only
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.model = timm.create_model(cam_model, pretrained=state is None, num_classes=classes).eval()
        except Exception as exc:  # offline cache misses surface as many exception kinds
            raise ExtractionError(
                f"--cam-model {cam_model} --pretrained: its weights are not in the local cache ({type(exc).__name__}); "
                "give them with --cam-weights"
            ) from None
        if state is not None:
            load_strictly(self.model, state, what=f"--cam-weights {cam_weights}", into=f"--cam-model {cam_model}")
        if not 0 <= cam_class < classes:
            raise ExtractionError(f"--cam-class {cam_class} does not exist: {cam_model} has {classes} classes")
        self.weights = self.model.get_classifier().weight[cam_class].detach().clone()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.mean, self.std = config["mean"], config["std"]
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> _CamNet:
        self.model = self.model.to(device).eval()
        self.device = device
        return self

    @torch.inference_mode()
    def __call__(self, views: np.ndarray) -> np.ndarray:
        """CAMs (V × h × w) of global views (V × S × S × 3 uint8), in one batch on the net's device."""
        from milcache.devices import autocast

        device = self.device
        x = torch.from_numpy(np.array(views)).to(device).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        x = (x - mean) / torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        with autocast(device, "auto"):
            features = self.model.forward_features(x)
        return activation_maps(features, self.weights.to(device))


def activation_maps(features: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
    """CAMs (B × h × w) from a last feature map (B × C × h × w): the classifier's ``weights`` for
    the class applied to it, or without them its channel-mean activation (a training-free saliency)."""
    if features.ndim != 4:
        raise ExtractionError("a CAM needs a convolutional model (a B × C × H × W feature map)")
    features = features.float()
    cams = features.mean(1) if weights is None else torch.einsum("c,bchw->bhw", weights, features)
    return torch.relu(cams).cpu().numpy()


@register_source("cam")
class CamSource(Source):
    coord_names = ["x0", "y0", "x1", "y1"]
    option_help = {
        "global_size": "side of the global view in pixels",
        "region_size": "side of a region square in full-resolution pixels",
        "regions": "regions kept per image, by CAM score",
        "cam_model": "timm CNN classifier whose last feature map gives the CAM [the encoder's saliency]",
        "cam_weights": "its weights (with the classifier; or --pretrained for timm's, from the local cache)",
        "cam_class": "the class whose activation map is used",
    }

    def __init__(
        self,
        global_size: int = 512,
        region_size: int = 512,
        regions: int = 8,
        cam_model: str | None = None,
        cam_weights: Path | None = None,
        cam_class: int = 1,
        pretrained: bool = False,
    ) -> None:
        if cam_model is None and cam_weights is not None:
            raise ExtractionError("--cam-weights needs --cam-model (the architecture they belong to)")
        if cam_model is not None and cam_weights is None and not pretrained:
            raise ExtractionError(
                f"--cam-model {cam_model} needs its trained weights: give them with --cam-weights (or --pretrained "
                "for timm's, from the local cache); a CAM of random weights would pick random regions"
            )
        cam_weights = None if cam_weights is None else str(cam_weights)  # settings stay JSON
        checks.at_least("--global-size", global_size, 32)
        checks.at_least("--region-size", region_size, 8)
        checks.at_least("--regions", regions, 1)
        checks.at_least("--cam-class", cam_class, 0)
        self.global_size, self.region_size, self.regions = global_size, region_size, regions
        self.cam_model, self.cam_weights, self.cam_class = cam_model, cam_weights, cam_class
        self.pretrained = pretrained
        self._net: _CamNet | None = None
        self.cam_digest = None
        if cam_model is not None:  # a checkpoint that does not fit is refused now, not once per bag
            self._new_net()
            if cam_weights:
                from milcache.extractor.encoders import file_digest

                self.cam_digest = file_digest(Path(cam_weights))
            else:
                self.cam_digest = f"timm-pretrained:{cam_model}"
            self._net = None  # each worker builds its own
        self._images: dict[str, np.ndarray] = {}  # the current bag's decoded images, by path
        self._views: dict[str, np.ndarray] = {}  # and their global views

    def settings(self) -> dict:
        return {
            "kind": self.kind,
            "global_size": self.global_size,
            "region_size": self.region_size,
            "regions": self.regions,
            "cam_model": self.cam_model,
            "cam_class": self.cam_class,
            "cam": "classifier" if self.cam_model else "saliency: channel-mean activation of the encoder",
            "cam_weights_digest": self.cam_digest,
        }

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_net": None, "_images": {}, "_views": {}}

    def _new_net(self) -> _CamNet:
        return _CamNet(self.cam_model, self.cam_weights, self.cam_class, self.pretrained)

    def image(self, path) -> np.ndarray:
        """A decoded image of the current bag (each image is decoded once per bag)."""
        key = str(path)
        if key not in self._images:
            self._images[key] = read_image(Path(path))
        return self._images[key]

    # The CAM network runs where the backbone runs (the compute device, in the main process), on a
    # batch of the bag's global views: workers only decode (``prepare``), the main process plans and
    # crops (``plan_prepared``).
    plan_on_device = True

    def prepare(self, bag: BagSpec) -> dict:
        """Worker side: the bag's images, decoded once, with what planning needs of them that no
        network does (the global views, the foreground grids), so that the main process only runs
        the CAM network and crops."""
        images = [read_image(Path(p)) for p in bag.paths]
        return {
            "images": [torch.from_numpy(image) for image in images],
            "views": torch.from_numpy(np.stack([_resize(i, self.global_size, self.global_size) for i in images])),
            "foreground": [torch.from_numpy(self._foreground(image)) for image in images],
        }

    def prepared_size(self, prepared: dict) -> tuple[int, int]:
        """The bag's global views (the CAM network's inputs) and its decoded images' bytes."""
        return len(prepared["views"]), sum(image.numel() * image.element_size() for image in prepared["images"])

    def plan_prepared(self, bag: BagSpec, prepared: dict, embedder=None) -> PlannedBag:
        """Main-process side: CAMs of the global views in one batch on the embedder's device, the
        top regions, and the pixels of the instances to embed. Where the saliency CAM's input is
        exactly a global instance's model input, one forward gives the view's CAM and its embedding."""
        cams, view_embeddings = self._cams(prepared["views"], embedder)
        return self._planned(bag, prepared, cams, view_embeddings)

    def plan_prepared_many(self, bags: list[BagSpec], prepared: list[dict], embedder) -> list[PlannedBag | str]:
        """Several bags' CAMs from one forward over all their global views (a bag's two views alone
        made a batch of two, which ran at 0.6x the backbone's batched rate on the CPU), then each
        bag planned on its own. If that forward fails, each bag is planned alone, so that a failure
        is its own bag's."""
        counts = [len(p["views"]) for p in prepared]
        try:
            cams, view_embeddings = self._cams(torch.cat([p["views"] for p in prepared]), embedder)
        except Exception:
            return super().plan_prepared_many(bags, prepared, embedder)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)

        def plan_one(i: int, bag: BagSpec, items: dict) -> PlannedBag:
            mine = slice(starts[i], starts[i + 1])
            return self._planned(bag, items, cams[mine], None if view_embeddings is None else view_embeddings[mine])

        return plan_each(bags, prepared, plan_one)

    def _cams(self, views: torch.Tensor, embedder) -> tuple[np.ndarray, torch.Tensor | None]:
        """The CAMs of global views (n × side × side × 3 uint8), and their embeddings when the same
        forward gives them (see ``_shares_forward``)."""
        if self._shares_forward(embedder):
            maps, view_embeddings = embedder.with_feature_maps(views)
            return activation_maps(maps), view_embeddings
        if self.cam_model is None:
            if embedder is None:
                raise ExtractionError("the saliency CAM runs the extraction's encoder: plan with its Embedder")
            return activation_maps(embedder.feature_maps(views)), None
        if self._net is None:
            self._net = self._new_net().to(embedder.device if embedder is not None else torch.device("cpu"))
        return self._net(views.numpy()), None

    def _planned(
        self, bag: BagSpec, prepared: dict, cams: np.ndarray, view_embeddings: torch.Tensor | None
    ) -> PlannedBag:
        """A bag's plan from its decoded images and its views' CAMs: the top regions of each image,
        and the pixels of the instances left to embed."""
        self._images = {str(p): np.asarray(image) for p, image in zip(bag.paths, prepared["images"], strict=True)}
        self._images_of = bag.bag_id
        views = prepared["views"].numpy()
        self._views = {str(p): view for p, view in zip(bag.paths, views, strict=True)}
        coords, kinds, images, scores, extras = [], [], [], [], {}
        for index, path in enumerate(bag.paths):
            image, cam = self.image(path), cams[index]
            height, width = image.shape[:2]
            extras[f"cam_{index}"] = _resize_map(cam, _CAM_SIDE).astype(np.float16)
            boxes, box_scores = self._regions(image, cam, prepared["foreground"][index].numpy())
            coords += [(0, 0, width, height), *boxes]
            kinds += [0] + [1] * len(boxes)
            images += [index] * (len(boxes) + 1)
            scores += [float(cam.sum()), *box_scores]
        attrs = {
            "kind": np.array(kinds, np.uint8),
            "image": np.array(images, np.uint8),
            "cam_score": np.array(scores, np.float32),
        }
        meta = {"images": [str(p) for p in bag.paths], "kinds": {"0": "global", "1": "region"}}
        plan = BagPlan(np.array(coords, np.int32), attrs, extras, meta)
        if view_embeddings is None:
            every = np.arange(len(plan))
            return PlannedBag(plan, self.read(bag, plan, every), every)
        regions = np.flatnonzero(attrs["kind"] == 1)
        embedded = (np.flatnonzero(attrs["kind"] == 0), view_embeddings)  # the views, in image order
        return PlannedBag(plan, self.read(bag, plan, regions), regions, embedded)

    def _shares_forward(self, embedder) -> bool:
        """Whether the saliency CAM can come from the forward that embeds the global views: the CAM
        is the embedding backbone's own (no --cam-model), and a global instance reaches the model as
        the CAM's input does (global size = region size = the backbone's input size: no resizing)."""
        if embedder is None or self.cam_model is not None or not embedder.gives_feature_maps:
            return False
        side = self.global_size
        encoder = embedder.backbone
        return self.region_size == side and tuple(encoder.input_size) == (side, side) and encoder.crop_pct == 1.0

    def plan(self, bag: BagSpec) -> BagPlan:
        return self.plan_prepared(bag, self.prepare(bag)).plan

    def _grid(self, image: np.ndarray) -> tuple[int, int, int]:
        """The scoring grid of an image: 16 cells per region side (exact enough, small)."""
        scale = max(1, self.region_size // 16)
        return scale, -(-image.shape[0] // scale), -(-image.shape[1] // scale)

    def _foreground(self, image: np.ndarray) -> np.ndarray:
        """Which cells of the scoring grid are brighter than the background (air around the breast)."""
        _, h, w = self._grid(image)
        grey = _resize(image, w, h).mean(2)
        return grey > grey.min() + _FOREGROUND_LEVEL * (grey.max() - grey.min())

    def _regions(self, image: np.ndarray, cam: np.ndarray, foreground: np.ndarray | None = None) -> tuple[list, list]:
        """The top squares of the grid by CAM mass, among those holding foreground."""
        height, width = image.shape[:2]
        side = self.region_size
        scale, h, w = self._grid(image)
        cam_map = _resize_map(cam, (w, h))
        foreground = self._foreground(image) if foreground is None else foreground
        boxes, scores = [], []
        cells = side // scale
        for y in range(0, height, side):
            for x in range(0, width, side):
                ys, xs = slice(y // scale, y // scale + cells), slice(x // scale, x // scale + cells)
                if foreground[ys, xs].any():
                    boxes.append((x, y, x + side, y + side))
                    scores.append(float(cam_map[ys, xs].sum()))
        order = np.argsort(-np.asarray(scores), kind="stable")[: self.regions]
        return [boxes[i] for i in order], [scores[i] for i in order]

    def read(self, bag: BagSpec, plan: BagPlan, indices: np.ndarray) -> np.ndarray:
        if getattr(self, "_images_of", None) != bag.bag_id:  # keep one bag's images, not every bag's
            self._images, self._views, self._images_of = {}, {}, bag.bag_id
        side = self.region_size
        out = np.empty((len(indices), side, side, 3), np.uint8)
        for row, i in enumerate(indices):
            image = self.image(bag.paths[int(plan.attrs["image"][i])])
            if plan.attrs["kind"][i] == 0:
                view = self._views.get(str(bag.paths[int(plan.attrs["image"][i])]))
                view = _resize(image, self.global_size, self.global_size) if view is None else view
                out[row] = _resize(view, side, side)
                continue
            x0, y0, x1, y1 = (int(v) for v in plan.coords[i])
            crop = np.zeros((side, side, 3), np.uint8)  # beyond the image: black, as mammogram background
            part = image[y0:y1, x0:x1]
            crop[: part.shape[0], : part.shape[1]] = part
            out[row] = crop
        return out


def _resize_map(cam: np.ndarray, size) -> np.ndarray:
    import torch.nn.functional as F

    width, height = (size, size) if isinstance(size, int) else size
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()

"""Going back from a store to pixels, and from pixels to the store's embedding space.

A store keeps, per bag, the plan its source made (coordinates, attributes, the images it read) and
the source's settings; ``reread`` asks the same source for the pixels of any of its instances again,
so nothing is tiled twice (contact sheets of search results, end-to-end fine-tuning).
``embed_images`` embeds new images exactly as the store's instances were embedded: the same
backbone, weights (checked by digest) and preprocessing.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from milcache.errors import ExtractionError, StoreMismatchError
from milcache.extractor.backbones import Backbone, create_backbone
from milcache.extractor.sources import SOURCES, BagPlan, Source, create_source, normalise_images
from milcache.store import FeatureStore
from milcache.store.tables import BagSpec


def source_of(store: FeatureStore) -> Source:
    """The source that extracted ``store``, rebuilt from the settings recorded in store.json."""
    settings = dict(store.metadata.source)
    kind = settings.pop("kind", None)
    if kind not in SOURCES:
        raise ExtractionError(
            f"{store.path} was not made by `milcache extract` (its source is {kind!r}), so its instances "
            "cannot be read again from images"
        )
    taken = set(inspect.signature(SOURCES.get(kind).__init__).parameters)
    return create_source(kind, **{k: v for k, v in settings.items() if k in taken})


def reread(
    store: FeatureStore, source: Source, bag_id: str, instances: np.ndarray, spec: BagSpec | None = None
) -> np.ndarray:
    """Pixels of instances ``instances`` of ``bag_id``, read again from the bag's images: those the
    store recorded, or those of ``spec`` (a manifest's row: the images may have moved since)."""
    bag = store.get(bag_id)
    meta = dict(bag.meta or {})
    if spec is None:
        files = meta.get("files")
        if not files:
            raise ExtractionError(f"bag {bag_id!r} of {store.path} does not record its image files (an older store)")
        spec = BagSpec(bag_id, [Path(f["path"]) for f in files])
    missing = [str(p) for p in spec.paths if not Path(p).exists()]
    if missing:
        raise ExtractionError(f"bag {bag_id!r}: its image file(s) moved or were deleted: {', '.join(missing)}")
    images = meta.get("images")
    if isinstance(images, list) and len(images) == len(spec.paths):  # the plan reads these paths
        meta["images"] = [
            {**image, "path": str(path)} if isinstance(image, dict) else str(path)
            for image, path in zip(images, spec.paths, strict=True)
        ]
    plan = BagPlan(coords=bag.coords, attrs=dict(bag.attrs), meta=meta)
    return source.read(spec, plan, np.asarray(instances, dtype=np.int64))


def store_backbone(store: FeatureStore, weights: str | Path | None = None) -> Backbone:
    """The backbone that extracted ``store``, with its weights and preprocessing; ``weights`` must be
    the very file it was extracted with (checked by digest)."""
    meta = store.metadata
    recorded = meta.weights_digest
    pretrained = recorded.startswith("timm-pretrained:")
    if recorded.startswith("sha256:") and weights is None:
        raise StoreMismatchError(f"{store.path} was extracted with a weights file: give it with --weights")
    # random-init backbones are seeded, so they too are rebuilt exactly
    backbone = create_backbone(meta.backbone, None if pretrained else weights, pretrained, **meta.preprocessing)
    if backbone.weights_digest != recorded:
        raise StoreMismatchError(
            f"weights: store has {recorded}, {weights} is {backbone.weights_digest}; give the file the store was "
            "extracted with"
        )
    return backbone


@torch.inference_mode()
def embed_images(backbone: Backbone, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Embeddings (n × dim, float32) of uint8 images (n × H × W × C) as the extractor makes them."""
    model = backbone.model.to(device).eval()
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)  # a writable copy
    return model(normalise_images(pixels, backbone)).float().cpu().numpy()


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image file as uint8 (1 × H × W × 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (OSError, UnidentifiedImageError) as exc:
        raise ExtractionError(f"{path}: cannot read as an image ({exc})") from None

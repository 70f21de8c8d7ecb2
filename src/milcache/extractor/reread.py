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
from milcache.extractor.encoders import Encoder, create_encoder
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


def store_backbone(store: FeatureStore, weights: str | Path | None = None) -> Encoder:
    """The encoder that extracted ``store``, rebuilt from its embedding spec; ``weights`` must be the
    very file it was extracted with (checked by digest; a preset's may come from the Hugging Face
    cache). Any field of the rebuilt encoder's spec that differs from the store's is refused."""
    from milcache.extractor.presets import PRESETS

    meta = store.metadata
    recorded = meta.weights_digest or "random-init"
    from_cache = weights is None and (
        recorded.startswith("timm-pretrained:") or (recorded.startswith("sha256:") and meta.backbone in PRESETS)
    )
    if recorded.startswith("sha256:") and weights is None and not from_cache:
        raise StoreMismatchError(f"{store.path} was extracted with a weights file: give it with --weights")
    # random-init encoders are seeded, so they too are rebuilt exactly
    encoder = create_encoder(
        meta.backbone,
        weights,
        from_cache,
        args=meta.encoder_args,
        token_rule=meta.token_rule,
        **meta.preprocessing,
    )
    rebuilt = encoder.spec(meta.source)
    meta.embedding.require_same(
        rebuilt,
        this="store has",
        that=f"{weights or 'the rebuilt encoder'} has",
        advice="give the weights the store was extracted with",
    )
    return encoder


@torch.inference_mode()
def embed_images(encoder: Encoder, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Embeddings (n × dim, float32) of uint8 images (n × H × W × C) as the extractor makes them."""
    encoder.model.to(device).eval()
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)  # a writable copy
    return encoder.embed(normalise_images(pixels, encoder)).float().cpu().numpy()


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image file as uint8 (1 × H × W × 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    except (OSError, UnidentifiedImageError) as exc:
        raise ExtractionError(f"{path}: cannot read as an image ({exc})") from None

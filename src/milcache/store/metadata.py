"""store.json: everything needed to know what the embeddings of a store are and how they were made."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from milcache.errors import StoreError, StoreMismatchError
from milcache.store.spec import DEFAULT_TOKEN_RULE, EmbeddingSpec

SCHEMA_VERSION = 1
METADATA_FILE = "store.json"
DTYPES = ("float16", "float32")
_VERSIONED_PACKAGES = ("milcache", "torch", "timm", "numpy", "lmdb", "openslide-python")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the embeddings, read without importing them."""
    found = {}
    for name in _VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass
class StoreMetadata:
    """The contents of store.json.

    The embedding spec's fields (``embedding``) are kept flat, as stores have always written them:
    ``backbone`` (the encoder: a preset or timm name), ``encoder_args`` (its architecture
    arguments), ``weights_digest``, ``dim``, ``preprocessing`` (input size, crop, interpolation,
    mean, std), ``token_rule`` and ``source`` (kind, tile size, stride, mpp/level, ...), so that
    the encoder and its preprocessing can be rebuilt from the store alone. ``coords`` names the
    columns of every bag's coordinate array (for example ``["x", "y", "level"]``).
    """

    backbone: str
    dim: int
    dtype: str = "float16"
    weights_digest: str | None = None
    preprocessing: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    encoder_args: dict = field(default_factory=dict)
    token_rule: str = DEFAULT_TOKEN_RULE
    coords: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    versions: dict = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"embedding dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if int(self.dim) <= 0:
            raise StoreError(f"embedding dim must be positive, not {self.dim}")
        self.dim = int(self.dim)
        self.coords = list(self.coords)

    @classmethod
    def for_embedding(cls, spec: EmbeddingSpec, *, dtype: str, coords: list[str]) -> StoreMetadata:
        """The metadata of a new store of embeddings made as ``spec`` says."""
        return cls(
            backbone=spec.encoder,
            dim=spec.dim,
            dtype=dtype,
            weights_digest=spec.weights_digest,
            preprocessing=spec.preprocessing,
            source=spec.source,
            encoder_args=spec.encoder_args,
            token_rule=spec.token_rule,
            coords=coords,
        )

    @property
    def embedding(self) -> EmbeddingSpec:
        """What this store's embeddings mean (see ``milcache.store.spec``)."""
        return EmbeddingSpec(
            encoder=self.backbone,
            dim=self.dim,
            weights_digest=self.weights_digest,
            encoder_args=self.encoder_args,
            preprocessing=self.preprocessing,
            token_rule=self.token_rule,
            source=self.source,
        )

    def check_compatible(self, existing: StoreMetadata, where: Path) -> None:
        """Refuse to mix embeddings that would not be comparable, naming the field and both sides."""
        if self.dtype != existing.dtype:
            raise StoreMismatchError(
                f"refusing to write into {where}: it stores {existing.dtype} embeddings, this run writes "
                f"{self.dtype}; use the store's --dtype, another --out, or --overwrite to start it over"
            )
        existing.embedding.require_same(
            self.embedding,
            this="store has",
            that="this run has",
            advice=f"refusing to write into {where}: use another --out, or --overwrite to start that store over",
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> StoreMetadata:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def read_metadata(store_dir: Path) -> StoreMetadata:
    path = Path(store_dir) / METADATA_FILE
    if not path.is_file():
        raise StoreError(f"{store_dir} is not a milcache store: {METADATA_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {data['schema_version']}; this milcache reads up to "
            f"{SCHEMA_VERSION}: upgrade milcache"
        )
    try:
        return StoreMetadata.from_dict(data)
    except TypeError as exc:
        raise StoreError(f"{path} is incomplete: {exc}") from None


def write_metadata(store_dir: Path, metadata: StoreMetadata) -> None:
    """Write store.json atomically: readers see the old file or the new one, never half of one."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store_dir, prefix=".store.json.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(metadata.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, store_dir / METADATA_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

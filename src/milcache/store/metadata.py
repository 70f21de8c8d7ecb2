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

SCHEMA_VERSION = 1
METADATA_FILE = "store.json"
DTYPES = ("float16", "float32")
# Two writers may share a store only if these agree: otherwise embeddings would not be comparable.
IDENTITY_FIELDS = ("backbone", "weights_digest", "dim", "dtype", "preprocessing", "source")
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

    ``source`` holds the extraction settings (kind, tile size, stride, mpp/level, ...) and
    ``preprocessing`` the backbone input settings (size, mean, std, interpolation), so that the
    preprocessing can be rebuilt from the store alone. ``coords`` names the columns of every
    bag's coordinate array (for example ``["x", "y", "level"]``).
    """

    backbone: str
    dim: int
    dtype: str = "float16"
    weights_digest: str | None = None
    preprocessing: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
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

    def identity(self) -> dict:
        # A JSON round trip makes tuples and lists compare equal, as they will once read back.
        return json.loads(json.dumps({name: getattr(self, name) for name in IDENTITY_FIELDS}))

    def check_compatible(self, existing: StoreMetadata, where: Path) -> None:
        """Refuse to mix embeddings that would not be comparable, naming both sides."""
        mine, theirs = self.identity(), existing.identity()
        differing = [name for name in IDENTITY_FIELDS if mine[name] != theirs[name]]
        if differing:
            sides = "; ".join(f"{name}: store has {theirs[name]!r}, this run has {mine[name]!r}" for name in differing)
            raise StoreMismatchError(
                f"refusing to write into {where}: it holds embeddings made differently ({sides}); "
                "use another --out, or --overwrite to start that store over"
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

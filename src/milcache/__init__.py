"""milcache: cache backbone embeddings of large medical images once, train MIL heads on them fast."""

from importlib.metadata import PackageNotFoundError, version

from milcache.errors import (
    ExtractionError,
    LabelError,
    ManifestError,
    MilcacheError,
    StoreError,
    StoreMismatchError,
)

try:
    __version__ = version("milcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ExtractionError",
    "LabelError",
    "ManifestError",
    "MilcacheError",
    "StoreError",
    "StoreMismatchError",
    "__version__",
]

"""milcache: cache backbone embeddings of large medical images once, train MIL heads on them fast.

The Python API mirrors the CLI, one function per command (``milcache.extract``, ``train_head``,
``tune``, ``predict``, ``fine_tune``, and ``milcache.index.build`` / ``search`` / ``kmeans`` /
``dedup``), plus the store and the head registry (``FeatureStore``, ``create_head``,
``list_heads``, ``register_head``). They load on first use, so that ``import milcache`` (and
``milcache --help``) stays instant.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from milcache.errors import (
    ExtractionError,
    LabelError,
    ManifestError,
    MilcacheError,
    OptionError,
    StoreError,
    StoreMismatchError,
)

try:
    __version__ = version("milcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# name → module that defines it, imported when the name is first used
_LAZY = {
    "extract": "milcache.api",
    "train_head": "milcache.api",
    "tune": "milcache.api",
    "predict": "milcache.api",
    "fine_tune": "milcache.api",
    "TrainResult": "milcache.api",
    "TuneResult": "milcache.api",
    "index": None,  # the module milcache.index itself
    "FeatureStore": "milcache.store",
    "Head": "milcache.aggregator.heads",
    "HeadOutput": "milcache.aggregator.heads",
    "create_head": "milcache.aggregator.heads",
    "list_heads": "milcache.aggregator.heads",
    "register_head": "milcache.aggregator.heads",
    "TrainConfig": "milcache.aggregator.config",
}

__all__ = [
    "ExtractionError",
    "LabelError",
    "ManifestError",
    "MilcacheError",
    "OptionError",
    "StoreError",
    "StoreMismatchError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'milcache' has no attribute {name!r}")
    module = _LAZY[name]
    value = (
        importlib.import_module(f"milcache.{name}")
        if module is None
        else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

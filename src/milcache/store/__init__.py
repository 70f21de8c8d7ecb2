"""The feature store (LMDB, one record per bag), manifests, and import / export."""

from milcache.store.interop import export_h5, import_embeddings
from milcache.store.lmdb_store import FeatureStore, StoreWriter
from milcache.store.metadata import StoreMetadata
from milcache.store.record import Bag
from milcache.store.tables import Manifest, read_labels, read_manifest

__all__ = [
    "Bag",
    "FeatureStore",
    "Manifest",
    "StoreMetadata",
    "StoreWriter",
    "export_h5",
    "import_embeddings",
    "read_labels",
    "read_manifest",
]

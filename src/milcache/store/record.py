"""Binary layout of one bag record: the value stored under a bag id in an LMDB shard.

    b"MILCREC1" | u32 header length | JSON header | padding to 64 | data region

The header lists every array (name, dtype, shape, offset into the data region) and the CRC-32 of the
data region, plus the bag's free-form ``meta`` dict. Arrays start on 64-byte boundaries of the data
region so that a reader can view them in place (``np.frombuffer``) without copying.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"MILCREC1"
_ALIGN = 64
_PREFIX = struct.Struct("<8sI")


class CorruptRecord(ValueError):
    """The bytes of a record do not decode or do not match their checksum."""


@dataclass(frozen=True)
class Bag:
    """One bag as read from a store. Arrays are read-only views into the store's memory map.

    ``copy()`` detaches them from the store.
    """

    bag_id: str
    embeddings: np.ndarray  # (n, dim)
    coords: np.ndarray  # (n, k) int32; the meaning of the k columns is in store.json
    attrs: dict[str, np.ndarray] = field(default_factory=dict)  # per instance, each (n,)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per bag, any shape (e.g. a CAM)
    meta: dict = field(default_factory=dict)  # per bag, JSON (e.g. label, source files)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def copy(self) -> Bag:
        return Bag(
            self.bag_id,
            self.embeddings.copy(),
            self.coords.copy(),
            {k: v.copy() for k, v in self.attrs.items()},
            {k: v.copy() for k, v in self.extras.items()},
            dict(self.meta),
        )


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode(bag: Bag) -> bytes:
    """Serialise a bag into one record (the arrays must already have their final dtypes)."""
    named = {"embeddings": bag.embeddings, "coords": bag.coords}
    named.update({f"attrs.{k}": v for k, v in bag.attrs.items()})
    named.update({f"extras.{k}": v for k, v in bag.extras.items()})
    entries, chunks, offset = [], [], 0
    for name, array in named.items():
        data = np.ascontiguousarray(array)
        entries.append({"name": name, "dtype": data.dtype.str, "shape": list(data.shape), "offset": offset})
        chunks.append(data.tobytes())
        padding = _pad(data.nbytes)
        chunks.append(b"\0" * padding)
        offset += data.nbytes + padding
    payload = b"".join(chunks)
    header = json.dumps(
        {"arrays": entries, "crc32": zlib.crc32(payload), "meta": bag.meta}, separators=(",", ":")
    ).encode()
    prefix = _PREFIX.pack(MAGIC, len(header)) + header
    return b"".join([prefix, b"\0" * _pad(len(prefix)), payload])


def read_header(buffer: bytes | memoryview) -> tuple[dict, int]:
    """The header dict and the offset of the data region, without touching the arrays."""
    if len(buffer) < _PREFIX.size:
        raise CorruptRecord("record shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise CorruptRecord(f"bad magic {bytes(magic)!r}")
    end = _PREFIX.size + header_len
    if end > len(buffer):
        raise CorruptRecord("header runs past the end of the record")
    try:
        header = json.loads(bytes(buffer[_PREFIX.size : end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"unreadable header: {exc}") from None
    return header, end + _pad(end)


def decode(bag_id: str, buffer: bytes | memoryview, check: bool = False) -> Bag:
    """Build a Bag whose arrays view ``buffer`` in place; ``check`` also verifies the CRC-32."""
    header, start = read_header(buffer)
    view = memoryview(buffer)[start:]
    if check and zlib.crc32(view) != header.get("crc32"):
        raise CorruptRecord("checksum mismatch")
    arrays = {}
    try:
        for entry in header["arrays"]:
            dtype = np.dtype(entry["dtype"])
            shape = tuple(entry["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if entry["offset"] + count * dtype.itemsize > len(view):
                raise CorruptRecord(f"array {entry['name']!r} runs past the end of the record")
            flat = np.frombuffer(view, dtype=dtype, count=count, offset=entry["offset"])
            arrays[entry["name"]] = flat.reshape(shape)
    except (KeyError, TypeError) as exc:
        raise CorruptRecord(f"malformed header: {exc}") from None
    if "embeddings" not in arrays or "coords" not in arrays:
        raise CorruptRecord("record lacks embeddings or coords")
    return Bag(
        bag_id=bag_id,
        embeddings=arrays.pop("embeddings"),
        coords=arrays.pop("coords"),
        attrs={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("attrs.")},
        extras={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("extras.")},
        meta=header.get("meta") or {},
    )

"""Binary layout of one bag record: the value stored under a bag id in an LMDB shard.

    b"MILCREC2" | u32 header length | u32 CRC-32 | JSON header | padding to 64 | data region

The header lists every array (name, dtype, shape, offset into the data region) and holds the bag's
free-form ``meta`` dict. The CRC-32 covers the header and the data region together, so a flipped
bit anywhere after the prefix (a value, a shape, a label in meta) is caught. Arrays start on
64-byte boundaries of the data region so that a reader can view them in place (``np.frombuffer``).
Records of the first layout (b"MILCREC1": no CRC in the prefix, the CRC of the data region in the
header) are still read.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"MILCREC2"
_MAGIC_V1 = b"MILCREC1"
_ALIGN = 64
_PREFIX = struct.Struct("<8sII")
_PREFIX_V1 = struct.Struct("<8sI")


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
    header = json.dumps({"arrays": entries, "meta": bag.meta}, separators=(",", ":")).encode()
    padding = b"\0" * _pad(_PREFIX.size + len(header))
    crc = zlib.crc32(payload, zlib.crc32(padding, zlib.crc32(header)))
    return b"".join([_PREFIX.pack(MAGIC, len(header), crc), header, padding, payload])


def read_header(buffer: bytes | memoryview) -> tuple[dict, int]:
    """The header dict and the offset of the data region, without touching the arrays."""
    header, start, _ = _parse(buffer)
    return header, start


def _parse(buffer: bytes | memoryview) -> tuple[dict, int, int | None]:
    """Header, data offset, and the offset from which the stored CRC-32 runs (None: a v1 record,
    whose CRC in the header covers the data region only)."""
    if len(buffer) < _PREFIX_V1.size:
        raise CorruptRecord("record shorter than its prefix")
    magic = bytes(buffer[:8])
    if magic == MAGIC and len(buffer) >= _PREFIX.size:
        _, header_len, _ = _PREFIX.unpack_from(buffer, 0)
        begin, covered_from = _PREFIX.size, _PREFIX.size
    elif magic == _MAGIC_V1:
        _, header_len = _PREFIX_V1.unpack_from(buffer, 0)
        begin, covered_from = _PREFIX_V1.size, None
    else:
        raise CorruptRecord(f"bad magic {magic!r}")
    end = begin + header_len
    if end > len(buffer):
        raise CorruptRecord("header runs past the end of the record")
    try:
        header = json.loads(bytes(buffer[begin:end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptRecord("malformed header: not a mapping")
    return header, end + _pad(end), covered_from


def checksum_ok(buffer: bytes | memoryview) -> bool:
    """Whether the record's bytes are those written (header, meta and arrays)."""
    return _crc_ok(buffer, *_parse(buffer))


def _crc_ok(buffer, header: dict, start: int, covered_from: int | None) -> bool:
    view = memoryview(buffer)
    if covered_from is None:
        return zlib.crc32(view[start:]) == header.get("crc32")
    return zlib.crc32(view[covered_from:]) == _PREFIX.unpack_from(buffer, 0)[2]


def decode(bag_id: str, buffer: bytes | memoryview, check: bool = True) -> Bag:
    """Build a Bag whose arrays view ``buffer`` in place, after verifying the record's CRC-32
    (``check=False`` skips that, for callers that just did)."""
    header, start, covered_from = _parse(buffer)
    if check and not _crc_ok(buffer, header, start, covered_from):
        raise CorruptRecord("checksum mismatch: the record's bytes changed after it was written")
    view = memoryview(buffer)[start:]
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
    except (KeyError, TypeError, ValueError) as exc:
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

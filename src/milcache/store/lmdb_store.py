"""The LMDB feature store: one record per bag, one shard per writer process, read as one store."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import lmdb
import numpy as np

from milcache.errors import StoreError
from milcache.store.metadata import METADATA_FILE, StoreMetadata, read_metadata, write_metadata
from milcache.store.record import Bag, CorruptRecord, decode, encode, read_header

_BAGS_DB = b"bags"
_FAILURES_DB = b"failures"
_SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.mdb$")
_INITIAL_MAP_SIZE = 1 << 30  # sparse on Linux/macOS: costs no disk until used
_MAX_GROWTHS = 40
_READER_MAP_SIZE = 1 << 40  # address space only (1 TiB of 128 TiB); nothing is read until used
_CREATE_LOCK = ".create.lock"  # held exclusively while a writer checks or creates store.json
_WRITERS_LOCK = ".writers.lock"  # held shared by every writer while it lives


@contextlib.contextmanager
def _exclusive(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shard_path(store_dir: Path, shard: int) -> Path:
    return Path(store_dir) / f"shard-{shard:05d}.mdb"


def _shard_lock(shard: Path) -> Path:
    """The lock every writer of ``shard`` holds shared for its life (exclusive to start it over)."""
    return shard.with_name(f".{shard.stem}.writer.lock")


def shard_paths(store_dir: Path) -> list[Path]:
    return sorted(p for p in Path(store_dir).iterdir() if _SHARD_PATTERN.match(p.name))


def remove_store(store_dir: Path) -> None:
    """Delete a store's files (store.json and every shard), leaving other files alone."""
    store_dir = Path(store_dir)
    if not store_dir.exists():
        return
    for path in shard_paths(store_dir):
        path.unlink()
        Path(f"{path}-lock").unlink(missing_ok=True)
    (store_dir / METADATA_FILE).unlink(missing_ok=True)
    for stale in store_dir.glob(".store.json.*"):
        stale.unlink()


def discard_if_empty(store_dir: Path) -> bool:
    """Remove a store that holds nothing (store.json written, no bag or failure ever stored: a
    run that failed before its first write), and its folder when nothing else is in it, so that a
    corrected rerun starts anew. Leaves it while any writer still holds it. True if removed."""
    store_dir = Path(store_dir)
    if not (store_dir / METADATA_FILE).exists() or shard_paths(store_dir):
        return False
    with _exclusive(store_dir / _CREATE_LOCK), open(store_dir / _WRITERS_LOCK, "a") as writers:
        try:
            fcntl.flock(writers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another writer is at work: the store is not ours alone
        if shard_paths(store_dir):
            return False
        remove_store(store_dir)
        (store_dir / _WRITERS_LOCK).unlink(missing_ok=True)
        for lock in store_dir.glob(".shard-*.writer.lock"):
            lock.unlink()
    (store_dir / _CREATE_LOCK).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        store_dir.rmdir()  # only when empty: the user's other files stay
    return True


def staging_dir(parent: Path, *, prefix: str) -> Path:
    """A new folder in ``parent`` (or its nearest existing ancestor: a failed write creates no
    folders) to write a store aside before it is published; staging folders of processes that
    died (killed half-way) are removed first."""
    import shutil
    import tempfile

    parent = Path(parent).absolute()
    while not parent.exists():
        parent = parent.parent
    for stale in parent.glob(f"{prefix}*"):
        owner = stale.name[len(prefix) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_store(staging: Path, out: Path, *, overwrite: bool) -> None:
    """Make the complete store in ``staging`` the store ``out``: by one rename when ``out`` does not
    exist; else, with ``overwrite`` (refused while another process writes to ``out``) or into an
    empty folder, its shards then its store.json move in, so readers never see a store.json whose
    shards are missing."""
    out = Path(out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, out)
            return
        except OSError:  # another process made ``out`` meanwhile: publish into it as into a folder
            pass
    with open(out / _WRITERS_LOCK, "a") as writing, _exclusive(out / _CREATE_LOCK):
        if (out / METADATA_FILE).exists() or shard_paths(out):
            if not overwrite:
                raise StoreError(f"{out} became a store while this one was written; nothing was changed")
            try:
                fcntl.flock(writing, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"cannot overwrite {out}: another process is writing to it right now") from None
            remove_store(out)
        for shard in shard_paths(staging):
            os.rename(shard, out / shard.name)
        os.rename(staging / METADATA_FILE, out / METADATA_FILE)


def add_shard(store_dir: Path, staging: Path) -> None:
    """Add the bags of the store in ``staging`` (one shard, metadata checked compatible) to the store
    ``store_dir`` as its next shard, by one rename: readers see all of them or none."""
    shards = shard_paths(staging)
    if not shards:
        return
    store_dir = Path(store_dir)
    with _exclusive(store_dir / _CREATE_LOCK):
        taken = [int(_SHARD_PATTERN.match(p.name).group(1)) for p in shard_paths(store_dir)]
        os.rename(shards[0], shard_path(store_dir, max(taken, default=-1) + 1))


class StoreWriter:
    """Writes bags into one shard of a store; each ``put`` is one LMDB transaction.

    A bag is therefore in the store whole or not at all, also when the process is killed. Several
    processes write several shards (``shard=rank``) of one store; their metadata must agree. The
    identity check and the creation of store.json happen under an exclusive lock, so of two writers
    with different settings starting together on a new store one is refused by name; every writer
    then holds a shared lock for its lifetime, so ``overwrite`` cannot delete a store being written.
    The shard itself is opened at the first write: a process may fork workers after the checks
    without them inheriting an open LMDB environment.
    """

    def __init__(
        self,
        store_dir: str | Path,
        metadata: StoreMetadata,
        shard: int = 0,
        overwrite: bool = False,
        map_size: int = _INITIAL_MAP_SIZE,
        *,
        restart_shard: bool = False,
    ) -> None:
        self.path = Path(store_dir)
        self.metadata = metadata
        self._file = shard_path(self.path, shard)
        self._map_size = map_size
        self._env = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._writing = open(self.path / _WRITERS_LOCK, "a")  # noqa: SIM115  (held for the writer's life)
            self._writing_shard = open(_shard_lock(self._file), "a")  # noqa: SIM115  (likewise, for its shard)
        except OSError as exc:
            raise StoreError(f"cannot write the store {self.path}: {exc}") from None
        with _exclusive(self.path / _CREATE_LOCK):
            if overwrite:
                self._remove_unless_in_use()
            if restart_shard:
                self._remove_shard_unless_in_use()
            fcntl.flock(self._writing, fcntl.LOCK_SH)
            fcntl.flock(self._writing_shard, fcntl.LOCK_SH)
            if (self.path / METADATA_FILE).exists():
                existing = read_metadata(self.path)
                metadata.check_compatible(existing, self.path)
                self.metadata = existing
            else:
                write_metadata(self.path, metadata)

    def _remove_unless_in_use(self) -> None:
        try:
            fcntl.flock(self._writing, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"cannot overwrite {self.path}: another process is writing to it right now") from None
        remove_store(self.path)

    def _remove_shard_unless_in_use(self) -> None:
        """Start this writer's shard over (``extract --overwrite`` of one shard of several), unless
        another process writes it right now."""
        try:
            fcntl.flock(self._writing_shard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"cannot start {self._file.name} of {self.path} over: another process is writing it right now"
            ) from None
        self._file.unlink(missing_ok=True)
        Path(f"{self._file}-lock").unlink(missing_ok=True)

    def _open(self):
        if self._env is None:
            try:
                self._env = lmdb.open(
                    str(self._file),
                    subdir=False,
                    map_size=self._map_size,
                    max_dbs=2,
                    meminit=False,
                    readahead=False,
                )
            except lmdb.Error as exc:
                raise StoreError(f"cannot open {self._file} for writing: {exc}") from None
            self._bags = self._env.open_db(_BAGS_DB)
            self._failures = self._env.open_db(_FAILURES_DB)
        return self._env

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if not self._writing.closed:
            self._writing.close()  # releases the shared lock
        if not self._writing_shard.closed:
            self._writing_shard.close()

    def put(
        self,
        bag_id: str,
        embeddings: np.ndarray,
        coords: np.ndarray | None = None,
        attrs: Mapping[str, np.ndarray] | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        meta: dict | None = None,
    ) -> None:
        """Store one bag (replacing an earlier record or failure of the same id)."""
        bag = self._validated(bag_id, embeddings, coords, attrs or {}, extras or {}, meta or {})
        key = _key(bag_id)
        record = encode(bag)

        def write(txn: lmdb.Transaction) -> None:
            txn.put(key, record, db=self._bags)
            txn.delete(key, db=self._failures)

        self._transact(write, bag_id)

    def fail(self, bag_id: str, reason: str) -> None:
        """Record that a bag could not be made, with a reason a human can act on."""
        key = _key(bag_id)
        value = json.dumps({"reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()

        def write(txn: lmdb.Transaction) -> None:
            txn.delete(key, db=self._bags)
            txn.put(key, value, db=self._failures)

        self._transact(write, bag_id)

    def _transact(self, write, bag_id: str) -> None:
        self._open()
        for _ in range(_MAX_GROWTHS):
            try:
                with self._env.begin(write=True) as txn:  # aborted on any exception
                    write(txn)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
            except lmdb.MapResizedError:  # another writer of this shard grew it: adopt its size
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise StoreError(
                    f"could not write bag {bag_id!r} to {self._file}: {exc}; the store is unchanged (is the disk full?)"
                ) from None
        raise StoreError(f"bag {bag_id!r} does not fit in {self._file} even after growing its map")

    def _validated(self, bag_id, embeddings, coords, attrs, extras, meta) -> Bag:
        if not isinstance(bag_id, str) or not bag_id:
            raise StoreError(f"bag id must be a non-empty string, not {bag_id!r}")
        emb = np.asarray(embeddings)
        dim = self.metadata.dim
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise StoreError(f"bag {bag_id!r}: embeddings must be (n, {dim}), got shape {emb.shape}")
        n = emb.shape[0]
        if n == 0:
            raise StoreError(f"bag {bag_id!r} has no instances; record it with fail() instead")
        if not np.isfinite(emb).all():
            bad = int((~np.isfinite(emb)).any(axis=1).sum())
            raise StoreError(f"bag {bag_id!r}: {bad} of {n} embeddings contain NaN or Inf")
        with np.errstate(over="ignore"):  # overflow is reported below, by bag
            emb = emb.astype(self.metadata.dtype, copy=False)
        if emb.dtype == np.float16 and not np.isfinite(emb).all():
            raise StoreError(f"bag {bag_id!r}: embeddings overflow float16; write the store as float32")
        k = len(self.metadata.coords)
        coords = np.zeros((n, k), np.int32) if coords is None else np.asarray(coords)
        if coords.shape != (n, k):
            raise StoreError(
                f"bag {bag_id!r}: coords must be (n, {k}) = ({n}, {k}) for columns "
                f"{self.metadata.coords}, got shape {coords.shape}"
            )
        if coords.size and (np.abs(coords).max() > np.iinfo(np.int32).max):
            raise StoreError(f"bag {bag_id!r}: coordinates do not fit in int32")
        checked_attrs = {}
        for name, values in attrs.items():
            values = np.asarray(values)
            if values.shape != (n,) or values.dtype.kind not in "biuf":
                raise StoreError(
                    f"bag {bag_id!r}: attribute {name!r} must be numeric with shape ({n},), "
                    f"got {values.dtype} {values.shape}"
                )
            checked_attrs[name] = values
        try:
            json.dumps(meta)
        except TypeError as exc:
            raise StoreError(f"bag {bag_id!r}: meta must be JSON-serialisable: {exc}") from None
        extras = {name: np.asarray(value) for name, value in extras.items()}
        return Bag(bag_id, emb, coords.astype(np.int32, copy=False), checked_attrs, extras, meta)


def _key(bag_id: str) -> bytes:
    key = bag_id.encode("utf-8")
    if len(key) > 500:  # LMDB's default maximum key size is 511 bytes
        raise StoreError(f"bag id is too long ({len(key)} bytes, at most 500): {bag_id[:60]}...")
    return key


def _map_base(path: Path) -> int | None:
    """Start address of LMDB's memory map of ``path`` in this process (Linux), else None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[2] == "00000000" and fields[5].strip() == str(path):
                    return int(fields[0].split("-")[0], 16)
    except OSError:
        return None
    return None


class _Env:
    """One read-only LMDB environment per shard file and process (LMDB allows no second one); shared
    by every open FeatureStore of that file and kept alive by their snapshots."""

    _open: weakref.WeakValueDictionary[str, _Env] = weakref.WeakValueDictionary()

    def __init__(self, path: Path) -> None:
        self.path = path
        lock_file = Path(f"{path}-lock")
        # A store on read-only media (or in a folder we may not write) has no writer at work, and
        # LMDB could not create or open its lock file there: read it without the lock.
        lockable = os.access(lock_file, os.W_OK) if lock_file.exists() else os.access(path.parent, os.W_OK)
        if not os.access(path, os.R_OK):
            raise StoreError(f"cannot read the shard {path}: permission denied")
        try:
            self.env = lmdb.open(
                # readahead on: a bag is a long run of overflow pages, read start to end
                str(path),
                subdir=False,
                readonly=True,
                lock=lockable,
                max_dbs=2,
                readahead=True,
                # Map far more than the file: a writer growing the file then never forces a remap
                # (which LMDB allows only with no snapshot open, and which would move the map).
                map_size=_READER_MAP_SIZE,
            )
            self.bags = self.failures = None
            self.named_dbs()
        except lmdb.Error as exc:
            raise StoreError(f"cannot open shard {path}: {exc}") from None
        self.fd = os.open(path, os.O_RDONLY)
        self.base = _map_base(path.resolve())

    def named_dbs(self) -> tuple:
        """The shard's bags and failures databases, or None for both while a writer that has just
        created the file has not committed them yet: the shard holds no bag then, and a reader
        opening the store at that moment sees it empty (the next snapshot looks again)."""
        if self.failures is None:
            try:
                self.bags = self.env.open_db(_BAGS_DB, create=False)
                self.failures = self.env.open_db(_FAILURES_DB, create=False)
            except lmdb.NotFoundError:
                return None, None
        return self.bags, self.failures

    @classmethod
    def of(cls, path: Path) -> _Env:
        key = str(path.resolve())
        env = cls._open.get(key)
        if env is None:
            env = cls._open[key] = cls(path)
        return env

    def begin(self) -> lmdb.Transaction:
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:  # a writer grew the map past even _READER_MAP_SIZE: adopt it
            self.env.set_mapsize(0)
            self.base = _map_base(self.path.resolve())
            return self.env.begin(buffers=True)

    def __del__(self) -> None:
        try:
            self.env.close()
            os.close(self.fd)
        except (AttributeError, OSError, lmdb.Error):
            pass


class _Shard:
    """One consistent snapshot (a long-lived read transaction) of one shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env = _Env.of(path)
        self.bags, self.failures = self._env.named_dbs()
        self.txn = self._env.begin()

    def read_copy(self, view: memoryview) -> bytearray:
        """A copy of a record. Read with one pread where the map's address is known: a cold record
        then streams at disk speed instead of faulting in one page at a time."""
        out = bytearray(len(view))
        if self._env.base is not None:
            offset = np.frombuffer(view, np.uint8).ctypes.data - self._env.base if len(view) else 0
            if offset >= 0 and os.preadv(self._env.fd, [out], offset) == len(view):
                return out
        out[:] = view
        return out

    def keys(self, db) -> list[str]:
        if db is None:  # a shard being created (see _Env.named_dbs)
            return []
        # surrogateescape: a damaged key still round-trips to its bytes, so it can be named and read
        try:
            with self.txn.cursor(db=db) as cursor:
                return [bytes(k).decode("utf-8", "surrogateescape") for k in cursor.iternext(keys=True, values=False)]
        except lmdb.Error as exc:
            raise StoreError(f"the shard {self.path} is damaged ({exc}); its bags cannot be listed") from None

    def get(self, bag_id: str, db) -> memoryview | None:
        if db is None:
            return None
        try:
            return self.txn.get(bag_id.encode("utf-8", "surrogateescape"), db=db)
        except lmdb.Error as exc:
            raise StoreError(f"bag {bag_id!r} cannot be read from the damaged shard {self.path}: {exc}") from None

    def __del__(self) -> None:
        # Runs once neither the store nor any array viewing this snapshot is left (see _pinned), so
        # the pages those arrays view are never reused by a writer while they live.
        with contextlib.suppress(AttributeError, lmdb.Error):
            self.txn.abort()


class _Pin:
    """Exposes an array that views a shard's memory map while holding that shard alive, so the map
    outlives every array made from it (reading a closed map would crash the interpreter)."""

    def __init__(self, array: np.ndarray, shard: _Shard) -> None:
        self.__array_interface__ = array.__array_interface__
        self._array, self._shard = array, shard


def _pinned(bag: Bag, shard: _Shard) -> Bag:
    pin = lambda a: np.asarray(_Pin(a, shard))  # noqa: E731
    return Bag(
        bag.bag_id,
        pin(bag.embeddings),
        pin(bag.coords),
        {k: pin(v) for k, v in bag.attrs.items()},
        {k: pin(v) for k, v in bag.extras.items()},
        bag.meta,
    )


class FeatureStore:
    """Read access to every shard of a store, as one mapping of bag id → Bag, in key order.

    The store is read from a snapshot taken at open (or at ``refresh()``): a writer working at the
    same time never shows a half-written bag. Arrays of returned bags view the memory map in place
    (read-only) and keep it mapped for as long as they live, also after ``close()``.
    """

    def __init__(self, store_dir: str | Path) -> None:
        self.path = Path(store_dir)
        if not self.path.is_dir():
            raise StoreError(f"no store at {self.path}: not a directory")
        self.metadata = read_metadata(self.path)
        self._shards = [_Shard(p) for p in shard_paths(self.path)]
        self._index()

    def _index(self) -> None:
        self._where: dict[str, _Shard] = {}
        for shard in self._shards:
            for bag_id in shard.keys(shard.bags):
                other = self._where.setdefault(bag_id, shard)
                if other is not shard:
                    raise StoreError(
                        f"bag {bag_id!r} is in two shards of {self.path}: {other.path.name} and "
                        f"{shard.path.name}; remove one of them"
                    )
        self._ids = sorted(self._where)

    def refresh(self) -> None:
        """Take a new snapshot, so that bags written since opening become visible."""
        self._shards = [_Shard(p) for p in shard_paths(self.path)]  # old snapshots live on in their arrays
        self._index()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the shards; each closes once no bag array still views it."""
        self._shards, self._where, self._ids = [], {}, []

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, bag_id: object) -> bool:
        return bag_id in self._where

    def bag_ids(self) -> list[str]:
        return list(self._ids)

    def select(self, bag_ids: list[str] | None, purpose: str) -> list[str]:
        """Every bag (``bag_ids`` None) or the given ones, refusing unknown ids and an empty choice
        by name (``purpose``: what they are for, e.g. "to predict")."""
        chosen = self.bag_ids() if bag_ids is None else list(bag_ids)
        unknown = [b for b in chosen if b not in self._where]
        if unknown:
            raise StoreError(f"{len(unknown)} bag(s) {purpose} are not in {self.path}: {', '.join(unknown[:20])}")
        if not chosen:
            raise StoreError(f"{self.path} holds no bags {purpose}")
        return chosen

    def raw(self, bag_id: str) -> memoryview:
        """The record bytes of one bag, in place."""
        shard = self._where.get(bag_id)
        if shard is None:
            raise KeyError(bag_id)
        return shard.get(bag_id, shard.bags)

    def get(self, bag_id: str, check: bool = True, copy: bool = False) -> Bag:
        """One bag, its checksum verified (a corrupt record raises StoreError naming the bag;
        ``check=False`` skips that for callers that verified it already); ``copy`` detaches its
        arrays from the store (reading the whole record ahead, the fast way to load bags that are
        not in the page cache). Unknown ids raise KeyError."""
        raw = self.raw(bag_id)
        shard = self._where[bag_id]
        try:
            if copy:
                return decode(bag_id, shard.read_copy(raw), check=check)
            return _pinned(decode(bag_id, raw, check=check), shard)
        except CorruptRecord as exc:
            raise StoreError(f"bag {bag_id!r} in {self.path} is corrupt: {exc}") from None

    def __getitem__(self, bag_id: str) -> Bag:
        return self.get(bag_id)

    def __iter__(self) -> Iterator[Bag]:
        for bag_id in self._ids:
            yield self.get(bag_id)

    def sizes(self) -> dict[str, int]:
        """Number of instances of every bag, read from the record headers only."""
        out = {}
        for bag_id in self._ids:
            try:
                header, _ = read_header(self.raw(bag_id))
                out[bag_id] = int(next(a for a in header["arrays"] if a["name"] == "embeddings")["shape"][0])
            except (CorruptRecord, StopIteration, KeyError, IndexError) as exc:
                raise StoreError(f"bag {bag_id!r} in {self.path} is corrupt: {exc}") from None
        return out

    def failures(self) -> dict[str, str]:
        """Bags whose extraction failed (and that no shard holds a finished record of) → reason."""
        out = {}
        for shard in self._shards:
            for bag_id in shard.keys(shard.failures):
                if bag_id not in self._where:
                    out[bag_id] = json.loads(bytes(shard.get(bag_id, shard.failures)))["reason"]
        return dict(sorted(out.items()))

    def disk_bytes(self) -> int:
        """Bytes the store really occupies (LMDB maps are sparse files)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())

"""The extraction loop: sources read and decode in DataLoader workers, the backbone runs on the GPU
(bf16, channels_last, optionally compiled), and a writer thread stores each finished bag while the
next ones compute. Resumable, shardable over processes (torchrun or --shard i/n)."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from milcache import checks
from milcache.devices import PRECISIONS, autocast, resolve_device
from milcache.errors import ExtractionError, MilcacheError
from milcache.extractor.backbones import Backbone, create_backbone
from milcache.extractor.sources import BagPlan, Source
from milcache.store import FeatureStore, StoreMetadata, StoreWriter, read_manifest
from milcache.store.lmdb_store import shard_path
from milcache.store.tables import BagSpec


@dataclass
class ExtractConfig:
    backbone: str
    weights: str | None = None
    pretrained: bool = False  # timm weights from an already-filled local cache
    device: str = "auto"
    batch_size: int = 64
    workers: int = 4
    precision: str = "auto"  # one of devices.PRECISIONS
    compile: bool = False
    dtype: str = "float16"  # of the stored embeddings
    shard: tuple[int, int] | None = None  # (index, count); default from torchrun's RANK / WORLD_SIZE
    overwrite: bool = False
    reextract_changed: bool = False  # re-extract finished bags whose source files changed
    profile: bool = False  # synchronise the GPU after each batch to time the model alone
    preprocessing: dict = field(default_factory=dict)  # input_size / mean / std / interpolation overrides

    def __post_init__(self) -> None:
        checks.at_least("--batch-size", self.batch_size, 1)
        checks.at_least("--workers", self.workers, 0)
        checks.one_of("--precision", self.precision, PRECISIONS)
        checks.one_of("--dtype", self.dtype, ("float16", "float32"))
        size = self.preprocessing.get("input_size")
        for side in size or ():
            checks.at_least("--input-size", side, 16)
        for value in self.preprocessing.get("std") or ():
            checks.above("--std", value, 0)


@dataclass
class ExtractSummary:
    bags: int = 0  # written in this run
    skipped: int = 0  # already complete from an earlier run
    instances: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # where the time went (main thread)

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        shard = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ExtractionError(f"shard {index}/{count} is not valid: need 0 ≤ index < count")
    return index, count


class Embedder:
    """A batch from a source (pinned, on the host) → embeddings (B × dim) on the device. The source
    says how its batch becomes model input (``Source.embed``); this class owns the model, its
    precision and memory format."""

    def __init__(self, backbone: Backbone, source: Source, device: torch.device, precision: str, compile: bool):
        self.backbone, self.source, self.device = backbone, source, device
        self.model = backbone.model.to(device).eval()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        if compile:
            self.model = torch.compile(self.model)
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone on model-ready input (float, normalised), in the configured precision."""
        if self.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.model(x).float()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.source.embed(batch.to(self.device, non_blocking=True), self.forward, self.backbone)


class _BagStream(IterableDataset):
    """Yields, per bag: ("plan", i, plan), then ("pixels", i, start, uint8 batch)…, or ("fail", i, why)."""

    def __init__(self, bags: list[tuple[int, BagSpec]], source: Source, batch_size: int) -> None:
        self.bags, self.source, self.batch_size = bags, source, batch_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.bags[info.id :: info.num_workers] if info else self.bags
        try:
            for index, bag in mine:
                yield from self._bag(index, bag)
        finally:
            self.source.close()

    def _bag(self, index: int, bag: BagSpec):
        try:
            plan = self.source.plan(bag)
        except MilcacheError as exc:
            yield ("fail", index, str(exc))
            return
        except Exception as exc:  # a broken file can raise anything from its decoder
            yield ("fail", index, f"{type(exc).__name__}: {exc}")
            return
        yield ("plan", index, plan)
        for start in range(0, len(plan), self.batch_size):
            indices = np.arange(start, min(start + self.batch_size, len(plan)))
            try:
                pixels = self.source.read(bag, plan, indices)
            except Exception as exc:
                yield ("fail", index, f"reading instances {start}..{indices[-1]}: {type(exc).__name__}: {exc}")
                return
            yield ("pixels", index, start, torch.from_numpy(pixels))


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with each other for cores
    die_with_parent()


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 included): orphaned decode
    workers would otherwise live on, holding the slides and the store's files open."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class _Writer(threading.Thread):
    """Stores finished bags while the main thread computes the next ones."""

    def __init__(self, writer: StoreWriter) -> None:
        super().__init__(daemon=True, name="milcache-writer")
        self.writer, self.jobs, self.error, self.busy = writer, queue.Queue(maxsize=8), None, 0.0

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue
            start = time.perf_counter()
            try:
                job()
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc
            self.busy += time.perf_counter() - start

    def submit(self, job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def file_identities(bag: BagSpec) -> list[dict]:
    """What each source file of a bag was when it was read: a rerun compares it to notice a change."""
    out = []
    for path in bag.paths:
        try:
            stat = Path(path).stat()
            out.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        except OSError:
            out.append({"path": str(path)})
    return out


def _changed(recorded: list[dict] | None, bag: BagSpec) -> str | None:
    """Why a finished bag no longer matches its manifest entry, or None. A file that moved with its
    size and time kept is the same file; one that cannot be read now is left as extracted."""
    if recorded is None:
        return None  # extracted before files were recorded
    if len(recorded) != len(bag.paths):
        return f"it had {len(recorded)} image(s), the manifest now gives {len(bag.paths)}"
    for was, now in zip(recorded, file_identities(bag), strict=True):
        if "bytes" not in now or "bytes" not in was:
            continue
        if (was["bytes"], was["mtime_ns"]) != (now["bytes"], now["mtime_ns"]):
            moved = "" if was["path"] == now["path"] else f" (was {was['path']})"
            return f"{now['path']}{moved} is not the file it was extracted from (size or time differ)"
    return None


def _finished_bags(out: Path, mine: list[tuple[int, BagSpec]], reextract_changed: bool) -> set[str]:
    """Bags of this run already in the store. A bag whose source files changed since is named and
    refused (its embeddings would silently describe the old file), or re-extracted on request."""
    from milcache.store.record import read_header

    with FeatureStore(out) as existing:
        changed = {}
        for _, bag in mine:
            if bag.bag_id in existing:
                header, _ = read_header(existing.raw(bag.bag_id))
                why = _changed((header.get("meta") or {}).get("files"), bag)
                if why:
                    changed[bag.bag_id] = why
        done = set(existing.bag_ids()) - set(changed)
    if changed and not reextract_changed:
        shown = "; ".join(f"{b}: {why}" for b, why in list(changed.items())[:5])
        more = f" … and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ExtractionError(
            f"{len(changed)} finished bag(s) of {out} changed since they were extracted: {shown}{more}; "
            "re-extract them with --reextract-changed (or start over with --overwrite)"
        )
    return done


def extract(
    manifest: str | Path, out: str | Path, source: Source, config: ExtractConfig, progress: bool = True
) -> ExtractSummary:
    """Embed every instance of every bag of ``manifest`` (this shard's share) into the store ``out``."""
    from tqdm import tqdm

    start_time = time.perf_counter()
    out = checks.output_dir(out)
    shard, shards = resolve_shard(config.shard)
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    bags = read_manifest(manifest, check_files=False).bags()  # a missing file fails its bag only
    backbone = create_backbone(
        config.backbone, config.weights, config.pretrained, **config.preprocessing, **source.backbone_options(bags)
    )
    metadata = StoreMetadata(
        backbone=config.backbone,
        dim=backbone.dim,
        dtype=config.dtype,
        weights_digest=backbone.weights_digest,
        preprocessing=backbone.preprocessing(),
        source=source.settings(),
        coords=source.coord_names,
    )
    if config.overwrite and shards > 1:  # the other processes write the other shards: start only ours over
        shard_path(out, shard).unlink(missing_ok=True)
    # Locked identity check (another run with other settings is refused here, before any work);
    # the shard opens at the first write, after the workers have forked.
    store_writer = StoreWriter(out, metadata, shard=shard, overwrite=config.overwrite and shards == 1)
    mine = [(i, b) for i, b in enumerate(bags) if i % shards == shard]
    try:
        done = _finished_bags(out, mine, config.reextract_changed)
    except BaseException:
        store_writer.close()
        raise
    summary = ExtractSummary()
    todo = [(i, b) for i, b in mine if b.bag_id not in done]
    summary.skipped = len(mine) - len(todo)
    embedder = Embedder(backbone, source, device, config.precision, config.compile)
    writer = _Writer(store_writer)
    writer.start()
    loader = DataLoader(
        _BagStream(todo, source, config.batch_size),
        batch_size=None,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if config.workers else None,
        prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )
    pending: dict[int, tuple[BagPlan, torch.Tensor, list[int]]] = {}
    bar = tqdm(
        total=0,
        unit="tile",
        desc=f"extract {shard + 1}/{shards}" if shards > 1 else "extract",
        disable=not progress,
        dynamic_ncols=True,
    )
    wait = compute = 0.0
    try:
        mark = time.perf_counter()
        for item in loader:
            now = time.perf_counter()
            wait += now - mark
            kind, index = item[0], item[1]
            bag = bags[index]
            if kind == "fail":
                pending.pop(index, None)
                summary.failures[bag.bag_id] = item[2]
                writer.submit(lambda b=bag.bag_id, why=item[2]: writer.writer.fail(b, why))
            elif kind == "plan":
                plan = item[2]
                pending[index] = (plan, torch.empty((len(plan), backbone.dim), device=device), [0])
                bar.total += len(plan)
                bar.refresh()
            else:
                plan, embeddings, filled = pending[index]
                batch = embedder(item[3])
                embeddings[item[2] : item[2] + len(batch)] = batch
                if config.profile and device.type == "cuda":
                    torch.cuda.synchronize(device)
                filled[0] += len(batch)
                bar.update(len(batch))
                if filled[0] == len(plan):
                    del pending[index]
                    result = embeddings.cpu().numpy()
                    meta = {**plan.meta, "files": file_identities(bag)}
                    writer.submit(
                        lambda b=bag.bag_id, p=plan, e=result, m=meta: writer.writer.put(
                            b, e, p.coords, p.attrs, p.extras, m
                        )
                    )
                    summary.bags += 1
                    summary.instances += len(plan)
                    bar.set_postfix(bags=f"{summary.bags + summary.skipped}/{len(mine)}", refresh=False)
            mark = time.perf_counter()
            compute += mark - now
    finally:
        bar.close()
        writer.finish()
        writer.writer.close()
    summary.seconds = time.perf_counter() - start_time
    summary.timings = {"waiting_for_pixels": wait, "model_and_transfer": compute, "store_writes": writer.busy}
    return summary

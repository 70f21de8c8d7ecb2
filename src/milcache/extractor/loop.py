"""The extraction loop: sources read and decode in DataLoader workers, the backbone runs on the GPU
(bf16, channels_last, optionally compiled), and a writer thread stores each finished bag while the
next ones compute. Resumable, shardable over processes (torchrun or --shard i/n)."""

from __future__ import annotations

import copy
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
from milcache.devices import (
    DECODE_CHOICES,
    PRECISIONS,
    autocast,
    release_free_host_memory,
    resolve_device,
    retain_freed_host_memory,
)
from milcache.errors import ExtractionError, OptionError
from milcache.extractor.encoders import Encoder, create_encoder
from milcache.extractor.jpeg import decode_on_device, decode_tiles
from milcache.extractor.sources import BagPlan, PlannedBag, Source, failure_reason
from milcache.store import FeatureStore, StoreMetadata, StoreWriter, read_manifest
from milcache.store.lmdb_store import discard_if_empty
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
    decode: str = "auto"  # JPEG tiles: in the workers (cpu), on the device (gpu), auto: gpu on CUDA
    dtype: str = "float16"  # of the stored embeddings
    shard: tuple[int, int] | None = None  # (index, count); default from torchrun's RANK / WORLD_SIZE
    overwrite: bool = False
    reextract_changed: bool = False  # re-extract finished bags whose source files changed
    profile: bool = False  # synchronise the GPU after each batch to time the model alone
    preprocessing: dict = field(default_factory=dict)  # input_size / mean / std / interpolation / crop_pct overrides
    backbone_args: dict = field(default_factory=dict)  # architecture arguments on top of the preset's / timm's
    token_rule: str | None = None  # how tokens become the embedding [the preset's, else the model's pooling]

    def __post_init__(self) -> None:
        checks.at_least("--batch-size", self.batch_size, 1)
        checks.at_least("--workers", self.workers, 0)
        checks.one_of("--precision", self.precision, PRECISIONS)
        checks.one_of("--dtype", self.dtype, ("float16", "float32"))
        checks.one_of("--decode", self.decode, DECODE_CHOICES)
        size = self.preprocessing.get("input_size")
        for side in size or ():
            checks.at_least("--input-size", side, 16)
        for value in self.preprocessing.get("std") or ():
            checks.above("--std", value, 0)
        checks.within("--crop-pct", self.preprocessing.get("crop_pct"), 0.05, 1.0)


@dataclass
class ExtractSummary:
    bags: int = 0  # written in this run
    skipped: int = 0  # already complete from an earlier run
    instances: int = 0
    decoded_on_device: int = 0  # instances whose JPEG tiles the compute device decoded
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

    def __init__(self, backbone: Encoder, source: Source, device: torch.device, precision: str, compile: bool):
        self.backbone, self.source, self.device = backbone, source, device
        backbone.model.to(device).eval()
        if device.type == "cuda":
            backbone.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self._embed = torch.compile(backbone.embed) if compile else backbone.embed
        self.precision = precision

    def _in_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Image batches channels-last on CUDA, as the model's weights are."""
        if self.device.type == "cuda" and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone on model-ready input (float, normalised), in the configured precision."""
        with autocast(self.device, self.precision):
            return self._embed(self._in_model_layout(x)).float()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.source.embed(batch.to(self.device, non_blocking=True), self.forward, self.backbone)

    @property
    def gives_feature_maps(self) -> bool:
        """Whether ``with_feature_maps`` can split the backbone (a timm model: features, then head)."""
        model = self.backbone.model
        pooled = self.backbone.token_rule == "pooled"
        return pooled and hasattr(model, "forward_features") and hasattr(model, "forward_head")

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature map (B × C × h × w, float32) of uint8 images (B × H × W × C) at
        their own size, normalised with the encoder's mean and std: the saliency CAM's input."""
        from milcache.extractor.sources import normalise_images

        x = normalise_images(images.to(self.device, non_blocking=True), self.backbone, resize=False)
        with autocast(self.device, self.precision):
            return self.backbone.model.forward_features(self._in_model_layout(x)).float()

    @torch.inference_mode()
    def with_feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings of uint8 images (B × H × W × C) and the backbone's last feature map on the
        way (B × C × h × w, float32), from one forward: a source that needs both (the saliency CAM of
        a global view that is also an instance) does not run the backbone twice. The model is the
        uncompiled one (torch.compile wraps ``forward`` only); the embeddings equal ``__call__``'s."""
        from milcache.extractor.sources import normalise_images

        x = self._in_model_layout(normalise_images(images.to(self.device, non_blocking=True), self.backbone))
        model = self.backbone.model
        with autocast(self.device, self.precision):
            maps = model.forward_features(x)
            embeddings = model.forward_head(maps)
        return maps.float(), embeddings.float()


@dataclass
class _PendingBag:
    plan: BagPlan
    embeddings: np.ndarray  # (instances × dim) in the stored dtype, filled as batches finish
    filled: int = 0


class _Batches:
    """Packs pixel chunks of any bags into batches of exactly ``batch_size`` instances (a bag's
    instances may share a batch with the next bag's; the last batch is padded on CUDA or under
    --compile), so the device always sees one shape: no ragged tail per bag, no cuDNN re-tuning, no
    recompilation.

    Host → device copies come from pinned staging buffers; the embeddings go back, in the stored
    dtype, into pinned host buffers with asynchronous copies that complete while the next batch
    runs; ``deliver(bag index, positions, rows)`` gets each batch's rows once they are on the host."""

    _IN_FLIGHT = 2  # batches whose results may still be on their way to the host

    def __init__(
        self, embedder: Embedder, batch_size: int, dtype, deliver, profile: bool = False, pad: bool = True
    ) -> None:
        self.embedder, self.batch_size, self.deliver, self.profile = embedder, batch_size, deliver, profile
        self.pad = pad
        self.device = embedder.device
        self.dtype = torch.float16 if dtype == np.float16 else torch.float32
        self.cuda = self.device.type == "cuda"
        self.staging: list[torch.Tensor] = []  # pinned input buffers, used in turn
        self.results: list[torch.Tensor] = []  # pinned output buffers (CUDA), one per staging buffer
        self.turn = 0
        self.fill = 0
        self.owners: list[tuple[int, np.ndarray, int]] = []  # (bag index, positions, first row) of the batch
        self.in_flight: list[tuple[torch.cuda.Event | None, torch.Tensor, list]] = []

    def add(self, index: int, positions: np.ndarray, pixels: torch.Tensor) -> None:
        """The instances of bag ``index`` at ``positions`` (one per row of ``pixels``)."""
        taken = 0
        while taken < len(pixels):
            buffer = self._buffer(pixels)
            count = min(len(pixels) - taken, self.batch_size - self.fill)
            buffer[self.fill : self.fill + count] = pixels[taken : taken + count]
            self.owners.append((index, positions[taken : taken + count], self.fill))
            self.fill += count
            taken += count
            if self.fill == self.batch_size:
                self._run()

    def finish(self) -> None:
        if self.fill:
            if self.pad:  # one shape for cuDNN and torch.compile; on the CPU padding is only waste
                self.staging[self.turn][self.fill :].zero_()  # padding rows: computed, never delivered
            self._run(self.batch_size if self.pad else self.fill)
        while self.in_flight:
            self._deliver_oldest()

    def _buffer(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.staging:
            shape = (self.batch_size, *pixels.shape[1:])
            # Staged where the first chunk is: pinned host memory for pixels from the workers, the
            # device for JPEG tiles decoded there (a chunk from the other side is copied across).
            pin = self.cuda and pixels.device.type == "cpu"
            self.staging = [
                torch.empty(shape, dtype=pixels.dtype, device=pixels.device, pin_memory=pin)
                for _ in range(self._IN_FLIGHT + 1)
            ]
        buffer = self.staging[self.turn]
        if pixels.shape[1:] != buffer.shape[1:] or pixels.dtype != buffer.dtype:
            raise ExtractionError(
                f"the source gave instances of shape {tuple(pixels.shape[1:])} {pixels.dtype} after "
                f"{tuple(buffer.shape[1:])} {buffer.dtype}: every instance of a store must have one shape"
            )
        return buffer

    def _run(self, rows: int | None = None) -> None:
        if len(self.in_flight) >= self._IN_FLIGHT:  # frees the staging buffer this batch will reuse next
            self._deliver_oldest()
        embeddings = self.embedder(self.staging[self.turn][: rows or self.batch_size]).to(self.dtype)
        if self.cuda:
            if not self.results:
                self.results = [torch.empty(embeddings.shape, dtype=self.dtype, pin_memory=True) for _ in self.staging]
            host = self.results[self.turn][: len(embeddings)]
            host.copy_(embeddings, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            if self.profile:
                done.synchronize()
        else:
            host, done = embeddings, None
        self.in_flight.append((done, host, self.owners))
        self.owners, self.fill = [], 0
        self.turn = (self.turn + 1) % len(self.staging)

    def _deliver_oldest(self) -> None:
        done, host, owners = self.in_flight.pop(0)
        if done is not None:
            done.synchronize()
        rows = host.numpy()
        for index, positions, first in owners:
            self.deliver(index, positions, rows[first : first + len(positions)])


_WAITING_BYTES = 512 << 20  # of decoded images held while their bags wait to be planned together


class _PreparedBags:
    """Bags the workers decoded for a source that plans on the device (CAM), gathered until they
    hold a batch of the planning network's inputs (or ``_WAITING_BYTES`` of images), then planned
    together (``Source.plan_prepared_many``): one forward over all their global views."""

    def __init__(self, source: Source, inputs: int) -> None:
        self.source, self.limit = source, inputs
        self.items: list[tuple[int, dict]] = []
        self.inputs = self.bytes = 0

    def add(self, index: int, prepared: dict) -> bool:
        """Keep a bag; True when the bags kept should be planned now."""
        inputs, nbytes = self.source.prepared_size(prepared)
        self.items.append((index, prepared))
        self.inputs, self.bytes = self.inputs + inputs, self.bytes + nbytes
        return self.inputs >= self.limit or self.bytes >= _WAITING_BYTES

    def plan(self, bags: list[BagSpec], embedder: Embedder) -> list[tuple[int, PlannedBag | str]]:
        """Each kept bag's index and its plan (or why it failed); none are kept afterwards."""
        if not self.items:
            return []
        indices = [index for index, _ in self.items]
        prepared = [items for _, items in self.items]
        self.items, self.inputs, self.bytes = [], 0, 0
        results = self.source.plan_prepared_many([bags[i] for i in indices], prepared, embedder)
        return list(zip(indices, results, strict=True))


class _BagStream(IterableDataset):
    """Yields, per bag: ("plan", i, plan), then ("pixels", i, start, uint8 batch)…, or ("fail", i, why);
    for sources that plan on the device: ("prepared", i, decoded images). With ``encoded``, batches
    the source can give as JPEG tiles come as ("encoded", i, start, jpeg.EncodedTiles)."""

    def __init__(self, bags: list[tuple[int, BagSpec]], source: Source, batch_size: int, encoded: bool = False):
        self.bags, self.source, self.batch_size, self.encoded = bags, source, batch_size, encoded

    def __iter__(self):
        info = get_worker_info()
        mine = self.bags[info.id :: info.num_workers] if info else self.bags
        if info:  # a forked worker inherits the files its parent opened (a preview's plan) with their
            # read offsets: reading through them races the parent and corrupts tiles. A copy drops them.
            self.source = copy.copy(self.source)
        try:
            for index, bag in mine:
                yield from self._bag(index, bag)
        finally:
            self.source.close()

    def _bag(self, index: int, bag: BagSpec):
        if self.source.plan_on_device:  # decoded here, planned in the main process
            try:
                yield ("prepared", index, self.source.prepare(bag))
            except Exception as exc:
                yield ("fail", index, failure_reason(exc))
            return
        try:
            plan = self.source.plan(bag)
        except Exception as exc:
            yield ("fail", index, failure_reason(exc))
            return
        yield ("plan", index, plan)
        for start in range(0, len(plan), self.batch_size):
            indices = np.arange(start, min(start + self.batch_size, len(plan)))
            try:
                encoded = self.source.read_encoded(bag, plan, indices) if self.encoded else None
                pixels = self.source.read(bag, plan, indices) if encoded is None else None
            except Exception as exc:
                yield ("fail", index, f"reading instances {start}..{indices[-1]}: {type(exc).__name__}: {exc}")
                return
            if encoded is not None:
                yield ("encoded", index, start, encoded)
            else:
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
    """Embed every instance of every bag of ``manifest`` (this shard's share) into the store ``out``.
    A run that fails before it stores anything leaves no store behind (``discard_if_empty``)."""
    try:
        return _extract(manifest, out, source, config, progress)
    except BaseException:
        if Path(out).is_dir():
            discard_if_empty(Path(out))
        raise


def _extract(
    manifest: str | Path, out: str | Path, source: Source, config: ExtractConfig, progress: bool = True
) -> ExtractSummary:
    from tqdm import tqdm

    start_time = time.perf_counter()
    out = checks.output_dir(out)
    shard, shards = resolve_shard(config.shard)
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    on_device = decode_on_device(config.decode, device)  # a CUDA-less --decode gpu is refused before any work
    if device.type == "cpu":
        retain_freed_host_memory()  # each batch's activations reuse the last one's pages (see there)
    bags = read_manifest(manifest, check_files=False).bags()  # a missing file fails its bag only
    encoder_options = source.backbone_options(bags)
    channels = encoder_options.get("in_chans", 3)
    for option in ("mean", "std"):
        given = config.preprocessing.get(option)
        if given is not None and len(given) != channels:
            raise OptionError(f"--{option} has {len(given)} values; the images have {channels} channels: one each")
    backbone = create_encoder(
        config.backbone,
        config.weights,
        config.pretrained,
        args=config.backbone_args,
        token_rule=config.token_rule,
        **config.preprocessing,
        **encoder_options,
    )
    spec = backbone.spec(source.settings())
    metadata = StoreMetadata.for_embedding(spec, dtype=config.dtype, coords=source.coord_names)
    # Locked identity check (another run with other settings is refused here, before any work);
    # the shard opens at the first write, after the workers have forked. With several shards,
    # --overwrite starts only ours over: the other processes write the others.
    store_writer = StoreWriter(
        out,
        metadata,
        shard=shard,
        overwrite=config.overwrite and shards == 1,
        restart_shard=config.overwrite and shards > 1,
    )
    mine = [(i, b) for i, b in enumerate(bags) if i % shards == shard]
    try:
        done = _finished_bags(out, mine, config.reextract_changed)
        embedder = Embedder(backbone, source, device, config.precision, config.compile)
    except BaseException:
        store_writer.close()
        raise
    summary = ExtractSummary()
    todo = [(i, b) for i, b in mine if b.bag_id not in done]
    summary.skipped = len(mine) - len(todo)
    writer = _Writer(store_writer)
    writer.start()
    loader = DataLoader(
        _BagStream(todo, source, config.batch_size, encoded=on_device),
        batch_size=None,
        num_workers=config.workers,
        pin_memory=False,  # chunks are copied into _Batches' pinned staging buffers: pinning them first copies twice
        worker_init_fn=_worker_init if config.workers else None,
        prefetch_factor=4 if config.workers else None,
        persistent_workers=False,
    )
    bar = tqdm(
        total=0,
        unit="tile",
        desc=f"extract {shard + 1}/{shards}" if shards > 1 else "extract",
        disable=not progress,
        dynamic_ncols=True,
    )
    pending: dict[int, _PendingBag] = {}
    store_dtype = np.float16 if config.dtype == "float16" else np.float32

    def finished_rows(index: int, positions: np.ndarray, values: np.ndarray) -> None:
        """Embeddings of some instances of bag ``index`` are on the host: keep them; store a full bag."""
        entry = pending.get(index)
        if entry is None:  # the bag failed after some of its instances were batched
            return
        entry.embeddings[positions] = values
        entry.filled += len(positions)
        bar.update(len(positions))
        if entry.filled == len(entry.plan):
            del pending[index]
            bag, plan = bags[index], entry.plan
            meta = {**plan.meta, "files": file_identities(bag)}
            writer.submit(
                lambda b=bag.bag_id, p=plan, e=entry.embeddings, m=meta: writer.writer.put(
                    b, e, p.coords, p.attrs, p.extras, m
                )
            )
            summary.bags += 1
            summary.instances += len(plan)
            bar.set_postfix(bags=f"{summary.bags + summary.skipped}/{len(mine)}", refresh=False)

    batches = _Batches(
        embedder,
        config.batch_size,
        store_dtype,
        finished_rows,
        profile=config.profile,
        pad=device.type == "cuda" or config.compile,
    )
    wait = compute = 0.0
    start_up = None
    if config.workers:
        release_free_host_memory()  # the workers fork at the loop's start (see there)
    waiting = _PreparedBags(source, config.batch_size)

    def take(item: tuple, planned: PlannedBag | None = None) -> None:
        """One bag's plan, failure or pixels (``planned``: the plan came from ``plan_prepared``)."""
        kind, index = item[0], item[1]
        bag = bags[index]
        if kind == "encoded" and index in pending:  # JPEG tiles: decoded here, on the device
            try:
                kind, item = "pixels", (*item[:3], decode_tiles(item[3], device))
                summary.decoded_on_device += len(item[3])
            except RuntimeError as exc:  # a corrupt JPEG tile: the bag's failure, named
                why = f"decoding instances {item[2]}.. on {device}: {str(exc).splitlines()[0]}"
                kind, item = "fail", ("fail", index, why)
        if kind == "plan" and len(item[2]) == 0:
            kind, item = "fail", ("fail", index, "the source found no instances in this bag")
        if kind == "fail":
            pending.pop(index, None)
            summary.failures[bag.bag_id] = item[2]
            writer.submit(lambda b=bag.bag_id, why=item[2]: writer.writer.fail(b, why))
        elif kind == "plan":
            plan = item[2]
            pending[index] = _PendingBag(plan, np.empty((len(plan), backbone.dim), store_dtype))
            bar.total += len(plan)
            bar.refresh()
            if planned is not None:
                if planned.embedded is not None:  # embedded while planning (a CAM's global views)
                    positions, values = planned.embedded
                    finished_rows(index, positions, values.to(batches.dtype).cpu().numpy())
                if len(planned.positions):
                    batches.add(index, planned.positions, torch.from_numpy(planned.pixels))
        elif kind == "pixels" and index in pending:  # not a bag that already failed
            batches.add(index, np.arange(item[2], item[2] + len(item[3])), item[3])

    def plan_waiting() -> None:
        for index, result in waiting.plan(bags, embedder):
            take(("fail", index, result) if isinstance(result, str) else ("plan", index, result.plan), result)

    try:
        mark = time.perf_counter()
        for item in loader:
            now = time.perf_counter()
            wait += now - mark
            if start_up is None:  # model built, workers started, the first bag planned
                start_up = now - start_time
            if item[0] != "prepared":
                take(item)
            elif waiting.add(item[1], item[2]):
                plan_waiting()
            mark = time.perf_counter()
            compute += mark - now
        plan_waiting()
        batches.finish()
        compute += time.perf_counter() - mark
    finally:
        bar.close()
        writer.finish()
        writer.writer.close()
    unfinished = [bags[i].bag_id for i in pending]
    if unfinished:  # a bug, not a user's mistake: say so rather than return a short store
        raise ExtractionError(f"internal error: bag(s) {', '.join(unfinished[:5])} were planned but not finished")
    summary.seconds = time.perf_counter() - start_time
    summary.timings = {
        "start_up": start_up or 0.0,
        "waiting_for_pixels": wait,
        "model_and_transfer": compute,
        "store_writes": writer.busy,
    }
    return summary

"""Bags resident in memory as one flat tensor plus offsets (CSR), and padded, masked batches of many
bags built from it on the device: no Python loop over bags or instances while training.

Regimes, chosen by size: the cohort lives on the GPU when it fits (float16); otherwise in pinned host
memory, from which each batch's instances are gathered and sent to the GPU; and when it does not fit
in host memory either, each batch's bags are read from the store's memory map (one pread per bag)
by a prefetching thread while the previous batch trains.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from milcache.aggregator.config import REGIMES
from milcache.aggregator.heads import SparseRows
from milcache.errors import MilcacheError
from milcache.store import FeatureStore

_GPU_FRACTION = 0.6  # of free GPU memory the resident cohort may take (the rest is for the heads)
_HOST_FRACTION = 0.5  # of available host memory a resident cohort may take
# Features are used as SparseRows when no instance has more than this share of nonzeros (and D is
# at least _SPARSE_MIN_DIM): the instance layer then costs K rows of W an instance instead of D.
# Backbone embeddings are dense and are never converted (the first chunk shows it).
_SPARSE_SHARE, _SPARSE_MIN_DIM = 1 / 16, 256


@dataclass
class BagTensor:
    features: torch.Tensor  # (total instances, D), float16 or float32, on `features.device`
    offsets: torch.Tensor  # (bags + 1,) int64, on the compute device
    lengths: np.ndarray  # (bags,) int64, on the host, for batch planning
    bag_ids: list[str]
    device: torch.device  # where heads run

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @functools.cached_property
    def sparse(self) -> SparseRows | None:
        """The instances as their nonzero entries, when the features are sparse (see ``sparse_rows``)."""
        return sparse_rows(self.features)

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """Each bag's first row, on the host (``offsets`` without a trip to the device)."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.bag_ids)


@dataclass
class StreamedBags:
    """Bags left in the store and read batch by batch (cohorts larger than host memory)."""

    store: FeatureStore
    lengths: np.ndarray
    bag_ids: list[str]
    device: torch.device
    dim: int
    skip: dict[str, np.ndarray] | None = None  # instances left out of each bag (near-duplicates)

    def __len__(self) -> int:
        return len(self.bag_ids)

    def embeddings(self, index: int) -> np.ndarray:
        bag_id = self.bag_ids[index]
        embeddings = self.store.get(bag_id, copy=True).embeddings
        return _without(embeddings, self.skip, bag_id)


def _without(embeddings: np.ndarray, skip: dict[str, np.ndarray] | None, bag_id: str) -> np.ndarray:
    if not skip or bag_id not in skip:
        return embeddings
    return np.delete(embeddings, skip[bag_id], axis=0)


Bags = BagTensor | StreamedBags


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not Linux: assume it fits
        return 1 << 62


def load_bags(
    store: FeatureStore,
    bag_ids: list[str],
    device: torch.device,
    progress: bool = False,
    regime: str = "auto",
    skip: dict[str, np.ndarray] | None = None,
) -> Bags:
    """The given bags, resident in one flat tensor (on the GPU when it fits, else in host memory), or
    streamed from the store when they do not fit in host memory (``regime`` forces one). ``skip``
    leaves out instances of some bags (the near-duplicates ``index dedup`` found)."""
    from tqdm import tqdm

    if regime not in REGIMES:
        raise MilcacheError(f"unknown memory regime {regime!r}; choose one of {', '.join(REGIMES)}")
    sizes = store.sizes()
    lengths = np.array([sizes[b] - (len(skip[b]) if skip and b in skip else 0) for b in bag_ids], dtype=np.int64)
    offsets = np.zeros(len(bag_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stored = torch.float16 if store.metadata.dtype == "float16" else torch.float32
    instances = int(offsets[-1]) * store.metadata.dim
    too_big = instances * stored.itemsize > _HOST_FRACTION * available_host_bytes()
    if regime == "stream" or (regime == "auto" and too_big):
        return StreamedBags(FeatureStore(store.path), lengths, list(bag_ids), device, store.metadata.dim, skip)
    dtype = resident_dtype(stored, device, instances)
    nbytes = instances * dtype.itemsize
    flat = torch.empty((int(offsets[-1]), store.metadata.dim), dtype=dtype, pin_memory=device.type == "cuda")
    target = flat.numpy()
    for i, bag_id in enumerate(tqdm(bag_ids, desc="load", unit="bag", disable=not progress)):
        target[offsets[i] : offsets[i + 1]] = _without(store.get(bag_id).embeddings, skip, bag_id)
    if device.type == "cuda" and regime != "host":
        free, _ = torch.cuda.mem_get_info(device)
        if regime == "gpu" or nbytes < _GPU_FRACTION * free:
            flat = flat.to(device, non_blocking=True)
    return BagTensor(flat, torch.from_numpy(offsets).to(device), lengths, list(bag_ids), device)


def sparse_rows(features: torch.Tensor) -> SparseRows | None:
    """``features`` (instances × D) as each instance's nonzero columns and values, padded to the most
    nonzeros of any instance (K), when K is at most ``_SPARSE_SHARE`` of D; None otherwise. Chunked,
    and stops at the first chunk of dense rows."""
    n, dim = features.shape
    if dim < _SPARSE_MIN_DIM or n == 0:
        return None
    chunk, most = _row_chunk(features), 1
    for start in range(0, n, chunk):
        most = max(most, int((features[start : start + chunk] != 0).sum(1).max()))
        if most > _SPARSE_SHARE * dim:
            return None
    columns = torch.zeros((n, most), dtype=torch.long, device=features.device)
    values = torch.zeros((n, most), dtype=torch.float32, device=features.device)
    for start in range(0, n, chunk):
        part = features[start : start + chunk]
        rows, cols = torch.nonzero(part, as_tuple=True)  # row-major order
        first = torch.searchsorted(rows, rows, right=False)  # each entry's row begins there
        slot = torch.arange(len(rows), device=rows.device) - first
        columns[start + rows, slot] = cols
        values[start + rows, slot] = part[rows, cols].float()
    return SparseRows(columns, values)


def resident_dtype(stored: torch.dtype, device: torch.device, values: int) -> torch.dtype:
    """The dtype a resident cohort of ``values`` numbers is held in: as stored, except that a CPU
    cohort is widened to float32 when that still fits: the CPU computes in float32, and its
    float16 → float32 conversion of every batch cost more than the batch's matmul input pass
    (0.5 s of a 4.4 s epoch of 200 bags × 1,500 × 512-d, measured with bench/train_head.py)."""
    if device.type == "cpu" and stored == torch.float16 and values * 4 <= _HOST_FRACTION * available_host_bytes():
        return torch.float32
    return stored


def plan_batches(
    lengths: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    max_tokens: int,
    cap: int | None = None,
    rng: np.random.Generator | None = None,
    shuffle: bool = True,
) -> list[np.ndarray]:
    """Group bags of similar size so that padding stays small. With ``rng`` the grouping varies
    (jittered sizes) and the batches are shuffled unless ``shuffle`` is False; without it, or
    unshuffled, they come smallest first.

    A batch holds at most ``batch_size`` bags and ``max_tokens`` padded instances (bags × longest).
    ``cap`` is the per-bag instance count after subsampling.
    """
    size = lengths[indices] if cap is None else np.minimum(lengths[indices], cap)
    if rng is not None:  # jitter keeps batches of similar sizes while varying their membership
        order = np.argsort(size * rng.uniform(0.85, 1.15, len(size)), kind="stable")
    else:
        order = np.argsort(size, kind="stable")
    # Bags are added in order while the batch has room: (bags so far + 1) × the new bag's size
    # within max_tokens. When that never binds, the batches are plain chunks (no loop over bags).
    position = np.arange(len(order)) % batch_size
    if np.all((position == 0) | ((position + 1) * size[order] <= max_tokens)):
        batches = np.split(indices[order], np.arange(batch_size, len(order), batch_size))
    else:
        batches = _greedy_batches(indices, order, size, batch_size, max_tokens)
    if rng is not None and shuffle:
        rng.shuffle(batches)
    return batches


def _greedy_batches(indices, order, size, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and (end - start + 1) * size[order[end]] <= max_tokens:
            end += 1
        batches.append(indices[order[start:end]])
        start = end
    return batches


@dataclass
class Batch:
    """The instances of a batch of bags. Resident cohorts give them packed: ``x`` holds the real
    instances only (groups × T × D, one group per stacked model, T the most real instances of a
    group, short groups padded with a real row), and ``slots`` (B × N, into a group's rows) lays
    them out as padded bags after the instance layer, so the largest matmul of a step never runs
    on padding. Streamed cohorts give padded bags (``x`` B × N × D, ``slots`` None)."""

    x: torch.Tensor | SparseRows  # SparseRows when the cohort's features are sparse (see sparse_rows)
    mask: torch.Tensor  # (B, N): True for real instances
    slots: torch.Tensor | None

    def grouped(self, groups: int) -> Batch:
        """The batch split into ``groups`` equal groups of bags (one per stacked model)."""
        mask = self.mask.view(groups, -1, self.mask.shape[-1])
        if self.slots is None:
            return Batch(self.x.view(groups, -1, *self.x.shape[1:]), mask, None)
        return Batch(self.x, mask, self.slots.view(groups, -1, self.slots.shape[-1]))  # x has its group axis


class RowBuffer:
    """One growing tensor that successive batches' instances are gathered into, for a training
    loop whose batch is used up (backward done) before the next is gathered. A fresh tensor per
    step was a fresh mapping of 12 MB on the CPU (200 bags × 1,024 × 512-d, 6 bags a step), whose
    page faults made the gather take 1.5-1.9x as long (the gather timed alone on bench/train_head.py's
    case-a cohort)."""

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None

    def rows(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The first ``n`` rows, shaped and typed as rows of ``like``, on its device."""
        rows = self._rows
        if rows is None or rows.shape[0] < n or rows.shape[1:] != like.shape[1:] or rows.dtype != like.dtype:
            rows = self._rows = like.new_empty(
                (max(n, 2 * (rows.shape[0] if rows is not None else 0)), *like.shape[1:])
            )
        return rows[:n]


def gather_batch(
    data: Bags,
    batch: np.ndarray,
    cap: int | None = None,
    generator: torch.Generator | None = None,
    groups: int | None = None,
    buffer: RowBuffer | None = None,
) -> Batch:
    """The given bags' instances on the compute device (see ``Batch``); with ``groups``, packed
    in that many equal consecutive groups of bags (``x`` then has a leading group axis).

    With ``cap``, bags longer than ``cap`` contribute ``cap`` random instances (in stored order).
    With ``buffer``, the instances are gathered into it (overwriting the previous batch's).
    """
    if isinstance(data, StreamedBags):
        x, mask = _gather_streamed(data, batch, cap, generator)
        return Batch(x, mask, None)
    # Which slots are real depends only on the bag lengths, known on the host: every index is
    # computed here and sent in one copy, so nothing waits for the device (no nonzero, no .item()).
    device, lengths = data.device, data.lengths[batch]
    counts = lengths if cap is None else np.minimum(lengths, cap)
    slots_per_bag = int(counts.max())
    host_mask = np.arange(slots_per_bag) < counts[:, None]  # (B, N)
    grouped, groups = groups is not None, groups or 1
    per_group = host_mask.reshape(groups, -1)  # a group's bags side by side
    position = per_group.cumsum(1) - 1  # slot → position among its group's real instances
    width = int(per_group.sum(1).max())
    target = (position + np.arange(groups)[:, None] * width)[per_group]  # into the packed (groups × width)
    bags, n, target, source, slots, mask = _to_device(
        device, batch, lengths, target, np.flatnonzero(per_group), np.maximum(position, 0), host_mask
    )
    if cap is not None and int(lengths.max()) > cap:
        longest = int(lengths.max())
        keys = torch.rand((len(batch), longest), device=device, generator=generator)
        keys.masked_fill_(torch.arange(longest, device=device) >= n.unsqueeze(1), float("inf"))
        local = keys.topk(cap, dim=1, largest=False).indices.sort(dim=1).values
    else:
        local = torch.arange(slots_per_bag, device=device).expand(len(batch), -1)
    rows = data.offsets[bags].unsqueeze(1) + local  # (B, N) rows of the flat tensor
    first_row = int(data.starts[batch[0]])  # short groups are padded with a real row
    packed = torch.full((groups, width), first_row, dtype=torch.long, device=device)
    packed.view(-1)[target] = rows.reshape(-1)[source]
    if data.sparse is not None:
        x = SparseRows(*(_rows(table, packed.view(-1), device).view(groups, width, -1) for table in data.sparse))
        return Batch(x if grouped else SparseRows(*(t[0] for t in x)), mask.bool(), slots.view(mask.shape))
    if buffer is not None and data.features.device.type == device.type:
        x = torch.index_select(data.features, 0, packed.view(-1), out=buffer.rows(packed.numel(), data.features))
    else:
        x = _rows(data.features, packed.view(-1), device)
    x = x.view(groups, width, data.dim)
    return Batch(x if grouped else x[0], mask.bool(), slots.view(mask.shape))


def _rows(table: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows of a table that lives on the compute device or in host memory (a cohort too big for the
    device), on the compute device. index_select, not table[rows]: on the CPU it gathers rows
    1.5-5x faster."""
    if table.device.type == device.type:
        return torch.index_select(table, 0, rows)
    return torch.index_select(table, 0, rows.cpu()).pin_memory().to(device, non_blocking=True)


def _to_device(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """Small host arrays on the device in one asynchronous copy, as int64 views."""
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays])
    moved = torch.from_numpy(flat).to(device, non_blocking=True)
    ends = np.cumsum([0] + [np.asarray(a).size for a in arrays])
    return [moved[ends[i] : ends[i + 1]].view(np.shape(a)) for i, a in enumerate(arrays)]


def _gather_streamed(
    data: StreamedBags, batch: np.ndarray, cap: int | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The streamed regime's batch: each bag read once from the store (a per-bag loop is inherent
    to reading from disk), subsampled, and packed into one pinned tensor sent in one copy."""
    n = data.lengths[batch]
    width = int(n.max()) if cap is None else int(min(n.max(), cap))
    seed = (
        int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        if generator is not None
        else 0
    )
    rng = np.random.default_rng(seed)
    x = torch.zeros((len(batch), width, data.dim), dtype=torch.float16, pin_memory=data.device.type == "cuda")
    for row, bag in enumerate(batch):
        embeddings = data.embeddings(int(bag))
        if len(embeddings) > width:
            embeddings = embeddings[np.sort(rng.choice(len(embeddings), width, replace=False))]
        x[row, : len(embeddings)] = torch.from_numpy(embeddings.astype(np.float16, copy=False))
    mask = torch.arange(width) < torch.from_numpy(np.minimum(n, width)).unsqueeze(1)
    return x.to(data.device, non_blocking=True), mask.to(data.device)


def prefetched(data: Bags, batches: Iterable[np.ndarray], gather) -> Iterator[tuple[np.ndarray, tuple]]:
    """(batch, gather(batch)) pairs; for streamed bags the next batch is read while this one trains."""
    batches = list(batches)
    if not isinstance(data, StreamedBags) or not batches:
        for batch in batches:
            yield batch, gather(batch)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="milcache-prefetch") as pool:
        pending = pool.submit(gather, batches[0])
        for i, batch in enumerate(batches):
            ready = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(gather, batches[i + 1])
            yield batch, ready


def instance_rows(data: BagTensor, bag_indices: np.ndarray) -> torch.Tensor:
    """Boolean (total instances,) marking the instances of the given bags."""
    flags = np.zeros(len(data), dtype=bool)
    flags[bag_indices] = True
    return torch.from_numpy(np.repeat(flags, data.lengths)).to(data.features.device)


def _row_chunk(features: torch.Tensor) -> int:
    """Rows a pass over the cohort takes at a time: on the CPU about 4 MB, so that each chunk's
    temporaries stay in cache and in the allocator's reused memory (65,536 rows of 512-d made
    every temporary a fresh 128 MB mapping: its page faults tripled the cost of the pass); on a GPU
    65,536 rows, few enough kernel launches."""
    return 1 << 16 if features.device.type == "cuda" else max(256, (1 << 20) // max(features.shape[1], 1))


def feature_statistics(data: Bags, bag_indices: np.ndarray, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """Per-feature mean and std over the instances of the given bags (the training split only).

    Sums run in float32 over chunks of ``chunk`` rows (default ``_row_chunk``) and accumulate in float64 across
    chunks. Streamed cohorts use up to 256 of the bags, which estimates these statistics well.
    """
    if isinstance(data, StreamedBags):
        chosen = np.random.default_rng(0).permutation(np.unique(bag_indices))[:256]
        stacked = np.concatenate([data.embeddings(int(i)) for i in chosen]).astype(np.float32)
        data = BagTensor(
            torch.from_numpy(stacked),
            torch.tensor([0, len(stacked)]),
            np.array([len(stacked)]),
            ["sample"],
            data.device,
        )
        bag_indices = np.array([0])
    every_bag = len(np.unique(bag_indices)) == len(data)
    rows = None if every_bag else instance_rows(data, bag_indices)
    total = torch.zeros(data.dim, dtype=torch.float64, device=data.features.device)
    squares = torch.zeros_like(total)
    count, chunk = 0, chunk or _row_chunk(data.features)
    for start in range(0, data.features.shape[0], chunk):
        x = data.features[start : start + chunk]
        if rows is not None:
            x = x[rows[start : start + chunk]]
        x = x.float()
        ones = torch.ones(1, x.shape[0], device=x.device)
        total += (ones @ x)[0].double()  # column sums as a GEMV: far faster than sum(0) on CPUs
        squares += (ones @ (x * x))[0].double()  # not in place: x may be a view of the cohort itself
        count += x.shape[0]
    mean = total / max(count, 1)
    std = (squares / max(count, 1) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float().to(data.device), std.float().to(data.device)


def fold_statistics(data: Bags, folds: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-feature mean and std of each fold's bags, from one pass over the cohort: per-bag sums
    and sums of squares are computed once, and each fold adds up its bags' rows of them."""
    if isinstance(data, StreamedBags) or len(folds) == 1:
        return [feature_statistics(data, np.asarray(f)) for f in folds]
    sums, squares = _bag_moments(data)
    counts = torch.from_numpy(data.lengths.astype(np.float64)).to(sums.device)
    member = torch.zeros((len(folds), len(data)), dtype=torch.float64, device=sums.device)
    for k, fold in enumerate(folds):
        member[k, torch.from_numpy(np.unique(fold)).to(sums.device)] = 1.0
    n = (member @ counts).clamp_min(1).unsqueeze(1)
    mean = (member @ sums) / n
    std = ((member @ squares) / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return [(mean[k].float().to(data.device), std[k].float().to(data.device)) for k in range(len(folds))]


def _bag_moments(data: BagTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bag's column sums and sums of squares (bags × D, float64)."""
    device = data.features.device
    owner = torch.from_numpy(np.repeat(np.arange(len(data)), data.lengths)).to(device)
    sums = torch.zeros((len(data), data.dim), dtype=torch.float64, device=device)
    squares, chunk = torch.zeros_like(sums), _row_chunk(data.features)
    for start in range(0, data.features.shape[0], chunk):
        x = data.features[start : start + chunk].double()
        rows = owner[start : start + chunk]
        sums.index_add_(0, rows, x)
        squares.index_add_(0, rows, x * x)
    return sums, squares

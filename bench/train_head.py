"""Stage 2 speed at identical architecture (gated attention, 256-d instance layer, 128-d attention):
milcache's trainer against the one-bag-per-step loop of MIL reference code and torchmil's ABMIL
with its padded collate (4 bags per step; imported when installed, else said so), same data, same run.

    (a) 200 bags × 1,000–2,000 instances × 512-d: seconds per training epoch
    (b) 92 bags × 2–40 × 166-d (MUSK size): wall time of a whole 10-fold × 5 CV, 40 epochs
    (c) 1,000 bags × 8,000 × 1,024-d on a GPU: seconds per epoch

    python bench/train_head.py --case a
    python bench/train_head.py --case b --repeats 5
    python bench/train_head.py --case c --device cuda
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import BagTensor, resident_dtype
from milcache.aggregator.model import build_model
from milcache.aggregator.run import Cohort, cross_validate
from milcache.aggregator.splits import cv_splits
from milcache.aggregator.tasks import Task
from milcache.aggregator.trainer import fit
from milcache.devices import resolve_device
from reference import GatedAttention, reference_optimizer

HIDDEN, ATTENTION = 256, 128
ARCHITECTURE = {"hidden": HIDDEN, "attention_dim": ATTENTION}


def synthetic(bags: int, low: int, high: int, dim: int, device: torch.device, dtype=torch.float16):
    """A cohort of random embeddings stored as ``dtype``, held as ``load_bags`` would hold it (on
    the CPU a float16 store is widened to float32); every side of the bench trains on this tensor."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(low, high + 1, bags).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    held = resident_dtype(dtype, device, int(offsets[-1]) * dim)
    features = torch.randn(int(offsets[-1]), dim, dtype=dtype, device=device).to(held)
    y = (np.arange(bags) % 2).astype(np.int64)
    rng.shuffle(y)
    ids = [f"b{i}" for i in range(bags)]
    return BagTensor(features, torch.from_numpy(offsets).to(device), lengths, ids, device), y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loop_epochs(
    data: BagTensor, y: np.ndarray, bags: np.ndarray, epochs: int, seed: int = 0, bf16: bool | None = None
) -> float:
    """One bag per step (batch size 1), Adam 5e-4: the reference loop, under a bf16 autocast on
    CUDA (or as ``bf16`` says). Returns seconds."""
    torch.manual_seed(seed)
    device = data.device
    model = GatedAttention(data.dim, HIDDEN, ATTENTION).to(device)
    optimizer = reference_optimizer(model)
    targets = torch.from_numpy(y).float().to(device)
    loss_fn = nn.BCEWithLogitsLoss()
    use_bf16 = device.type == "cuda" if bf16 is None else bf16
    rng = np.random.default_rng(seed)
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for i in rng.permutation(bags):
            x = data.features[data.offsets[i] : data.offsets[i + 1]]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model(x.float() if not use_bf16 else x).float(), targets[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start


def torchmil_epochs(data: BagTensor, y: np.ndarray, bags: np.ndarray, epochs: int, batch: int = 4) -> float | None:
    """torchmil's ABMIL (gated) with its padded collate, ``batch`` bags per step; None without torchmil."""
    try:
        from torchmil.data import pad_tensors
        from torchmil.models import ABMIL
    except ImportError:
        return None
    device = data.device
    torch.manual_seed(0)
    feat_ext = nn.Sequential(nn.Linear(data.dim, HIDDEN), nn.ReLU())
    model = ABMIL(in_shape=(data.dim,), att_dim=ATTENTION, gated=True, feat_ext=feat_ext).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=5e-4)
    targets = torch.from_numpy(y).float().to(device)
    rng = np.random.default_rng(0)
    use_bf16 = device.type == "cuda"
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(bags)
        for s in range(0, len(order), batch):
            chosen = order[s : s + batch]
            x, mask = pad_tensors([data.features[data.offsets[i] : data.offsets[i + 1]].float() for i in chosen])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                _, losses = model.compute_loss(targets[chosen], x, mask)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start


def milcache_epochs(data: BagTensor, y: np.ndarray, epochs: int, config: TrainConfig) -> float:
    task = Task("binary", [0, 1])
    model = build_model(config.head, config.head_options, data.dim, task)
    sync(data.device)
    start = time.perf_counter()
    fit(model, data, task, y, np.arange(len(y)), None, config)
    sync(data.device)
    return time.perf_counter() - start


def _amx_cpu(device: torch.device) -> bool:
    """A CPU with AMX tiles (Intel Xeon 4th generation and later), where bf16 matmuls run on their own units."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent: say no
    return device.type == "cpu" and probe is not None and bool(probe())


def matmul_rate(device: torch.device, models: int, width: int) -> float:
    """FLOP/s of the batched matmul this device reaches now on a step's shape (``models`` × ``width``
    instances × the hidden width, into V and U)."""
    a = torch.randn(models, width, HIDDEN, device=device)
    b = torch.randn(models, HIDDEN, 2 * ATTENTION, device=device)
    torch.bmm(a, b)
    sync(device)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.5:
        torch.bmm(a, b)
        calls += 1
    sync(device)
    return calls * 2 * models * width * HIDDEN * 2 * ATTENTION / (time.perf_counter() - start)


def matmul_floor(tokens: float, dim: int, rate: float) -> tuple[float, float]:
    """The matrix products of training this architecture on ``tokens`` instance-passes (forward;
    backward without the input's gradient) in FLOP, and the seconds they take at ``rate``: a floor
    under any implementation of the same architecture doing the same work."""
    flops = tokens * 2 * (2 * dim * HIDDEN + 3 * HIDDEN * 2 * ATTENTION)  # instance layer ×2, V and U ×3
    return flops, flops / rate


def _print_floor(what: str, flops: float, seconds: float, loop: float | None, unit: str) -> None:
    line = (
        f"  floor, {what}: {flops / 1e12:.2f} TFLOP of matrix products, {seconds:.3f} {unit} at this run's matmul rate"
    )
    print(line + (f": at most {loop / seconds:.1f}x the loop" if loop else ""))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def case_epoch(
    bags: int, low: int, high: int, dim: int, device: torch.device, epochs: int = 2, rounds: int = 3
) -> None:
    """Seconds per epoch, each side timed over ``epochs`` epochs (one-off costs included), the
    sides taking turns ``rounds`` times and each keeping its fastest round (a shared VM's noise
    only ever slows a round down)."""
    data, y = synthetic(bags, low, high, dim, device)
    print(
        f"{bags} bags × {low}–{high} instances × {dim}-d (float16 store, held as {data.features.dtype}) "
        f"on {_device_name(device)}; {epochs} epochs a round, fastest of {rounds} rounds"
    )
    every = np.arange(bags)
    defaults = TrainConfig(head_options=ARCHITECTURE, epochs=epochs)
    all_instances = TrainConfig(head_options=ARCHITECTURE, epochs=epochs, instances=None)
    milcache_epochs(data, y, 1, TrainConfig(head_options=ARCHITECTURE, epochs=1))  # warm-up (allocator, kernels)
    sides = {
        "milcache, defaults (≤ 1,024 instances a bag a step)": lambda: milcache_epochs(data, y, epochs, defaults),
        "milcache, every instance": lambda: milcache_epochs(data, y, epochs, all_instances),
        "one-bag-per-step loop": lambda: loop_epochs(data, y, every, epochs),
        "torchmil ABMIL, 4 bags a step": lambda: torchmil_epochs(data, y, every, epochs),
    }
    if _amx_cpu(device):  # where bf16 matmuls have their own units; auto stays fp32 on a CPU (README)
        bf16 = TrainConfig(head_options=ARCHITECTURE, epochs=epochs, precision="bf16")
        milcache_epochs(data, y, 1, replace(bf16, epochs=1))  # oneDNN's bf16 kernels warm up too
        sides["milcache, --precision bf16 (AMX)"] = lambda: milcache_epochs(data, y, epochs, bf16)
        sides["one-bag-per-step loop, bf16 autocast (AMX)"] = lambda: loop_epochs(data, y, every, epochs, bf16=True)
    times: dict[str, list] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            times[name].append(run())
    rows = {k: (None if v[0] is None else min(v) / epochs) for k, v in times.items()}
    _print_rows(rows, "s/epoch")
    loop = rows["one-bag-per-step loop"]
    capped = float(np.minimum(data.lengths, defaults.instances).sum())
    rate = matmul_rate(device, 1, 6144)  # a step of 6 bags × 1,024 instances
    _print_floor("milcache defaults", *matmul_floor(capped, dim, rate), loop, "s/epoch")
    every = float(data.lengths.sum())
    _print_floor("every instance (the loop's work)", *matmul_floor(every, dim, rate), loop, "s/epoch")


def case_cv(folds: int, repeats: int, device: torch.device, loop_folds: int | None) -> None:
    """Wall time of a whole folds × repeats CV on MUSK-sized bags: milcache's defaults (stacked
    folds, 25 epochs) against the reference recipe (40 epochs, one bag per step), fold after fold.
    With ``loop_folds``, the peers run that many folds and their time is scaled to the whole CV
    (every fold costs the same to them; the output says so)."""
    data, y = synthetic(92, 2, 40, 166, device, dtype=torch.float32)
    print(f"92 bags × 2–40 instances × 166-d on {_device_name(device)}: {folds}-fold × {repeats} CV")
    ids = np.array(data.bag_ids, dtype=object)
    cohort = Cohort(data, Task("binary", [0, 1]), y, ids, None, y.tolist(), 0, {})
    config = TrainConfig(head_options=ARCHITECTURE)
    cross_validate(cohort, TrainConfig(head_options=ARCHITECTURE, epochs=1), folds, 1)  # warm-up
    sync(device)
    start = time.perf_counter()
    cross_validate(cohort, config, folds, repeats)
    sync(device)
    ours = time.perf_counter() - start
    splits = cv_splits(y, ids, folds, repeats, 0)
    measured = splits[: loop_folds or len(splits)]
    scale = len(splits) / len(measured)
    loop = scale * sum(loop_epochs(data, y, train, 40, seed=k) for k, (train, _) in enumerate(measured))
    tm = [torchmil_epochs(data, y, train, 40) for train, _ in measured]
    note = f" ({len(measured)} folds measured, scaled to {len(splits)})" if scale != 1 else ""
    rows = {
        f"milcache cross_validate, defaults ({config.epochs} epochs)": ours,
        f"one-bag-per-step loop, 40 epochs, fold after fold{note}": loop,
        f"torchmil ABMIL, 4 bags a step, 40 epochs{note}": None if tm[0] is None else scale * sum(tm),
    }
    _print_rows(rows, "s for the CV")
    visits = float(sum(data.lengths[train].sum() for train, _ in splits)) * config.epochs
    rate = matmul_rate(device, len(splits), 100)  # every fold's ~100 packed instances a step
    _print_floor(f"milcache's {config.epochs} epochs", *matmul_floor(visits, 166, rate), loop, "s")


def _print_rows(rows: dict, unit: str) -> None:
    """Each row against milcache's defaults (the first row); each milcache row against the fastest peer."""
    ours = next(iter(rows.values()))
    peers = [v for k, v in rows.items() if not k.startswith("milcache") and v is not None]
    for name, value in rows.items():
        if value is None:
            print(f"  {name:66s}  not installed (pip install torchmil to compare)")
        else:
            print(f"  {name:66s} {value:9.3f} {unit}   milcache defaults are {value / ours:6.2f}x faster")
    for name, value in rows.items():
        if peers and name.startswith("milcache") and value is not None:
            print(f"  ratio to the fastest peer, {name}: {min(peers) / value:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["a", "b", "c"], default="a")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-folds", type=int, help="case b: time the peers on this many folds and scale up")
    parser.add_argument("--rounds", type=int, default=3, help="cases a and c: turns each side takes (fastest kept)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    device = resolve_device(args.device)
    if args.case == "a":
        case_epoch(200, 1000, 2000, 512, device, rounds=args.rounds)
    elif args.case == "b":
        case_cv(args.folds, args.repeats, device, args.loop_folds)
    else:
        if device.type != "cuda":
            print("case (c) is sized for a GPU (1,000 bags × 8,000 × 1,024-d, 16 GB): GPU figures pending")
            return
        case_epoch(1000, 8000, 8000, 1024, device, rounds=args.rounds)


if __name__ == "__main__":
    main()

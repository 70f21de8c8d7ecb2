"""Fitting one model on resident bags: AdamW, cosine or constant schedule, bf16 on CUDA, early
stopping on a validation split, and batched inference. Knows nothing of Optuna beyond ``report``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import Bags, feature_statistics, gather_batch, plan_batches, prefetched
from milcache.aggregator.model import MILModel
from milcache.aggregator.tasks import Task

Report = Callable[[int, float], None]


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _class_weights(task: Task, y: np.ndarray, device: torch.device) -> torch.Tensor | None:
    if task.kind == "regression":
        return None
    counts = np.bincount(y, minlength=len(task.classes)).astype(np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _elastic_net(model: MILModel, strength: float, l1_ratio: float) -> torch.Tensor:
    matrices = [p for p in model.head.parameters() if p.ndim >= 2]
    l1 = sum(p.abs().sum() for p in matrices)
    l2 = sum(p.pow(2).sum() for p in matrices)
    return strength * (l1_ratio * l1 + (1 - l1_ratio) * l2)


def _balanced(y: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(y[indices])
    p = 1.0 / counts[y[indices]]
    return rng.choice(indices, size=len(indices), replace=True, p=p / p.sum())


@torch.no_grad()
def infer(
    model: MILModel, data: Bags, indices: np.ndarray, config: TrainConfig, scores: bool = False
) -> tuple[torch.Tensor, list[np.ndarray] | None]:
    """Logits of the given bags (in the order given) using all their instances, and optionally each
    bag's per-instance scores."""
    model.eval()
    indices = np.asarray(indices)
    position = np.empty(len(data), dtype=np.int64)
    position[indices] = np.arange(len(indices))
    logits = None
    per_bag: list[np.ndarray | None] = [None] * len(indices)
    batches = plan_batches(data.lengths, indices, 4 * config.batch_size, config.max_tokens)
    for batch, (x, mask) in prefetched(data, batches, lambda b: gather_batch(data, b)):
        with _autocast(data.device, config.precision):
            out = model(x, mask)
        if logits is None:
            logits = torch.empty((len(indices), out.logits.shape[1]), device=data.device)
        logits[torch.from_numpy(position[batch]).to(data.device)] = out.logits.float()
        if scores and out.scores is not None:
            values = out.scores.float().cpu().numpy()
            for row, bag in enumerate(batch):  # per-bag output arrays: only when asked for
                per_bag[position[bag]] = values[row, : data.lengths[bag]]
    return logits, (per_bag if scores else None)


def fit(
    model: MILModel,
    data: Bags,
    task: Task,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray | None,
    config: TrainConfig,
    report: Report | None = None,
    monitor: str = "auc",
    step_offset: int = 0,
) -> dict:
    """Train ``model`` on the bags ``train``; with ``val``, stop early on its loss and keep the best
    epoch's weights. ``report(step, value)`` receives the monitored validation metric each epoch."""
    device = data.device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    model.to(device)
    mean, std = feature_statistics(data, train)
    model.mean.copy_(mean)
    model.std.copy_(std)
    targets = torch.from_numpy(y).to(device)
    weights = _class_weights(task, y[train], device) if config.class_weights else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * len(
        plan_batches(data.lengths, train, config.batch_size, config.max_tokens, config.instances)
    )
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    best = {"loss": math.inf, "epoch": config.epochs, "state": None}
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_bags = _balanced(y, train, rng) if config.balanced_sampling and task.kind != "regression" else train
        total, count = 0.0, 0
        batches = plan_batches(data.lengths, epoch_bags, config.batch_size, config.max_tokens, config.instances, rng)
        for batch, (x, mask) in prefetched(data, batches, lambda b: gather_batch(data, b, config.instances, generator)):
            batch_t = torch.from_numpy(batch).to(device)
            with _autocast(device, config.precision):
                out = model(x, mask)
                loss = task.loss(out.logits, targets[batch_t], weights)
                extra = model.head.extra_loss(out, targets[batch_t])
                if extra is not None:
                    loss = loss + extra
            if config.elastic_net > 0:
                loss = loss + _elastic_net(model, config.elastic_net, config.l1_ratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        record = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if val is not None and len(val):
            logits, _ = infer(model, data, val, config)
            val_targets = targets[torch.from_numpy(val).to(device)]
            record["val_loss"] = float(task.loss(logits, val_targets))
            metrics = task.metrics(y[val], task.outputs(logits).cpu().numpy())
            record.update({f"val_{k}": v for k, v in metrics.items()})
            if report is not None and monitor in metrics:
                report(step_offset + epoch, metrics[monitor])
            if record["val_loss"] < best["loss"] - 1e-4:
                best = {"loss": record["val_loss"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            elif epoch - best["epoch"] >= config.patience:
                history.append(record)
                break
        history.append(record)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"] if best["state"] is not None else len(history), "history": history}

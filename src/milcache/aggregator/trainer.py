"""Fitting models on resident bags: several models of one architecture (the folds of a
cross-validation, a trial's folds) train together as one stacked model, and batched inference.

Stacking: the models' parameters get a leading model axis (``torch.func.stack_module_state``) and
one ``vmap``-ed step trains all of them, each on a batch of its own training bags, so that a
10-fold × 5 CV costs about one model's wall time on small cohorts. Every model keeps its own batch
plan, step count, learning-rate schedule and early stopping: a model whose epoch has fewer steps,
or that has stopped, is masked out of the update, so each fold trains as it would alone.

A stacked step is as wide as its widest model's batch, so the models' epochs are aligned by size:
each model's batches are ranked by size and spread over a grid of as many slots as the longest
epoch has steps, and every model walks the grid in one shared random order. At each step all
models hold batches of about the same rank, hence about the same width (unaligned, every step of
a 50-model stack was as wide as the largest of 50 random batches). A model trained alone on the
same grid visits its batches in the same order.
Knows nothing of Optuna beyond ``report``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from milcache.aggregator.config import BATCH_RANGE, TrainConfig
from milcache.aggregator.data import Bags, RowBuffer, fold_statistics, gather_batch, plan_batches, prefetched
from milcache.aggregator.heads import Preactivated, SparseRows, sparse_affine
from milcache.aggregator.model import MILModel
from milcache.aggregator.tasks import Task
from milcache.devices import autocast, retain_freed_host_memory

Report = Callable[[int, float], None]


def _class_weights(task: Task, y: np.ndarray, device: torch.device) -> torch.Tensor:
    """Inverse class frequencies of a training split (ones for tasks without classes)."""
    if not task.has_classes:
        return torch.ones(1, device=device)
    counts = np.bincount(y, minlength=len(task.classes)).astype(np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _balanced(y: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(y[indices])
    p = 1.0 / counts[y[indices]]
    return rng.choice(indices, size=len(indices), replace=True, p=p / p.sum())


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor over the same memory: stacked weight matrices are stored
    transposed (see ``_in_gradient_layout``), and an element-wise update may run on either view."""
    return t.transpose(1, 2) if t.ndim == 3 and not t.is_contiguous() else t


def _in_gradient_layout(p: torch.Tensor) -> torch.Tensor:
    """A stacked weight matrix (models × out × in) stored as models × in × out, the layout that
    backward's weight gradient of ``F.linear`` comes in, so that autograd hands the gradient over
    instead of adding it into the parameter's layout: that transposing add took as long as the
    optimizer step (10 % of a 50-model CV step in torch's profiler, on bench/train_head.py's case-b
    cohort)."""
    if p.ndim != 3:
        return p
    return p.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(p.requires_grad)


class StackedAdam:
    """Adam over parameters with a leading model axis, where each model has its own step count and
    learning rate and may sit a step out. ``decoupled`` weight decay is ``torch.optim.AdamW``'s;
    otherwise the decay is an L2 term added to the gradient, as ``torch.optim.Adam`` adds it.

    The two regularise differently: through Adam's per-weight normalisation, the L2 term pulls a
    weight whose loss gradient is small (a feature that rarely fires) towards zero at up to the
    learning rate per step, where AdamW's decay moves every weight by the same small fraction. On
    corel_dogs (5 % positive bags) that was the gap to the MIL literature's recipe (bench/quality.py:
    AUC 0.867-0.880 with AdamW whatever else was changed, 0.892 with L2; the reference's 0.890).

    torch's optimisers update whole tensors, so this one runs torch's fused Adam / AdamW kernel
    (the one behind ``fused=True``: one pass over parameters, gradients and moments) once per
    distinct learning rate and run of consecutive models at one step count among the models taking
    the step (``_runs``): on slices of the stacked tensors, the whole of them when every model
    takes it with the same step count.
    Gradients are freed after each step; a parameter that got none is updated with a zero
    gradient (decay and moments move on, as torch's optimisers do with a zeroed gradient)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        n_models: int,
        weight_decay: float,
        decoupled: bool = True,
        betas=(0.9, 0.999),
        eps=1e-8,
    ):
        self.params, self.weight_decay, self.betas, self.eps = params, weight_decay, betas, eps
        self._kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        self.exp_avg = [torch.zeros_like(p) for p in params]  # zeros_like keeps p's (transposed) layout
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(n_models, device=params[0].device)  # read by the kernel (bias correction)
        self.host_steps = np.zeros(n_models)  # the same counts, for the learning-rate schedule
        # The dense views of the tensors that last as long as the optimiser (parameters, moments) and
        # each model's views of them, made once: building them took longer than the update itself
        # (gradients are new every step, so only theirs are made per step).
        self._lasting = [[_dense(t) for t in ts] for ts in (params, self.exp_avg, self.exp_avg_sq)]
        self._model_views = [[[t[m] for t in ts] for ts in self._lasting] for m in range(n_models)]

    @torch.no_grad()
    def step(self, lr: np.ndarray, active: np.ndarray) -> None:
        """``lr`` holds one value per model and ``active`` (bool) says which models take this step
        (both on the host: nothing here waits for the device)."""
        if active.all():
            self.steps.add_(1)
        else:
            self.steps.index_add_(
                0,
                torch.from_numpy(np.flatnonzero(active)).to(self.steps.device),
                self.steps.new_ones(int(active.sum())),
            )
        self.host_steps += active
        grads = [_dense(p.grad if p.grad is not None else torch.zeros_like(p)) for p in self.params]
        dense = self._lasting
        for rate in np.unique(lr[active]):
            members = np.flatnonzero(active & (lr == rate))
            for first, last in _runs(members, self.host_steps):
                if last - first > 1:  # consecutive models at one step count: slices of the stacked tensors
                    lists = [[t[first:last] for t in ts] for ts in (dense[0], grads, dense[1], dense[2])]
                else:  # one model: its views, made once
                    views = self._model_views[first]
                    lists = [views[0], [g[first] for g in grads], views[1], views[2]]
                self._kernel(
                    *lists,
                    [],
                    [self.steps[first]] * len(self.params),
                    lr=float(rate),
                    beta1=self.betas[0],
                    beta2=self.betas[1],
                    weight_decay=self.weight_decay,
                    eps=self.eps,
                    amsgrad=False,
                    maximize=False,
                )

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _runs(members: np.ndarray, steps: np.ndarray) -> list[tuple[int, int]]:
    """``members`` (ascending model indices) as runs [first, last) of consecutive models at one
    step count: each run is one slice of the stacked tensors, updated in one kernel call (the
    folds of a CV differ by a bag, hence by a step an epoch: per-model calls took 2x the update)."""
    if len(members) == 0:
        return []
    breaks = np.flatnonzero((np.diff(members) != 1) | (np.diff(steps[members]) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(members)]])
    return [(int(members[a]), int(members[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


class _Objective(nn.Module):
    """A model and its training loss, as one module for ``functional_call``."""

    def __init__(self, model: MILModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, mask, slots, targets, class_weights, bag_weight):
        out = self.model(x, mask, slots)
        return self.model.loss(out, targets, class_weights, bag_weight)


@dataclass
class _ModelState:
    """The bookkeeping of one model of a stack."""

    train: np.ndarray
    val: np.ndarray | None
    watch: np.ndarray | None
    rng: np.random.Generator
    steps_per_epoch: int
    best_loss: float = math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    stopped: bool = False
    epochs_run: int = 0


def _lr_factor(schedule: str, step: np.ndarray, total: np.ndarray) -> np.ndarray:
    if schedule == "cosine":
        return 0.5 * (1 + np.cos(math.pi * np.minimum(step, total) / np.maximum(total, 1)))
    return np.ones_like(step)


def fit_stacked(
    models: list[MILModel],
    data: Bags,
    task: Task,
    y: np.ndarray,
    trains: list[np.ndarray],
    vals: list[np.ndarray | None],
    config: TrainConfig,
    seeds: list[int] | None = None,
    report: Report | None = None,
    monitor: str = "auc",
    watch: list[np.ndarray] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    step_grid: int | None = None,
) -> list[dict]:
    """Train ``models[m]`` on the bags ``trains[m]``, all at once; with ``vals[m]``, model m stops
    on its own when its validation loss has not improved for ``config.patience`` epochs and keeps
    its best epoch's weights. ``report(epoch, value)`` gets the ``monitor`` metric averaged over the
    models' validation sets (or the ``watch`` sets when there are none). ``on_epoch(n)`` is told
    how many model-epochs finished. ``step_grid`` (at least the longest epoch's steps, which is
    the default) is the grid the epochs are aligned on (see the module's docstring). Returns each
    model's best epoch, history and the step grid used."""
    from torch.func import functional_call, stack_module_state, vmap

    device, n_models = data.device, len(models)
    if device.type == "cpu":
        retain_freed_host_memory()  # each step reuses the last one's pages (see there)
    config = config.resolve(min(len(t) for t in trains))  # idempotent once resolved
    seeds = seeds if seeds is not None else [config.seed] * n_models
    torch.manual_seed(seeds[0])
    generator = torch.Generator(device=device).manual_seed(seeds[0])
    for model, (mean, std) in zip(models, fold_statistics(data, trains), strict=True):
        model.to(device)
        model.mean.copy_(mean)
        model.std.copy_(std)
    states = [
        _ModelState(
            train=np.asarray(trains[m]),
            val=vals[m] if vals[m] is not None and len(vals[m]) else None,
            watch=watch[m] if watch is not None else None,
            rng=np.random.default_rng(seeds[m]),
            steps_per_epoch=len(
                plan_batches(
                    data.lengths, np.asarray(trains[m]), config.batch_size, config.max_tokens, config.instances
                )
            ),
        )
        for m in range(n_models)
    ]
    objectives = [_Objective(model).train() for model in models]
    params, buffers = stack_module_state(objectives)
    params = {name: _in_gradient_layout(p) for name, p in params.items()}
    base = copy.deepcopy(objectives[0]).to("meta")
    targets = torch.from_numpy(y).to(device)
    class_weights = torch.stack(
        [
            _class_weights(task, y[s.train], device)
            if config.class_weights
            else torch.ones(max(len(task.classes), 1), device=device)
            for s in states
        ]
    )
    optimizer = StackedAdam(list(params.values()), n_models, config.weight_decay, config.optimizer == "adamw")
    total_steps = np.array([float(config.epochs * s.steps_per_epoch) for s in states])
    grid = max([s.steps_per_epoch for s in states] + [step_grid or 0])

    def one_model_loss(p, b, x, mask, slots, t, cw, bw):
        return functional_call(base, (p, b), (x, mask, slots, t, cw, bw))

    if n_models == 1:  # a stack of one needs no vmap, whose dispatch is a fifth of a small step

        def stacked_loss(p, b, *inputs):
            # squeeze, not [0]: its backward is a view, so the gradient keeps the parameter's layout
            first = {k: v.squeeze(0) for k, v in p.items()}, {k: v.squeeze(0) for k, v in b.items()}
            return one_model_loss(*first, *(_first_model(v) for v in inputs)).unsqueeze(0)

        streamed_loss = stacked_loss
    else:
        stacked_loss = vmap(one_model_loss, randomness="different")
        streamed_loss = vmap(one_model_loss, in_dims=(0, 0, 0, 0, None, 0, 0, 0), randomness="different")
    histories: list[list[dict]] = [[] for _ in range(n_models)]
    rows = RowBuffer()  # each step's instances, gathered over the previous step's (used up by then)
    for epoch in range(1, config.epochs + 1):
        active_models = [m for m, s in enumerate(states) if not s.stopped]
        if not active_models:
            break
        order = np.random.default_rng([config.seed, epoch]).permutation(grid)  # shared by the stack
        plans = [
            [None] * grid if states[m].stopped else _on_grid(_epoch_batches(states[m], data, y, task, config), grid)
            for m in range(n_models)
        ]
        steps = _stack_steps([[plan[slot] for slot in order] for plan in plans], data.lengths)
        epoch_loss = torch.zeros(n_models, device=device)
        epoch_bags = torch.zeros(n_models, device=device)
        base.train()
        gather = lambda step: gather_batch(data, step[0], config.instances, generator, n_models, rows)  # noqa: E731
        for (flat, weight, active), batch in prefetched(data, steps, gather):
            batch = batch.grouped(n_models)
            bags = torch.from_numpy(flat).to(device, non_blocking=True).view(n_models, -1)
            bag_weight = torch.from_numpy(weight).to(device, non_blocking=True)
            loss_of = stacked_loss if batch.slots is not None else streamed_loss
            with autocast(device, config.precision):
                x = _instance_layer_of_sparse(batch.x, params, buffers)
                losses = loss_of(params, buffers, x, batch.mask, batch.slots, targets[bags], class_weights, bag_weight)
            total = losses.sum()
            if config.elastic_net > 0:
                total = total + _elastic_net(params, config.elastic_net, config.l1_ratio)
            optimizer.zero_grad()
            total.backward()
            optimizer.step(config.lr * _lr_factor(config.schedule, optimizer.host_steps, total_steps), active > 0)
            epoch_loss += losses.detach().float() * bag_weight.sum(1)  # stays on the device: no sync
            epoch_bags += bag_weight.sum(1)
        train_loss = (epoch_loss / epoch_bags.clamp_min(1)).tolist()
        _end_epoch(
            epoch,
            states,
            active_models,
            models,
            params,
            buffers,
            data,
            task,
            y,
            config,
            train_loss,
            histories,
            monitor if report is not None else None,
        )
        if report is not None:
            values = [histories[m][-1].get(f"val_{monitor}", math.nan) for m in active_models]
            finite = [v for v in values if np.isfinite(v)]
            if finite:
                report(epoch, float(np.mean(finite)))
        if on_epoch is not None:  # a model that stopped will not run its remaining epochs
            on_epoch(len(active_models) + sum(config.epochs - epoch for m in active_models if states[m].stopped))
    results = []
    for m, state in enumerate(states):
        final = state.best_state if state.best_state is not None else _model_state(params, buffers, m)
        models[m].load_state_dict(final)
        results.append(
            {
                "best_epoch": state.best_epoch if state.best_state is not None else state.epochs_run,
                "history": histories[m],
                "step_grid": grid,
            }
        )
    return results


def _first_model(value):
    """Model 0's part of a stacked input (a tensor, a ``SparseRows`` or ``Preactivated``, or None)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return type(value)(*(t[0] for t in value))
    return value[0]


def _instance_layer_of_sparse(x, params: dict, buffers: dict):
    """Sparse instances through every stacked model's instance layer at once, outside ``vmap``
    (whose batching of the row gathers took longer than the dense product: see ``sparse_affine``);
    other inputs as they are."""
    if not isinstance(x, SparseRows):
        return x
    weight = params["model.head.instance_layer.weight"].transpose(1, 2)  # models × D × hidden, contiguous
    bias = params["model.head.instance_layer.bias"]
    return Preactivated(sparse_affine(x, weight, bias, buffers["model.mean"], buffers["model.std"]))


def _epoch_batches(state: _ModelState, data: Bags, y: np.ndarray, task: Task, config: TrainConfig) -> list:
    """A model's batches for one epoch, smallest (padded instances) first."""
    bags = state.train
    if config.balanced_sampling and task.has_classes:
        bags = _balanced(y, bags, state.rng)
    batches = plan_batches(data.lengths, bags, config.batch_size, config.max_tokens, config.instances, state.rng, False)
    capped = data.lengths if config.instances is None else np.minimum(data.lengths, config.instances)
    widths = [len(b) * int(capped[b].max()) for b in batches]
    return [batches[i] for i in np.argsort(widths, kind="stable")]


def _on_grid(batches: list[np.ndarray], grid: int) -> list[np.ndarray | None]:
    """Batches ranked by size spread evenly over ``grid`` slots (empty slots None): rank i of n
    goes to slot i · grid // n, so the same rank of every model of a stack lands in about the same slot."""
    slots: list[np.ndarray | None] = [None] * grid
    for rank, batch in enumerate(batches):
        slots[rank * grid // len(batches)] = batch
    return slots


def _stack_steps(plans: list[list[np.ndarray | None]], lengths: np.ndarray) -> list[tuple]:
    """One step of the stack per grid slot that any model uses: every model's batch side by side,
    padded with zero-weight copies of the step's shortest bag (which keep every value finite and
    the padded width small) for models without a batch in that slot or that have stopped."""
    n_models = len(plans)
    n_steps = max((len(p) for p in plans), default=0)
    steps = []
    for s in range(n_steps):
        batches = [p[s] if s < len(p) else None for p in plans]
        present = [b for b in batches if b is not None]
        if not present:
            continue
        width = max(len(b) for b in present)
        pooled = np.concatenate(present)
        filler = pooled[np.argmin(lengths[pooled])]
        flat = np.full((n_models, width), filler, dtype=np.int64)
        weight = np.zeros((n_models, width), dtype=np.float32)
        active = np.zeros(n_models, dtype=np.float32)
        for m, b in enumerate(batches):
            if b is not None:
                flat[m, : len(b)] = b
                weight[m, : len(b)] = 1.0
                active[m] = 1.0
        steps.append((flat.reshape(-1), weight, active))
    return steps


def _elastic_net(params: dict[str, torch.Tensor], strength: float, l1_ratio: float) -> torch.Tensor:
    """The penalty on the heads' weight matrices, summed over the stacked models (each model's
    gradient is its own penalty's)."""
    matrices = [p for name, p in params.items() if name.startswith("model.head.") and p.ndim >= 3]
    l1 = sum(p.abs().sum() for p in matrices)
    l2 = sum(p.pow(2).sum() for p in matrices)
    return strength * (l1_ratio * l1 + (1 - l1_ratio) * l2)


def _model_state(params: dict, buffers: dict, m: int) -> dict:
    """Model m's own state dict (copies), in MILModel's key names."""
    return {k.removeprefix("model."): v[m].detach().clone() for k, v in {**params, **buffers}.items()}


def _end_epoch(
    epoch, states, active_models, models, params, buffers, data, task, y, config, train_loss, histories, monitor
):
    """Each active model's validation (and early stopping) at the end of an epoch."""
    for m in active_models:
        state = states[m]
        state.epochs_run = epoch
        record = {"epoch": epoch, "train_loss": train_loss[m]}
        evaluated = state.val if state.val is not None else state.watch
        if evaluated is not None:
            models[m].load_state_dict(_model_state(params, buffers, m))
            logits, _ = infer(models[m], data, evaluated, config)
            record["val_loss"] = float(task.loss(logits, torch.from_numpy(y[evaluated]).to(logits.device)))
            if monitor is not None:  # only what a pruner reads: metrics cost more than a small epoch
                metrics = task.metrics(y[evaluated], task.outputs(logits).cpu().numpy(), only=monitor)
                record.update({f"val_{k}": v for k, v in metrics.items()})
        if state.val is not None:
            if record["val_loss"] < state.best_loss - 1e-4:
                state.best_loss, state.best_epoch = record["val_loss"], epoch
                state.best_state = _model_state(params, buffers, m)
            elif epoch - state.best_epoch >= config.patience:
                state.stopped = True
        histories[m].append(record)


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
    seed: int | None = None,
    step_grid: int | None = None,
) -> dict:
    """Train one model (a stack of one); see ``fit_stacked``."""
    seeds = [config.seed if seed is None else seed]
    return fit_stacked([model], data, task, y, [train], [val], config, seeds, report, monitor, step_grid=step_grid)[0]


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
    batches = plan_batches(data.lengths, indices, 4 * (config.batch_size or BATCH_RANGE[1]), config.max_tokens)
    for batch, bags in prefetched(data, batches, lambda b: gather_batch(data, b)):
        with autocast(data.device, config.precision):
            out = model(bags.x, bags.mask, bags.slots)
        if logits is None:
            logits = torch.empty((len(indices), out.logits.shape[1]), device=data.device)
        logits[torch.from_numpy(position[batch]).to(data.device)] = out.logits.float()
        if scores and out.scores is not None:
            values = out.scores.float().cpu().numpy()
            for row, bag in enumerate(batch):  # per-bag output arrays: only when asked for
                per_bag[position[bag]] = values[row, : data.lengths[bag]]
    return logits, (per_bag if scores else None)

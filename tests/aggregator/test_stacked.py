"""Fold-parallel training: a stack of models trains each one as it would train alone."""

import numpy as np
import pytest
import torch

from milcache.aggregator.config import TrainConfig
from milcache.aggregator.data import BagTensor
from milcache.aggregator.model import build_model
from milcache.aggregator.tasks import Task
from milcache.aggregator.trainer import fit, fit_stacked, infer


def _cohort(n_bags=60, dim=8, seed=0):
    """Bags of 3-30 instances; a bag is positive when one of its instances is shifted."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, n_bags)
    y = rng.integers(0, 2, n_bags)
    x = rng.standard_normal((int(lengths.sum()), dim)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for b in np.flatnonzero(y):
        x[offsets[b], 0] += 3.0
    data = BagTensor(
        torch.from_numpy(x), torch.from_numpy(offsets), lengths, [f"b{i}" for i in range(n_bags)], torch.device("cpu")
    )
    return data, y


def _model(config, task, dim, seed):
    torch.manual_seed(seed)
    return build_model(config.head, config.head_options, dim, task)


@pytest.mark.parametrize("head", ["gated-attention", "clam-sb", "dsmil"])
def test_each_stacked_model_equals_training_it_alone(head):
    data, y = _cohort()
    task = Task("binary", [0, 1])
    # No dropout and no subsampling: the only random draws left are each model's own batch plans.
    config = TrainConfig(
        head=head, head_options={"dropout": 0.0}, epochs=6, batch_size=4, instances=None, patience=2, lr=5e-3
    )
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    # Folds of different sizes (different step counts), with and without a validation split.
    trains = [order[:40], order[10:47], order[5:30]]
    vals = [order[40:55], None, order[30:45]]
    stacked = [_model(config, task, data.dim, seed) for seed in range(3)]
    results = fit_stacked(stacked, data, task, y, trains, vals, config, seeds=[10, 11, 12])
    for k in range(3):
        alone = _model(config, task, data.dim, k)
        # Alone on the stack's step grid: the same batches in the same order.
        result = fit(alone, data, task, y, trains[k], vals[k], config, seed=10 + k, step_grid=results[k]["step_grid"])
        assert result["best_epoch"] == results[k]["best_epoch"]
        assert len(result["history"]) == len(results[k]["history"])  # stopped at the same epoch
        # The same predictions and instance scores. (Parameters are not compared: the attention
        # bias gets a zero gradient, softmax being shift-invariant, and Adam turns the float noise
        # of that zero into arbitrary steps that change nothing.)
        a, scores_a = infer(alone, data, np.arange(len(y)), config, scores=True)
        b, scores_b = infer(stacked[k], data, np.arange(len(y)), config, scores=True)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for sa, sb in zip(scores_a, scores_b, strict=True):
            np.testing.assert_allclose(sa, sb, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("decoupled", [True, False])
def test_stacked_adam_matches_torch_adam_and_adamw(decoupled):
    """Decoupled weight decay is torch's AdamW; the L2 term in the gradient is torch's Adam."""
    from milcache.aggregator.trainer import StackedAdam

    torch.manual_seed(0)
    a = torch.randn(5, 3, requires_grad=True)
    b = a.detach().clone().unsqueeze(0).repeat(2, 1, 1).requires_grad_(True)
    initial = a.detach().clone()
    reference = (torch.optim.AdamW if decoupled else torch.optim.Adam)([a], lr=1e-2, weight_decay=0.1)
    ours = StackedAdam([b], 2, weight_decay=0.1, decoupled=decoupled)
    for _ in range(5):
        grad = torch.randn(5, 3)
        a.grad = grad.clone()
        reference.step()
        b.grad = grad.unsqueeze(0).repeat(2, 1, 1)
        b.grad[1] = 7.0  # model 1 sits every step out: its parameters must not move
        ours.step(np.array([1e-2, 1e-2]), np.array([True, False]))
    torch.testing.assert_close(b[0].detach(), a.detach())
    assert torch.equal(b[1].detach(), initial)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_adam_gives_each_model_its_own_learning_rate_and_step_count(transposed, decoupled):
    """Models with different learning rates (a cosine schedule over folds of different sizes) and
    one that sits some steps out: each follows torch's Adam / AdamW run on its own; the gradients that
    backward writes are the ones used, also for weights stored transposed (as the trainer stores
    stacked weight matrices, in the layout of their gradients)."""
    from milcache.aggregator.trainer import StackedAdam, _in_gradient_layout

    torch.manual_seed(0)
    rates = np.array([1e-2, 3e-3, 1e-2])
    start = torch.randn(3, 4, 2)
    stacked = (
        _in_gradient_layout(start.clone().requires_grad_(True)) if transposed else start.clone().requires_grad_(True)
    )
    assert stacked.is_contiguous() != transposed
    alone = [start[m].clone().requires_grad_(True) for m in range(3)]
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    references = [optimizer([p], lr=float(r), weight_decay=0.05) for p, r in zip(alone, rates, strict=True)]
    ours = StackedAdam([stacked], 3, weight_decay=0.05, decoupled=decoupled)
    for step in range(6):
        target = torch.randn(3, 4, 2)
        active = np.array([True, True, step % 2 == 0])  # model 2 takes every other step
        ours.zero_grad()
        ((stacked - target) ** 2).sum().backward()
        ours.step(rates, active)
        for m in np.flatnonzero(active):
            references[m].zero_grad()
            ((alone[m] - target[m]) ** 2).sum().backward()
            references[m].step()
    for m in range(3):
        torch.testing.assert_close(stacked[m].detach(), alone[m].detach())


@pytest.mark.parametrize("decoupled", [True, False])
def test_stacked_adam_updates_runs_of_models_at_one_step_count_together(decoupled):
    """Folds of a CV differ by a bag, hence by a step an epoch: consecutive models at one step
    count are updated as one slice of the stack, and each still follows torch's Adam on its own."""
    from milcache.aggregator.trainer import StackedAdam, _in_gradient_layout, _runs

    assert _runs(np.array([0, 1, 2, 4, 5]), np.array([3, 3, 2, 2, 2, 2])) == [(0, 2), (2, 3), (4, 6)]
    assert _runs(np.array([], dtype=int), np.zeros(3)) == []
    torch.manual_seed(1)
    start = torch.randn(5, 4, 3)
    stacked = _in_gradient_layout(start.clone().requires_grad_(True))
    alone = [start[m].clone().requires_grad_(True) for m in range(5)]
    optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    references = [optimizer([p], lr=1e-2, weight_decay=0.05) for p in alone]
    ours = StackedAdam([stacked], 5, weight_decay=0.05, decoupled=decoupled)
    for step in range(7):
        target = torch.randn(5, 4, 3)
        active = np.array([True, True, True, step % 3 > 0, step % 3 > 0])  # models 3-4 lag behind
        ours.zero_grad()
        ((stacked - target) ** 2).sum().backward()
        ours.step(np.full(5, 1e-2), active)
        for m in np.flatnonzero(active):
            references[m].zero_grad()
            ((alone[m] - target[m]) ** 2).sum().backward()
            references[m].step()
    assert ours.host_steps.tolist() == [7, 7, 7, 4, 4]
    for m in range(5):
        torch.testing.assert_close(stacked[m].detach(), alone[m].detach())


def test_a_stack_of_many_folds_pads_its_steps_little(monkeypatch):
    """A stacked step is as wide as its longest bag over every model: the models' epochs are
    aligned by batch size, so a 20-fold stack pads about as little as one model would (unaligned,
    every step held some model's batch of the longest bags)."""
    import milcache.aggregator.trainer as trainer

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 41, 92)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    features = torch.from_numpy(rng.standard_normal((int(offsets[-1]), 4)).astype(np.float32))
    data = BagTensor(features, torch.from_numpy(offsets), lengths, [f"b{i}" for i in range(92)], torch.device("cpu"))
    y = rng.integers(0, 2, 92)
    ratios = []
    stack_steps = trainer._stack_steps

    def recorded(plans, lengths):
        steps = stack_steps(plans, lengths)
        for flat, weight, _ in steps:
            n = lengths[flat].reshape(weight.shape)
            ratios.append(n.max() / ((n * weight).sum() / weight.sum()))
        return steps

    monkeypatch.setattr(trainer, "_stack_steps", recorded)
    config = TrainConfig(head_options={"hidden": 8, "attention_dim": 4}, epochs=2, batch_size=3, instances=None)
    trains = [rng.permutation(92)[:83] for _ in range(20)]
    task = Task("binary", [0, 1])
    models = [_model(config, task, 4, k) for k in range(20)]
    fit_stacked(models, data, task, y, trains, [None] * 20, config, seeds=list(range(20)))
    assert np.mean(ratios) < 1.5, np.mean(ratios)  # 1.23 aligned; 1.84 before, each model in its own order

"""The field's reference recipe, written as the common MIL scripts write it (shared by the benches):
Ilse et al. 2018's gated attention trained one bag per step with Adam."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GatedAttention(nn.Module):
    """Instance layer (Linear + ReLU), tanh × sigmoid attention, weighted sum, linear classifier."""

    def __init__(self, dim: int, hidden: int = 256, attention: int = 128) -> None:
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.V = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.U = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One bag's logit from its instances (N × dim)."""
        h = self.feature(x)
        a = torch.softmax(self.w(self.V(h) * self.U(h)).squeeze(-1), 0)
        return self.classifier(a @ h).squeeze(-1)


def reference_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Adam, learning rate 5e-4, weight decay 5e-4 (Ilse et al.'s settings)."""
    return reference_optimizer_of(list(model.parameters()))


def training_statistics(bags: list[np.ndarray], train) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of a training fold's instances (std 1 for constant features)."""
    stacked = np.concatenate([bags[i] for i in train])
    mean, std = stacked.mean(0), stacked.std(0)
    std[std < 1e-6] = 1.0
    return mean, std


def _stack(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The modules' parameters with a leading model axis, as leaf tensors for an optimiser."""
    names = [name for name, _ in modules[0].named_parameters()]
    return {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in modules]).requires_grad_(True)
        for name in names
    }


def _stacked_logits(p: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``GatedAttention.forward`` of M models at once, model m on its own bag x[m] (N × dim,
    ``mask`` marking its real instances): padded instances get exactly zero attention."""
    h = torch.relu(torch.baddbmm(p["feature.0.bias"][:, None], x, p["feature.0.weight"].transpose(1, 2)))
    v = torch.tanh(torch.baddbmm(p["V.0.bias"][:, None], h, p["V.0.weight"].transpose(1, 2)))
    u = torch.sigmoid(torch.baddbmm(p["U.0.bias"][:, None], h, p["U.0.weight"].transpose(1, 2)))
    scores = torch.baddbmm(p["w.bias"][:, None], v * u, p["w.weight"].transpose(1, 2)).squeeze(-1)
    a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    pooled = torch.bmm(a.unsqueeze(1), h).squeeze(1)
    return (pooled * p["classifier.weight"][:, 0]).sum(-1) + p["classifier.bias"][:, 0]


def _padded_bags(tensors: list[torch.Tensor], chosen: list[int], mean: torch.Tensor, std: torch.Tensor):
    """Bag ``chosen[m]`` for model m, standardised by model m's statistics, padded to one width."""
    width = max(len(tensors[i]) for i in chosen)
    x = torch.zeros(len(chosen), width, tensors[0].shape[1])
    mask = torch.zeros(len(chosen), width, dtype=torch.bool)
    for m, i in enumerate(chosen):
        x[m, : len(tensors[i])] = tensors[i]
        mask[m, : len(tensors[i])] = True
    return (x - mean[:, None]) / std[:, None], mask


def stacked_reference(bags, y, folds, seeds, epochs: int = 40) -> list[np.ndarray]:
    """The reference recipe (one bag per step, Adam 5e-4 with weight decay 5e-4, fixed epochs,
    features standardised by the training fold) for many folds at once: the folds' models are
    stacked, and at each step every model takes one bag of its own fold, in the order its own
    seeded loop would take them. Adam is elementwise, so stacked it is each model's own Adam;
    folds with as many training bags share a stack so that every model steps at every step.
    ``folds`` holds (train, test) pairs; returns each fold's test probabilities, as ``reference_fold``
    of bench/quality.py would, up to float rounding, which long runs can amplify on a few
    near-boundary bags (bench/quality.py prints the largest difference)."""
    raw = [torch.from_numpy(b) for b in bags]
    targets = torch.from_numpy(np.asarray(y)).float()
    results: list[np.ndarray | None] = [None] * len(folds)
    sizes = np.array([len(train) for train, _ in folds])
    for size in np.unique(sizes):
        members = np.flatnonzero(sizes == size)
        modules, rngs, means, stds = [], [], [], []
        for k in members:
            train = folds[k][0]
            torch.manual_seed(seeds[k])
            rngs.append(np.random.default_rng(seeds[k]))
            modules.append(GatedAttention(bags[0].shape[1]))
            mean, std = training_statistics(bags, train)
            means.append(torch.from_numpy(mean))
            stds.append(torch.from_numpy(std))
        mean, std = torch.stack(means), torch.stack(stds)
        params = _stack(modules)
        # Fused: one pass over the stacked tensors (the per-op Adam made the step 50x the loop's
        # tiny one, out of cache); the same arithmetic, which the loop comparison checks.
        optimizer = reference_optimizer_of(list(params.values()), fused=True)
        for _ in range(epochs):
            orders = [rng.permutation(folds[k][0]) for k, rng in zip(members, rngs, strict=True)]
            for step in range(size):
                chosen = [int(order[step]) for order in orders]
                x, mask = _padded_bags(raw, chosen, mean, std)
                logits = _stacked_logits(params, x, mask)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, targets[chosen], reduction="sum")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            tests = [folds[k][1] for k in members]
            for row in range(max(len(t) for t in tests)):
                chosen = [int(t[min(row, len(t) - 1)]) for t in tests]
                x, mask = _padded_bags(raw, chosen, mean, std)
                probs = torch.sigmoid(_stacked_logits(params, x, mask)).numpy()
                for m, k in enumerate(members):
                    if row < len(tests[m]):
                        if results[k] is None:
                            results[k] = np.zeros(len(tests[m]))
                        results[k][row] = probs[m]
    return results


def reference_optimizer_of(params: list[torch.Tensor], fused: bool | None = None) -> torch.optim.Optimizer:
    """``reference_optimizer``'s settings over given tensors (the stacked reference's)."""
    return torch.optim.Adam(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-4, fused=fused)

"""The field's reference recipe, written as the common MIL scripts write it (shared by the benches):
Ilse et al. 2018's gated attention trained one bag per step with Adam."""

from __future__ import annotations

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
    return torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-4)

"""Aggregator heads: one registry, one ``create_head``.

Every head maps embeddings ``x`` (B × N × D) and a mask (B × N, True for real instances) to bag logits
(B × C) and per-instance scores (B × N, or None). Padded instances never change a result: every
reduction over instances is masked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from milcache.errors import MilcacheError

_HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a head available under ``name`` (CLI, tuning and predict read this)."""

    def add(cls: type[Head]) -> type[Head]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return add


def list_heads() -> list[str]:
    return sorted(_HEADS)


def head_class(name: str) -> type[Head]:
    if name not in _HEADS:
        raise MilcacheError(f"unknown head {name!r}; choose one of: {', '.join(list_heads())}")
    return _HEADS[name]


def create_head(name: str, in_dim: int, n_outputs: int, **kwargs) -> Head:
    """Build a registered head. Options left as None fall back to the head's own defaults."""
    cls = head_class(name)
    options = {k: v for k, v in kwargs.items() if v is not None}
    unknown = set(options) - set(cls.options())
    if unknown:
        raise MilcacheError(f"head {name!r} has no option(s) {', '.join(sorted(unknown))}; it takes {cls.options()}")
    return cls(in_dim=in_dim, n_outputs=n_outputs, **options)


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor | None  # (B, N) per-instance scores (attention or instance probability)
    extra: dict = field(default_factory=dict)


def _mlp(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Module:
    """Logistic regression (hidden = 0) or a one-hidden-layer MLP with LeakyReLU and dropout."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the instance axis (1) that gives padded instances exactly zero weight."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1).nan_to_num(0.0)  # an all-padding row gives zeros, not NaN


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class Head(nn.Module):
    """Base of every head: an optional instance embedding layer (Linear → ReLU → Dropout to
    ``hidden``), then the head's own pooling and classifier."""

    name = "?"
    order_invariant = True  # False for heads that read instances in their stored order (concat)

    def __init__(self, in_dim: int, n_outputs: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.n_outputs, self.hidden, self.dropout = in_dim, n_outputs, hidden, dropout
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))

    @classmethod
    def options(cls) -> list[str]:
        """The keyword options of this head (for the CLI, the tuner and the error messages)."""
        import inspect

        names = []
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                continue
            params = inspect.signature(klass.__init__).parameters
            names += [p for p in params if p not in ("self", "in_dim", "n_outputs") and p not in names]
        return names

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> HeadOutput:  # pragma: no cover
        raise NotImplementedError

    def extra_loss(self, output: HeadOutput, targets: torch.Tensor) -> torch.Tensor | None:
        """A head's own additional loss (CLAM's instance clustering); None for most heads."""
        return None


class _PoolingHead(Head):
    def __init__(
        self, in_dim: int, n_outputs: int, hidden: int = 128, dropout: float = 0.25, classifier_hidden: int = 0
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        self.classifier = _mlp(hidden, n_outputs, classifier_hidden, dropout)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.classifier(self.pool(self.embed(x), mask)), None)


@register_head("mean")
class MeanPooling(_PoolingHead):
    """Mean of the instance embeddings, then a classifier."""

    def pool(self, h, mask):
        return masked_mean(h, mask)


@register_head("max")
class MaxPooling(_PoolingHead):
    """Element-wise max over the instance embeddings, then a classifier."""

    def pool(self, h, mask):
        return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1).clamp_min(-1e4)


@register_head("lse")
class LogSumExpPooling(_PoolingHead):
    """Log-mean-exp pooling: a smooth max whose temperature r moves it from mean (r→0) to max."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, classifier_hidden=0, temperature: float = 5.0):
        super().__init__(in_dim, n_outputs, hidden, dropout, classifier_hidden)
        self.temperature = temperature

    def pool(self, h, mask):
        r = self.temperature
        scaled = (r * h.float()).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        count = mask.sum(1, keepdim=True).clamp_min(1).float()
        return ((torch.logsumexp(scaled, dim=1) - torch.log(count)) / r).to(h.dtype)


@register_head("concat")
class ConcatPooling(Head):
    """The first ``n_instances`` instances in stored order (top-K tiles, the views of a patient),
    concatenated (zeros where a bag has fewer), then a classifier."""

    order_invariant = False

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, classifier_hidden=128, n_instances: int = 16):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        self.n_instances = n_instances
        self.classifier = _mlp(hidden * n_instances, n_outputs, classifier_hidden, dropout)

    def forward(self, x, mask):
        k = self.n_instances
        h = self.embed(x) * mask.unsqueeze(-1)
        # Valid instances first, in their order (padding is always at the end of a row, but be safe).
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
        h = torch.gather(h, 1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        if h.shape[1] < k:
            h = F.pad(h, (0, 0, 0, k - h.shape[1]))
        return HeadOutput(self.classifier(h.flatten(1)), None)


class _AttentionScorer(nn.Module):
    """Ilse et al. 2018: a_i = wᵀ tanh(V h_i), optionally gated: wᵀ (tanh(V h_i) ⊙ σ(U h_i))."""

    def __init__(self, dim: int, attention_dim: int, gated: bool, dropout: float) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.V(h)
        if self.U is not None:
            a = a * self.U(h)
        return self.w(a).squeeze(-1)


@register_head("attention")
class AttentionMIL(Head):
    """Attention pooling (Ilse et al. 2018): softmax attention over instances, weighted sum, classifier."""

    gated = False

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, classifier_hidden=0, attention_dim: int = 64):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        self.attention = _AttentionScorer(hidden, attention_dim, self.gated, dropout)
        self.classifier = _mlp(hidden, n_outputs, classifier_hidden, dropout)

    def forward(self, x, mask):
        h = self.embed(x)
        weights = masked_softmax(self.attention(h), mask)
        pooled = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        return HeadOutput(self.classifier(pooled), weights, {"h": h})


@register_head("gated-attention")
class GatedAttentionMIL(AttentionMIL):
    """Gated attention pooling (Ilse et al. 2018): tanh × sigmoid gate, weighted sum, classifier."""

    gated = True


@register_head("noisy-and")
class NoisyAnd(Head):
    """Instance probabilities pooled by NoisyAnd (Kraus et al. 2016), per class:
    P = (σ(a(p̄ − b)) − σ(−ab)) / (σ(a(1 − b)) − σ(−ab)), with p̄ the mean instance probability and a
    learnable threshold b ∈ (0, 1)."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, slope: float = 10.0):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        self.instance_classifier = nn.Linear(hidden, n_outputs)
        self.slope = slope
        self.threshold_logit = nn.Parameter(torch.full((n_outputs,), -1.0))  # b = σ(-1) ≈ 0.27

    def forward(self, x, mask):
        p = torch.sigmoid(self.instance_classifier(self.embed(x)).float())  # (B, N, C)
        mean_p = masked_mean(p, mask)
        bag_p = noisy_and(mean_p, self.slope, torch.sigmoid(self.threshold_logit))
        logits = torch.logit(bag_p.clamp(1e-6, 1 - 1e-6))
        scores = p[..., -1].masked_fill(~mask, 0.0)
        return HeadOutput(logits, scores)


def noisy_and(mean_p: torch.Tensor, a: float, b: torch.Tensor) -> torch.Tensor:
    low, high = torch.sigmoid(-a * b), torch.sigmoid(a * (1 - b))
    return (torch.sigmoid(a * (mean_p - b)) - low) / (high - low)


@register_head("transformer")
class TransformerMIL(Head):
    """A small transformer encoder over the instances (instance interactions), then attention
    pooling with a learned query."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, layers: int = 1, heads: int = 4):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 1, hidden) / math.sqrt(hidden))
        self.key = nn.Linear(hidden, hidden)
        self.classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_outputs))

    def forward(self, x, mask):
        h = self.encoder(self.embed(x), src_key_padding_mask=~mask)
        h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        logits = (self.key(h) * self.query).sum(-1) / math.sqrt(h.shape[-1])
        weights = masked_softmax(logits, mask)
        pooled = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        return HeadOutput(self.classifier(pooled), weights)


@register_head("clam-sb")
class ClamSB(GatedAttentionMIL):
    """CLAM single-branch (Lu et al. 2021): gated attention, plus an instance-level clustering loss:
    the ``k_sample`` most attended instances of a bag are pseudo-positives of its class and the
    ``k_sample`` least attended pseudo-negatives, for a per-class instance classifier."""

    def __init__(
        self,
        in_dim,
        n_outputs,
        hidden=128,
        dropout=0.25,
        classifier_hidden=0,
        attention_dim=64,
        k_sample: int = 8,
        instance_loss_weight: float = 0.3,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, classifier_hidden, attention_dim)
        self.k_sample, self.instance_loss_weight = k_sample, instance_loss_weight
        self.instance_classifiers = nn.Linear(hidden, 2 * max(n_outputs, 2))

    def extra_loss(self, output: HeadOutput, targets: torch.Tensor) -> torch.Tensor | None:
        if targets.dtype.is_floating_point and targets.ndim == 1 and self.n_outputs == 1:
            targets = targets.round().long()  # binary targets arrive as 0./1.
        if targets.dtype.is_floating_point:
            return None  # regression: no class to cluster
        h, weights = output.extra["h"], output.scores
        mask = weights > 0
        k = int(min(self.k_sample, mask.sum(1).min().item()))
        if k < 1:
            return None
        top = weights.masked_fill(~mask, -1.0).topk(k, dim=1).indices
        bottom = (-weights).masked_fill(~mask, -2.0).topk(k, dim=1).indices
        chosen = torch.cat([top, bottom], 1)
        feats = torch.gather(h, 1, chosen.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = self.instance_classifiers(feats).view(*chosen.shape, -1, 2)  # (B, 2k, classes, 2)
        cls = targets.long().clamp_max(logits.shape[2] - 1)
        logits = logits[torch.arange(len(cls), device=cls.device), :, cls]  # (B, 2k, 2)
        pseudo = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)], 1)
        return self.instance_loss_weight * F.cross_entropy(logits.reshape(-1, 2).float(), pseudo.reshape(-1))


@register_head("dsmil")
class DSMIL(Head):
    """DSMIL (Li et al. 2021), dual stream: an instance classifier finds the critical (max-scoring)
    instance; every instance is attended by its similarity to it; the bag logit averages the
    critical instance's score and the classifier of the attention-pooled embedding."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, query_dim: int = 64):
        super().__init__(in_dim, n_outputs, hidden, dropout)
        self.instance_classifier = nn.Linear(hidden, n_outputs)
        self.query = nn.Sequential(nn.Linear(hidden, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.bag_classifier = nn.Conv1d(n_outputs, n_outputs, kernel_size=hidden)

    def forward(self, x, mask):
        h = self.embed(x)
        inst = self.instance_classifier(h).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, N, C)
        critical_score, critical = inst.max(1)  # (B, C)
        q = self.query(h)  # (B, N, Q)
        q_crit = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        sim = torch.einsum("bnq,bcq->bnc", q.float(), q_crit.float()) / math.sqrt(q.shape[-1])
        weights = masked_softmax(sim, mask.unsqueeze(-1).expand_as(sim))  # (B, N, C)
        pooled = torch.einsum("bnc,bnd->bcd", weights.to(h.dtype), self.value(h))  # (B, C, D)
        bag = self.bag_classifier(pooled).squeeze(-1)  # (B, C)
        logits = 0.5 * (critical_score.clamp_min(-1e4) + bag.float())
        return HeadOutput(logits, weights[..., -1])

"""Aggregator heads: one registry, one ``create_head``.

Every head maps embeddings ``x`` (B × N × D) and a mask (B × N, True for real instances) to bag logits
(B × C) and per-instance scores (B × N, or None). Padded instances never change a result: every
reduction over instances is masked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from milcache import checks
from milcache.errors import MilcacheError
from milcache.registry import Registry


def _named(name: str, cls: type[Head]) -> None:
    """Tell a head class its registered name, once it is known to define what a head must."""
    if cls.aggregate is Head.aggregate:
        raise MilcacheError(
            f"head {name!r} ({cls.__module__}.{cls.__qualname__}) must define aggregate(self, h, mask) -> "
            "HeadOutput: the bag logits (and instance scores) from instance embeddings h (B x N x hidden) "
            "and mask (B x N, True for real instances)"
        )
    if issubclass(cls, _PoolingHead) and cls.pool is _PoolingHead.pool:
        raise MilcacheError(
            f"head {name!r} ({cls.__module__}.{cls.__qualname__}) must define pool(self, h, mask) -> B x hidden: "
            "one vector per bag from instance embeddings h (B x N x hidden) and mask (B x N)"
        )
    cls.name = name


HEADS: Registry[type[Head]] = Registry("head", entry_point_group="milcache.heads", on_add=_named)


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a head available under ``name`` to train-head, tune and predict.
    Another package can offer heads through the ``milcache.heads`` entry-point group."""
    return HEADS.register(name)


def list_heads() -> list[str]:
    return HEADS.names()


def head_class(name: str) -> type[Head]:
    return HEADS.get(name)


def resolved_options(name: str, options: dict) -> dict:
    """Every option of head ``name``: the given ones, the head's defaults for the rest (what a run
    directory records, so that it rebuilds the same head after a default changes)."""
    return {**head_class(name).option_defaults(), **{k: v for k, v in options.items() if v is not None}}


def check_head(name: str, options: dict, task_kind: str | None = None) -> None:
    """Refuse an unknown head, an option it does not take, or a value out of range, before any
    work starts (by building the head once on a tiny input size); with ``task_kind``, a head
    whose loss needs classes on a task without them."""
    if task_kind in ("regression", "survival") and head_class(name).needs_classes:
        raise MilcacheError(
            f"head {name!r} adds an instance loss over classes, and a {task_kind} task has none: "
            "choose another head (attention, gated-attention, dsmil …)"
        )
    try:
        create_head(name, 4, 1, **options)
    except TypeError as exc:  # a value of the wrong kind reached torch
        raise MilcacheError(
            f"head {name!r}: an option has a value of the wrong kind ({exc}); options: {options}"
        ) from None


def create_head(name: str, in_dim: int, n_outputs: int, n_classes: int | None = None, **kwargs) -> Head:
    """Build a registered head. Options left as None fall back to the head's own defaults;
    ``n_classes`` (the task's class count) reaches the heads that need it."""
    import inspect

    cls = head_class(name)
    options = {k: v for k, v in kwargs.items() if v is not None}
    unknown = set(options) - set(cls.options())
    if unknown:
        raise MilcacheError(f"head {name!r} has no option(s) {', '.join(sorted(unknown))}; it takes {cls.options()}")
    if n_classes is not None and "n_classes" in inspect.signature(cls.__init__).parameters:
        options["n_classes"] = n_classes  # heads with one instance classifier per class (CLAM)
    return cls(in_dim=in_dim, n_outputs=n_outputs, **options)


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor | None  # (B, N) per-instance scores (attention or instance probability)
    extra: dict = field(default_factory=dict)
    # Heads with several classifier streams (DSMIL) give each stream's logits; the model averages
    # their probabilities for ``logits`` and the trainer averages their losses, as their papers do.
    streams: list[torch.Tensor] | None = None


def _mlp(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Module:
    """Dropout then logistic regression (hidden = 0), or a one-hidden-layer MLP with LeakyReLU."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_dim, hidden),
        nn.LeakyReLU(0.01),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the instance axis (1) that gives padded instances exactly zero weight."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1).nan_to_num(0.0)  # an all-padding row gives zeros, not NaN


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def padded(h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Packed rows (T × …) laid out as padded bags (B × N × …) by ``slots``: index_select, whose
    backward (index_add) is far cheaper on the CPU than advanced indexing's (index_put)."""
    return torch.index_select(h, 0, slots.reshape(-1)).view(*slots.shape, *h.shape[1:])


def packed_weighted_sum(weights: torch.Tensor, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Σₙ weights[b, n] · h[slots[b, n]] for every bag b (B × hidden), from packed h (T × hidden):
    the weights are scattered into a B × T matrix (padding slots add their zero weight) and one
    matmul sums. Never builds the padded B × N × hidden copy of h, nor its gradient."""
    dense = weights.new_zeros(weights.shape[0], h.shape[0]).scatter_add(1, slots, weights)
    return dense.to(h.dtype) @ h


def _inverse_std(std: torch.Tensor) -> torch.Tensor:
    """1 / std, and 0 for features constant in training (std ≈ 0): those are ignored."""
    return torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std))


class SparseRows(NamedTuple):
    """Instances whose features are mostly zeros, as each one's nonzero entries: ``columns`` (… × K,
    int64) and ``values`` (… × K), K the most nonzeros of any instance of the cohort (an instance
    with fewer has zero values at column 0). Bag-of-words features (web_recommendation: 20 of
    5,863) cost K weight rows an instance this way instead of a D-long product."""

    columns: torch.Tensor
    values: torch.Tensor


class Preactivated(NamedTuple):
    """Instance-layer outputs W z + b computed before the head was called (the trainer does it for
    all its stacked models at once from ``SparseRows``: see ``sparse_affine``); ``embed`` then
    applies only the activation and dropout."""

    values: torch.Tensor


def sparse_affine(
    x: SparseRows, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """W z + b of the standardised z = (x − mean) / std for M models at once, from sparse ``x``
    (columns and values M × T × K); ``weight`` M × D × hidden (W transposed), ``bias`` M × hidden,
    ``mean`` and ``std`` M × D. Returns M × T × hidden, equal to the dense product.

    Each instance sums the rows of W at its nonzero columns, scaled by value / std: one
    ``embedding_bag`` over the models' weight matrices laid end to end (its backward adds into the
    gathered rows only). The centring, which would make z dense, goes into the bias: b − W · mean / std.
    Features constant in training (std ≈ 0) are ignored, as in ``Head.embed``."""
    models, dim, hidden = weight.shape
    inv = _inverse_std(std)
    columns = x.columns.reshape(models, -1)
    scaled = x.values.reshape(models, -1).float() * torch.gather(inv, 1, columns)
    first_row = torch.arange(models, device=columns.device).unsqueeze(1) * dim  # model m's rows of the table
    k = x.columns.shape[-1]
    summed = F.embedding_bag(
        (columns + first_row).view(-1, k),
        weight.reshape(models * dim, hidden),
        per_sample_weights=scaled.view(-1, k),
        mode="sum",
    )
    shift = bias - torch.bmm((mean * inv).unsqueeze(1), weight).squeeze(1)
    return summed.view(models, -1, hidden) + shift.unsqueeze(1)


# Folding the standardisation into W costs about nine passes over W per step (scaling it, W @ mean,
# and in backward the bias path's outer product, its sum with the matmul's gradient and the
# rescaling); standardising x costs two passes over x (x needs no gradient). So fold only when x
# is well over 4.5 times W's size. At the old threshold of 1x, a 50-fold stack of 5,863-d weights
# folded on its steps of 129-250 instances a model and each such step cost ~8x its neighbours.
_FOLD_RATIO = 5


class Head(nn.Module):
    """Base of every head: an instance layer (Linear → ReLU, then ``instance_dropout``) shared by
    all heads, then the head's own ``aggregate``. ``dropout`` acts on bag-level vectors (before the
    classifier), where it is cheap: instance-level dropout costs a random draw per instance feature.
    """

    name = "?"
    order_invariant = True  # False for heads that read instances in their stored order (concat)
    has_instance_scores = True  # False for heads whose output gives no per-instance score (pooling)
    needs_classes = False  # True for heads whose own loss works on the task's classes (CLAM)

    def __init__(
        self, in_dim: int, n_outputs: int, hidden: int = 128, dropout: float = 0.25, instance_dropout: float = 0.0
    ) -> None:
        super().__init__()
        checks.at_least("hidden", hidden, 1)
        checks.within("dropout", dropout, 0.0, 1.0, high_open=True)
        checks.within("instance_dropout", instance_dropout, 0.0, 1.0, high_open=True)
        self.in_dim, self.n_outputs, self.hidden, self.dropout = in_dim, n_outputs, hidden, dropout
        self.instance_layer = nn.Linear(in_dim, hidden)
        self.instance_dropout = nn.Dropout(instance_dropout)

    @classmethod
    def options(cls) -> list[str]:
        """The keyword options of this head (for the CLI, the tuner and the error messages)."""
        return list(cls.option_defaults())

    @classmethod
    def option_defaults(cls) -> dict:
        """Every keyword option of this head with its default. A head's ``__init__`` names its
        options; one that passes ``*args, **kwargs`` on takes those of the head it builds on too."""
        import inspect

        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        defaults = {}
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            params = inspect.signature(klass.__init__).parameters.values()
            for param in params:
                if param.kind not in variadic and param.name not in ("self", "in_dim", "n_outputs", "n_classes"):
                    defaults.setdefault(param.name, param.default)
            if not any(param.kind in variadic for param in params):
                break
        return defaults

    def embed(
        self,
        x: torch.Tensor | SparseRows | Preactivated,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Instance embeddings h = ReLU(W z + b) of z = (x − mean) / std (B × N × hidden); ``x``
        dense, ``SparseRows`` (see ``sparse_affine``) or already ``Preactivated``.

        Features constant in training (std ≈ 0) are ignored. On the CPU, when the batch is more
        than ``_FOLD_RATIO`` times W's size, the standardisation is folded into W and b (passes
        over the batch, the largest tensor of a step, saved); otherwise, on a GPU and under a
        reduced-precision autocast, it runs on x in float32 (there before the reduced-precision
        matmul, whose rounding of raw values would otherwise be amplified by 1/std)."""
        if isinstance(x, Preactivated):
            return self.activate(x.values)
        weight, bias = self.instance_layer.weight, self.instance_layer.bias
        if isinstance(x, SparseRows):
            if mean is None or std is None:
                mean, std = torch.zeros_like(weight[0]), torch.ones_like(weight[0])
            single = SparseRows(x.columns.unsqueeze(0), x.values.unsqueeze(0))
            z = sparse_affine(single, weight.T.unsqueeze(0), bias.unsqueeze(0), mean.unsqueeze(0), std.unsqueeze(0))
            return self.activate(z.view(*x.columns.shape[:-1], -1))
        if mean is not None and std is not None:
            inv = _inverse_std(std)
            reduced = x.device.type == "cuda" or torch.is_autocast_enabled(x.device.type)
            if reduced or x.numel() <= _FOLD_RATIO * weight.numel():
                x = torch.addcmul(-mean * inv, x, inv)
            else:
                weight = weight * inv
                bias = bias - weight @ mean
        if x.dtype != weight.dtype and x.device.type != "cuda":
            x = x.to(weight.dtype)
        return self.activate(F.linear(x, weight, bias))

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """The instance layer's output from its pre-activation W z + b."""
        return self.instance_dropout(F.relu(z))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> HeadOutput:
        return self.aggregate(self.embed(x), mask)

    def aggregate(self, h: torch.Tensor, mask: torch.Tensor) -> HeadOutput:  # pragma: no cover
        """Bag logits (and instance scores) from instance embeddings ``h`` (B × N × hidden)."""
        raise NotImplementedError

    def aggregate_packed(self, h: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> HeadOutput:
        """``aggregate`` of packed instance embeddings (T × hidden, real instances only) that
        ``slots`` (B × N, into h's rows) lays out as padded bags. Heads that work on instances one
        by one until a weighted sum (attention) override this to skip the padded copy of h."""
        return self.aggregate(padded(h, slots), mask)

    def combine_loss(
        self, bag_loss: torch.Tensor, output: HeadOutput, targets: torch.Tensor, bag_weight: torch.Tensor
    ) -> torch.Tensor:
        """The training loss from the task's bag loss; heads with an instance loss (CLAM) add it here."""
        return bag_loss


class _PoolingHead(Head):
    has_instance_scores = False

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden: int = 128,
        dropout: float = 0.25,
        instance_dropout: float = 0.0,
        classifier_hidden: int = 0,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.classifier = _mlp(hidden, n_outputs, classifier_hidden, dropout)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def aggregate(self, h: torch.Tensor, mask: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.classifier(self.pool(h, mask)), None)


@register_head("linear")
class LinearProbe(Head):
    """Logistic regression on the bag's mean standardised embedding (SimpleMI, Dong 2006; the
    linear probe of foundation-model papers). No hidden layer: on a cohort of a few dozen bags of
    thousands of features there is then little to overfit but one weight per feature and class,
    which weight decay and the elastic net hold back. Being linear, a bag's logits are the mean of
    its instances' own logits W zᵢ + b (the instance layer is the classifier), and an instance's
    score is its logit for the last class."""

    def __init__(self, in_dim: int, n_outputs: int) -> None:
        super().__init__(in_dim, n_outputs, hidden=n_outputs, dropout=0.0)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def aggregate(self, h, mask):
        h = h.float()
        return HeadOutput(masked_mean(h, mask), h[..., -1].masked_fill(~mask, 0.0))


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

    def __init__(
        self,
        in_dim,
        n_outputs,
        hidden=128,
        dropout=0.25,
        instance_dropout=0.0,
        classifier_hidden=0,
        temperature: float = 5.0,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout, classifier_hidden)
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

    has_instance_scores = False

    order_invariant = False

    def __init__(
        self,
        in_dim,
        n_outputs,
        hidden=128,
        dropout=0.25,
        instance_dropout=0.0,
        classifier_hidden=128,
        n_instances: int = 16,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.n_instances = n_instances
        self.classifier = _mlp(hidden * n_instances, n_outputs, classifier_hidden, dropout)

    def aggregate(self, h, mask):
        k = self.n_instances
        h = h * mask.unsqueeze(-1)
        # Valid instances first, in their order (padding is always at the end of a row, but be safe).
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
        h = torch.gather(h, 1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        if h.shape[1] < k:
            h = F.pad(h, (0, 0, 0, k - h.shape[1]))
        return HeadOutput(self.classifier(h.flatten(1)), None)


class _AttentionScorer(nn.Module):
    """Ilse et al. 2018: a_i = wᵀ tanh(V h_i), optionally gated: wᵀ (tanh(V h_i) ⊙ σ(U h_i)).
    V and U are one matmul (their weights stacked), which halves the kernel launches."""

    def __init__(self, dim: int, attention_dim: int, gated: bool) -> None:
        super().__init__()
        self.gated, self.attention_dim = gated, attention_dim
        self.VU = nn.Linear(dim, attention_dim * (2 if gated else 1))
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.VU(h)
        if self.gated:
            v, u = a.split(self.attention_dim, dim=-1)
            a = torch.tanh(v) * torch.sigmoid(u)
        else:
            a = torch.tanh(a)
        return self.w(a).squeeze(-1)


@register_head("attention")
class AttentionMIL(Head):
    """Attention pooling (Ilse et al. 2018): softmax attention over instances, weighted sum, classifier."""

    gated = False

    def __init__(
        self,
        in_dim,
        n_outputs,
        hidden=128,
        dropout=0.25,
        instance_dropout=0.0,
        classifier_hidden=0,
        attention_dim: int = 64,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.attention = _AttentionScorer(hidden, attention_dim, self.gated)
        self.classifier = _mlp(hidden, n_outputs, classifier_hidden, dropout)

    def aggregate(self, h, mask):
        weights = masked_softmax(self.attention(h), mask)
        pooled = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        return HeadOutput(self.classifier(pooled), weights, {"h": h})

    def aggregate_packed(self, h, slots, mask):
        """Attention scores on the real instances only, laid out as bags just for the softmax."""
        weights = masked_softmax(padded(self.attention(h), slots), mask)
        pooled = packed_weighted_sum(weights, h, slots)
        return HeadOutput(self.classifier(pooled), weights, {"h": h, "slots": slots})


@register_head("gated-attention")
class GatedAttentionMIL(AttentionMIL):
    """Gated attention pooling (Ilse et al. 2018): tanh × sigmoid gate, weighted sum, classifier."""

    gated = True


@register_head("noisy-and")
class NoisyAnd(Head):
    """Instance probabilities pooled by NoisyAnd (Kraus et al. 2016), per class:
    P = (σ(a(p̄ − b)) − σ(−ab)) / (σ(a(1 − b)) − σ(−ab)), with p̄ the mean instance probability and a
    learnable threshold b ∈ (0, 1)."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, instance_dropout=0.0, slope: float = 10.0):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.instance_classifier = nn.Linear(hidden, n_outputs)
        self.slope = slope
        self.threshold_logit = nn.Parameter(torch.full((n_outputs,), -1.0))  # b = σ(-1) ≈ 0.27

    def aggregate(self, h, mask):
        p = torch.sigmoid(self.instance_classifier(h).float())  # (B, N, C)
        mean_p = masked_mean(p, mask)
        bag_p = noisy_and(mean_p, self.slope, torch.sigmoid(self.threshold_logit))
        logits = torch.logit(bag_p.clamp(1e-6, 1 - 1e-6))
        scores = p[..., -1].masked_fill(~mask, 0.0)
        return HeadOutput(logits, scores)


def noisy_and(mean_p: torch.Tensor, a: float, b: torch.Tensor) -> torch.Tensor:
    low, high = torch.sigmoid(-a * b), torch.sigmoid(a * (1 - b))
    return (torch.sigmoid(a * (mean_p - b)) - low) / (high - low)


# Stacked fold models (vmap) run the fused attention kernel once per model: correct, and still linear
# in memory; torch warns that it has no batched rule for it, which is not the user's business.
warnings.filterwarnings(
    "ignore", message="There is a performance drop because we have not yet implemented the batching rule"
)


class _EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer whose attention runs through
    ``F.scaled_dot_product_attention``: its fused kernels (flash / memory-efficient, CPU and CUDA)
    never hold the N × N score matrix, so a bag of 50,000 instances costs memory linear in N
    (torch's own encoder layer materialises the scores with a padding mask)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise MilcacheError(f"transformer: hidden ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        keys = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]  # a bag of padding only attends to all
        # No dropout on the attention weights: the fused CPU kernel has none (it would fall back
        # to the N × N path); dropout acts on both residual branches instead.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.feed_forward(self.norm2(x)))


@register_head("transformer")
class TransformerMIL(Head):
    """A small transformer encoder over the instances (instance interactions), then attention
    pooling with a learned query. Memory grows linearly with the bag (fused attention kernels)."""

    def __init__(
        self, in_dim, n_outputs, hidden=128, dropout=0.25, instance_dropout=0.0, layers: int = 1, heads: int = 4
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        checks.at_least("layers", layers, 1)
        checks.at_least("heads", heads, 1)
        self.encoder = nn.ModuleList(_EncoderLayer(hidden, heads, dropout) for _ in range(layers))
        self.query = nn.Parameter(torch.randn(1, 1, hidden) / math.sqrt(hidden))
        self.key = nn.Linear(hidden, hidden)
        self.classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_outputs))

    def aggregate(self, h, mask):
        for layer in self.encoder:
            h = layer(h, mask)
        h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        logits = (self.key(h) * self.query).sum(-1) / math.sqrt(h.shape[-1])
        weights = masked_softmax(logits, mask)
        pooled = torch.einsum("bn,bnd->bd", weights.to(h.dtype), h)
        return HeadOutput(self.classifier(pooled), weights)


@register_head("clam-sb")
class ClamSB(GatedAttentionMIL):
    """CLAM single-branch (Lu et al. 2021): gated attention, plus an instance-level clustering loss.

    Each class has its own binary instance classifier. For a bag of class c, its k most attended
    instances are pseudo-positives and its k least attended pseudo-negatives of classifier c, with
    k = min(k_sample, n // 2) for a bag of n instances (so no instance is both); with more than two
    classes (CLAM's subtyping mode) the k most attended are also negatives of every other class's
    classifier, averaged over classes. The loss is (1 − w) · bag loss + w · instance loss."""

    needs_classes = True

    def __init__(
        self,
        in_dim,
        n_outputs,
        hidden=128,
        dropout=0.25,
        instance_dropout=0.0,
        classifier_hidden=0,
        attention_dim=64,
        k_sample: int = 8,
        instance_loss_weight: float = 0.3,
        n_classes: int | None = None,
    ):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout, classifier_hidden, attention_dim)
        self.k_sample, self.instance_loss_weight = k_sample, instance_loss_weight
        self.n_classes = n_classes or (2 if n_outputs == 1 else n_outputs)
        self.instance_classifiers = nn.Linear(hidden, 2 * self.n_classes)

    def combine_loss(self, bag_loss, output, targets, bag_weight):
        if targets.dtype.is_floating_point and self.n_outputs > 1:
            return bag_loss  # regression with several outputs: no class to cluster
        w = self.instance_loss_weight
        extra = output.extra
        return (1 - w) * bag_loss + w * self.instance_loss(
            extra["h"], output.scores, targets, bag_weight, extra.get("slots")
        )

    def instance_loss(self, h, attention, targets, bag_weight, slots=None):
        """``h`` as the bags' padded instance embeddings (B × N × hidden), or packed (T × hidden)
        with the ``slots`` that lay them out (see ``aggregate_packed``)."""
        n_bags, width = attention.shape
        valid = attention > 0  # masked_softmax gives padding exactly 0 and real instances > 0
        n = valid.sum(1)
        k = torch.minimum(torch.full_like(n, self.k_sample), n // 2)  # per bag
        depth = min(self.k_sample, width)
        rank = torch.arange(depth, device=h.device)
        order = attention.masked_fill(~valid, -1.0).argsort(dim=1, descending=True)  # real instances first
        top = order[:, :depth]
        bottom = torch.gather(order, 1, (n.unsqueeze(1) - 1 - rank).clamp_min(0))  # least attended first
        used = rank < k.unsqueeze(1)  # (B, depth)
        chosen = torch.cat([top, bottom], 1)
        if slots is None:
            feats = torch.gather(h, 1, chosen.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        else:
            feats = padded(h, torch.gather(slots, 1, chosen))
        logits = self.instance_classifiers(feats).float().view(n_bags, 2 * depth, self.n_classes, 2)
        cls = targets.round().long() if targets.dtype.is_floating_point else targets.long()
        pseudo = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)], 1)
        # In-class: classifier c of the bag's class, top → 1 and bottom → 0.
        own = logits[torch.arange(n_bags, device=h.device), :, cls]  # (B, 2·depth, 2)
        ce = F.cross_entropy(own.reshape(-1, 2), pseudo.reshape(-1), reduction="none").view(n_bags, -1)
        both = torch.cat([used, used], 1).float()
        per_bag = (ce * both).sum(1) / both.sum(1).clamp_min(1)
        if self.n_classes > 2:  # subtyping: the top instances are negatives for every other class
            top_logits = logits[:, :depth]  # (B, depth, classes, 2)
            ce_out = F.cross_entropy(
                top_logits.reshape(-1, 2),
                torch.zeros(top_logits.shape[:-1].numel(), dtype=torch.long, device=h.device),
                reduction="none",
            ).view(n_bags, depth, self.n_classes)
            other = torch.ones(n_bags, self.n_classes, device=h.device).scatter(1, cls.unsqueeze(1), 0.0)
            out_per_bag = (ce_out * used.unsqueeze(-1).float() * other.unsqueeze(1)).sum((1, 2))
            out_per_bag = out_per_bag / (used.sum(1).clamp_min(1).float())
            per_bag = (per_bag + out_per_bag) / self.n_classes
        weight = bag_weight * (k > 0).float()
        return (per_bag * weight).sum() / weight.sum().clamp_min(1e-6)


@register_head("dsmil")
class DSMIL(Head):
    """DSMIL (Li et al. 2021), dual stream: an instance classifier finds the critical (max-scoring)
    instance; every instance is attended by its similarity to it; the bag classifier reads the
    attention-pooled embedding. As in the paper's code, training averages the two streams' losses and
    prediction averages their probabilities."""

    def __init__(self, in_dim, n_outputs, hidden=128, dropout=0.25, instance_dropout=0.0, query_dim: int = 64):
        super().__init__(in_dim, n_outputs, hidden, dropout, instance_dropout)
        self.instance_classifier = nn.Linear(hidden, n_outputs)
        self.query = nn.Sequential(nn.Linear(hidden, query_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.bag_classifier = nn.Conv1d(n_outputs, n_outputs, kernel_size=hidden)

    def aggregate(self, h, mask):
        inst = self.instance_classifier(h).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, N, C)
        critical_score, critical = inst.max(1)  # (B, C)
        q = self.query(h)  # (B, N, Q)
        q_crit = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        sim = torch.einsum("bnq,bcq->bnc", q.float(), q_crit.float()) / math.sqrt(q.shape[-1])
        weights = masked_softmax(sim, mask.unsqueeze(-1).expand_as(sim))  # (B, N, C)
        pooled = torch.einsum("bnc,bnd->bcd", weights.to(h.dtype), self.value(h))  # (B, C, D)
        bag = self.bag_classifier(pooled).squeeze(-1).float()  # (B, C)
        critical_score = critical_score.clamp_min(-1e4)
        # ``logits`` averages the streams for use without a task; MILModel replaces it by the
        # task's average of the streams' probabilities.
        return HeadOutput(0.5 * (critical_score + bag), weights[..., -1], streams=[critical_score, bag])

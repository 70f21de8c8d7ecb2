"""Time-to-event labels: the Cox partial likelihood and the discrete-time likelihood as training
losses; concordance, Brier score, time-dependent AUC and Kaplan–Meier groups from scikit-survival.

A survival target is a pair (time, event) per bag, event 1 for an observed event and 0 for a
censored time. The head's output is a risk (higher: the event comes sooner). With the Cox loss
the risk is the head's one logit; with the discrete-time loss the head gives one hazard logit per
time interval, and the risk is minus the sum of the survival curve over the intervals (the
reference code's rule), so that both losses are scored the same way.

The Cox loss compares every bag with the bags of its risk set; the trainer sees a batch at a
time, so the risk set is the batch: large batches (``COX_BATCH``) or the whole fold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from milcache import checks
from milcache.aggregator.config import SURVIVAL_LOSSES, TIES
from milcache.errors import LabelError

COX_BATCH = 64  # bags per step with the Cox loss (its risk set), the whole fold when smaller
_NEVER = -1e30  # log of a weight of zero that stays finite (an all-masked logsumexp has a finite gradient)


@dataclass(frozen=True)
class SurvivalSpec:
    """How a survival task is read, trained and shown: the labels' ``time_column`` and
    ``event_column``; ``loss`` cox or nll; Cox ``ties`` efron or breslow; the discrete-time loss's
    ``bins`` intervals (their ``edges`` set from the cohort's event times) and ``alpha``, the weight
    of its uncensored term (Zadeh & Schmid 2020: the loss is (1 − alpha) · NLL + alpha · NLL of the
    uncensored bags, so censored bags weigh 1 − alpha); ``risk_groups`` of the Kaplan–Meier plots."""

    loss: str = "cox"
    ties: str = "efron"
    bins: int = 4
    alpha: float = 0.0
    edges: tuple[float, ...] = ()
    time_column: str = "time"
    event_column: str = "event"
    risk_groups: int = 2

    def __post_init__(self) -> None:
        checks.one_of("--survival-loss", self.loss, SURVIVAL_LOSSES)
        checks.one_of("--ties", self.ties, TIES)
        checks.whole("--bins", self.bins, 2)
        checks.within("--alpha", self.alpha, 0.0, 1.0)
        checks.whole("--risk-groups", self.risk_groups, 2)

    def fitted(self, time: np.ndarray, event: np.ndarray) -> SurvivalSpec:
        """This spec with the discrete-time intervals placed at quantiles of the observed event
        times (the first from 0, the last to the longest time), as the reference code places them."""
        if self.loss != "nll":
            return self
        observed = np.unique(time[event > 0])
        if len(observed) < self.bins:
            raise LabelError(
                f"--bins {self.bins} needs at least {self.bins} distinct event times; the labels have "
                f"{len(observed)}: use fewer --bins, or --survival-loss cox"
            )
        inner = np.quantile(time[event > 0], np.linspace(0, 1, self.bins + 1)[1:-1])
        edges = np.concatenate([[0.0], inner, [float(time.max())]])
        if len(np.unique(edges)) != len(edges):
            raise LabelError(
                f"the event times give fewer than {self.bins} distinct intervals (quantile edges "
                f"{', '.join(f'{e:g}' for e in edges)}): use fewer --bins"
            )
        return replace(self, edges=tuple(float(e) for e in edges))

    @property
    def n_outputs(self) -> int:
        return 1 if self.loss == "cox" else self.bins

    def to_dict(self) -> dict:
        return {**asdict(self), "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, stored: dict) -> SurvivalSpec:
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "edges": tuple(stored.get("edges", ()))})

    def loss_of(self, logits: torch.Tensor, y: torch.Tensor, bag_weight: torch.Tensor | None) -> torch.Tensor:
        """The batch's loss; ``y`` holds (time, event) rows, ``bag_weight`` 0 for padded slots."""
        weight = torch.ones_like(y[:, 0]) if bag_weight is None else bag_weight.float()
        time, event = y[:, 0].float().contiguous(), y[:, 1].float()
        if self.loss == "cox":
            return cox_loss(logits[:, 0].float(), time, event, weight, ties=self.ties)
        edges = torch.tensor(self.edges[1:-1], dtype=time.dtype, device=time.device)
        interval = torch.bucketize(time, edges, right=True)
        return discrete_time_loss(logits.float(), interval, event, weight, alpha=self.alpha)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """The risk (B × 1), and for the discrete-time loss the survival curve after it (B × 1+bins)."""
        logits = logits.float()
        if self.loss == "cox":
            return logits[:, :1]
        curve = torch.exp(torch.cumsum(F.logsigmoid(-logits), 1))  # S_k = Π (1 − h_j), j ≤ k
        return torch.cat([-curve.sum(1, keepdim=True), curve], 1)

    def output_columns(self) -> list[str]:
        if self.loss == "cox":
            return ["risk"]
        return ["risk"] + [f"survival_{edge:g}" for edge in self.edges[1:]]

    def metric_functions(self, y: np.ndarray, outputs: np.ndarray) -> dict:
        time, event, risk = y[:, 0].astype(np.float64), y[:, 1] > 0, outputs[:, 0].astype(np.float64)
        functions = {
            "c_index": lambda: harrell_c(time, event, risk),
            "uno_c": lambda: uno_c(time, event, risk),
        }
        if self.loss == "nll":
            grid = lambda: evaluation_times(time, event)  # noqa: E731
            functions["ibs"] = lambda: brier_score(time, event, self.curve_at(outputs, grid()), grid())
            functions["td_auc"] = lambda: dynamic_auc(time, event, 1 - self.curve_at(outputs, grid()), grid())
        return functions

    def curve_at(self, outputs: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Each bag's survival probability at ``times`` (bags × times), linear between the
        intervals' ends (S = 1 at time 0)."""
        edges = np.asarray(self.edges)
        curve = np.concatenate([np.ones((len(outputs), 1)), outputs[:, 1:]], 1)
        right = np.clip(np.searchsorted(edges, times, side="right"), 1, len(edges) - 1)
        share = np.clip((times - edges[right - 1]) / (edges[right] - edges[right - 1]), 0, 1)
        return curve[:, right - 1] * (1 - share) + curve[:, right] * share


def cox_loss(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, weight: torch.Tensor, *, ties: str = "efron"
) -> torch.Tensor:
    """The negative Cox partial log-likelihood of a batch per observed event, with Breslow's or
    Efron's handling of tied event times. Bags of weight 0 are in no risk set. Written with
    bag × bag masks (no data-dependent shapes) so that ``vmap`` runs it for stacked models."""
    event = event * weight
    at_risk = (time.unsqueeze(0) >= time.unsqueeze(1)) & (weight.unsqueeze(0) > 0)  # [i, j]: j at risk at t_i
    log_risk_set = torch.logsumexp(risk.unsqueeze(0).masked_fill(~at_risk, _NEVER), 1)
    per_event = log_risk_set - risk
    if ties == "efron":  # the d events tied at a time leave the risk set in equal shares 0, 1/d, …, (d-1)/d
        tied = (time.unsqueeze(0) == time.unsqueeze(1)) & (event.unsqueeze(0) > 0) & (event.unsqueeze(1) > 0)
        log_tied = torch.logsumexp(risk.unsqueeze(0).masked_fill(~tied, _NEVER), 1)
        index = torch.arange(len(risk), device=risk.device)
        share = (tied & (index.unsqueeze(0) < index.unsqueeze(1))).sum(1) / tied.sum(1).clamp_min(1)
        per_event = per_event + torch.log1p(-share * torch.exp(log_tied - log_risk_set))
    return torch.where(event > 0, per_event, 0.0).sum() / event.sum().clamp_min(1)


def discrete_time_loss(
    logits: torch.Tensor, interval: torch.Tensor, event: torch.Tensor, weight: torch.Tensor, *, alpha: float = 0.0
) -> torch.Tensor:
    """The discrete-time survival negative log-likelihood (Zadeh & Schmid 2020) of hazard logits
    (B × intervals): an observed event in interval k survived the intervals before it and had its
    event in k; a censored time survived interval k. Log-sigmoids keep it finite without clamps."""
    log_hazard, log_survive = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_curve = torch.cumsum(log_survive, 1)  # log S_k
    log_before = torch.cat([torch.zeros_like(log_curve[:, :1]), log_curve[:, :-1]], 1)  # log S_{k-1}
    k = interval.long().unsqueeze(1)
    uncensored = -(log_before.gather(1, k) + log_hazard.gather(1, k)).squeeze(1) * event
    censored = -log_curve.gather(1, k).squeeze(1) * (1 - event)
    per_bag = (1 - alpha) * (uncensored + censored) + alpha * uncensored
    return (per_bag * weight).sum() / weight.sum().clamp_min(1e-12)


def _surv(time: np.ndarray, event: np.ndarray):
    from sksurv.util import Surv

    return Surv.from_arrays(event.astype(bool), time.astype(np.float64))


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance of a risk (higher: sooner); NaN without a comparable pair."""
    from sksurv.metrics import concordance_index_censored

    try:
        return float(concordance_index_censored(event.astype(bool), time, risk)[0])
    except (ValueError, ZeroDivisionError):
        return math.nan


def uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Uno's IPCW concordance, the censoring distribution estimated on the bags scored."""
    from sksurv.metrics import concordance_index_ipcw

    surv = _surv(time, event)
    try:
        return float(concordance_index_ipcw(surv, surv, risk)[0])
    except (ValueError, ZeroDivisionError):
        return math.nan


def evaluation_times(time: np.ndarray, event: np.ndarray, points: int = 20) -> np.ndarray:
    """Times at which the curve metrics are read: percentiles 10 to 90 of the observed event times,
    inside the follow-up that scikit-survival requires."""
    observed = time[event > 0]
    if len(observed) < 2:
        return np.array([])
    grid = np.unique(np.percentile(observed, np.linspace(10, 90, points)))
    return grid[(grid >= time.min()) & (grid < time.max())]


def brier_score(time: np.ndarray, event: np.ndarray, curve: np.ndarray, times: np.ndarray) -> float:
    """The integrated Brier score of survival curves (bags × ``times``); lower is better."""
    from sksurv.metrics import integrated_brier_score

    if len(times) < 2:
        return math.nan
    surv = _surv(time, event)
    try:
        return float(integrated_brier_score(surv, surv, curve, times))
    except ValueError:
        return math.nan


def dynamic_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, times: np.ndarray) -> float:
    """The mean cumulative/dynamic AUC over ``times`` of risks (bags × times)."""
    from sksurv.metrics import cumulative_dynamic_auc

    if len(times) < 1:
        return math.nan
    surv = _surv(time, event)
    try:
        return float(cumulative_dynamic_auc(surv, surv, risk, times)[1])
    except ValueError:
        return math.nan


def risk_groups(risk: np.ndarray, groups: int) -> np.ndarray:
    """Each bag's risk group 0 (lowest) … groups − 1, split at the risk's quantiles (the median for 2)."""
    cuts = np.quantile(risk, np.linspace(0, 1, groups + 1)[1:-1])
    return np.searchsorted(cuts, risk, side="right")


def log_rank_p(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """The log-rank test's p-value of equal survival across groups."""
    from sksurv.compare import compare_survival

    if len(np.unique(group)) < 2 or not event.any():
        return math.nan
    return float(compare_survival(_surv(time, event), group)[1])

"""What a label means: binary, multi-class, ordinal, continuous or a time to an event; its loss,
outputs and metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from milcache.aggregator.config import TASK_KINDS
from milcache.aggregator.survival import SurvivalSpec
from milcache.errors import LabelError


@dataclass
class Task:
    """``classes`` maps class index → original label value (empty for regression and survival);
    ``survival`` says how a survival task trains (its targets are (time, event) rows)."""

    kind: str
    classes: list
    survival: SurvivalSpec | None = None

    @classmethod
    def for_survival(cls, time: np.ndarray, event: np.ndarray, spec: SurvivalSpec | None = None) -> Task:
        """A survival task whose discrete-time intervals (if its loss has them) fit these times."""
        return cls("survival", [], (spec or SurvivalSpec()).fitted(np.asarray(time), np.asarray(event)))

    def to_dict(self) -> dict:
        stored = {"kind": self.kind, "classes": self.classes}
        return stored if self.survival is None else {**stored, "survival": self.survival.to_dict()}

    @classmethod
    def from_dict(cls, stored: dict) -> Task:
        survival = stored.get("survival")
        return cls(stored["kind"], stored["classes"], None if survival is None else SurvivalSpec.from_dict(survival))

    @property
    def has_classes(self) -> bool:
        return self.kind not in ("regression", "survival")

    def strata(self, y: np.ndarray) -> np.ndarray | None:
        """What folds are stratified on: the class, the event for survival, nothing for regression."""
        if self.kind == "survival":
            return y[:, 1].astype(np.int64)
        return y if self.has_classes else None

    @property
    def output_columns(self) -> list[str]:
        """The names of ``outputs``' columns, as prediction tables write them."""
        if self.kind == "survival":
            return self.survival.output_columns()
        if self.kind == "regression":
            return ["prediction"]
        return [f"prob_{name}" for name in self.classes]

    @property
    def n_outputs(self) -> int:
        if self.kind == "survival":
            return self.survival.n_outputs
        if self.kind in ("binary", "regression"):
            return 1
        if self.kind == "ordinal":
            return len(self.classes) - 1  # cumulative logits: P(y > k) for k = 0 .. C-2
        return len(self.classes)

    @classmethod
    def infer(cls, labels: list, kind: str | None = None, classes: list | None = None) -> Task:
        """Choose the task from the label values (or check the one asked for). ``classes`` gives
        the class order (needed for ordinal labels that are strings, e.g. low, medium, high)."""
        values = sorted(set(labels), key=lambda v: (isinstance(v, str), v))
        numeric = all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values)
        if kind is None:
            integral = numeric and all(float(v).is_integer() for v in values)
            kind = "regression" if numeric and not integral and classes is None else None
            kind = kind or ("binary" if len(classes or values) == 2 else "multiclass")
        if kind not in TASK_KINDS:
            raise LabelError(f"unknown task {kind!r}; choose one of {', '.join(TASK_KINDS)}")
        if kind == "survival":
            raise LabelError("a survival task needs a time and an event column (--time, --event), not a label")
        if kind == "regression":
            return cls(kind, [])
        if classes is not None:
            values = _ordered_classes(values, classes)
        elif kind == "ordinal" and not numeric:
            raise LabelError(
                f"ordinal labels that are text need their order: give --classes "
                f"{','.join(map(str, values[:5]))} in the order low to high (found {len(values)} values)"
            )
        if len(values) < 2:
            raise LabelError(f"every labelled bag has the label {values[0]!r}: a classifier needs two classes at least")
        if kind == "binary" and len(values) != 2:
            raise LabelError(f"a binary task needs exactly two label values, found {len(values)}: {values[:10]}")
        return cls(kind, values)

    def encode(self, labels: list) -> np.ndarray:
        """Targets from label values: class indices, values, or (time, event) rows for survival."""
        if self.kind == "regression":
            return np.asarray(labels, dtype=np.float32)
        if self.kind == "survival":
            return np.asarray(labels, dtype=np.float32).reshape(-1, 2)
        index = {v: i for i, v in enumerate(self.classes)}
        unknown = sorted({str(v) for v in labels if v not in index})
        if unknown:
            raise LabelError(f"labels not seen in training: {', '.join(unknown[:10])}")
        return np.asarray([index[v] for v in labels], dtype=np.int64)

    def loss(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        class_weights: torch.Tensor | None = None,
        bag_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss of a batch; ``bag_weight`` (0/1 per bag) leaves padded bag slots out."""
        if self.kind == "survival":  # the Cox loss is not a sum over bags
            return self.survival.loss_of(logits, y, bag_weight)
        per_bag, norm = self._per_bag_loss(logits.float(), y, class_weights)
        if bag_weight is not None:
            per_bag, norm = per_bag * bag_weight, norm * bag_weight
        return per_bag.sum() / norm.sum().clamp_min(1e-12)

    def _per_bag_loss(
        self, logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each bag's loss and its share of the normaliser (torch's reductions, made per bag)."""
        ones = torch.ones(len(y), device=logits.device)
        if self.kind == "regression":
            return F.mse_loss(logits[:, 0], y.float(), reduction="none"), ones
        if self.kind == "binary":
            pos_weight = None if class_weights is None else class_weights[1] / class_weights[0]
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=pos_weight, reduction="none")
            return loss, ones
        if self.kind == "ordinal":
            thresholds = torch.arange(logits.shape[1], device=y.device)
            above = (y.unsqueeze(1) > thresholds).float()
            loss = F.binary_cross_entropy_with_logits(logits, above, reduction="none").mean(1)
            return (loss if class_weights is None else loss * class_weights[y]), ones
        loss = F.cross_entropy(logits, y, reduction="none")
        if class_weights is None:
            return loss, ones
        return loss * class_weights[y], class_weights[y]

    def combine_streams(self, streams: list[torch.Tensor]) -> torch.Tensor:
        """Logits whose outputs are the mean of the streams' outputs (probabilities, or values)."""
        stacked = torch.stack([s.float() for s in streams])
        if self.kind == "regression" or (self.kind == "survival" and self.survival.loss == "cox"):
            return stacked.mean(0)
        if self.kind == "multiclass":
            return torch.logsumexp(torch.log_softmax(stacked, -1), 0) - math.log(len(streams))
        p = torch.sigmoid(stacked).mean(0).clamp(1e-7, 1 - 1e-7)
        return torch.logit(p)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B × classes), the predicted value (B × 1) for regression, or the risk
        (and survival curve) for survival (``SurvivalSpec.outputs``)."""
        logits = logits.float()
        if self.kind == "survival":
            return self.survival.outputs(logits)
        if self.kind == "regression":
            return logits
        if self.kind == "binary":
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], 1)
        if self.kind == "ordinal":
            above = torch.sigmoid(logits).cummin(dim=1).values  # P(y > k), kept monotone
            ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
            cumulative = torch.cat([ones, above, zeros], 1)
            return cumulative[:, :-1] - cumulative[:, 1:]
        return torch.softmax(logits, 1)

    def metrics(
        self, y: np.ndarray, outputs: np.ndarray, only: str | None = None, groups: np.ndarray | None = None
    ) -> dict[str, float]:
        """Metrics of one evaluation; y are encoded targets, outputs as from ``outputs``. With
        ``only`` (a metric this task has), just that one: what a pruner needs every epoch. With
        ``groups`` (patients), a survival task is scored per patient (``per_patient``)."""
        if self.kind == "survival" and groups is not None:
            y, outputs = per_patient(y, outputs, groups)
        functions = self._metric_functions(y, outputs)
        names = [only] if only in functions else list(functions)
        return {name: float(functions[name]()) for name in names}

    @property
    def metric_names(self) -> list[str]:
        """The metrics ``metrics`` computes for this kind of task."""
        return list(self._metric_functions(np.zeros((1, 2)), np.ones((1, len(self.output_columns)))))

    def _metric_functions(self, y: np.ndarray, outputs: np.ndarray) -> dict:
        from scipy.stats import pearsonr
        from sklearn import metrics as m

        if self.kind == "survival":
            return self.survival.metric_functions(y, outputs)
        if self.kind == "regression":
            pred = outputs[:, 0]
            return {
                "mse": lambda: m.mean_squared_error(y, pred),
                "r2": lambda: m.r2_score(y, pred),
                "pearson_r": lambda: pearsonr(y, pred)[0] if len(y) > 1 and np.std(pred) > 0 else float("nan"),
            }
        pred = outputs.argmax(1)
        labels = list(range(len(self.classes)))
        probs = np.clip(outputs, 1e-7, 1)
        probs = probs / probs.sum(1, keepdims=True)
        functions = {
            "auc": lambda: _auc(y, outputs, labels),
            "accuracy": lambda: m.accuracy_score(y, pred),
            "balanced_accuracy": lambda: m.balanced_accuracy_score(y, pred),
            "f1": lambda: m.f1_score(y, pred, average="binary" if self.kind == "binary" else "macro", zero_division=0),
            "log_loss": lambda: m.log_loss(y, probs, labels=labels),
        }
        if self.kind == "ordinal":
            functions["kappa"] = lambda: m.cohen_kappa_score(y, pred, weights="quadratic")
        return functions


def per_patient(y: np.ndarray, outputs: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per patient from several slides' rows: the mean of their outputs (risk, curve) and
    the patient's (time, event), which its slides share (``read_labels`` checks that)."""
    _, first, inverse = np.unique(groups.astype(str), return_index=True, return_inverse=True)
    if len(first) == len(groups):
        return y, outputs
    sums = np.zeros((len(first), outputs.shape[1]))
    np.add.at(sums, inverse, outputs)
    return y[first], sums / np.bincount(inverse)[:, None]


def _ordered_classes(values: list, classes: list) -> list:
    """The user's class order, its names matched to the label values (text or numbers)."""
    by_text = {str(v): v for v in values}
    unknown = sorted(str(v) for v in values if str(v) not in {str(c) for c in classes})
    if unknown:
        raise LabelError(f"labels {', '.join(unknown[:10])} are not among --classes {','.join(map(str, classes))}")
    if len({str(c) for c in classes}) != len(classes):
        raise LabelError(f"--classes names a class twice: {','.join(map(str, classes))}")
    return [by_text.get(str(c), c) for c in classes]


def _auc(y: np.ndarray, outputs: np.ndarray, labels: list[int]) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")  # undefined on a single class
    if outputs.shape[1] == 2:
        return float(roc_auc_score(y, outputs[:, 1]))
    present = np.unique(y)
    if len(present) < len(labels):  # one-vs-rest over the classes that occur
        sub = outputs[:, present] / outputs[:, present].sum(1, keepdims=True)
        return (
            float(roc_auc_score(np.searchsorted(present, y), sub, multi_class="ovr"))
            if len(present) > 2
            else float(roc_auc_score(y == present[1], sub[:, 1]))
        )
    return float(roc_auc_score(y, outputs, multi_class="ovr", labels=labels))

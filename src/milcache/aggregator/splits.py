"""Cross-validation splits: stratified, grouped by patient when groups are given, repeated, or fixed."""

from __future__ import annotations

import numpy as np

from milcache.errors import LabelError


def _kfold(n_splits: int, stratified: bool, grouped: bool, seed: int):
    from sklearn import model_selection as ms

    if stratified:
        cls = ms.StratifiedGroupKFold if grouped else ms.StratifiedKFold
        return cls(n_splits=n_splits, shuffle=True, random_state=seed)
    if grouped:
        return ms.GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return ms.KFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _check_enough(strata: np.ndarray | None, groups: np.ndarray, n_splits: int, what: str) -> None:
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise LabelError(f"too few bags for {what}: {n_groups} groups (patients) for {n_splits} folds")
    if strata is not None:
        for value in np.unique(strata):
            count = len(np.unique(groups[strata == value]))
            if count < n_splits:
                raise LabelError(
                    f"too few bags for {what}: stratum {value} (a class index, or the event for survival) has "
                    f"{count} group(s) for {n_splits} folds; use fewer --folds or a fixed split column"
                )


def cv_splits(
    strata: np.ndarray | None, groups: np.ndarray, folds: int, repeats: int = 1, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs for ``repeats`` × ``folds``, stratified on ``strata`` (the task's
    ``Task.strata``: None for none); no group is ever in both sides."""
    if folds < 2:
        raise LabelError(f"--folds must be at least 2, not {folds}")
    _check_enough(strata, groups, folds, f"{folds}-fold cross-validation")
    grouped = len(np.unique(groups)) < len(groups)
    out = []
    for r in range(repeats):
        splitter = _kfold(folds, strata is not None, grouped, seed + r)
        out += list(splitter.split(np.zeros(len(groups)), strata, groups if grouped else None))
    return out


def validation_split(
    strata: np.ndarray | None, groups: np.ndarray, train: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold ``fraction`` of a training fold out for early stopping (grouped, and stratified on
    ``strata`` when given and it can)."""
    if fraction <= 0:
        return train, np.array([], dtype=np.int64)  # no early stopping: fixed epochs
    n_splits = max(2, round(1 / fraction))
    sub_strata = None if strata is None else strata[train]
    sub_groups = groups[train]
    try:
        _check_enough(sub_strata, sub_groups, n_splits, "the validation split")
    except LabelError:
        return train, np.array([], dtype=np.int64)  # too small to hold out: train without early stopping
    grouped = len(np.unique(sub_groups)) < len(sub_groups)
    splitter = _kfold(n_splits, sub_strata is not None, grouped, seed)
    fit, val = next(splitter.split(np.zeros(len(sub_groups)), sub_strata, sub_groups if grouped else None))
    return train[fit], train[val]

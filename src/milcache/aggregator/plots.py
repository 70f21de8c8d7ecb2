"""PNG figures people look at: ROC curves of out-of-fold predictions, Kaplan–Meier curves of risk groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y: np.ndarray, outputs: np.ndarray, classes: list, path: Path, title: str) -> None:
    """One-vs-rest ROC curves (the positive class only, for binary tasks) with their AUCs."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    shown = [1] if len(classes) == 2 else range(len(classes))
    for c in shown:
        truth = y == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, outputs[:, c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {roc_auc_score(truth, outputs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_regression(y: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.scatter(y, pred, s=8, alpha=0.6)
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([low, high], [low, high], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="label", ylabel="prediction", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_kaplan_meier(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: Path, *, title: str, groups: int = 2
) -> dict:
    """Kaplan–Meier curves of ``groups`` risk groups (a median split for 2) with the log-rank test's
    p-value; returns {"groups", "log_rank_p", "sizes"}."""
    from sksurv.nonparametric import kaplan_meier_estimator

    from milcache.aggregator.survival import log_rank_p, risk_groups

    group = risk_groups(risk, groups)
    p_value = log_rank_p(time, event, group)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    names = ["low risk", "high risk"] if groups == 2 else [f"risk group {g + 1}" for g in range(groups)]
    sizes = []
    for g in range(groups):
        members = group == g
        sizes.append(int(members.sum()))
        if not members.any():
            continue
        times, survival = kaplan_meier_estimator(event[members].astype(bool), time[members])
        ax.step(
            np.concatenate([[0], times]),
            np.concatenate([[1], survival]),
            where="post",
            label=f"{names[g]} (n={members.sum()})",
        )
    shown_p = "n/a" if not np.isfinite(p_value) else f"{p_value:.2g}"
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=f"{title}\nlog-rank p = {shown_p}")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"groups": groups, "log_rank_p": p_value, "sizes": sizes}


def contact_sheet(images: np.ndarray, titles: list[str], path: Path, title: str) -> None:
    """A grid of instance images (n × H × W × C uint8, or n × D × H × W volumes: their middle
    slice), each with its title, as one PNG."""
    plt = pyplot()
    columns = min(len(images), 5)
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):  # a volume patch: its middle slice
            image = image[image.shape[0] // 2]
        ax.imshow(image.squeeze(), cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None)
        ax.set_title(text, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)

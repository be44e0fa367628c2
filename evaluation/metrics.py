"""Downstream metrics on numpy arrays: ROC AUC, F1/accuracy, Dice under both empty-mask conventions, Recall@K."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DICE_CONVENTIONS = ("empty_as_one", "empty_excluded")


def _binary_labels(y_true, what: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    if not np.all((y == 0) | (y == 1)):
        bad = y[~((y == 0) | (y == 1))][:5]
        raise ValueError(f"{what} must hold only 0 and 1 (missing labels masked out first); got {bad.tolist()}")
    return y


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, then each run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve via the Mann-Whitney rank sum; a tie between a positive and a
    negative counts one half. NaN when y_true holds a single class (AUC is undefined there)."""
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) != len(y):
        raise ValueError(f"roc_auc: {len(y)} labels but {len(s)} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), one point per distinct score plus (0, 0)."""
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = (last_of_run + 1) - tp
    n_pos, n_neg = max(y.sum(), 1), max(len(y) - y.sum(), 1)
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def f1_at(y_true, scores, threshold: float = 0.5) -> float:
    """F1 of the positive class with predictions scores >= threshold; 0 when there is nothing to find or predict."""
    y = _binary_labels(y_true).astype(bool)
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    tp = np.sum(pred & y)
    denom = pred.sum() + y.sum()
    return float(2 * tp / denom) if denom else 0.0


def accuracy_at(y_true, scores, threshold: float = 0.5) -> float:
    y = _binary_labels(y_true).astype(bool)
    pred = np.asarray(scores, dtype=np.float64).ravel() >= threshold
    return float(np.mean(pred == y)) if len(y) else math.nan


def multiclass_accuracy(y_true, logits) -> float:
    """Share of rows whose arg-max column equals the integer class in y_true."""
    y = np.asarray(y_true).ravel()
    pred = np.asarray(logits).argmax(axis=1)
    if len(pred) != len(y):
        raise ValueError(f"multiclass_accuracy: {len(y)} labels but {len(pred)} rows of logits")
    return float(np.mean(pred == y)) if len(y) else math.nan


def per_label_auc(labels, scores, names: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """AUC per column of a [N, K] label matrix (NaN = missing, masked out per label).

    Returns (auc by label, skipped label -> reason); skipped labels (a single class among the rows
    that have the label) are left out of the first dict, never averaged in as NaN or 0.5."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2 or y.shape[1] != len(names):
        raise ValueError(f"per_label_auc: labels {y.shape}, scores {s.shape} and {len(names)} names disagree")
    aucs, skipped = {}, {}
    for k, name in enumerate(names):
        present = ~np.isnan(y[:, k])
        value = roc_auc(y[present, k], s[present, k]) if present.any() else math.nan
        if math.isnan(value):
            n_pos = int(np.nansum(y[:, k]))
            skipped[name] = f"one class only in the evaluation set ({n_pos} positive of {int(present.sum())} labelled)"
        else:
            aucs[name] = value
    return aucs, skipped


def dice_per_image(pred, truth, convention: str = "empty_as_one") -> np.ndarray:
    """Dice of each image's binary masks ([N, H, W] or [N, 1, H, W]).

    `empty_as_one`: an empty prediction on an empty truth scores 1 (any predicted pixel there scores 0).
    `empty_excluded`: images whose truth is empty get NaN, so they drop out of `nanmean`."""
    if convention not in DICE_CONVENTIONS:
        raise ValueError(f"unknown Dice convention {convention!r}; use one of {DICE_CONVENTIONS}")
    p = np.asarray(pred).astype(bool).reshape(len(pred), -1)
    t = np.asarray(truth).astype(bool).reshape(len(truth), -1)
    if p.shape != t.shape:
        raise ValueError(f"dice_per_image: prediction {p.shape} and truth {t.shape} differ in shape")
    inter = np.sum(p & t, axis=1)
    total = p.sum(axis=1) + t.sum(axis=1)
    truth_empty = t.sum(axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    if convention == "empty_excluded":
        dice = np.where(truth_empty, np.nan, dice)
    return dice


def dice_summary(pred, truth) -> dict[str, float]:
    """Mean Dice under both conventions, plus how many images each one counts."""
    as_one = dice_per_image(pred, truth, "empty_as_one")
    excluded = dice_per_image(pred, truth, "empty_excluded")
    counted = int(np.sum(~np.isnan(excluded)))
    return {
        "dice_empty_as_one": float(np.mean(as_one)) if len(as_one) else math.nan,
        "dice_empty_excluded": float(np.nanmean(excluded)) if counted else math.nan,
        "images": len(as_one),
        "images_with_empty_truth": len(as_one) - counted,
    }


def retrieval_ranks(similarity, targets=None) -> np.ndarray:
    """0-based rank of each query's correct candidate in a [queries, candidates] similarity matrix.

    targets[i] is query i's correct column (default: i, the diagonal). A candidate tied with the
    correct one counts as ranked above it, so a constant similarity gets no credit."""
    sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    targets = np.arange(n) if targets is None else np.asarray(targets)
    correct = sim[np.arange(n), targets][:, None]
    at_least = np.sum(sim >= correct, axis=1) - 1   # minus the correct candidate itself
    return at_least


def recall_at_k(similarity, ks: Sequence[int] = (1, 5, 10), targets=None) -> dict[int, float]:
    ranks = retrieval_ranks(similarity, targets)
    return {k: float(np.mean(ranks < k)) for k in ks}


def image_text_recalls(similarity, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Contract keys i2t_rK / t2i_rK from an [images, texts] similarity matrix where image i pairs with text i."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"image_text_recalls needs a square similarity matrix (pair i <-> i); got {sim.shape}")
    i2t = recall_at_k(sim, ks)
    t2i = recall_at_k(sim.T, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def spread(values: Sequence[float]) -> dict:
    """{"mean", "std", "per_seed"} over seeds; std is the population std (0 for one seed), NaN seeds skipped."""
    per_seed = [float(v) for v in values]
    finite = [v for v in per_seed if not math.isnan(v)]
    return {"mean": float(np.mean(finite)) if finite else math.nan,
            "std": float(np.std(finite)) if finite else math.nan,
            "per_seed": per_seed}

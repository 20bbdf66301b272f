"""Multi-label metrics as pure numpy functions (tested against scikit-learn).

Inputs are ``y_true`` (rows x tags, 0/1) and ``scores`` (rows x tags, any monotone score).

- ``average_precision``: AP of one tag, the step-wise area under its precision-recall curve
  (sum over distinct score thresholds of (R_n - R_{n-1}) * P_n), as scikit-learn defines it.
- ``mean_average_precision``: macro (mean of per-tag AP over tags that have positives) and micro
  (AP of all (row, tag) pairs pooled).
- ``hamming_loss``: share of (row, tag) decisions that are wrong.
- ``top_k_accuracy``: share of rows whose top-k scored tags contain a true tag.

Example:
    >>> y = np.array([[1, 0], [0, 1]]); s = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> mean_average_precision(y, s)["macro"]
    1.0
"""

from __future__ import annotations

import numpy as np


def precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first.

    Returns (precision, recall, thresholds), one entry per distinct score: predicting positive
    for ``score >= thresholds[i]`` gives ``precision[i]`` and ``recall[i]``.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: ties are decided together.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    positives = y.sum()
    precision = tp / (tp + fp)
    recall = tp / positives if positives else np.full(tp.shape, np.nan)
    return precision, recall, s[last]


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP of one tag; NaN when the tag has no positive (its AP is undefined)."""
    precision, recall, _ = precision_recall_curve(y_true, scores)
    if np.isnan(recall).all():
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_tag_average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    return np.array([average_precision(y_true[:, j], scores[:, j]) for j in range(y_true.shape[1])])


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Macro mAP (mean over tags with at least one positive) and micro mAP (pooled pairs)."""
    per_tag = per_tag_average_precision(y_true, scores)
    valid = ~np.isnan(per_tag)
    return {
        "macro": float(per_tag[valid].mean()) if valid.any() else float("nan"),
        "micro": average_precision(np.asarray(y_true).ravel(), np.asarray(scores).ravel()),
        "tags_scored": int(valid.sum()),
    }


def chance_mean_average_precision(y_true: np.ndarray) -> float:
    """Expected macro mAP of uninformative scores: each tag's AP is then its prevalence."""
    y = np.asarray(y_true, dtype=np.float64)
    prevalence = y.mean(axis=0)
    return float(prevalence[prevalence > 0].mean())


def hamming_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true).astype(bool) != np.asarray(y_pred).astype(bool)))


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows (with at least one true tag) whose k best-scored tags include a true one."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores)
    rows = y.any(axis=1)
    k = min(k, s.shape[1])
    top = np.argpartition(-s[rows], k - 1, axis=1)[:, :k]
    hits = np.take_along_axis(y[rows], top, axis=1).any(axis=1)
    return float(hits.mean()) if hits.size else float("nan")

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


def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray | float]:
    """Per-tag precision, recall and F1 of 0/1 decisions, plus micro and macro averages.

    A tag with no predicted positive has precision 0 (scikit-learn's zero_division=0)."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = (y & p).sum(axis=0).astype(np.float64)
    predicted, actual = p.sum(axis=0), y.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    micro_p = tp.sum() / max(predicted.sum(), 1)
    micro_r = tp.sum() / max(actual.sum(), 1)
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": actual,
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "micro_f1": float(micro_f1),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


def level_accuracy(y_true: np.ndarray, scores: np.ndarray, level_map: np.ndarray) -> dict:
    """Top-1 accuracy with tags collapsed to one level of the hierarchy.

    ``level_map`` (tags x level classes) sends each tag to its ancestor at the level. A class
    scores the best of its descendants; a row (with at least one true class at the level) is
    correct when its best-scored class is one of its true classes.
      micro: share of rows correct; macro: mean over classes of that share among the rows
      where the class is true (balanced accuracy for single-label data);
      confusion[true, predicted]: for every row and each of its true classes, one count at the
      row's best-scored class (the usual confusion matrix for single-label data).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(level_map).astype(bool)
    n_classes = m.shape[1]
    level_scores = np.full((len(s), n_classes), -np.inf)
    level_true = np.zeros((len(y), n_classes), dtype=bool)
    for c in range(n_classes):
        members = m[:, c]
        if members.any():
            level_scores[:, c] = s[:, members].max(axis=1)
            level_true[:, c] = y[:, members].any(axis=1)
    rows = level_true.any(axis=1)
    predicted = level_scores.argmax(axis=1)
    correct = level_true[np.arange(len(y)), predicted] & rows
    per_class = [float(correct[level_true[:, c]].mean()) for c in range(n_classes) if level_true[:, c].any()]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    true_rows, true_classes = np.nonzero(level_true)
    np.add.at(confusion, (true_classes, predicted[true_rows]), 1)
    return {
        "micro": float(correct[rows].mean()) if rows.any() else float("nan"),
        "macro": float(np.mean(per_class)) if per_class else float("nan"),
        "rows": int(rows.sum()),
        "confusion": confusion,
    }

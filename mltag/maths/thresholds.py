"""Per-tag decision thresholds chosen from precision-recall curves (pure: no I/O, no model).

Two targets, as production taggers set them:
  - ``precision`` (default): the lowest threshold whose precision reaches the target, i.e. the
    highest recall at that precision;
  - ``recall``: the threshold with the best precision among those whose recall reaches a floor.
A tag that cannot reach its target falls back to its best-F1 threshold and is listed; a tag with
no positive example in the calibration data keeps its current threshold. ``mltag calibrate``
(``mltag.stages.calibrate``) feeds these functions a validation split's scores.

Example:
    >>> y = np.array([1, 1, 0, 1, 0]); s = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    >>> choose_threshold(y, s, "precision", 0.9).threshold
    0.8
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mltag.maths.metrics import precision_recall_curve

MODES = ("precision", "recall")


@dataclass
class TagThreshold:
    tag: str
    threshold: float
    precision: float  # at the chosen threshold, on the calibration data
    recall: float
    reached: bool  # whether the target was met
    positives: int
    note: str = ""


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, mode: str, target: float, tag: str = "", current: float = 0.5) -> TagThreshold:
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; choose one of: {', '.join(MODES)}")
    y = np.asarray(y_true).astype(bool)
    positives = int(y.sum())
    if positives == 0:
        return TagThreshold(tag, float(current), float("nan"), float("nan"), False, 0, "no positive example: threshold kept")
    precision, recall, thresholds = precision_recall_curve(y, scores)
    if mode == "precision":
        ok = np.flatnonzero(precision >= target)
        if ok.size:  # thresholds descend, recall rises: the last qualifying index has the most recall
            i = ok[np.argmax(recall[ok])]
            return TagThreshold(tag, float(thresholds[i]), float(precision[i]), float(recall[i]), True, positives)
    else:
        ok = np.flatnonzero(recall >= target)
        if ok.size:
            i = ok[np.argmax(precision[ok])]  # first maximum: the highest such threshold
            return TagThreshold(tag, float(thresholds[i]), float(precision[i]), float(recall[i]), True, positives)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0)
    i = int(np.argmax(f1))
    return TagThreshold(
        tag,
        float(thresholds[i]),
        float(precision[i]),
        float(recall[i]),
        False,
        positives,
        f"{mode} {target} unreachable: best-F1 threshold used",
    )


def choose_thresholds(
    y_true: np.ndarray,
    scores: np.ndarray,
    names: list[str],
    mode: str = "precision",
    target: float = 0.9,
    current: np.ndarray | None = None,
) -> list[TagThreshold]:
    current = np.full(len(names), 0.5) if current is None else current
    return [choose_threshold(y_true[:, j], scores[:, j], mode, target, names[j], float(current[j])) for j in range(len(names))]

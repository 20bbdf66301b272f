"""Per-tag decision thresholds chosen from precision-recall curves, and ``mltag calibrate``.

Two targets, as production taggers set them:
  - ``precision`` (default): the lowest threshold whose precision reaches the target, i.e. the
    highest recall at that precision;
  - ``recall``: the threshold with the best precision among those whose recall reaches a floor.
A tag that cannot reach its target falls back to its best-F1 threshold and is listed; a tag with
no positive example in the calibration data keeps its current threshold.

Example:
    >>> y = np.array([1, 1, 0, 1, 0]); s = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    >>> choose_threshold(y, s, "precision", 0.9).threshold
    0.8
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.metrics import precision_recall_curve

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


@dataclass
class CalibrateConfig:
    """Choose per-tag thresholds on a validation split and save them with the model."""

    manifest: str = ""  # labelled manifest (with tags)
    model: str = ""  # tagger directory; its thresholds are replaced (a new model version)
    split: str = "val"  # which split to calibrate on; empty: every row
    mode: str = "precision"  # precision: best recall at precision >= target; recall: best precision at recall >= target
    target: float = 0.9  # the precision (or recall floor) to reach
    batch_size: int = 64  # inference batch size
    num_actors: int = 0  # inference actors (0: from the cluster's resources)

    def validate(self) -> None:
        if not self.manifest or not self.model:
            raise ValueError("manifest and model are required")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if not 0 < self.target <= 1:
            raise ValueError("target must be in (0, 1]")


def run(config: CalibrateConfig) -> list[TagThreshold]:
    from mltag.evaluate import predict
    from mltag.model import load_spec, set_thresholds

    spec = load_spec(config.model)
    y, scores, _ = predict(config.manifest, config.model, config.split, config.batch_size, config.num_actors)
    names = list(spec.vocab.names)
    chosen = choose_thresholds(y, scores, names, config.mode, config.target, spec.threshold_array())
    new_spec = set_thresholds(config.model, [c.threshold for c in chosen])
    report = {
        "mode": config.mode,
        "target": config.target,
        "split": config.split,
        "model_version": new_spec.version,
        "previous_version": spec.version,
        "tags": [asdict(c) for c in chosen],
        "unreached": [c.tag for c in chosen if not c.reached],
    }
    with open(os.path.join(config.model, "thresholds.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    pq.write_table(pa.Table.from_pylist([asdict(c) for c in chosen]), os.path.join(config.model, "thresholds.parquet"))
    print(f"{'tag':<20} {'threshold':>9} {'precision':>9} {'recall':>7}  target met")
    for c in chosen:
        print(f"{c.tag:<20} {c.threshold:>9.4f} {c.precision:>9.3f} {c.recall:>7.3f}  {'yes' if c.reached else 'NO  ' + c.note}")
    print(f"thresholds saved with the model: version {spec.version} -> {new_spec.version}")
    if report["unreached"]:
        print(f"{len(report['unreached'])} tag(s) cannot reach {config.mode} {config.target}: {', '.join(report['unreached'])}")
    return chosen

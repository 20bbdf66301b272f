"""``mltag eval``: score a tagger on a labelled manifest.

Writes under ``out``:
  ``metrics.json``     mAP (macro, micro), Hamming loss, precision/recall/F1 at the model's
                       thresholds (micro, macro), top-1/3/5 accuracy, accuracy with tags collapsed
                       to each hierarchy level (micro, macro) and the L1 confusion matrix
  ``per_tag.parquet``  tag, level, support, AP, threshold, precision, recall, F1
  ``scores.parquet``   listing_id, labels (0/1, vocabulary order), scores: what the report plots
  ``provenance.json``  the resolved config and its hash, the model version, the tag table version
                       (with --tag-table): ``--config runs/eval/provenance.json`` repeats the run

Ground truth and predictions are both closed upward through the hierarchy (forest => tree).

Example:
    mltag eval --manifest catalog/manifest.parquet --model runs/train/model --split val --out runs/eval
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import PROVENANCE_FILE, config_hash, save_provenance
from mltag.maths.metrics import (
    hamming_loss,
    level_accuracy,
    mean_average_precision,
    per_tag_average_precision,
    precision_recall_f1,
    top_k_accuracy,
)
from mltag.table.tag_table import decide_tags
from mltag.tagger.spec import load_spec

# predict_rows is re-exported for callers of its former home here (mltag.stages.evaluate.predict_rows).
from mltag.tagging.predict import predict, predict_rows, stored_scores  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate a tagger on a labelled manifest: metrics JSON and a per-tag Parquet."""

    manifest: str = ""  # labelled manifest (with tags)
    model: str = ""  # tagger directory
    split: str = "val"  # which split to evaluate; empty: every row
    out: str = "runs/eval"  # output directory
    batch_size: int = 64  # inference batch size
    num_actors: int = 0  # inference actors (0: from the cluster's resources)
    tag_table: str = ""  # score the predictions stored in this tag table instead of running the model
    as_of: str = ""  # with --tag-table: the table version number or date (2026-11-20) to evaluate

    def validate(self) -> None:
        if not self.manifest or not self.model:
            raise ValueError("manifest and model are required")
        if self.as_of and not self.tag_table:
            raise ValueError("--as-of reads a version of a tag table: give --tag-table too")


def compute_metrics(y: np.ndarray, scores: np.ndarray, spec) -> tuple[dict, pa.Table]:
    """Every metric of the eval report from labels and scores (pure: no I/O)."""
    vocab = spec.vocab
    names = list(vocab.names)
    thresholds = spec.threshold_array()
    index = {n: i for i, n in enumerate(names)}
    predicted = np.zeros_like(y, dtype=bool)
    for row, tags in enumerate(decide_tags(scores, thresholds, vocab)):
        predicted[row, [index[t] for t in tags]] = True

    maps = mean_average_precision(y, scores)
    prf = precision_recall_f1(y, predicted)
    levels = {}
    for level in range(1, vocab.depth + 1):
        classes, mapping = vocab.level_map(level)
        result = level_accuracy(y, scores, mapping)
        levels[f"L{level}"] = {
            "classes": classes,
            "micro_accuracy": result["micro"],
            "macro_accuracy": result["macro"],
            "rows": result["rows"],
            "confusion": result["confusion"].tolist(),
        }
    metrics = {
        "images": int(len(y)),
        "tags": len(names),
        "map_macro": maps["macro"],
        "map_micro": maps["micro"],
        "tags_scored": maps["tags_scored"],
        "hamming_loss": hamming_loss(y, predicted),
        **{k: prf[k] for k in ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1")},
        **{f"top{k}_accuracy": top_k_accuracy(y, scores, k) for k in (1, 3, 5)},
        "levels": levels,
    }
    per_tag = pa.table(
        {
            "tag": names,
            "level": [vocab.level_of(n) for n in names],
            "support": prf["support"].astype(np.int64),
            "ap": per_tag_average_precision(y, scores),
            "threshold": thresholds.astype(np.float64),
            "precision": prf["precision"],
            "recall": prf["recall"],
            "f1": prf["f1"],
        }
    )
    return metrics, per_tag


def run(config: EvalConfig) -> dict:
    spec = load_spec(config.model)
    if config.tag_table:
        y, scores, ids = stored_scores(config.manifest, config.tag_table, config.as_of, spec, config.split)
    else:
        y, scores, ids = predict(config.manifest, config.model, config.split, config.batch_size, config.num_actors)
    metrics, per_tag = compute_metrics(y, scores, spec)
    metrics.update({"model_version": spec.version, "manifest": config.manifest, "split": config.split, "config_hash": config_hash(config)})
    if config.tag_table:
        from mltag.table import tag_table

        meta = tag_table.run_metadata(config.tag_table, config.as_of or None)
        metrics.update({"tag_table": meta["table"], "table_version": meta["table_version"]})
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    pq.write_table(per_tag, os.path.join(config.out, "per_tag.parquet"))
    n = len(spec.vocab)
    pq.write_table(
        pa.table(
            {
                "listing_id": ids,
                "labels": pa.FixedSizeListArray.from_arrays(pa.array(y.ravel().astype(np.uint8)), n),
                "scores": pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel(), pa.float32()), n),
            }
        ),
        os.path.join(config.out, "scores.parquet"),
    )
    save_provenance(
        os.path.join(config.out, PROVENANCE_FILE),
        config,
        model_version=spec.version,
        tag_table=metrics.get("tag_table"),
        table_version=metrics.get("table_version"),
    )
    logger.info(
        f"eval on {metrics['images']} images ({config.split or 'all'}): mAP {metrics['map_macro']:.4f} "
        f"(micro {metrics['map_micro']:.4f}), Hamming loss {metrics['hamming_loss']:.4f}, "
        f"top-1/3/5 {metrics['top1_accuracy']:.3f}/{metrics['top3_accuracy']:.3f}/{metrics['top5_accuracy']:.3f}"
    )
    for level, m in metrics["levels"].items():
        logger.info(
            f"  {level} accuracy: micro {m['micro_accuracy']:.3f}, macro {m['macro_accuracy']:.3f} over {len(m['classes'])} classes"
        )
    logger.info("-> %s", config.out)
    return metrics

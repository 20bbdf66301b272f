"""``mltag calibrate``: choose per-tag thresholds on a validation split and save them with the model.

The stage scores the split with the model (``mltag.tagging.predict``), chooses each tag's threshold with
the pure functions of ``mltag.maths.thresholds``, and writes the thresholds into the model directory:
a new model version, with ``thresholds.json`` (the choice, per tag), ``thresholds.parquet`` and
``thresholds.provenance.json`` (the resolved config, its hash, the old and new model versions)
beside it.

Example:
    mltag calibrate --manifest catalog/manifest.parquet --model runs/train/model --target 0.9
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import config_hash, provenance_beside, save_provenance
from mltag.maths.thresholds import MODES, TagThreshold, choose_thresholds

logger = logging.getLogger(__name__)


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
    # Imported when it runs: the model brings torch and timm, the prediction Ray Data.
    from mltag.tagger.model import load_spec, set_thresholds
    from mltag.tagging.predict import predict

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
        "config_hash": config_hash(config),
    }
    with open(os.path.join(config.model, "thresholds.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    pq.write_table(pa.Table.from_pylist([asdict(c) for c in chosen]), os.path.join(config.model, "thresholds.parquet"))
    save_provenance(
        provenance_beside(os.path.join(config.model, "thresholds.json")),
        config,
        model_version=new_spec.version,
        inputs={"previous_model_version": spec.version},
    )
    # The chosen thresholds are the command's answer: stdout. What was saved, and what fell short: the log.
    print(f"{'tag':<20} {'threshold':>9} {'precision':>9} {'recall':>7}  target met")
    for c in chosen:
        print(f"{c.tag:<20} {c.threshold:>9.4f} {c.precision:>9.3f} {c.recall:>7.3f}  {'yes' if c.reached else 'NO  ' + c.note}")
    logger.info("thresholds saved with the model: version %s -> %s", spec.version, new_spec.version)
    if report["unreached"]:
        logger.warning(
            "%d tag(s) cannot reach %s %s: %s", len(report["unreached"]), config.mode, config.target, ", ".join(report["unreached"])
        )
    return chosen

"""`mltag eval` over the scores a tag table stored (no Ray, no model run) and `mltag calibrate` over
given scores: the numbers land in files, with the provenance of the run beside them."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mltag.config import config_hash
from mltag.table import tag_table
from mltag.table.delta_table import write_table

TAGS = ["a", "b", "c"]


@pytest.fixture()
def tiny_model(tmp_path):
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(0)
    spec = save_tagger(
        Tagger("test_efficientnet", len(TAGS)),
        TaggerSpec(backbone="test_efficientnet", vocabulary={"tags": TAGS}, img_size=32),
        str(tmp_path / "model"),
    )
    return str(tmp_path / "model"), spec


def labelled(n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(TAGS))) < 0.4).astype(np.uint8)
    y[: len(TAGS)] = np.eye(len(TAGS), dtype=np.uint8)  # every tag has a positive
    scores = np.clip(y * 0.5 + rng.random(y.shape) * 0.6, 0, 1).astype(np.float32)
    return y, scores


def test_eval_from_a_tag_table_writes_metrics_and_its_provenance(tmp_path, tiny_model):
    from mltag.stages.evaluate import EvalConfig, run

    model, spec = tiny_model
    y, scores = labelled()
    n = len(y)
    ids, uris = [f"L{i}" for i in range(n)], [f"/img/{i}.jpg" for i in range(n)]
    tags = [[t for t, on in zip(TAGS, row) if on] for row in y]
    pq.write_table(pa.table({"listing_id": ids, "image_uri": uris, "tags": tags, "split": ["val"] * n}), tmp_path / "m.parquet")
    batch = pa.table({"listing_id": ids, "image_uri": uris})
    rows = tag_table.assemble(batch, np.arange(n), scores, np.zeros((n, 4), np.float32), tags, spec.version, [None] * n)
    write_table(str(tmp_path / "t"), rows, {"run_id": "r", "model_version": spec.version, "embedding_dim": 4, "rows": n, "errors": 0})

    config = EvalConfig(manifest=str(tmp_path / "m.parquet"), model=model, out=str(tmp_path / "eval"), tag_table=str(tmp_path / "t"))
    metrics = run(config)
    assert metrics["images"] == n and metrics["config_hash"] == config_hash(config)
    record = json.loads((tmp_path / "eval" / "provenance.json").read_text())
    assert record["config_hash"] == config_hash(config) and record["model_version"] == spec.version
    assert record["table_version"] == 0 and record["config"]["tag_table"] == str(tmp_path / "t")


def test_calibrate_writes_the_new_model_version_and_its_provenance_beside_the_thresholds(tmp_path, tiny_model, monkeypatch):
    from mltag.stages.calibrate import CalibrateConfig, run
    from mltag.tagger.model import load_spec
    from mltag.tagging import predict

    model, spec = tiny_model
    y, scores = labelled(seed=1)
    monkeypatch.setattr(predict, "predict", lambda *a, **k: (y, scores, [f"L{i}" for i in range(len(y))]))
    config = CalibrateConfig(manifest="unused.parquet", model=model, target=0.8)
    run(config)
    new_version = load_spec(model).version
    assert new_version != spec.version
    record = json.loads((tmp_path / "model" / "thresholds.provenance.json").read_text())
    assert record["config_hash"] == config_hash(config) and record["model_version"] == new_version
    assert record["previous_model_version"] == spec.version
    assert json.loads((tmp_path / "model" / "thresholds.json").read_text())["config_hash"] == config_hash(config)


def test_rare_tag_rows_keep_tags_under_the_bar_that_the_split_holds_rarest_first():
    from mltag.stages.report import rare_tag_rows

    per_tag = [
        {"tag": "a", "support": 3, "ap": 0.5},
        {"tag": "b", "support": 0, "ap": float("nan")},  # not in the evaluated split
        {"tag": "c", "support": 7, "ap": 0.9},
        {"tag": "d", "support": 2, "ap": 0.1},  # common: above the bar
        {"tag": "e", "support": 1, "ap": 0.2},  # no training count recorded
    ]
    rows = rare_tag_rows(per_tag, {"a": 40, "b": 5, "c": 12, "d": 60}, 60, {"a": 0.4, "c": 0.95})
    assert [(r["tag"], r["train"], r["baseline_ap"]) for r in rows] == [("c", 12, 0.95), ("a", 40, 0.4)]
    assert [r["baseline_ap"] for r in rare_tag_rows(per_tag, {"a": 1}, 60, None)] == [None]

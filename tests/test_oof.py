"""`mltag split` -> `mltag oof` -> `mltag curate --oof` through the CLI on a local Ray: every
image scored once, by the model that did not train on it, the two folds training at once (a Ray
Train start costs ~40 s on 2 cores); how folds combine is tested without Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mltag.cli import main


@pytest.mark.slow
def test_split_oof_curate_from_the_command_line(ray_local, tiny_catalog, tmp_path):
    folds = tmp_path / "folds.parquet"
    assert main(["split", "--manifest", tiny_catalog["manifest"], "--folds", "2", "--include-test", "true", "--out", str(folds)]) == 0
    (tmp_path / "train.yaml").write_text(
        yaml.safe_dump(
            {"backbone": "test_efficientnet", "img_size": 64, "batch_size": 16, "augment": False, "hflip": False, "cache_decoded": True}
        )
    )
    args = ["oof", "--manifest", str(folds), "--vocabulary", tiny_catalog["vocabulary"], "--train-config", str(tmp_path / "train.yaml")]
    # Two folds at once on the fixture's 2 CPUs (one each): more than the automatic rule allows
    # (a worker's CPU + one for data), which would run them one after the other here.
    assert main([*args, "--epochs", "1", "--only-folds", "0,1", "--concurrent-folds", "2", "--out", str(tmp_path / "oof")]) == 0

    oof = pq.read_table(tmp_path / "oof" / "oof.parquet")
    manifest = pq.read_table(folds)
    assert oof.column_names == ["listing_id", "image_uri", "fold", "scores", "model_version"]
    fold_of = dict(zip(manifest.column("listing_id").to_pylist(), manifest.column("fold").to_pylist()))
    assert oof.column("listing_id").to_pylist() == sorted(fold_of)  # every image once, sorted
    assert [fold_of[i] for i in oof.column("listing_id").to_pylist()] == oof.column("fold").to_pylist()
    meta = json.loads((tmp_path / "oof" / "oof.json").read_text())
    assert [f["fold"] for f in meta["folds"]] == [0, 1]
    for fold in meta["folds"]:
        k = fold["fold"]
        versions = {v for v, f in zip(oof.column("model_version").to_pylist(), oof.column("fold").to_pylist()) if f == k}
        assert versions == {fold["model_version"]} and fold["images"] == sum(f == k for f in fold_of.values())
        assert fold["train_config"]["val_fold"] == k and fold["train_config"]["backbone"] == "test_efficientnet"
        assert fold["train_config"]["out"].endswith(f"fold-{k}") and (tmp_path / "oof" / f"fold-{k}" / "model" / "tagger.json").exists()
    assert meta["folds"][0]["model_version"] != meta["folds"][1]["model_version"]
    # the two trainings overlapped in time: each started before the other finished
    assert max(f["trained_from"] for f in meta["folds"]) < min(f["trained_to"] for f in meta["folds"])
    assert meta["cv_map_macro"]["mean"] == pytest.approx(np.mean([f["map_macro"] for f in meta["folds"]]))
    assert len(oof.column("scores")[0]) == len(meta["tags"])

    out = tmp_path / "curated"
    assert (
        main(
            [
                "curate",
                "--manifest",
                str(folds),
                "--vocabulary",
                tiny_catalog["vocabulary"],
                "--oof",
                str(tmp_path / "oof" / "oof.parquet"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "curation.json").read_text())
    assert summary["images_scored"] == len(fold_of)
    assert sorted(summary["inputs"]["model_versions"]) == sorted(f["model_version"] for f in meta["folds"])


def test_folds_combine_into_one_sorted_table_and_a_cv_map_with_its_spread(tmp_path):
    from mltag.stages.oof import OofConfig, cross_validated_map, oof_table, train_config_for_fold

    parts = [
        {"fold": 1, "ids": ["b", "a"], "uris": ["/b.jpg", "/a.jpg"], "scores": np.array([[0.1, 0.2], [0.3, 0.4]]), "model_version": "m1"},
        {"fold": 0, "ids": ["c"], "uris": ["/c.jpg"], "scores": np.array([[0.5, 0.6]]), "model_version": "m0"},
    ]
    table = oof_table(parts)
    assert table.column("listing_id").to_pylist() == ["a", "b", "c"]
    assert table.column("fold").to_pylist() == [1, 1, 0] and table.column("model_version").to_pylist() == ["m1", "m1", "m0"]
    assert table.column("scores").to_pylist()[0] == pytest.approx([0.3, 0.4])
    assert cross_validated_map([0.5, 0.7, 0.6]) == pytest.approx({"mean": 0.6, "std": np.std([0.5, 0.7, 0.6]), "min": 0.5, "max": 0.7})

    (tmp_path / "t.yaml").write_text("epochs: 3\nlr: 0.01\n")
    config = train_config_for_fold(OofConfig(manifest="m.parquet", out=str(tmp_path), train_config=str(tmp_path / "t.yaml"), epochs=2), 3)
    assert (config.val_fold, config.epochs, config.lr, config.name) == (3, 2, 0.01, "oof-fold-3")
    (tmp_path / "bad.yaml").write_text("val_fold: 1\n")
    with pytest.raises(ValueError, match="set per fold"):
        train_config_for_fold(OofConfig(manifest="m.parquet", train_config=str(tmp_path / "bad.yaml")), 0)


def test_folds_train_at_once_only_where_each_has_its_workers_and_a_data_cpu():
    from mltag.stages.oof import folds_that_fit

    # 2 cores, one 1-CPU worker per fold: worker + data CPU = 2, so one fold at a time
    assert folds_that_fit(cpus=2, gpus=0, num_workers=1, cpus_per_worker=1, use_gpu=False, folds=5) == 1
    assert folds_that_fit(cpus=16, gpus=0, num_workers=1, cpus_per_worker=1, use_gpu=False, folds=5) == 5
    assert folds_that_fit(cpus=16, gpus=0, num_workers=2, cpus_per_worker=2, use_gpu=False, folds=5) == 3
    # GPUs bound it: 4 GPUs, 2 per fold
    assert folds_that_fit(cpus=64, gpus=4, num_workers=2, cpus_per_worker=1, use_gpu=True, folds=5) == 2
    assert folds_that_fit(cpus=1, gpus=0, num_workers=1, cpus_per_worker=1, use_gpu=False, folds=5) == 1  # never 0


@pytest.mark.slow
def test_curate_with_a_model_scores_the_manifest_itself(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    from mltag.stages.curate import CurateConfig, run

    summary = run(CurateConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, out=str(tmp_path), thumbnails=False))
    assert summary["images_scored"] == 48 and summary["scores"].startswith("model (in-sample")
    issues = pq.read_table(tmp_path / "label_issues.parquet")
    assert issues.num_rows == summary["label_issues"]["flagged"]
    assert "in-sample" in (tmp_path / "report.html").read_text()

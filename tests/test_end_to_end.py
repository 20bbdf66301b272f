"""Every jobs/ entrypoint and the CLI, run as a user runs them, on a tiny real catalog."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.data.catalog import read_manifest
from mltag.table import tag_table

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_entrypoint(*args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """sample (CLI) -> jobs/train.py -> jobs/tag_catalog.py (with bad rows) -> jobs/build_index.py."""
    work = tmp_path_factory.mktemp("e2e")
    out = {"work": work}
    run_entrypoint("-m", "mltag.cli", "sample", "--out", str(work / "catalog"), "--n-images", "40", "--size", "64")
    manifest = work / "catalog" / "manifest.parquet"

    config = work / "train.yaml"
    config.write_text(
        f"manifest: {manifest}\nout: {work / 'train'}\nbackbone: test_efficientnet\nimg_size: 64\nepochs: 2\nbatch_size: 8\nhflip: false\n"
        "cache_decoded: true\n"
    )
    out["train_log"] = run_entrypoint("jobs/train.py", "--config", str(config), "--lr", "0.003")

    # The catalog to tag: the sample plus a corrupt file and a missing one.
    (work / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    table = read_manifest(str(manifest))  # absolute image URIs: the new manifest lives elsewhere
    bad = pa.table(
        {
            "listing_id": ["BAD1", "BAD2"],
            "image_uri": [str(work / "corrupt.jpg"), str(work / "missing.jpg")],
            "tags": pa.array([[], []], pa.list_(pa.string())),
            "split": ["test", "test"],
        }
    )
    pq.write_table(pa.concat_tables([table, bad]), work / "to_tag.parquet")
    out["tag_log"] = run_entrypoint(
        "jobs/tag_catalog.py",
        "--manifest",
        str(work / "to_tag.parquet"),
        "--model",
        str(work / "train" / "model"),
        "--out",
        str(work / "tag_table"),
        "--batch-size",
        "16",
    )
    out["index_log"] = run_entrypoint("jobs/build_index.py", "--tag-table", str(work / "tag_table"), "--out", str(work / "index"))
    return out


def test_training_prints_validation_map_per_epoch_and_saves_a_model(pipeline):
    from test_console import finished_lines

    log = pipeline["train_log"]
    summaries = [line for line in finished_lines(log) if re.search(r"epoch \d/2 \(phase 2\): train loss", line)]
    assert len(summaries) == 2 and "epoch 1/2" in summaries[0] and "epoch 2/2" in summaries[1], log[-6000:]
    assert all("val mAP" in line and "samples/s" in line for line in summaries)
    assert "best epoch" in log and "Reporting training result" not in log
    spec = json.loads((pipeline["work"] / "train" / "model" / "tagger.json").read_text())
    assert len(spec["version"]) == 12 and spec["backbone"] == "test_efficientnet"
    assert [h["epoch"] for h in spec["extra"]["history"]] == [1, 2]
    assert (pipeline["work"] / "train" / "config.yaml").exists()


def test_each_job_prints_each_line_once_and_no_warnings(pipeline):
    """What a person reads (issue 17: epoch lines printed twice, Ray Train's report dicts, numpy
    and torch warnings, a Ray deprecation warning, Ray Data's "Progress bars disabled" notices),
    on the consoles of the pipeline's own jobs rather than a second training of its own."""
    from test_console import repeated_lines

    for job in ("train_log", "index_log"):
        console = pipeline[job]
        assert repeated_lines(console) == {}, (job, console[-6000:])
        assert "Warning" not in console, (job, console[-6000:])
    # Tagging: mltag's own lines once and no warnings. Ray Data's progress log (stdout is not a
    # terminal here) repeats its per-operator "Tasks: 0 ..." lines by design, and Ray's core prints
    # two error-level notes of its own (actor constructor arguments in the object store: Ray issue
    # 57733, any map_batches with a class; a KillActor RPC to a worker that had already exited).
    console = pipeline["tag_log"]
    assert {line for line in repeated_lines(console) if "mltag." in line} == set(), console[-6000:]
    assert "Warning" not in console and "shards done: 1/1" in console, console[-6000:]


def test_tag_table_has_one_row_per_input_and_error_rows(pipeline):
    import duckdb
    from deltalake import DeltaTable

    work = pipeline["work"]
    success = tag_table.run_metadata(str(work / "tag_table"))
    assert success["rows"] == success["manifest_rows"] == 42 and success["errors"] == 2
    con = duckdb.connect()
    tags = DeltaTable(str(work / "tag_table")).to_pyarrow_dataset()  # noqa: F841 (DuckDB reads the variable by name)
    rows = con.execute("SELECT listing_id, error, len(embedding) AS d, len(scores) AS s FROM tags").fetchall()
    assert len(rows) == 42 and len({r[0] for r in rows}) == 42
    errors = {r[0]: r[1] for r in rows if r[1] is not None}
    assert set(errors) == {"BAD1", "BAD2"}
    assert "corrupt" in errors["BAD1"] or "not an image" in errors["BAD1"]
    assert "missing" in errors["BAD2"]
    dims = {r[2] for r in rows if r[1] is None}
    assert dims == {success["embedding_dim"]} and {r[3] for r in rows if r[1] is None} == {len(success["vocabulary"])}
    version = con.execute("SELECT DISTINCT model_version FROM tags").fetchall()
    assert version == [(json.loads((work / "train" / "model" / "tagger.json").read_text())["version"],)]


@pytest.fixture(scope="module")
def model_eval(pipeline):
    """`mltag eval` of the trained model on the val split (the tagged manifest's: the sample's
    plus two bad rows in test) -> work/eval, with its console."""
    work = pipeline["work"]
    args = ["-m", "mltag.cli", "eval", "--manifest", str(work / "to_tag.parquet"), "--model", str(work / "train" / "model")]
    log = run_entrypoint(*args, "--out", str(work / "eval"))
    return {"dir": work / "eval", "log": log, "args": args}


def test_eval_of_the_stored_table_matches_eval_of_the_model(pipeline, model_eval):
    """`mltag eval --tag-table --as-of` scores what the table holds; on the same split it must give
    what running the model gives."""
    work = pipeline["work"]
    run_entrypoint(*model_eval["args"], "--out", str(work / "eval-table"), "--tag-table", str(work / "tag_table"), "--as-of", "0")
    by_model = json.loads((model_eval["dir"] / "metrics.json").read_text())
    by_table = json.loads((work / "eval-table" / "metrics.json").read_text())
    assert by_table["table_version"] == 0 and by_table["images"] == by_model["images"] == 10
    assert by_table["map_macro"] == pytest.approx(by_model["map_macro"], abs=1e-4)
    assert by_table["hamming_loss"] == pytest.approx(by_model["hamming_loss"], abs=1e-6)


def test_search_by_listing_and_by_image_finds_the_listing_itself_first(pipeline):
    work = pipeline["work"]
    by_id = run_entrypoint("-m", "mltag.cli", "search", "--index", str(work / "index"), "--listing-id", "L000005", "--k", "3")
    first = [line for line in by_id.splitlines() if line.strip().startswith("1 ")][0]
    assert "L000005" in first and "1.0000" in first
    image = work / "catalog" / "images" / "000011.jpg"
    by_image = run_entrypoint("-m", "mltag.cli", "search", "--index", str(work / "index"), "--image", str(image), "--k", "3")
    first = [line for line in by_image.splitlines() if line.strip().startswith("1 ")][0]
    assert "L000011" in first


def test_rerun_replaces_the_table_without_duplicates(pipeline):
    work = pipeline["work"]
    run_entrypoint(
        "jobs/tag_catalog.py",
        "--manifest",
        str(work / "to_tag.parquet"),
        "--model",
        str(work / "train" / "model"),
        "--out",
        str(work / "tag_table"),
        "--run-id",
        "second",
    )
    meta = tag_table.run_metadata(str(work / "tag_table"))
    assert meta["run_id"] == "second" and meta["table_version"] == 1
    rows = tag_table.read_rows(str(work / "tag_table"))
    assert rows.num_rows == 42 == len(set(rows.column("listing_id").to_pylist()))  # replaced whole, nothing doubled
    assert tag_table.read_rows(str(work / "tag_table"), as_of=0).num_rows == 42
    assert not (work / "tag_table" / "_mltag_runs").exists()


def test_cli_reports_config_errors_clearly():
    proc = subprocess.run(
        [sys.executable, "-m", "mltag.cli", "train", "--manifest", "m.csv", "--loss", "asl2"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "bce, focal, asl" in proc.stderr


def test_eval_metrics_match_sklearn_on_the_pipelines_scores(pipeline, model_eval):
    import numpy as np
    from sklearn import metrics as skm

    from mltag.tagger.embed import tag_images

    work, log, out = pipeline["work"], model_eval["log"], model_eval["dir"]
    assert "mAP" in log and "L1 accuracy" in log and "L2 accuracy" in log
    metrics = json.loads((out / "metrics.json").read_text())
    scored = pq.read_table(out / "scores.parquet")
    n_tags = metrics["tags"]
    y = np.asarray(scored.column("labels").combine_chunks().flatten()).reshape(-1, n_tags)
    s = np.asarray(scored.column("scores").combine_chunks().flatten()).reshape(-1, n_tags)
    assert metrics["images"] == len(y) == 10  # the val split of 40 images
    keep = y.sum(axis=0) > 0
    assert metrics["map_macro"] == pytest.approx(skm.average_precision_score(y[:, keep], s[:, keep], average="macro"))
    assert metrics["map_micro"] == pytest.approx(skm.average_precision_score(y, s, average="micro"))
    assert set(metrics["levels"]) == {"L1", "L2"} and metrics["levels"]["L1"]["classes"] == ["scene", "odd", "even"]
    per_tag = pq.read_table(out / "per_tag.parquet")
    assert per_tag.num_rows == n_tags and set(per_tag.column_names) >= {"tag", "ap", "precision", "recall", "f1"}

    # The Ray Data pipeline's scores are the model's scores for those very listings.
    manifest = read_manifest(str(work / "catalog" / "manifest.parquet")).to_pylist()
    uri = {r["listing_id"]: r["image_uri"] for r in manifest}
    ids = scored.column("listing_id").to_pylist()[:3]
    direct, _, _ = tag_images([uri[i] for i in ids], str(work / "train" / "model"))
    np.testing.assert_allclose(s[:3], direct, atol=1e-4)


def test_calibrate_saves_thresholds_as_a_new_model_version(pipeline, tmp_path):
    import shutil

    work = pipeline["work"]
    model = tmp_path / "model"
    shutil.copytree(work / "train" / "model", model)
    before = json.loads((model / "tagger.json").read_text())
    log = run_entrypoint(
        "-m", "mltag.cli", "calibrate", "--manifest", str(work / "catalog" / "manifest.parquet"), "--model", str(model), "--target", "0.8"
    )
    after = json.loads((model / "tagger.json").read_text())
    report = json.loads((model / "thresholds.json").read_text())
    assert after["version"] != before["version"] and report["model_version"] == after["version"]
    assert after["thresholds"] == [t["threshold"] for t in report["tags"]]
    assert all(t["precision"] >= 0.8 for t in report["tags"] if t["reached"])
    assert "target met" in log


def test_report_renders_its_figures_in_a_headless_browser(pipeline, model_eval):
    import shutil

    work, evaluated = pipeline["work"], str(model_eval["dir"])
    run_entrypoint(
        "-m", "mltag.cli", "report", "--model", str(work / "train" / "model"), "--eval", evaluated, "--out", str(work / "report"),
        "--baseline-eval", evaluated, "--rare-below", "1000",
    )  # fmt: skip
    page = (work / "report" / "report.html").read_text()
    counts = json.loads((work / "train" / "model" / "tagger.json").read_text())["extra"]["train_tag_counts"]
    rare = [t for t, c in counts.items() if c < 1000]
    assert rare and 'id="rare-tags"' in page  # every tag is "rare" below 1000: each row with its AP twice
    for row in pq.read_table(model_eval["dir"] / "per_tag.parquet").to_pylist():
        if row["support"] > 0 and row["tag"] in rare:
            assert (
                f"<td>{row['tag']}</td><td>{counts[row['tag']]}</td><td>{row['support']}</td><td>{row['ap']:.3f}</td><td>{row['ap']:.3f}</td>"
                in page
            )
    for name in ("training_curves.png", "pr_curves.png", "per_tag_ap.png", "confusion_l1.png"):
        assert (work / "report" / name).stat().st_size > 5000
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser installed (make test installs chromium where apt-get can)")
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={work / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (work / "report" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = proc.stdout
    assert 'data-figures="4"' in dom, proc.stderr[-2000:]
    assert 'data-figures-rendered="4"' in dom  # every PNG decoded by the browser
    assert "mAP (macro)" in dom

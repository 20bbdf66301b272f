"""S3 against a real S3-compatible server on loopback (moto's server), never a mock object."""

from __future__ import annotations

import io
import os
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.table import delta_table, tag_table

pytestmark = pytest.mark.s3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server in its own process (delta-rs holds the GIL while it waits on the network, so
    a server thread inside the test process would never answer it)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except OSError as exc:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("moto's S3 server did not start") from exc
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from mltag.data import storage

    storage._filesystem.cache_clear()  # pick up the endpoint
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._filesystem.cache_clear()
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_catalog(s3_server, tiny_catalog):
    """The tiny sample catalog uploaded to s3://catalog/, manifest with relative URIs."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="catalog")
    table = pq.read_table(tiny_catalog["manifest"]).slice(0, 10)
    for uri in table.column("image_uri").to_pylist():
        with open(os.path.join(tiny_catalog["out"], uri), "rb") as f:
            s3.put_object(Bucket="catalog", Key=f"listings/{uri}", Body=f.read())
    extra = pa.table(
        {
            "listing_id": ["GONE", "NOBUCKET"],
            "image_uri": ["images/not-uploaded.jpg", "s3://no-such-bucket/x.jpg"],
            "tags": pa.array([[], []], pa.list_(pa.string())),
            "split": ["test", "test"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables([table, extra]), buf)
    s3.put_object(Bucket="catalog", Key="listings/manifest.parquet", Body=buf.getvalue())
    return "s3://catalog/listings/manifest.parquet"


def test_fetch_from_s3_missing_key_and_bucket(s3_catalog):
    from mltag.data.images import load_image

    pixels, error = load_image("s3://catalog/listings/images/000000.jpg", 32)
    assert error is None and pixels.shape == (32, 32, 3)
    assert "missing" in load_image("s3://catalog/listings/images/nope.jpg", 32)[1]
    assert load_image("s3://no-such-bucket/x.jpg", 32)[1] is not None


def test_manifest_on_s3_resolves_relative_uris(s3_catalog):
    from mltag.data.catalog import read_manifest

    uris = read_manifest(s3_catalog).column("image_uri").to_pylist()
    assert uris[0] == "s3://catalog/listings/images/000000.jpg"
    assert uris[-1] == "s3://no-such-bucket/x.jpg"


@pytest.mark.slow
def test_tag_job_reads_and_writes_s3_and_a_failed_rerun_changes_nothing(s3_server, s3_catalog, tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mltag.data import storage

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/tag_catalog.py",
            "--manifest",
            s3_catalog,
            "--model",
            tiny_model_dir,
            "--out",
            "s3://catalog/tag_table",
            "--batch-size",
            "4",
            "--max-error-rate",
            "0.5",
        ],
        cwd=root,
        env={**os.environ, **s3_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    meta = tag_table.run_metadata("s3://catalog/tag_table")
    assert meta["rows"] == meta["manifest_rows"] == 12 and meta["errors"] == 2 and meta["table_version"] == 0
    table = tag_table.read_rows("s3://catalog/tag_table")
    errors = dict(zip(table.column("listing_id").to_pylist(), table.column("error").to_pylist()))
    assert "missing" in errors["GONE"] and errors["NOBUCKET"] is not None
    assert sum(e is None for e in errors.values()) == 10
    assert not storage.filesystem_for("s3://catalog/")[0].exists("catalog/tag_table/_mltag_runs")

    # A re-run with a tampered model file stops on the driver, before Ray starts, with one line
    # naming the model (it once failed in every actor, a Ray traceback); the committed version is
    # readable and unchanged, row for row, and nothing was staged beside it.
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    failed = subprocess.run(
        [
            sys.executable,
            "jobs/tag_catalog.py",
            "--manifest",
            s3_catalog,
            "--model",
            str(broken),
            "--run-id",
            "rerun-2",
            "--out",
            "s3://catalog/tag_table",
            "--batch-size",
            "4",
            "--max-error-rate",
            "0.5",
        ],
        cwd=root,
        env={**os.environ, **s3_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "Started a local Ray" not in failed.stderr
    assert failed.stderr.strip() == failed.stderr.strip().splitlines()[-1]  # one line
    assert f"refusing to load the tagger at {broken}: weights.pt and tagger.json do not match" in failed.stderr
    assert not storage.filesystem_for("s3://catalog/")[0].exists("catalog/tag_table/_mltag_runs")
    assert delta_table.latest_version("s3://catalog/tag_table") == 0
    assert tag_table.read_rows("s3://catalog/tag_table").equals(table)


@pytest.mark.slow
def test_two_concurrent_runs_into_one_s3_table(s3_server, s3_catalog, tiny_catalog, tiny_model_dir, tmp_path):
    """Conditional puts on the S3 server: two jobs racing into one table leave one whole run per version
    (s3_catalog: the bucket)."""
    from test_tag_transactions import check_one_whole_run_per_version, concurrent_runs

    out = "s3://catalog/concurrent"
    a, b = concurrent_runs(tiny_catalog, tiny_model_dir, tmp_path, out, s3_server)
    check_one_whole_run_per_version(out, a, b)
    assert delta_table.storage_options(out)["aws_conditional_put"] == "etag"


@pytest.mark.slow
def test_training_checkpoints_to_s3_storage(s3_server, tiny_catalog, tmp_path):
    """Ray Train's RunConfig storage on s3:// (the loopback server), through mltag's filesystem."""
    import subprocess
    import sys
    from pathlib import Path

    from mltag.data import storage

    storage._filesystem.cache_clear()
    fs, _ = storage.filesystem_for("s3://")
    fs.mkdir("train-storage")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/train.py",
            "--manifest",
            tiny_catalog["manifest"],
            "--out",
            str(tmp_path / "run"),
            "--backbone",
            "test_efficientnet",
            "--img-size",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--storage-path",
            "s3://train-storage/runs",
            "--name",
            "on-s3",
            "--cache-decoded",
            "true",
        ],
        cwd=root,
        env={**os.environ, **s3_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    checkpoints = [p for p in fs.ls("train-storage/runs/on-s3") if "checkpoint_" in p and not p.endswith(".json")]
    assert len(checkpoints) == 2
    assert any(p.endswith("state.pt") for p in fs.find(checkpoints[0]))
    assert (tmp_path / "run" / "model" / "tagger.json").exists()


def test_provenance_and_configs_are_written_to_and_read_from_s3(s3_server):
    import json

    import boto3

    from mltag.config import config_hash, load_yaml, save_config, save_provenance
    from mltag.data import storage
    from mltag.stages.index_build import IndexConfig

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="provenance")
    config = IndexConfig(tag_table="s3://provenance/tags", out="runs/index")
    uri = save_provenance("s3://provenance/runs/eval/provenance.json", config, model_version="m1", table_version=2)
    record = json.loads(storage.read_bytes(uri))
    assert record["config_hash"] == config_hash(config) and record["model_version"] == "m1" and record["table_version"] == 2
    assert load_yaml(uri)["tag_table"] == "s3://provenance/tags"  # a provenance file is a config file
    save_config(config, "s3://provenance/runs/train/config.yaml")
    assert load_yaml("s3://provenance/runs/train/config.yaml") == record["config"]

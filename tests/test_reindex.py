"""Two nightly runs over a changing catalog: only what changed is tagged, the rest carried over
row for row; re-runs and a killed run leave no duplicates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mltag.catalog import read_manifest
from mltag.index import EmbeddingIndex, IndexConfig, build_index
from mltag.reindex import ReindexConfig, plan, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _rows(snapshot_dir) -> dict:
    table = pq.read_table(snapshot_dir)
    return {(r["listing_id"], r["image_uri"]): r for r in table.to_pylist()}


def test_plan_splits_keys():
    prev = pa.table({"listing_id": ["a", "b", "c"], "image_uri": ["1", "2", "3"], "fingerprint": ["x", "y", "z"],
                     "model_version": ["v", "v", "v"]})
    today = pa.table({"listing_id": ["a", "b", "d"], "image_uri": ["1", "2", "4"], "fingerprint": ["x", "Y", "w"]})
    parts = plan(today, prev, "v")
    assert parts == {"new": [("d", "4")], "changed": [("b", "2")], "unchanged": [("a", "1")], "deleted": [("c", "3")]}
    assert plan(today, prev, "v2")["changed"] == [("a", "1"), ("b", "2")]  # a new model re-tags all


def test_two_nights_then_rerun_then_killed_restart(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    catalog = tmp_path / "catalog"
    shutil.copytree(tiny_catalog["out"], catalog)
    day1 = read_manifest(str(catalog / "manifest.parquet")).select(["listing_id", "image_uri"])
    pq.write_table(day1, tmp_path / "day1.parquet")
    table_root, index_dir = tmp_path / "tag_table", tmp_path / "index"

    first = run(ReindexConfig(manifest=str(tmp_path / "day1.parquet"), model=tiny_model_dir, table=str(table_root),
                              snapshot="2026-11-23"))
    assert (first["new"], first["changed"], first["unchanged"], first["deleted"]) == (48, 0, 0, 0)
    build_index(IndexConfig(tag_table=str(table_root), out=str(index_dir)))

    # Day 2: two photos replaced, two listings gone, three new ones.
    uris = day1.column("image_uri").to_pylist()
    ids = day1.column("listing_id").to_pylist()
    rng = np.random.default_rng(0)
    for uri in uris[:2]:
        time.sleep(0.01)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(uri, "JPEG")
    new_uris = []
    for k in range(3):
        path = catalog / "images" / f"new{k}.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
        new_uris.append(str(path))
    day2 = pa.table({"listing_id": ids[:2] + ids[4:] + ["N0", "N1", "N2"], "image_uri": uris[:2] + uris[4:] + new_uris})
    pq.write_table(day2, tmp_path / "day2.parquet")
    config = ReindexConfig(manifest=str(tmp_path / "day2.parquet"), model=tiny_model_dir, table=str(table_root),
                           snapshot="2026-11-24", index=str(index_dir))
    second = run(config)
    assert (second["new"], second["changed"], second["unchanged"], second["deleted"]) == (3, 2, 44, 2)
    before, after = _rows(table_root / "snapshot=2026-11-23"), _rows(table_root / "snapshot=2026-11-24")
    assert len(after) == 49 == day2.num_rows
    unchanged = [k for k in after if k[0] in ids[4:]]
    assert len(unchanged) == 44 and all(after[k] == before[k] for k in unchanged)  # byte-for-byte the same content
    assert all(after[(ids[i], uris[i])]["embedding"] != before[(ids[i], uris[i])]["embedding"] for i in range(2))
    index = EmbeddingIndex.load(str(index_dir))
    listed = index.ids.column("listing_id").to_pylist()
    assert len(listed) == len(set(listed)) == 49 and ids[2] not in listed and "N2" in listed
    assert index.search_listing("N1", k=1).column("listing_id").to_pylist() == ["N1"]

    # The same night again: the same snapshot, nothing doubled.
    again = run(config)
    assert (again["new"], again["changed"], again["unchanged"], again["deleted"]) == (3, 2, 44, 2)
    assert _rows(table_root / "snapshot=2026-11-24") == after
    listed = EmbeddingIndex.load(str(index_dir)).ids.column("listing_id").to_pylist()
    assert len(listed) == len(set(listed)) == 49

    # Day 3, killed as soon as its tagging part is committed, then run again: the tagged part is reused.
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(uris[10], "JPEG")
    args = ["jobs/nightly_reindex.py", "--manifest", str(tmp_path / "day2.parquet"), "--model", tiny_model_dir,
            "--table", str(table_root), "--snapshot", "2026-11-25"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = table_root / ".reindex-2026-11-25" / "tagged" / "_SUCCESS.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run died before its tagging part was committed"
    assert not (table_root / "snapshot=2026-11-25" / "_SUCCESS.json").exists(), "the kill came too late to test a restart"
    third = run(ReindexConfig(manifest=str(tmp_path / "day2.parquet"), model=tiny_model_dir, table=str(table_root),
                              snapshot="2026-11-25"))
    assert third["tagged_reused_after_restart"] is True
    assert (third["changed"], third["unchanged"], third["rows"]) == (1, 48, 49)
    assert len(_rows(table_root / "snapshot=2026-11-25")) == 49
    assert not (table_root / ".reindex-2026-11-25").exists()

"""The README's DuckDB queries, run as written against a (small, fast) demo's outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    proc = subprocess.run(
        [sys.executable, "jobs/demo.py", "--out", str(out), "--n-images", "40", "--img-size", "64",
         "--backbone", "test_efficientnet", "--pretrained", "none", "--epochs", "1", "--batch-size", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "validation mAP" in proc.stdout and "duckdb" in proc.stdout
    return out


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [q for q in re.findall(r"```sql\n(.*?)```", text, re.S) if "demo_out/" in q]


def test_the_readme_has_the_analyst_queries():
    queries = readme_queries()
    assert len(queries) >= 5
    assert any("anomalies.parquet" in q for q in queries) and any("neighbour" in q for q in queries)


@pytest.mark.parametrize("number", range(5))
def test_readme_query_runs_on_the_demo_outputs(demo_out, number):
    import duckdb

    query = readme_queries()[number].replace("demo_out/", f"{demo_out}/")
    rows = duckdb.connect().execute(query).fetchall()
    if "error IS NOT NULL" in query:
        assert {r[0] for r in rows} == {"BAD-corrupt", "BAD-missing"}
    if "anomalies.parquet" in query:
        assert rows, "the anomaly queries return the flagged listings and their neighbours"


def test_demo_wrote_every_output(demo_out):
    for path in ("catalog/manifest.parquet", "train/model/tagger.json", "tag_table/_SUCCESS.json", "index/index.json",
                 "anomalies.parquet", "duplicates.parquet"):
        assert (demo_out / path).exists(), path

"""The README's analyst snippets (DuckDB over the Delta tag table), run as written against a small demo's outputs."""

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
        [
            sys.executable,
            "jobs/demo.py",
            "--out",
            str(out),
            "--n-images",
            "40",
            "--img-size",
            "64",
            "--backbone",
            "test_efficientnet",
            "--pretrained",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "validation mAP" in proc.stdout and "duckdb" in proc.stdout and "Delta" in proc.stdout
    return out


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Querying the outputs") : text.index("## Running on a cluster")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_analyst_snippets():
    snippets = readme_snippets()
    assert len(snippets) >= 6
    assert any("anomalies.parquet" in q for q in snippets) and any("neighbour" in q for q in snippets)
    assert any("version=0" in q for q in snippets)  # time travel


def test_readme_snippets_run_in_order_on_the_demo_outputs(demo_out, capsys, monkeypatch):
    monkeypatch.chdir(demo_out.parent)  # the snippets say demo_out/...
    namespace: dict = {}
    outputs = []
    for snippet in readme_snippets():
        exec(compile(snippet, "README.md", "exec"), namespace)
        outputs.append(capsys.readouterr().out)
    counts, carrying, failed, anomalies, neighbours, history = outputs[:6]
    assert "scene" in counts and "images" in counts
    assert "scene_palace" not in carrying or "L0" in carrying
    assert "BAD-corrupt" in failed and "BAD-missing" in failed and "missing" in failed
    assert "rank" in anomalies and "L0" in anomalies
    assert "neighbour_tags" in neighbours
    assert "WRITE" in history or "CREATE TABLE" in history


def test_demo_wrote_every_output(demo_out):
    for path in (
        "catalog/manifest.parquet",
        "train/model/tagger.json",
        "tag_table/_delta_log",
        "index/CURRENT",
        "anomalies.parquet",
        "duplicates.parquet",
    ):
        assert (demo_out / path).exists(), path

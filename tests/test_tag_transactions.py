"""The tag table as a transaction log: one commit per run, resume after a killed driver, concurrent
writers, the error gate, re-runs and repeated manifest rows. Real Ray, real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.cli import main as cli_main
from mltag.data.catalog import read_manifest
from mltag.stages.tag import TagConfig, run
from mltag.table import delta_table, tag_table
from mltag.table.sharded_run import RUNS_DIR

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("listing_id").to_pylist(), table.column("image_uri").to_pylist()))


def _many(tiny_catalog, tmp_path, copies: int, name: str = "many.parquet") -> tuple[str, pa.Table]:
    """The sample images under ``copies`` x 48 distinct listing ids."""
    base = read_manifest(tiny_catalog["manifest"])
    table = pa.concat_tables(
        [base.set_column(0, "listing_id", pa.array([f"{i}-{k}" for i in base.column("listing_id").to_pylist()])) for k in range(copies)]
    )
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path), table


def test_a_run_is_one_commit_a_rerun_is_a_no_op_and_a_new_run_replaces_the_table_whole(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    out = str(tmp_path / "t")
    first = run(TagConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, out=out, snapshot="2026-11-22", shard_rows=10))
    assert first["table_version"] == 0 and first["rows"] == 48 and first["shards"] == 5
    again = run(TagConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, out=out, shard_rows=10))
    assert again["table_version"] == 0  # the same inputs: already committed, nothing written
    half, _ = _many(tiny_catalog, tmp_path, 1, "half.parquet")
    pq.write_table(pq.read_table(half).slice(0, 20), half)
    second = run(TagConfig(manifest=half, model=tiny_model_dir, out=out, snapshot="2026-11-23"))
    assert second["table_version"] == 1
    assert tag_table.read_rows(out).num_rows == 20  # replaced whole, not appended
    assert tag_table.read_rows(out, as_of="2026-11-22").num_rows == 48 == tag_table.read_rows(out, as_of=0).num_rows
    assert not (tmp_path / "t" / RUNS_DIR).exists()  # working directories cleaned after commit
    history = delta_table.history_entries(delta_table.open_table(out))
    assert [(h["version"], h["mltag"]["snapshot"], h["mltag"]["rows"]) for h in history] == [(1, "2026-11-23", 20), (0, "2026-11-22", 48)]
    assert (
        history[0]["mltag"]["config_hash"] and history[0]["mltag"]["model_version"] and history[0]["userMetadata"].startswith("mltag tag")
    )


def test_repeated_manifest_rows_are_kept_once_and_counted(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    base = read_manifest(tiny_catalog["manifest"])
    doubled = pa.concat_tables([base, base.slice(0, 3)])
    pq.write_table(doubled, tmp_path / "dup.parquet")
    meta = run(TagConfig(manifest=str(tmp_path / "dup.parquet"), model=tiny_model_dir, out=str(tmp_path / "t")))
    rows = tag_table.read_rows(str(tmp_path / "t"))
    assert meta["duplicates_dropped"] == 3 and meta["rows"] == rows.num_rows == 48
    assert _keys(rows) == _keys(base)


def test_error_gate_refuses_a_run_of_denied_images_and_leaves_the_table_as_it_was(
    ray_local, tiny_catalog, tiny_model_dir, tmp_path, capsys
):
    out = str(tmp_path / "t")
    run(TagConfig(manifest=tiny_catalog["manifest"], model=tiny_model_dir, out=out))
    before = tag_table.read_rows(out)
    # Every image denied: root reads anything, so point at files nobody may read (/proc write-only knobs).
    denied = pa.table({"listing_id": [f"D{i}" for i in range(6)], "image_uri": ["/proc/sys/vm/drop_caches"] * 6})
    pq.write_table(denied, tmp_path / "denied.parquet")
    code = cli_main(["tag", "--manifest", str(tmp_path / "denied.parquet"), "--model", tiny_model_dir, "--out", out])
    err = capsys.readouterr().err
    assert code == 1
    assert "6 of 6 rows (100.0%) failed" in err and "permission_denied" in err and "/proc/sys/vm/drop_caches" in err
    assert tag_table.read_rows(out).equals(before) and delta_table.latest_version(out) == 0
    assert not list((tmp_path / "t").glob("part-tag-*-s*")) or len(list((tmp_path / "t").glob("part-*"))) == len(
        delta_table.open_table(out).file_uris()
    )  # the refused run's files were removed


def _command(manifest: str, model: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mltag.cli", "tag", "--manifest", manifest, "--model", model, "--out", out, *extra]


def test_a_driver_killed_at_60_percent_resumes_only_the_unfinished_shards(tiny_catalog, tiny_model_dir, tmp_path):
    # 960 rows in 10 shards of 96 (here each shard adds ~2 s to a run besides its rows)
    manifest, table = _many(tiny_catalog, tmp_path, 20)
    out = str(tmp_path / "t")
    command = _command(manifest, tiny_model_dir, out, "--shard-rows", "96", "--batch-size", "8", "--decode-batch-size", "8")
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dirs = lambda: list((tmp_path / "t" / RUNS_DIR).glob("*/done"))  # noqa: E731
    done, deadline = 0, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        done = sum(len(list(d.iterdir())) for d in done_dirs())
        if done >= 6:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
    proc.wait()
    assert 6 <= done < 10, f"the kill came at {done} of 10 shards"
    assert not delta_table.exists(out)  # nothing committed: readers see no table at all
    finished_before = sum(len(list(d.iterdir())) for d in done_dirs())

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (  # status is logged, to stderr: stdout is for a command's answer, and tagging has none
        "resuming run tag-" in result.stderr
        and f"{finished_before} of 10 shards already done, tagging {10 - finished_before}" in result.stderr
        and "mltag.stages.tag: tag table: 960 rows" in result.stderr
        and "resuming" not in result.stdout
    )
    rows = tag_table.read_rows(out)
    assert rows.num_rows == table.num_rows == 960 and _keys(rows) == _keys(table)  # one row per manifest row
    meta = tag_table.run_metadata(out)
    assert meta["shards_resumed"] == finished_before and meta["table_version"] == 0 and meta["rows"] == 960
    assert not (tmp_path / "t" / RUNS_DIR).exists()


def concurrent_runs(tiny_catalog, tiny_model_dir, tmp_path, out: str, env: dict) -> tuple[pa.Table, pa.Table]:
    """Two `mltag tag` jobs, each with its own Ray, into one table at the same time."""
    a_manifest, a = _many(tiny_catalog, tmp_path, 1, "a.parquet")
    b_manifest, b = _many(tiny_catalog, tmp_path, 2, "b.parquet")
    env = {**os.environ, "RAY_ADDRESS": "local", **env}
    procs = [
        subprocess.Popen(
            _command(m, tiny_model_dir, out, "--run-id", f"run-{n}", "--shard-rows", "32"),  # 2 and 3 shards
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, m in (("a", a_manifest), ("b", b_manifest))
    ]
    outcomes = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    # Each job either committed (on top of the other, whole) or stopped with a clear conflict error.
    for code, (_stdout, stderr) in zip(codes, outcomes):
        assert code == 0 or "another writer" in stderr, stderr[-3000:]
    assert 0 in codes
    return a, b


def check_one_whole_run_per_version(out: str, a: pa.Table, b: pa.Table) -> None:
    rows = tag_table.read_rows(out)
    assert _keys(rows) in (_keys(a), _keys(b)), "the table holds exactly one run's rows: never a mix"
    assert len(set(_keys(rows))) == rows.num_rows
    for entry in delta_table.history_entries(delta_table.open_table(out)):
        assert _keys(tag_table.read_rows(out, as_of=entry["version"])) in (_keys(a), _keys(b))


def test_two_concurrent_runs_leave_one_whole_run_in_the_table(tiny_catalog, tiny_model_dir, tmp_path):
    out = str(tmp_path / "t")
    a, b = concurrent_runs(tiny_catalog, tiny_model_dir, tmp_path, out, {})
    check_one_whole_run_per_version(out, a, b)


def test_a_writer_that_lost_the_race_commits_on_top_whole(tmp_path):
    """The commit race made deterministic: two writers read version 0, one commits, the other's
    overwrite then lands on top of it, whole."""
    from deltalake import DeltaTable

    out = str(tmp_path / "t")
    delta_table.write_table(out, pa.table({"listing_id": ["a"], "image_uri": ["u"]}), {"run_id": "first"})
    slow = DeltaTable(out)  # read at version 0 ...
    delta_table.write_table(out, pa.table({"listing_id": ["b"], "image_uri": ["u"]}), {"run_id": "fast"})  # ... another commits 1
    pq.write_table(pa.table({"listing_id": ["c", "d"], "image_uri": ["u", "u"]}), tmp_path / "t" / "part-slow.parquet")
    with pytest.raises(Exception, match="(?i)concurrent"):
        slow.create_write_transaction(
            [delta_table.add_action("part-slow.parquet", os.path.getsize(tmp_path / "t" / "part-slow.parquet"), 2)],
            "overwrite",
            pa.schema([("listing_id", pa.string()), ("image_uri", pa.string())]),
        )
    version = delta_table.commit_overwrite(
        out,
        [delta_table.add_action("part-slow.parquet", os.path.getsize(tmp_path / "t" / "part-slow.parquet"), 2)],
        pa.schema([("listing_id", pa.string()), ("image_uri", pa.string())]),
        {"run_id": "slow"},
    )
    assert version == 2 and sorted(tag_table.read_rows(out).column("listing_id").to_pylist()) == ["c", "d"]


def test_retry_errors_retags_only_the_error_rows(ray_local, tiny_catalog, tiny_model_dir, tmp_path):
    base = read_manifest(tiny_catalog["manifest"])
    late = tmp_path / "late.jpg"  # uploaded after the first run
    rows = base.to_pylist()[:10] + [dict(base.to_pylist()[10], listing_id="LATE", image_uri=str(late))]
    pq.write_table(pa.Table.from_pylist(rows, schema=base.schema), tmp_path / "m.parquet")
    out = str(tmp_path / "t")
    first = run(TagConfig(manifest=str(tmp_path / "m.parquet"), model=tiny_model_dir, out=out, max_error_rate=0.5))
    assert first["errors"] == 1 and first["error_reasons"] == {"missing": 1}
    before = {r["listing_id"]: r for r in tag_table.read_rows(out).to_pylist()}
    late.write_bytes(Path(base.column("image_uri")[10].as_py()).read_bytes())
    meta = run(TagConfig(model=tiny_model_dir, out=out, retry_errors=True))
    assert meta["retried"] == 1 and meta["healed"] == 1 and meta["merge"]["num_target_rows_updated"] == 1
    after = {r["listing_id"]: r for r in tag_table.read_rows(out).to_pylist()}
    assert after.keys() == before.keys() and after["LATE"]["error"] is None and len(after["LATE"]["embedding"]) > 0
    assert all(after[k] == before[k] for k in before if k != "LATE")  # untouched rows unchanged
    assert json.dumps(tag_table.run_metadata(out)["operation"]) == '"retry-errors"'


def test_history_lists_each_version_with_what_its_run_recorded(tmp_path, capsys):
    out = str(tmp_path / "t")
    delta_table.write_table(
        out,
        pa.table({"listing_id": ["a"], "image_uri": ["u"]}),
        {"operation": "tag", "run_id": "r1", "snapshot": "2026-11-20", "rows": 1, "errors": 0, "model_version": "m1"},
    )
    delta_table.write_table(
        out,
        pa.table({"listing_id": ["a", "b"], "image_uri": ["u", "v"]}),
        {
            "operation": "reindex",
            "run_id": "r2",
            "snapshot": "2026-11-21",
            "rows": 2,
            "errors": 1,
            "new": 1,
            "deleted": 0,
            "model_version": "m1",
        },
    )
    assert cli_main(["history", "--table", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "version" in printed[0] and len(printed) == 3
    assert printed[1].split()[0] == "1" and "reindex" in printed[1] and "2026-11-21" in printed[1] and "new 1" in printed[1]
    assert printed[2].split()[0] == "0" and "2026-11-20" in printed[2]
    assert delta_table.resolve_as_of(delta_table.open_table(out), "2026-11-20") == 0
    assert delta_table.resolve_as_of(delta_table.open_table(out), "2026-11-25") == 1
    with pytest.raises(ValueError, match="no version on or before"):
        delta_table.resolve_as_of(delta_table.open_table(out), "2026-11-01")
    assert cli_main(["history", "--table", str(tmp_path / "nothing")]) == 1  # a clear error, not a traceback

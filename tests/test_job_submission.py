"""`ray job submit` for real: a local Ray head on 127.0.0.1 with ports of its own, the tagging job
submitted with the Ray Jobs CLI and the repository as working_dir, its output checked, the head
stopped. The CLI runs in its own process, as a platform engineer's would, so this test's own
local Ray (the session fixture) cannot interfere."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
RUNTIME_ENV = json.dumps(
    {"working_dir": str(ROOT), "excludes": [".venv", ".git", "demo_out", "runs", ".pytest_cache", "*.egg-info", "benchmarks/results"]}
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Job entrypoints say `python`: on this head that must be the environment mltag is installed in.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node of its own, shared by this module's jobs (--block: its process group is exactly
    this cluster, so killing the group stops it and nothing else). Ray
    2.60 turns token authentication on for `ray start`; the CLI sends the local token
    (~/.ray/auth_token) once RAY_AUTH_MODE=token."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    port, dashboard = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--ray-client-server-port={_free_port()}",
            # Every port of its own: another Ray on this machine (a test session's, a user's) must not collide.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
        ],
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=_env(),
    )
    env = _env(RAY_ADDRESS=f"http://127.0.0.1:{dashboard}", RAY_AUTH_MODE="token")
    try:
        deadline, listing = time.time() + 180, None
        while time.time() < deadline:
            listing = subprocess.run([RAY, "job", "list"], env=env, capture_output=True, text=True, timeout=60)
            if listing.returncode == 0:
                break
            time.sleep(2)
        if listing is None or listing.returncode != 0:
            pytest.fail(
                f"the Ray head did not answer: {listing and listing.stderr[-2000:]}\n" + (tmp_path / "head.log").read_text()[-3000:]
            )
        yield env
    finally:
        # SIGTERM asks `ray start --block` to stop its cluster; a graceful stop takes ~30 s, so
        # after a few seconds the whole process group (this head's every process) is killed.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        # `ray start` recorded this head as the machine's current cluster; a later plain ray.init()
        # would try to join the dead head. `ray stop` would clear it, but would stop every Ray here.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def ray_job_submit(env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` (blocking: it streams the job's logs and exits non-zero if the job fails),
    retried while a fresh head has no job agent yet."""
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(
            [RAY, "job", "submit", "--runtime-env-json", RUNTIME_ENV, "--", *entrypoint],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


def test_tagging_job_submitted_to_a_real_head(ray_head, tiny_catalog, tiny_model_dir, tmp_path):
    out = tmp_path / "tag_table"
    proc = ray_job_submit(
        ray_head,
        "python",
        "jobs/tag_catalog.py",
        "--manifest",
        tiny_catalog["manifest"],
        "--model",
        tiny_model_dir,
        "--out",
        str(out),
        "--snapshot",
        "2026-11-23",
        "--batch-size",
        "16",
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    assert "succeeded" in logs.lower() and "tag table: 48 rows" in logs
    from mltag.table import tag_table

    meta = tag_table.run_metadata(str(out))
    assert meta["rows"] == meta["manifest_rows"] == 48 and meta["errors"] == 0 and meta["snapshot"] == "2026-11-23"


def test_a_failing_job_surfaces_its_logs(ray_head, tiny_model_dir, tmp_path):
    proc = ray_job_submit(ray_head, "python", "jobs/tag_catalog.py", "--manifest", str(tmp_path / "nope.csv"), "--model", tiny_model_dir)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "manifest not found" in logs and "failed" in logs.lower()

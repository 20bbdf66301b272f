"""`ray job submit` for real: a local Ray head on 127.0.0.1, the tagging job submitted through the
Ray Jobs API with the repository as working_dir, its output checked, the head stopped."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path, monkeypatch):
    """A head node of its own (--block: stopping this process stops exactly this cluster), with
    token authentication as Ray 2.60 enables it for `ray start`: the client sends the local token
    (~/.ray/auth_token, made by Ray on first use) once told to."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the client talks to this head, by its URL
    ray = str(Path(sys.executable).parent / "ray")
    port, dashboard = _free_port(), _free_port()
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--ray-client-server-port={_free_port()}",
         # Every port of its own: another Ray on this machine (a test session's, a user's) must not collide.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        # Job entrypoints say `python`: on this head that must be the environment mltag is installed in.
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    try:
        deadline, client, last = time.time() + 180, None, None
        while time.time() < deadline and client is None:
            try:
                client = JobSubmissionClient(address)
            except Exception as exc:  # the dashboard is still starting
                last = exc
                time.sleep(1)
        if client is None:
            pytest.fail(f"the Ray head did not come up ({last!r}):\n" + (tmp_path / "head.log").read_text()[-3000:])
        yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # `ray start` recorded this head as the machine's current cluster; a later plain ray.init()
        # would try to join the dead head. `ray stop` would clear it, but would stop every Ray here.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def submit(client, **kwargs) -> str:
    """Submits, waiting out the seconds after start-up when the head has no job agent yet."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def test_tagging_job_submitted_to_a_real_head(ray_head, tiny_catalog, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus

    out = tmp_path / "tag_table"
    job_id = submit(
        ray_head,
        entrypoint=f"python jobs/tag_catalog.py --manifest {tiny_catalog['manifest']} --model {tiny_model_dir} "
                   f"--out {out} --snapshot 2026-11-23 --batch-size 16",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "demo_out", "runs", ".pytest_cache", "*.egg-info"]},
    )
    deadline = time.time() + 600
    status = ray_head.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = ray_head.get_job_status(job_id)
    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job ended {status}; its logs:\n{logs[-5000:]}"
    success = json.loads((out / "snapshot=2026-11-23" / "_SUCCESS.json").read_text())
    assert success["rows"] == success["manifest_rows"] == 48 and success["errors"] == 0
    assert "tag table: 48 rows" in logs


def test_a_failing_job_surfaces_its_logs(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    job_id = submit(ray_head, entrypoint=f"python jobs/tag_catalog.py --manifest {tmp_path / 'nope.csv'} --model x",
                                 runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "demo_out", "runs"]})
    deadline = time.time() + 300
    while ray_head.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED} and time.time() < deadline:
        time.sleep(1)
    assert ray_head.get_job_status(job_id) == JobStatus.FAILED
    assert "manifest not found" in ray_head.get_job_logs(job_id)

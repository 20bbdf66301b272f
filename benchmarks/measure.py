"""Shared by the benchmark scripts: run a command as its own process and measure its wall time,
its peak PSS (shared pages split between their users, unlike a sum of RSS) and the machine's
peak cgroup memory, sampled every 0.2 s."""

from __future__ import annotations

import os
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def cgroup_memory() -> int:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            with open(path) as f:
                return int(f.read())
        except OSError:
            continue
    return 0


def pss_bytes(pid: int) -> int:
    """A process's proportional set size, from /proc."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(command: list[str], env: dict | None = None) -> dict:
    """Runs ``command`` from the repository root; returns wall seconds, the process's peak PSS
    ("driver_peak"), the cgroup's peak and its output. Raises if the command fails."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"driver": 0, "total": 0}
    base = cgroup_memory()

    def sample():
        while proc.poll() is None:
            peak["driver"] = max(peak["driver"], pss_bytes(proc.pid))
            peak["total"] = max(peak["total"], cgroup_memory())
            time.sleep(0.2)

    started = time.time()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    wall = time.time() - started
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-4000:]}")
    return {"wall_s": wall, "driver_peak": peak["driver"], "total_peak": peak["total"], "total_base": base, "output": output}

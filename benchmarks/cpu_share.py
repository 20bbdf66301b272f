"""Where a Ray run's CPU goes: runs a command and samples every process's CPU time from /proc twice
a second, then prints each kind of process's share of the machine's cores over the window in
which the busiest kind (``--busy``, a Ray Train worker by default) used more than one core.

Used for the training-throughput figures in the README: on a 2-core machine the Ray processes
beside the training worker (placement-group cleaner, split coordinator, dashboard, log monitor,
GCS, raylet) take a share of the cores that a plain PyTorch loop has to itself.

    W=$(mktemp -d) && python -c "from mltag.stages.sample import build_sample_catalog as b; b('$W/catalog', 640, size=128, seed=0)"
    python benchmarks/cpu_share.py -- python benchmarks/train_throughput.py --side mltag-cached \\
        --manifest $W/catalog/manifest.parquet --work $W --img-size 128 --epochs 3 --batch-size 32 --loader-workers 2

Run it alone on the machine: every process is counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import time

TICK = os.sysconf("SC_CLK_TCK")
KINDS = (
    "RayTrainWorker",
    "SplitCoordinator",
    "TrainController",
    "PlacementGroupCleaner",
    "raylet",
    "gcs_server",
    "dashboard",
    "log_monitor",
    "runtime_env",
    "ray::",
)


def kind_of(pid: str, driver_pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if int(pid) == driver_pid:
        return "the command (driver)"
    return next((k for k in KINDS if k in command), "other")


def cpu_seconds_by_kind(driver_pid: int) -> collections.Counter:
    totals: collections.Counter = collections.Counter()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        kind = kind_of(pid, driver_pid)
        if kind is None:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        totals[kind] += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="RayTrainWorker", help="the kind whose busy window is measured")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(command)
    samples = []
    while proc.poll() is None:
        samples.append((time.time(), cpu_seconds_by_kind(proc.pid)))
        time.sleep(0.5)
    busy = [
        i
        for i in range(len(samples) - 1)
        if (samples[i + 1][1][args.busy] - samples[i][1][args.busy]) / (samples[i + 1][0] - samples[i][0]) > 1.0
    ]
    if not busy:
        raise SystemExit(f"{args.busy} never used more than one core")
    (t0, first), (t1, last) = samples[busy[0]], samples[busy[-1] + 1]
    cores = os.cpu_count()
    print(f"\n{args.busy} busy for {t1 - t0:.1f} s; share of the {cores} cores over that window:")
    for kind in sorted(set(first) | set(last), key=lambda k: first[k] - last[k]):
        used = last[kind] - first[kind]
        print(f"  {kind:24s} {used:7.1f} CPU s  {100 * used / (t1 - t0) / cores:5.1f}%")


if __name__ == "__main__":
    main()

"""Where work runs: joining the Ray cluster, and running a whole-catalog step on a worker.

The driver of a job (the process ``ray job submit`` starts, or ``mltag`` on a laptop) plans and
commits; it holds nothing that grows with the catalog. Steps whose memory does grow with it (a
FAISS index of every embedding, delta-rs's MERGE join) run as one Ray task on a worker, which
the cluster places on a node with the memory; the driver waits for the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def init_ray() -> None:
    """Joins the cluster named by RAY_ADDRESS, or a cluster already running on this machine
    (`ray start --head`), or else starts a local instance of its own; nothing if this process
    already has. A local instance of our own starts without the dashboard (a second of start-up
    and a process per run); start a cluster with `ray start --head` to watch runs in it."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init()
        return
    if not address:
        try:
            ray.init(address="auto")
            return
        except ConnectionError:  # no cluster running here
            pass
    ray.init(address="local", include_dashboard=False)


def largest_node_cpus(limit: int = 16) -> int:
    """The CPUs of the cluster's largest live node (at most ``limit``)."""
    import ray

    init_ray()
    sizes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, min(limit, int(max(sizes, default=1))))


def on_worker(fn: Callable[..., Any], *args, num_cpus: float | None = None, memory: int | None = None, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run as one Ray task; returns its result. An exception in the task is
    raised here as its own class too (Ray's task errors subclass their cause), so callers catch
    ``TableConflictError`` and friends as if the call were local. Not retried: the steps sent
    here commit (a MERGE, an index version) and are made idempotent by their own checks.

    ``num_cpus`` defaults to a whole node (``largest_node_cpus``): these steps are multi-threaded
    (FAISS, delta-rs) and Ray gives a task as many OpenMP threads as CPUs it reserved."""
    import ray

    init_ray()
    options: dict[str, Any] = {"num_cpus": num_cpus or largest_node_cpus(), "max_retries": 0}
    if memory:
        options["memory"] = int(memory)
    task = ray.remote(_with_console).options(name=getattr(fn, "__name__", "mltag-step"), **options)
    return ray.get(task.remote(fn, *args, **kwargs))


def _with_console(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn`` in a Ray worker, after mltag's console is set up there: a worker is its own process,
    and without its handler the stage's status lines (logging.INFO) would be dropped."""
    from mltag import log

    log.configure()
    return fn(*args, **kwargs)

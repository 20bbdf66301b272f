"""Where work runs: joining the Ray cluster, what it offers (CPUs, GPUs: the one place a
``use_gpu`` setting is resolved), and running a whole-catalog step on a worker.

The driver of a job (the process ``ray job submit`` starts, or ``mltag`` on a laptop) plans and
commits; it holds nothing that grows with the catalog. Steps whose memory does grow with it (a
FAISS index of every embedding, delta-rs's MERGE join) run as one Ray task on a worker, which
the cluster places on a node with the memory; the driver waits for the result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

GPU_SETTINGS = ("auto", "true", "false")  # the values of every stage's use_gpu


def init_ray(local_cpus: int | None = None) -> None:
    """Joins the cluster named by RAY_ADDRESS, or a cluster already running on this machine
    (`ray start --head`), or else starts a local instance of its own; nothing if this process
    already has. A local instance of our own starts with the dashboard: Ray Train's placement-group
    cleaner polls the State API, which the dashboard serves, and without it logs a failure every
    second of a training run.

    ``local_cpus`` asks for a local instance of our own whatever RAY_ADDRESS says, with that many
    CPUs (0: all of this machine's): for runs that are single-machine by design (``mltag demo``).
    """
    import ray

    if ray.is_initialized():
        return
    if local_cpus is not None:
        _start_local(num_cpus=local_cpus or None)
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init()
        return
    if not address:
        from ray._private.services import find_bootstrap_address

        # Only a cluster recorded by `ray start` (what plain ray.init() joins). Not address="auto":
        # it also joins any Ray process it finds, such as another mltag run's private instance,
        # which dies under us when that run ends.
        if find_bootstrap_address(None) is not None:
            try:
                ray.init()
                return
            except ConnectionError:  # the recorded cluster has gone: start our own
                pass
    _start_local()


_STARTED_HERE = False  # whether this process started the Ray instance it is connected to


def started_here() -> bool:
    """True when the connected Ray instance is this process's own local one: the cluster is this
    machine and nothing (no autoscaler) will add CPUs to it."""
    return _STARTED_HERE


def _start_local(**options) -> None:
    global _STARTED_HERE
    import ray

    # Ray gives a local instance token authentication unless RAY_AUTH_MODE says otherwise, and
    # warns on every start that it did so. That is the mode we want, and the notice is Ray's own,
    # so it alone is dropped, only while our instance starts. (Setting RAY_AUTH_MODE=token here
    # instead does not work: Ray reads its config when imported, before this runs.)
    auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_logger.addFilter(_drop_token_auth_default_notice)
    # Ray Train's placement-group cleaner finds the State API by auto-detection, which fails
    # ("Found multiple active Ray instances") whenever another Ray runs on this machine, and then
    # prints a traceback per poll. Our instance's dashboard gets a port chosen here, and the
    # processes it starts (they inherit this environment) are told where it is; this process's
    # environment is restored at once, so nothing else here (`ray job submit`, ...) is redirected.
    port = _free_port()
    told = "RAY_API_SERVER_ADDRESS" not in os.environ
    if told:
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **options)
        _STARTED_HERE = True
    finally:
        auth_logger.removeFilter(_drop_token_auth_default_notice)
        if told:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop_token_auth_default_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster.")


def dataset_from_tables(tables, settle_s: float = 3.0):
    """``ray.data.from_arrow(tables)``, returned once Ray's resource view shows a free CPU again
    (waiting at most ``settle_s``).

    Why: from_arrow runs one metadata task per table and waits for them, and the view that Ray
    Data's start-of-execution check reads (``ray.available_resources``) trails those finished tasks
    by a report period or more. On a small machine the next execution then warned "The Ray cluster
    currently does not have any available CPUs ... will hang" about CPUs that were free (seen in a
    fresh `make demo`). A cluster whose CPUs are really all held still gets that warning."""
    import time

    import ray
    import ray.data

    ds = ray.data.from_arrow(tables)
    deadline = time.monotonic() + settle_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)
    return ds


def cluster_cpus() -> int:
    """The CPUs of the whole cluster (joining it first, as ``init_ray``)."""
    import ray

    init_ray()
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> int:
    """The GPUs of the whole cluster (joining it first, as ``init_ray``)."""
    import ray

    init_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def alive_nodes() -> int:
    """How many nodes of the cluster are up (joining it first, as ``init_ray``)."""
    import ray

    init_ray()
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def wants_gpu(setting: str | bool = "auto") -> bool:
    """Whether a stage's Ray workers ask for GPUs, from a ``use_gpu`` setting (auto | true | false).

    "auto" asks the cluster (joining it first, as ``init_ray``): a GPU anywhere in it is one the
    work can be placed on. "true" is taken at its word, GPUs or not: Ray then waits for a GPU node
    (an autoscaler may add one) instead of quietly running on CPU.

    Example:
        >>> wants_gpu("false")
        False
    """
    choice = str(setting).lower()
    if choice not in GPU_SETTINGS:
        raise ValueError(f"unknown use_gpu {setting!r}; choose one of: {', '.join(GPU_SETTINGS)}")
    if choice == "auto":
        return cluster_gpus() > 0
    return choice == "true"


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
    task = ray.remote(with_console).options(name=getattr(fn, "__name__", "mltag-step"), **options)
    return ray.get(task.remote(fn, *args, **kwargs))


def with_console(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn`` in a Ray worker, after mltag's console is set up there: a worker is its own process,
    and without its handler the stage's status lines (logging.INFO) would be dropped."""
    from mltag.runtime import log

    log.configure()
    return fn(*args, **kwargs)

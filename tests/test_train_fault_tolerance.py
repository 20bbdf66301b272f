"""A training worker killed mid-run: Ray Train restarts the worker group, the loop resumes from the
last checkpoint, and the run ends with every epoch trained exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def _alive_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_killed_worker_resumes_from_checkpoint(ray_local, state_api_of_this_cluster, tiny_catalog, tmp_path):
    from mltag.stages.train import TrainConfig, build_trainer, export_best

    config = TrainConfig(
        manifest=tiny_catalog["manifest"],
        out=str(tmp_path),
        backbone="test_efficientnet",
        img_size=64,
        epochs=3,
        batch_size=8,
        augment=False,
        hflip=False,
        max_failures=2,
        name="killed",
    )
    trainer, vocab, mean, std = build_trainer(config)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()

    # A checkpoint counts once the controller has registered it (its snapshot names it); a
    # directory still being written when the worker dies is rightly not resumed from.
    snapshot = os.path.join(str(tmp_path), "ray_train", "killed", "checkpoint_manager_snapshot.json")
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        if os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read():
            break
        time.sleep(0.1)
    pids = _alive_worker_pids()
    assert pids, "no live training worker to kill"
    os.kill(pids[0], signal.SIGKILL)

    thread.join(timeout=600)
    assert "result" in outcome, "training did not finish after the worker was killed"
    spec = export_best(outcome["result"], config, vocab, mean, std, str(tmp_path))
    history = spec.extra["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # each epoch once, none skipped
    assert spec.extra["restarts"] == 1  # the run was restarted once, from a checkpoint
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] == 1


def test_rerunning_the_same_name_resumes_instead_of_starting_over(ray_local, tiny_catalog, tmp_path):
    from mltag.stages.train import TrainConfig, run

    common = dict(
        manifest=tiny_catalog["manifest"],
        out=str(tmp_path),
        backbone="test_efficientnet",
        img_size=64,
        batch_size=16,
        augment=False,
        hflip=False,
        cache_decoded=True,
        name="resumable",
    )
    first = run(TrainConfig(epochs=2, **common))
    assert [h["epoch"] for h in first.extra["history"]] == [1, 2]
    second = run(TrainConfig(epochs=3, **common))  # the same run, asked for one more epoch
    history = second.extra["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["restarts"] for h in history] == [0, 0, 1]  # epochs 1-2 come from the first run's checkpoint

"""A training run whose workers would hold every CPU stops before any work (streamed decoding
needs a CPU beside them); cached decoding and a joined cluster do not stop."""

from __future__ import annotations

import logging
import os

import pytest

import mltag.runtime.cluster as cluster
from mltag.config import ConfigError
from mltag.stages.train import TrainConfig, check_cpus_left_for_decoding, run


def _config(tiny_catalog, out, **changes) -> TrainConfig:
    common = dict(manifest=tiny_catalog["manifest"], out=str(out), backbone="test_efficientnet", img_size=64, epochs=1, head_init="probe")
    return TrainConfig(**{**common, **changes})


def test_workers_holding_every_cpu_of_a_private_instance_stop_the_run_before_any_work(ray_local, tiny_catalog, tmp_path, monkeypatch):
    cpus = int(ray_local.cluster_resources()["CPU"])
    # The session's instance is this process's own, as one `mltag train` starts on a laptop.
    monkeypatch.setattr(cluster, "_STARTED_HERE", True)
    with pytest.raises(ConfigError, match=rf"num_workers x cpus_per_worker = {cpus} x 1 reserves all {cpus} CPUs.*cache_decoded"):
        run(_config(tiny_catalog, tmp_path / "run", num_workers=cpus, cpus_per_worker=1))
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")  # no probe, no record, no config

    # one CPU left for decoding, or the images decoded before the workers start: no objection
    check_cpus_left_for_decoding(_config(tiny_catalog, tmp_path, num_workers=cpus - 1))
    check_cpus_left_for_decoding(_config(tiny_catalog, tmp_path, num_workers=cpus, cache_decoded=True))


def test_on_a_joined_cluster_it_is_a_warning_an_autoscaler_may_add_cpus(ray_local, tiny_catalog, tmp_path, monkeypatch, caplog):
    cpus = int(ray_local.cluster_resources()["CPU"])
    monkeypatch.setattr(cluster, "_STARTED_HERE", False)
    with caplog.at_level(logging.WARNING, logger="mltag.stages.train"):
        check_cpus_left_for_decoding(_config(tiny_catalog, tmp_path, num_workers=1, cpus_per_worker=cpus))
    assert any("leaves none to decode" in r.getMessage() and "waits until the cluster adds CPUs" in r.getMessage() for r in caplog.records)

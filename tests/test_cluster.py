"""mltag.runtime.cluster: the one place a use_gpu setting is resolved and Ray is joined."""

from __future__ import annotations

import pytest

from mltag.runtime.cluster import GPU_SETTINGS, cluster_cpus, cluster_gpus, init_ray, wants_gpu


@pytest.mark.parametrize("setting, expected", [("true", True), ("false", False), ("TRUE", True), (True, True), (False, False)])
def test_an_explicit_setting_answers_itself_without_asking_the_cluster(setting, expected):
    assert wants_gpu(setting) is expected


@pytest.mark.parametrize("setting", ["yes", "", "gpu", "1"])
def test_an_unknown_setting_names_the_valid_ones(setting):
    with pytest.raises(ValueError, match="choose one of: auto, true, false"):
        wants_gpu(setting)


def test_auto_follows_the_gpus_of_the_cluster(ray_local):
    init_ray()  # already joined: nothing happens
    assert ray_local.is_initialized()
    assert wants_gpu("auto") is (cluster_gpus() > 0)
    assert wants_gpu("auto") is (int(ray_local.cluster_resources().get("GPU", 0)) > 0)
    assert cluster_cpus() == int(ray_local.cluster_resources()["CPU"])
    assert GPU_SETTINGS == ("auto", "true", "false")

"""cluster.yaml passes the Ray launcher's own schema validation and has the shape we document."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load()))  # raises on any schema error


def test_cluster_shape_cpu_head_and_autoscaling_gpu_workers():
    config = _load()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU head
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert any("pip install -e ." in c for c in config["setup_commands"])


def test_a_broken_cluster_yaml_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load()
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


def test_start_commands_set_object_store_and_spilling():
    config = _load()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if c.startswith("ray start")][0]
        assert "--object-store-memory=" in start and "--object-spilling-directory=" in start
    assert any("faiss-gpu" in c and "uninstall -y faiss-cpu" in c for c in config["setup_commands"])
    cpu_workers = config["available_node_types"]["cpu_worker"]
    assert cpu_workers["min_workers"] == 0 and not cpu_workers["node_config"]["InstanceType"].startswith(("g", "p"))

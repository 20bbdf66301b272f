"""cluster.yaml passes the Ray launcher's own schema validation and has the shape we document."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _ray_start(commands: list[str]) -> str:
    (start,) = [c for c in commands if "ray start" in c]
    return start


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
        start = _ray_start(config[key])
        assert "--object-store-memory=" in start and "--object-spilling-directory=" in start
    assert any("faiss-gpu" in c and "uninstall -y faiss-cpu" in c for c in config["setup_commands"])
    cpu_workers = config["available_node_types"]["cpu_worker"]
    assert cpu_workers["min_workers"] == 0 and not cpu_workers["node_config"]["InstanceType"].startswith(("g", "p"))


def test_every_node_type_reads_s3_through_an_instance_profile():
    config = _load()
    for name, node in config["available_node_types"].items():
        arn = node["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name
    types = config["available_node_types"]
    # Workers share one least-privilege role; the head's (autoscaler rights) is a different one.
    worker_arns = {types[t]["node_config"]["IamInstanceProfile"]["Arn"] for t in types if t != config["head_node_type"]}
    assert len(worker_arns) == 1
    assert types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"] not in worker_arns


def test_dashboard_is_not_exposed_and_every_node_requires_the_token():
    config = _load()
    head = _ray_start(config["head_start_ray_commands"])
    assert "0.0.0.0" not in head and "--dashboard-host=127.0.0.1" in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert _ray_start(config[key]).startswith("RAY_AUTH_MODE=token ")
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()

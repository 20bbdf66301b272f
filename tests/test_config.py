import pytest

from mltag.config import ConfigError, config_from_dict, parse_config, save_config
from mltag.stages.tag import TagConfig
from mltag.stages.train import TrainConfig


def test_layers_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("manifest: m.parquet\nepochs: 7\nloss: focal\nhflip: false\n")
    config = parse_config(TrainConfig, ["--config", str(path), "--epochs", "9", "--lr", "0.01"])
    assert (config.manifest, config.epochs, config.loss, config.lr, config.hflip) == ("m.parquet", 9, "focal", 0.01, False)
    assert config.batch_size == TrainConfig.batch_size  # untouched default


def test_unknown_yaml_key_is_an_error_naming_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("manifest: m.parquet\nepochz: 7\n")
    with pytest.raises(ConfigError, match="epochz.*valid keys"):
        parse_config(TrainConfig, ["--config", str(path)])


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--manifest", "m", "--epochz", "3"])


@pytest.mark.parametrize("key,value", [("epochs", "three"), ("epochs", 2.5), ("lr", "fast"), ("hflip", "maybe")])
def test_wrong_types_are_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(TrainConfig, {"manifest": "m", key: value})


def test_validation_names_the_choices():
    with pytest.raises(ValueError, match="bce, focal, asl"):
        config_from_dict(TrainConfig, {"manifest": "m", "loss": "asl2"})
    with pytest.raises(ValueError, match="model is required"):
        config_from_dict(TagConfig, {"manifest": "m"})


def test_saved_config_loads_back(tmp_path):
    config = config_from_dict(TrainConfig, {"manifest": "m.parquet", "epochs": 3})
    save_config(config, tmp_path / "config.yaml")
    assert parse_config(TrainConfig, ["--config", str(tmp_path / "config.yaml")]) == config


@pytest.mark.parametrize(
    "name, module, cls",
    [
        ("demo.yaml", "mltag.stages.demo", "DemoConfig"),
        ("tag_production.yaml", "mltag.stages.tag", "TagConfig"),
        ("train_production.yaml", "mltag.stages.train", "TrainConfig"),
        ("nightly_production.yaml", "mltag.stages.reindex", "ReindexConfig"),
    ],
)
def test_every_shipped_config_loads_into_its_stage(name, module, cls):
    import importlib
    from pathlib import Path

    from mltag.config import config_from_dict, load_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / name
    config = config_from_dict(getattr(importlib.import_module(module), cls), load_yaml(path))
    assert config is not None


def test_provenance_records_the_config_its_hash_and_the_versions_and_loads_back_as_a_config(tmp_path):
    import json

    from mltag.config import config_hash, save_provenance

    config = config_from_dict(TrainConfig, {"manifest": "m.parquet", "epochs": 3})
    uri = save_provenance(str(tmp_path / "out" / "provenance.json"), config, model_version="m1", table_version=4, inputs={"index": "x"})
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert uri == str(tmp_path / "out" / "provenance.json")
    assert record["config_hash"] == config_hash(config) and record["model_version"] == "m1" and record["table_version"] == 4
    assert record["config_class"] == "mltag.stages.train.TrainConfig" and record["index"] == "x" and record["config"]["epochs"] == 3
    # The record is a config file too: --config repeats the run it describes.
    assert parse_config(TrainConfig, ["--config", uri]) == config


@pytest.mark.parametrize(
    "output, expected",
    [
        ("runs/anomalies.parquet", "runs/anomalies.provenance.json"),
        ("anomalies.parquet", "anomalies.provenance.json"),
        ("s3://bucket/runs/d.parquet", "s3://bucket/runs/d.provenance.json"),
        ("/m/model/thresholds.json", "/m/model/thresholds.provenance.json"),
        ("runs/out", "runs/out.provenance.json"),
    ],
)
def test_a_file_output_gets_its_provenance_beside_it(output, expected):
    from mltag.config import provenance_beside

    assert provenance_beside(output) == expected

"""LP-FT (linear probe, then fine-tune): the probe fitted on the frozen backbone's embeddings, the
probe alone as a model (epochs 0), and fine-tuning that starts from the probe's head."""

from __future__ import annotations

import numpy as np
import pytest

from mltag.config import ConfigError, config_from_dict
from mltag.stages.train import TrainConfig


def test_a_preset_sets_its_fields_under_the_yaml_and_flags():
    config = config_from_dict(TrainConfig, {"manifest": "m.parquet", "preset": "cpu", "epochs": "4"})
    # fields the preset sets away from the bare defaults
    assert (config.head_init, config.batch_norm, config.img_size) == ("probe", "frozen", TrainConfig.PRESETS["cpu"]["img_size"])
    assert TrainConfig.img_size != TrainConfig.PRESETS["cpu"]["img_size"]
    assert (config.crop_scale, config.jitter) == (0.9, 0.1) != (TrainConfig.crop_scale, TrainConfig.jitter)
    assert config.epochs == 4  # the flag wins over the preset
    # gpu: the same measured recipe on ResNeXt-50 at 224 px, one worker per GPU, images streamed
    gpu = config_from_dict(TrainConfig, {"manifest": "m.parquet", "preset": "gpu"})
    recipe = ("head_init", "epochs", "loss", "batch_norm", "backbone_lr_scale", "crop_scale", "jitter", "lr", "warmup_epochs", "ema_decay")
    assert [getattr(gpu, f) for f in recipe] == [
        getattr(config_from_dict(TrainConfig, {"manifest": "m", "preset": "cpu"}), f) for f in recipe
    ]
    assert (gpu.backbone, gpu.img_size, gpu.use_gpu, gpu.cache_decoded) == ("resnext50_32x4d", 224, "true", False)
    assert config_from_dict(TrainConfig, {"manifest": "m.parquet"}).head_init == "random"  # no preset: the defaults
    with pytest.raises(ConfigError, match="unknown preset 'tpu'.*cpu-fast, cpu, gpu"):
        config_from_dict(TrainConfig, {"manifest": "m.parquet", "preset": "tpu"})
    with pytest.raises(ValueError, match="0 only with head_init probe"):
        config_from_dict(TrainConfig, {"manifest": "m.parquet", "epochs": 0})


def _head(model_dir: str) -> tuple[np.ndarray, np.ndarray]:
    from mltag.tagger.model import load_tagger

    model, _ = load_tagger(model_dir)
    return model.head.weight.detach().numpy(), model.head.bias.detach().numpy()


@pytest.mark.slow
def test_the_probe_is_a_model_and_fine_tuning_starts_from_its_head(ray_local, tiny_catalog, tmp_path):
    from mltag.maths.metrics import mean_average_precision
    from mltag.stages.train import run
    from mltag.tagging.predict import predict

    common = dict(manifest=tiny_catalog["manifest"], backbone="test_efficientnet", img_size=64, head_init="probe", batch_size=16)

    # epochs 0: the frozen backbone with the probe's head is the model, and its validation mAP,
    # scored again through the tagging pipeline, is the one the probe was chosen by.
    probe_only = run(TrainConfig(out=str(tmp_path), epochs=0, **common))
    probe = probe_only.extra["probe"]
    assert probe["train_rows"] > 0 and probe["val_rows"] > 0 and len(probe["grid_val_map"]) == len(probe["grid"])
    model_dir = str(tmp_path / "model")
    for got, fitted in zip(_head(model_dir), _head(probe["model"])):
        np.testing.assert_array_equal(got, fitted)
    y, scores, _ = predict(tiny_catalog["manifest"], model_dir, split="val")
    assert mean_average_precision(y, scores)["macro"] == pytest.approx(probe["val_map"], abs=1e-5)

    # Fine-tuning in the same directory reuses the probe (same inputs). One epoch at learning rate 0:
    # the workers' head starts from the probe's, so it ends there too.
    probe_json = tmp_path / "probe" / "probe.json"
    written = probe_json.stat().st_mtime_ns
    tuned = run(TrainConfig(out=str(tmp_path), epochs=1, lr=0.0, augment=False, hflip=False, name="lpft", **common))
    assert tuned.extra["probe"] == probe and probe_json.stat().st_mtime_ns == written  # not fitted again
    assert len(tuned.extra["history"]) == 1
    for got, fitted in zip(_head(model_dir), _head(probe["model"])):
        np.testing.assert_allclose(got, fitted, atol=1e-6)


def test_the_probe_stays_the_model_unless_fine_tuning_beats_it_on_validation():
    from mltag.stages.train import probe_wins

    assert probe_wins(0.30, 0.28) and not probe_wins(0.30, 0.31)
    assert not probe_wins(0.30, 0.30)  # a tie keeps the fine-tuned model (the run asked for fine-tuning)
    assert probe_wins(0.30, float("nan")) and probe_wins(0.30, None)  # a fine-tuning without a score never wins
    assert not probe_wins(None, 0.1) and not probe_wins(float("nan"), 0.1)

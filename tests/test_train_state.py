"""TrainState: one save and one load for everything a run continues from; the typed loop config
the driver hands the workers; what one training epoch does to the model's batch-norm layers."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch
from timm.utils import ModelEmaV3

from mltag.tagger.model import Tagger
from mltag.tagger.train_loop import LoopConfig, build_optimizer, new_state
from mltag.tagger.train_state import STATE_META_FILE, TrainState


def _trained_state(ema_decay: float = 0.9) -> TrainState:
    torch.manual_seed(0)
    model = Tagger("test_efficientnet", 3)
    optimizer = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
    for step in range(3):
        model(torch.randn(2, 3, 32, 32))[0].sum().backward()
        optimizer.step(), scheduler.step()
        if ema is not None:
            ema.update(model, step=step + 1)
    return TrainState(model, optimizer, scheduler, ema, epochs_done=2, step=3, history=[{"epoch": 1}, {"epoch": 2}], restarts=1)


def _fresh_like(ema: bool) -> TrainState:
    torch.manual_seed(1)  # other initial weights: whatever matches afterwards came from the checkpoint
    model = Tagger("test_efficientnet", 3)
    optimizer = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    return TrainState(model, optimizer, scheduler, ModelEmaV3(model, decay=0.9) if ema else None)


def test_save_then_load_restores_every_part_and_the_rng(tmp_path):
    saved = _trained_state()
    saved.save(str(tmp_path))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())  # what comes next after the save
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    loaded = _fresh_like(ema=True).load(str(tmp_path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert (loaded.epochs_done, loaded.step, loaded.history, loaded.restarts) == (2, 3, [{"epoch": 1}, {"epoch": 2}], 1)
    for name, value in saved.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)
    for name, value in saved.ema.state_dict().items():
        torch.testing.assert_close(loaded.ema.state_dict()[name], value)
    assert loaded.scheduler.state_dict()["last_epoch"] == 3
    assert loaded.optimizer.state_dict()["state"][0]["step"] == saved.optimizer.state_dict()["state"][0]["step"]
    # The scored weights are the EMA's, and differ from the raw model's.
    assert loaded.scored_model is loaded.ema.module
    head = "head.weight"
    assert not torch.equal(loaded.scored_model.state_dict()[head], loaded.model.state_dict()[head])


def test_the_file_format_is_unchanged(tmp_path):
    """Checkpoints written before TrainState (and by it) count epochs 0-based in 'epoch'."""
    _trained_state().save(str(tmp_path))
    meta = json.loads((tmp_path / STATE_META_FILE).read_text())
    assert meta["epoch"] == 1 and meta["step"] == 3 and meta["restarts"] == 1 and meta["rng"]["numpy"][0] == "MT19937"
    tensors = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(tensors) == {"model", "optimizer", "scheduler", "ema", "rng"}
    assert not any(k.startswith("module.") for k in tensors["model"])  # the bare model, never DDP's wrapper


@pytest.mark.parametrize("saved_ema,slot", [(True, False), (False, True), (False, False)])
def test_export_slots_and_checkpoints_without_an_ema(tmp_path, saved_ema, slot):
    """Export loads into a model (and an EMA when EMA is on) without optimiser or RNG; an EMA slot
    with no EMA in the checkpoint starts from the checkpoint's weights, never from a fresh init."""
    saved = _trained_state(ema_decay=0.9 if saved_ema else 0.0)
    saved.save(str(tmp_path))
    torch.manual_seed(1)
    model = Tagger("test_efficientnet", 3)
    state = TrainState(model, ema=ModelEmaV3(model, decay=0.9) if slot else None)
    rng_before = torch.get_rng_state()
    state.load(str(tmp_path), rng=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    expected = saved.model.state_dict()
    for name, value in state.scored_model.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def _loop(**overrides) -> LoopConfig:
    values = dict(
        backbone="test_efficientnet",
        pretrained="none",
        pooling="avg",
        img_size=32,
        loss="asl",
        gamma_pos=0.0,
        gamma_neg=4.0,
        clip=0.05,
        focal_gamma=2.0,
        epochs=4,
        head_epochs=0,
        backbone_lr_scale=1.0,
        batch_norm="train",
        batch_size=8,
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.0,
        warmup_epochs=1.0,
        ema_decay=0.0,
        seed=0,
        num_tags=3,
        vocabulary={"tags": ["a", "b", "c"]},
        threads=1,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        pos_weight=None,
        resample=False,
        n_train_effective=40.0,
    )
    return LoopConfig(**{**values, **overrides})


def test_loop_config_travels_as_a_plain_dict():
    loop = _loop(pos_weight=[1.0, 2.0, 3.0])
    as_sent = json.loads(json.dumps(loop.to_dict()))  # what Ray Train may do with it: JSON
    assert LoopConfig.from_dict(as_sent) == loop
    with pytest.raises(TypeError):
        LoopConfig.from_dict({**as_sent, "lr_typo": 1})


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_new_state_schedules_the_whole_run(ema_decay):
    state = new_state(_loop(ema_decay=ema_decay), torch.device("cpu"), world=2)
    assert isinstance(state.optimizer, torch.optim.SGD) and (state.ema is not None) == (ema_decay > 0)
    # 40 images, 8 per worker per step, 2 workers: 3 steps an epoch, 12 in all, 3 of warmup.
    lrs = []
    for _ in range(12):
        lrs.append(state.scheduler.get_last_lr()[-1])
        state.optimizer.step(), state.scheduler.step()
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert lrs[-1] < 0.01 and state.epochs_done == 0 and state.step == 0


def test_loop_config_is_built_from_train_config_field_by_field(tiny_catalog):
    from mltag.data.catalog import read_manifest
    from mltag.data.vocabulary import Vocabulary
    from mltag.stages.train import TrainConfig, label_counts, loop_config

    vocab = Vocabulary.load(tiny_catalog["vocabulary"])
    config = TrainConfig(manifest=tiny_catalog["manifest"], backbone="test_efficientnet", lr=0.003, torch_threads=0, cpus_per_worker=3)
    counts = label_counts(read_manifest(config.manifest, require_tags=True), vocab)
    loop = loop_config(config, vocab, counts, 12.0)
    assert (loop.lr, loop.backbone, loop.threads, loop.num_tags, loop.n_train_effective) == (
        0.003,
        "test_efficientnet",
        3,
        len(vocab),
        12.0,
    )
    assert loop.vocabulary == vocab.to_dict() and loop.progress == ("bar" if sys.stderr.isatty() else "log")


def _train_one_epoch(loop: LoopConfig, prepare=lambda state: None):
    """One epoch of ``train_one_epoch`` on 16 random 32 px images (Ray Data on the local cluster):
    the state, its state dict before (cloned), and the epoch's metrics. ``prepare`` runs on the
    fresh state first (e.g. to freeze layers, as ``set_phase`` would)."""
    import pyarrow as pa
    import ray.data

    from mltag.data.images import pixels_to_arrow
    from mltag.data.staging import StagingBuffers
    from mltag.data.vocabulary import Vocabulary
    from mltag.maths.resampling import TagIndex
    from mltag.tagger.losses import MultiLabelLoss
    from mltag.tagger.train_loop import Worker, train_one_epoch

    rng = np.random.default_rng(0)
    rows = pa.table(
        {
            "listing_id": [f"L{i}" for i in range(16)],
            "pixels": pixels_to_arrow(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)),
            "tags": [["a"] if i % 2 else ["b", "c"] for i in range(16)],
        }
    )
    state = new_state(loop, torch.device("cpu"), world=1)
    prepare(state)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    worker = Worker(
        loop,
        0,
        1,
        torch.device("cpu"),
        TagIndex(Vocabulary.from_dict(loop.vocabulary)),
        MultiLabelLoss("bce"),
        StagingBuffers(torch.device("cpu")),
    )
    metrics = train_one_epoch(worker, state.model, state, ray.data.from_arrow(rows), epoch=0)
    return state, before, metrics


@pytest.mark.parametrize("batch_norm", ["train", "frozen"])
def test_frozen_batch_norm_keeps_the_pretrained_statistics_while_weights_learn(ray_local, batch_norm):
    loop = _loop(batch_norm=batch_norm, optimizer="adamw", lr=0.01, warmup_epochs=0.0, n_train_effective=16.0)
    state, before, metrics = _train_one_epoch(loop)
    norms = [m for m in state.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms  # test_efficientnet has batch norm after every convolution
    after = state.model.state_dict()
    assert metrics["phase"] == 2 and state.step == 2
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    changed = [k for k in statistics if not torch.equal(before[k], after[k])]
    assert changed == [] if batch_norm == "frozen" else len(changed) == len(statistics)
    learnt = [k for k in before if k.endswith(".weight") and not torch.equal(before[k], after[k])]
    assert any("bn" in k for k in learnt) and any("conv" in k for k in learnt)  # scale and shift learn in both modes


def test_frozen_stages_stay_as_they_start_and_get_no_gradient(ray_local):
    """The stem and the first stage of test_efficientnet (frozen_stages=2) keep their weights and
    batch-norm statistics while batch norm trains elsewhere; autograd never reaches them."""
    from mltag.tagger.model import backbone_stages
    from mltag.tagger.train_loop import freeze_backbone

    loop = _loop(batch_norm="train", optimizer="adamw", lr=0.01, warmup_epochs=0.0, n_train_effective=16.0, frozen_stages=2)
    state, before, _ = _train_one_epoch(loop, lambda state: freeze_backbone(state.model, frozen=False, frozen_stages=2))
    stages = backbone_stages(state.model.backbone)
    assert sorted(set(stages.values()))[:3] == [0, 1, 2] and stages["conv_stem.weight"] == 0
    after = state.model.state_dict()

    def stage_of(key: str) -> int:  # state-dict keys of the backbone, buffers included, by their module
        module = key.removeprefix("backbone.").rsplit(".", 1)[0]
        return min((s for name, s in stages.items() if name.rsplit(".", 1)[0] == module), default=99)

    backbone_keys = [k for k in before if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    frozen = [k for k in backbone_keys if stage_of(k) < 2]
    trained = [k for k in backbone_keys if stage_of(k) >= 2]
    assert frozen and trained and any(k.endswith("running_mean") for k in frozen)
    assert [k for k in frozen if not torch.equal(before[k], after[k])] == []
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith(("running_mean", "weight")))
    params = dict(state.model.backbone.named_parameters())
    assert all(params[n].grad is None for n, s in stages.items() if s < 2)
    assert all(params[n].grad is not None for n, s in stages.items() if s >= 2)


def test_frozen_stages_must_leave_a_stage_to_train():
    from mltag.stages.train import TrainConfig

    TrainConfig(manifest="m.csv", backbone="test_efficientnet", frozen_stages=2).validate()
    for bad in (-1, 99):
        with pytest.raises(ValueError, match=r"frozen_stages .* must be between 0 and \d+: test_efficientnet has"):
            TrainConfig(manifest="m.csv", backbone="test_efficientnet", frozen_stages=bad).validate()

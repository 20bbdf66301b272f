import numpy as np
import pyarrow as pa
import pytest
import torch

from mltag.data.augment import augment_batch, colour_jitter, random_resized_crop
from mltag.data.images import pixels_from_arrow, pixels_to_arrow
from mltag.tagger.model import Tagger
from mltag.tagger.train_loop import build_optimizer, freeze_backbone, warmup_cosine


def _batch(n=4, size=32):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return pa.table({"listing_id": [f"L{i}" for i in range(n)]}).append_column("pixels", pixels_to_arrow(pixels)), pixels


def test_augment_batch_keeps_rows_columns_and_shape_and_is_seeded():
    batch, pixels = _batch()
    a, b = augment_batch(batch, 32, seed=1), augment_batch(batch, 32, seed=1)
    assert a.column("listing_id").to_pylist() == batch.column("listing_id").to_pylist()
    out = pixels_from_arrow(a.column("pixels"), 32)
    assert out.shape == pixels.shape and not np.array_equal(out, pixels)
    np.testing.assert_array_equal(out, pixels_from_arrow(b.column("pixels"), 32))


def test_no_augmentation_is_identity():
    batch, pixels = _batch()
    out = augment_batch(batch, 32, hflip=False, crop_scale=1.0, jitter=0.0, seed=0)
    np.testing.assert_array_equal(pixels_from_arrow(out.column("pixels"), 32), pixels)


def test_crop_keeps_most_of_the_image():
    # A bright border 2 px wide: any crop keeping >= 90% of the area in a 40 px image sees part of it... and
    # the crop is resized back to the full size.
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :20] = 255
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = random_resized_crop(image, rng, scale=(0.9, 1.0))
        assert out.shape == image.shape
        assert out[:, :10].mean() > 200 and out[:, -10:].mean() < 50  # both halves survive


def test_colour_jitter_stays_in_range():
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    out = colour_jitter(image, np.random.default_rng(1), 0.4)
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_warmup_then_cosine_to_zero():
    values = [warmup_cosine(s, 100, 10) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(0.0, abs=1e-9)


def test_phase_one_trains_only_the_head():
    torch.manual_seed(0)
    model = Tagger("test_efficientnet", 3)
    optimizer = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.01, backbone_lr_scale=1.0)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.head.weight.clone()
    freeze_backbone(model, True)
    model.train()
    model.backbone.eval()
    loss = model(torch.randn(4, 3, 32, 32))[0].sum()
    loss.backward()
    optimizer.step()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone[k])  # weights and batch-norm statistics alike
    assert not torch.equal(model.head.weight, head)
    freeze_backbone(model, False)
    assert all(p.requires_grad for p in model.parameters())

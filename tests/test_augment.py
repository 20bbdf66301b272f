import numpy as np
import pytest
import torch
from PIL import Image

from mltag.data.augment import augment, colour_jitter, crop_resize, random_crop_boxes
from mltag.tagger.model import Tagger
from mltag.tagger.train_loop import build_optimizer, freeze_backbone, warmup_cosine


def _pixels(n=4, size=32, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_dtype_and_is_seeded():
    pixels = _pixels()
    a, b = augment(pixels, _generator(1)), augment(pixels, _generator(1))
    assert a.shape == pixels.shape and a.dtype == torch.uint8 and not torch.equal(a, pixels)
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(pixels, _generator(2)))


def test_no_augmentation_is_identity():
    pixels = _pixels()
    assert torch.equal(augment(pixels, _generator(0), crop_scale=1.0, jitter=0.0, hflip=False), pixels)


def test_every_image_of_a_batch_draws_its_own_augmentation():
    # A batch of one image repeated: transforms.v2 on a batch tensor would give 16 equal outputs.
    pixels = _pixels(1).expand(16, -1, -1, -1).contiguous()
    out = augment(pixels, _generator(0))
    distinct = {out[i].numpy().tobytes() for i in range(16)}
    assert len(distinct) == 16


def test_flips_mirror_about_half_of_the_images():
    pixels = _pixels(64, 8)
    out = augment(pixels, _generator(0), crop_scale=1.0, jitter=0.0, hflip=True)
    flipped = torch.tensor([torch.equal(out[i], pixels[i].flip(1)) for i in range(64)])
    kept = torch.tensor([torch.equal(out[i], pixels[i]) for i in range(64)])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48


def test_crop_boxes_keep_the_asked_share_of_the_area_and_fit():
    boxes = random_crop_boxes(2000, 40, 60, _generator(0), scale=(0.7, 1.0))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all())
    share = width * height / (40 * 60)
    assert float(share.min()) > 0.65 and float(share.max()) <= 1.0  # rounding may cost a pixel row
    assert len(set(boxes[:, 0].tolist())) > 10 and len(set(boxes[:, 1].tolist())) >= 3  # positions vary (less room in y)


def test_crop_resize_matches_pil_bilinear():
    # The independent reference: PIL crops the box and resizes it back with BILINEAR. Inside the
    # outermost row and column they agree to PIL's rounding; there roi_align reads the real
    # neighbouring pixels where PIL, having cut the crop out, repeats its edge.
    image = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    box = (5, 3, 25, 29)  # x1, y1, x2, y2
    expected = np.asarray(Image.fromarray(image).crop(box).resize((32, 32), Image.Resampling.BILINEAR)).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = crop_resize(x, torch.tensor([box], dtype=torch.float32))[0].permute(1, 2, 0).numpy()
    inside = np.abs(got - expected)[1:-1, 1:-1]
    assert inside.mean() < 0.5 and inside.max() <= 1.0
    whole = crop_resize(x, torch.tensor([[0, 0, 32, 32]], dtype=torch.float32))
    torch.testing.assert_close(whole, x)


def test_crop_keeps_most_of_the_image():
    # Left half bright, right half dark: any crop keeping >= 90% of the area shows both halves.
    image = torch.zeros(20, 40, 40, 3, dtype=torch.uint8)
    image[:, :, :20] = 255
    out = augment(image, _generator(0), crop_scale=0.9, jitter=0.0, hflip=False).float()
    assert bool((out[:, :, :10].mean(dim=(1, 2, 3)) > 200).all() and (out[:, :, -10:].mean(dim=(1, 2, 3)) < 50).all())


def test_colour_jitter_scales_brightness_per_image_and_stays_in_range():
    pixels = torch.full((8, 6, 6, 3), 100, dtype=torch.uint8)
    out = augment(pixels, _generator(0), crop_scale=1.0, jitter=0.4, hflip=False)
    assert out.dtype == torch.uint8
    levels = out.float().mean(dim=(1, 2, 3))
    assert float(levels.min()) >= 60 - 1 and float(levels.max()) <= 140 + 1 and len(set(levels.tolist())) == 8
    # grey stays grey: contrast and saturation pivot on the image's own mean and grey
    assert float((out.float() - out.float().mean(dim=(1, 2, 3), keepdim=True)).abs().max()) <= 1.0
    wild = colour_jitter(torch.full((2, 3, 4, 4), 250.0), _generator(1), 0.4)
    assert float(wild.max()) > 255  # the raw jitter overshoots; augment clamps it
    assert int(augment(torch.full((2, 4, 4, 3), 250, dtype=torch.uint8), _generator(1), 1.0, 0.4, False).max()) <= 255


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

"""Training augmentation for multi-label images, run as a Ray Data stage on CPU workers.

Chosen so that no tag is cropped out of the picture: a random resized crop that keeps most of the
image (area scale 0.7..1 by default), an optional horizontal flip, and mild colour jitter
(brightness, contrast, saturation). Operates on the ``pixels`` column (fixed-size uint8 RGB).

Example:
    >>> out = augment_batch(batch, size=160, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from PIL import Image

from mltag.data.images import pixels_from_arrow, pixels_to_arrow


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Crops a random box of area share in ``scale`` and aspect in ``ratio``, resized back."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = Image.fromarray(image[top : top + ch, left : left + cw])
            return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))
    return image


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [1-s, 1+s]."""
    x = image.astype(np.float32)
    x *= rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - strength, 1 + strength) + grey  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


def augment_batch(
    batch: pa.Table, size: int, hflip: bool = True, crop_scale: float = 0.7, jitter: float = 0.2, seed: int | None = None
) -> pa.Table:
    """Ray Data stage: replaces ``pixels`` with an augmented copy; all other columns unchanged."""
    rng = np.random.default_rng(seed)
    pixels = pixels_from_arrow(batch.column("pixels"), size).copy()
    for i in range(len(pixels)):
        image = pixels[i]
        if crop_scale < 1.0:
            image = random_resized_crop(image, rng, scale=(crop_scale, 1.0))
        if hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        if jitter > 0:
            image = colour_jitter(image, rng, jitter)
        pixels[i] = image
    index = batch.schema.get_field_index("pixels")
    return batch.set_column(index, "pixels", pixels_to_arrow(pixels))

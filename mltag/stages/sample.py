"""An offline multi-label sample catalog built from real images that ship inside scikit-learn.

Each listing photo is a crop of one of scikit-learn's two sample photographs (``china.jpg``, a
palace; ``flower.jpg``, a flower) with one to four real handwritten digits (the UCI digits set,
also shipped in scikit-learn) painted over it. Its tags say what is in the picture: the scene and
each digit present. The vocabulary has a two-level hierarchy: ``digit_3`` implies ``odd``,
``scene_palace`` implies ``scene``... so every later feature (closure, level accuracy) has data.

Deterministic for a seed: the same seed gives byte-identical JPEGs and manifest.

Example:
    >>> summary = build_sample_catalog("/tmp/sample", n_images=40, size=96, seed=0)  # doctest: +SKIP
    >>> summary["manifest"]                                                           # doctest: +SKIP
    '/tmp/sample/manifest.parquet'
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mltag.data.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

SCENES = {"china.jpg": "scene_palace", "flower.jpg": "scene_flower"}


@dataclass
class SampleConfig:
    """Build the offline sample catalog (real photos + real handwritten digits)."""

    out: str = "sample_catalog"  # output directory (images/, manifest.parquet, manifest.csv, vocabulary.yaml)
    n_images: int = 600  # number of listing images
    size: int = 160  # side of each square JPEG, pixels
    val_fraction: float = 0.25  # share of listings in the 'val' split
    seed: int = 0  # same seed, same catalog

    def validate(self) -> None:
        if self.n_images < 8:
            raise ValueError("n_images must be at least 8 (train and val both need examples)")
        if self.size < 48:
            raise ValueError("size must be at least 48 pixels so digits stay legible")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be strictly between 0 and 1")


def sample_vocabulary() -> Vocabulary:
    tags: list[dict] = [{"name": "scene"}, {"name": "odd"}, {"name": "even"}]
    tags += [{"name": tag, "parent": "scene"} for tag in SCENES.values()]
    tags += [{"name": f"digit_{d}", "parent": "even" if d % 2 == 0 else "odd"} for d in range(10)]
    return Vocabulary.from_dict({"tags": tags})


def _paint_digit(canvas: np.ndarray, digit: np.ndarray, top: int, left: int, side: int, colour: np.ndarray) -> None:
    """Alpha-blends an 8x8 digit (values 0..16), upscaled to ``side``, in ``colour`` onto canvas."""
    alpha = Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    a = (np.asarray(alpha, dtype=np.float32) / 255.0)[..., None]
    patch = canvas[top : top + side, left : left + side].astype(np.float32)
    canvas[top : top + side, left : left + side] = (patch * (1 - a) + colour * a).astype(np.uint8)


def _compose(rng: np.random.Generator, photos: dict[str, np.ndarray], digits, size: int):
    name = rng.choice(sorted(photos))
    photo = photos[name]
    h, w = photo.shape[:2]
    crop = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    canvas = np.asarray(Image.fromarray(photo[y : y + crop, x : x + crop]).resize((size, size), Image.Resampling.BILINEAR)).copy()

    count = int(rng.integers(1, 5))
    cell = size // 2  # one digit per quadrant: digits never overlap
    quadrants = rng.permutation(4)[:count]
    present = set()
    for q in quadrants:
        idx = int(rng.integers(0, len(digits.target)))
        side = int(rng.integers(int(cell * 0.7), cell))
        top = (q // 2) * cell + int(rng.integers(0, cell - side + 1))
        left = (q % 2) * cell + int(rng.integers(0, cell - side + 1))
        # Light or dark ink, whichever contrasts with the region it lands on.
        region = canvas[top : top + side, left : left + side].mean()
        colour = np.array([255, 255, 255] if region < 128 else [0, 0, 0], dtype=np.float32)
        colour = np.clip(colour + rng.normal(0, 30, 3), 0, 255)
        _paint_digit(canvas, digits.images[idx], top, left, side, colour)
        present.add(f"digit_{int(digits.target[idx])}")
    return canvas, [SCENES[name], *sorted(present)]


def build_sample_catalog(out: str, n_images: int = 600, size: int = 160, val_fraction: float = 0.25, seed: int = 0) -> dict:
    """Writes JPEGs, ``manifest.parquet`` + ``manifest.csv`` and ``vocabulary.yaml`` under ``out``."""
    from sklearn.datasets import load_digits, load_sample_image

    SampleConfig(out, n_images, size, val_fraction, seed).validate()
    rng = np.random.default_rng(seed)
    photos = {name: load_sample_image(name) for name in SCENES}
    digits = load_digits()
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    vocab = sample_vocabulary()

    rows = []
    n_val = max(1, int(round(n_images * val_fraction)))
    for i in range(n_images):
        canvas, tags = _compose(rng, photos, digits, size)
        rel = f"images/{i:06d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="JPEG", quality=90)
        with open(os.path.join(out, rel), "wb") as f:
            f.write(buf.getvalue())
        rows.append({"listing_id": f"L{i:06d}", "image_uri": rel, "tags": tags, "split": "val" if i >= n_images - n_val else "train"})

    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("listing_id", pa.string()),
                ("image_uri", pa.string()),
                ("tags", pa.list_(pa.string())),
                ("split", pa.string()),
            ]
        ),
    )
    pq.write_table(table, os.path.join(out, "manifest.parquet"))
    with open(os.path.join(out, "manifest.csv"), "w") as f:
        f.write("listing_id,image_uri,tags,split\n")
        for r in rows:
            f.write(f"{r['listing_id']},{r['image_uri']},{'|'.join(r['tags'])},{r['split']}\n")
    vocab.save(os.path.join(out, "vocabulary.yaml"))
    return {
        "out": out,
        "manifest": os.path.join(out, "manifest.parquet"),
        "vocabulary": os.path.join(out, "vocabulary.yaml"),
        "n_train": n_images - n_val,
        "n_val": n_val,
    }


def run(config: SampleConfig) -> dict:
    summary = build_sample_catalog(config.out, config.n_images, config.size, config.val_fraction, config.seed)
    logger.info(f"sample catalog: {summary['n_train']} train + {summary['n_val']} val images -> {summary['manifest']}")
    return summary

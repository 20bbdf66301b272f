"""Shared by the storage and scale benchmarks: small real JPEGs and a tiny saved tagger, so that
the machinery, not the forward pass, is what they measure."""

from __future__ import annotations

import os

import numpy as np


def make_images(folder: str, count: int, seed: int, crop: int = 96, size: int = 64) -> list[str]:
    """``count`` JPEGs of ``size`` px: random ``crop``-px crops of scikit-learn's sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - crop), rng.integers(0, photo.shape[1] - crop)
        path = os.path.join(folder, f"{seed}-{i:05d}.jpg")
        Image.fromarray(photo[y : y + crop, x : x + crop]).resize((size, size)).save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


def tiny_model(work: str) -> str:
    """An untrained timm test_efficientnet tagger over 15 tags at 64 px, saved under ``work``."""
    import torch

    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(0)
    names = [f"tag{i}" for i in range(15)]
    out = os.path.join(work, "model")
    save_tagger(
        Tagger("test_efficientnet", len(names)), TaggerSpec(backbone="test_efficientnet", img_size=64, vocabulary={"tags": names}), out
    )
    return out


def link_rows(images: list[str], folder: str, rows: int, prefix: str = "") -> list[str]:
    """One hard link per catalog row, cycling over ``images``: every row has a file of its own (a
    night can replace one row's photo alone) at no extra disk space."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(rows):
        path = os.path.join(folder, f"{prefix}{i:08d}.jpg")
        os.link(images[i % len(images)], path)
        paths.append(path)
    return paths

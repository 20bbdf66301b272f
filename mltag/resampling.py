"""Repeat-factor resampling of rare tags (Gupta et al., LVIS 2019), as pure functions.

Tag factor   r(h) = max(1, phi(t / f(h)))   f(h): share of training images carrying tag h,
                                            t: target frequency, phi: identity or square root
Image factor r(I) = max over the image's tags of r(h)   (1 for an image without tags)

Each epoch an image appears floor(r) times plus once more with probability frac(r). The extra
draw is a hash of (seed, epoch, listing id), so the counts are the same for a seed whatever order
the data arrives in, and differ from epoch to epoch.

Example:
    >>> labels = np.array([[1, 0], [1, 0], [1, 0], [1, 1]], np.float32)
    >>> repeat_factors(labels, threshold=0.5).round(3).tolist()
    [1.0, 1.0, 1.0, 1.414]
"""

from __future__ import annotations

import hashlib

import numpy as np


def tag_repeat_factors(labels: np.ndarray, threshold: float, sqrt: bool = True) -> np.ndarray:
    """r(h) per tag from a (images x tags) 0/1 matrix; tags never seen get factor 1."""
    frequency = np.asarray(labels, dtype=np.float64).mean(axis=0)
    with np.errstate(divide="ignore"):
        ratio = np.where(frequency > 0, threshold / np.maximum(frequency, 1e-300), 1.0)
    ratio = np.sqrt(ratio) if sqrt else ratio
    return np.maximum(1.0, ratio)


def repeat_factors(labels: np.ndarray, threshold: float, sqrt: bool = True) -> np.ndarray:
    """r(I) per image: the largest tag factor among its tags (1 when it has none)."""
    labels = np.asarray(labels) > 0
    per_tag = tag_repeat_factors(labels, threshold, sqrt)
    return np.where(labels, per_tag[None, :], 1.0).max(axis=1, initial=1.0)


def _uniform(seed: int, epoch: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def repeat_counts(factors: np.ndarray, keys: list[str], seed: int, epoch: int) -> np.ndarray:
    """How many times each image appears this epoch: floor(r) + Bernoulli(frac(r))."""
    factors = np.asarray(factors, dtype=np.float64)
    base = np.floor(factors)
    u = np.array([_uniform(seed, epoch, k) for k in keys])
    return (base + (u < factors - base)).astype(np.int64)

"""Which tags to drop from a vocabulary: too rare to learn, or unrelated to every other tag.

- ``rare_tags``: a tag on fewer than ``min_fraction`` of the images (58.com dropped tags on
  fewer than 0.5 per mille of 5M images), or fewer than ``min_count`` (the floor small sets need).
- ``uncorrelated_tags``: a tag whose largest co-occurrence correlation (phi, the Pearson
  correlation of two 0/1 columns) with any other tag is below ``threshold`` (58.com: 0.01). A
  tag's own ancestors and descendants do not count: closure makes them co-occur by definition.

Example:
    >>> labels = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    >>> rare_tags(labels, min_fraction=0.0, min_count=2).tolist()
    [False, False, True]
"""

from __future__ import annotations

import numpy as np


def rare_tags(labels: np.ndarray, min_fraction: float = 0.0005, min_count: int = 0) -> np.ndarray:
    """True for tags on fewer than max(min_fraction x images, min_count) images."""
    labels = np.asarray(labels, dtype=bool)
    floor = max(min_fraction * labels.shape[0], float(min_count))
    return labels.sum(axis=0) < floor


def correlation_matrix(labels: np.ndarray) -> np.ndarray:
    """Phi coefficient of every pair of tags (tags x tags); NaN where a tag is constant (on every
    image or on none: its correlation is undefined)."""
    x = np.asarray(labels, dtype=np.float64)
    centred = x - x.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (centred.T @ centred) / np.outer(norms, norms)


def max_correlation(labels: np.ndarray, exclude: np.ndarray | None = None, keep: np.ndarray | None = None) -> np.ndarray:
    """Each tag's largest correlation with another tag (-1 when it has none to compare with; NaN
    for a constant tag); ``exclude`` (tags x tags, True = ignore the pair) and ``keep`` (tags
    still in) restrict it."""
    corr = correlation_matrix(labels)
    constant = np.isnan(np.diag(corr))
    corr = np.nan_to_num(corr, nan=-np.inf)
    n = corr.shape[0]
    ignore = np.eye(n, dtype=bool) if exclude is None else (np.asarray(exclude, dtype=bool) | np.eye(n, dtype=bool))
    if keep is not None:
        ignore |= ~np.asarray(keep, dtype=bool)[None, :]
    corr = np.where(ignore, -np.inf, corr)
    best = corr.max(axis=1) if n > 1 else np.full(n, -np.inf)
    return np.where(constant, np.nan, np.where(np.isfinite(best), best, -1.0))


def uncorrelated_tags(labels: np.ndarray, threshold: float = 0.01, exclude: np.ndarray | None = None, keep: np.ndarray | None = None):
    """(dropped, max correlation before, max correlation after) for the tags in ``keep`` (all by
    default): dropped where the largest correlation with another kept tag is below ``threshold``.
    A constant tag (on every image: a root of a one-branch catalog) has no correlation and is not
    dropped here. One pass: 'after' is recomputed among the tags that stay, for the report."""
    n = np.asarray(labels).shape[1]
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    before = max_correlation(labels, exclude, keep)
    dropped = keep & (np.nan_to_num(before, nan=np.inf) < threshold)
    after = max_correlation(labels, exclude, keep & ~dropped)
    return dropped, before, np.where(keep & ~dropped, after, np.nan)

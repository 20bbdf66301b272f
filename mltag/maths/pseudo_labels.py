"""Pseudo-labels: tags a model is confident of, added beside the human labels, never over them.

A tag is added to an image when the model ranks it among the image's ``top_k`` tags and scores
it at least ``threshold`` (the album-tagging recipe: top-5 above 0.5), and no human gave it.
Human labels are never touched: the result is a separate matrix of *added* labels.

Example:
    >>> human = np.array([[1, 0, 0], [0, 0, 0]], bool)
    >>> scores = np.array([[0.9, 0.8, 0.2], [0.6, 0.4, 0.7]])
    >>> pseudo_labels(human, scores, top_k=1, threshold=0.5).astype(int).tolist()
    [[0, 0, 0], [0, 0, 1]]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows x tags) True where a tag is among its row's k best scores; ties go to the tag that
    comes first in the vocabulary (a stable sort), so the result never depends on the platform."""
    scores = np.asarray(scores)
    k = max(0, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def pseudo_labels(
    human: np.ndarray, scores: np.ndarray, top_k: int = 5, threshold: float = 0.5, eligible: np.ndarray | None = None
) -> np.ndarray:
    """The labels to add: top-k, at least ``threshold``, not a human label, and (optionally)
    only for ``eligible`` tags (a boolean per tag)."""
    human = np.asarray(human, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    added = top_k_mask(scores, top_k) & (scores >= threshold) & ~human
    if eligible is not None:
        added &= np.asarray(eligible, dtype=bool)[None, :]
    return added


def tags_by_source(labels: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Splits a curated ``labels`` column (per image, one ``{tag, source, ...}`` struct per tag,
    as ``mltag curate`` writes it) into two list<string> columns, row for row: the tags whose
    source is ``pseudo`` and the others (``human``, ``review``). Vectorised: no Python per row.

    Example:
        >>> labels = pa.array([[{"tag": "a", "source": "human"}, {"tag": "b", "source": "pseudo"}], []])
        >>> [c.to_pylist() for c in tags_by_source(labels)]
        [[['b'], []], [['a'], []]]
    """
    labels = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    flat = pc.list_flatten(labels)
    rows = pc.list_parent_indices(labels).to_numpy()
    is_pseudo = pc.fill_null(pc.equal(flat.field("source"), "pseudo"), False)
    tags = flat.field("tag")

    def lists(mask: pa.Array) -> pa.Array:
        keep = mask.to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=len(labels)))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), tags.filter(mask))

    return lists(is_pseudo), lists(pc.invert(is_pseudo))

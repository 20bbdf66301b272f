"""Every indexed vector's k nearest other vectors: the kNN pass that ``anomalies`` and
``duplicates`` both make over a whole index.

An IVF index searched with a small ``nprobe`` may find fewer than k neighbours for a vector whose
probed lists are nearly empty; faiss pads those results with id -1 and similarity -3.4e38. They
are never taken for neighbours: such rows are searched again over every list, and ``stats`` says
how many rows still have fewer than k (an index of k or fewer vectors).

Example:
    >>> index = EmbeddingIndex.load("runs/index")                       # doctest: +SKIP
    >>> for start, faiss_ids, found, sims in iter_neighbours(index, k=10):  # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faiss
import numpy as np

from mltag.search.embedding_index import EmbeddingIndex, ivf_of


def _search_every_list(index: faiss.Index, ivf, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One search with nprobe = nlist (every list scanned), the index's own nprobe restored."""
    params, nprobe = faiss.ParameterSpace(), ivf.nprobe
    params.set_index_parameter(index, "nprobe", ivf.nlist)
    try:
        return index.search(vectors, k)
    finally:
        params.set_index_parameter(index, "nprobe", nprobe)


def iter_neighbours(
    index: EmbeddingIndex, k: int, batch: int = 4096, stats: dict | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every indexed vector's k nearest other vectors, a batch of rows at a time (in ``index.ids``
    order): yields (start row, faiss ids (b,), neighbour faiss ids (b, k) int64, similarities
    (b, k) float32). The row itself is removed and faiss's missing-neighbour placeholders (id -1,
    similarity -3.4e38) are never taken: a row with fewer than k neighbours is padded with id -1
    and similarity nan. Rows that came back short from an IVF index are searched again over every
    list; ``stats`` counts them (``widened``) and the rows still short (``short``)."""
    stats = stats if stats is not None else {}
    stats.setdefault("widened", 0)
    stats.setdefault("short", 0)
    ids = index.ids.column("faiss_id").to_numpy()
    ivf = ivf_of(index.index)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        vectors = index.vectors_of_faiss_ids(chunk)
        sims, found = index.index.search(vectors, k + 1)
        padded = np.flatnonzero((found < 0).any(axis=1))
        if len(padded) and ivf is not None and ivf.nprobe < ivf.nlist:
            sims[padded], found[padded] = _search_every_list(index.index, ivf, vectors[padded], k + 1)
            stats["widened"] += len(padded)
        keep = (found >= 0) & (found != chunk[:, None])
        # Kept neighbours first, in faiss's order (a stable sort of the keep mask), then the first k.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        keep = np.take_along_axis(keep, order, axis=1)
        neighbour_ids = np.where(keep, np.take_along_axis(found, order, axis=1), -1)
        neighbour_sims = np.where(keep, np.take_along_axis(sims, order, axis=1), np.nan).astype(np.float32)
        stats["short"] += int((keep.sum(axis=1) < k).sum())
        yield start, chunk, neighbour_ids, neighbour_sims


def neighbours_of_all(index: EmbeddingIndex, k: int, batch: int = 4096):
    """For every indexed vector: its k nearest other vectors, self removed, faiss's missing-neighbour
    placeholders never taken.

    Returns (faiss ids (n,), neighbour faiss ids (n, k) int64 padded with -1, similarities (n, k)
    float32 padded with nan, stats): ``stats`` counts the rows searched again over every IVF list
    (``widened``) and those still left with fewer than k neighbours (``short``). Rows are in
    ``index.ids`` order."""
    n, stats = len(index.ids), {"widened": 0, "short": 0}
    neighbour_ids, neighbour_sims = np.full((n, k), -1, np.int64), np.full((n, k), np.nan, np.float32)
    for start, chunk, found, sims in iter_neighbours(index, k, batch, stats):
        neighbour_ids[start : start + len(chunk)] = found
        neighbour_sims[start : start + len(chunk)] = sims
    return index.ids.column("faiss_id").to_numpy(), neighbour_ids, neighbour_sims, stats


def log_short_rows(logger: logging.Logger, stats: dict, k: int, total: int) -> None:
    """Logs ``describe_short_rows``'s line, if any: a warning where rows were scored over fewer than
    k neighbours, information where searching every list was enough."""
    if note := describe_short_rows(stats, k, total):
        logger.log(logging.WARNING if stats["short"] else logging.INFO, note)


def describe_short_rows(stats: dict, k: int, total: int) -> str | None:
    """The console line about rows that had fewer than k neighbours (None when there were none)."""
    if not stats["widened"] and not stats["short"]:
        return None
    parts = []
    if stats["widened"]:
        parts.append(
            f"{stats['widened']} of {total} listings had fewer than k={k} neighbours in their probed IVF lists "
            "and were searched again over every list"
        )
    if stats["short"]:
        parts.append(
            f"{stats['short']} of {total} listings have fewer than k={k} neighbours (the index holds too few "
            "vectors): scored over the neighbours found"
        )
    return "; ".join(parts)

"""``mltag anomalies``: listings whose image does not belong, by k-nearest-neighbour distance.

An image far from even its nearest neighbours in embedding space is unlike the rest of the
catalog: a wrong photo, a placeholder, a screenshot in a shoe category. The score is the cosine
distance (1 - similarity) to the k-th neighbour (``kth``) or the mean over the k nearest
(``mean``); the top ``contamination`` share is flagged.

Output Parquet: listing_id, image_uri, score, rank (1 = most anomalous), is_outlier, neighbours,
neighbour_similarities.

An IVF index searched with a small ``nprobe`` may find fewer than k neighbours for a vector whose
probed lists are nearly empty; faiss pads those results with id -1 and similarity -3.4e38. They
are never taken for neighbours: such rows are searched again over every list, and the run says
how many rows still have fewer than k (an index of k or fewer vectors).

Example:
    mltag anomalies --index runs/index --out runs/anomalies.parquet --k 10 --contamination 0.01
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.index import EmbeddingIndex

SCORES = ("kth", "mean")


@dataclass
class AnomalyConfig:
    """Score every listing by its kNN distance and write the outlier table."""

    index: str = "runs/index"  # index directory built by `mltag index`
    out: str = "runs/anomalies.parquet"  # output Parquet file
    k: int = 10  # neighbours considered (the listing itself excluded)
    score: str = "kth"  # kth: distance to the k-th neighbour | mean: mean distance to the k nearest
    contamination: float = 0.01  # share of listings flagged as outliers
    batch: int = 4096  # vectors searched per call

    def validate(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of: {', '.join(SCORES)}")
        if not 0 <= self.contamination < 1:
            raise ValueError("contamination must be in [0, 1)")
        if self.k < 1:
            raise ValueError("k must be positive")


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def _search_every_list(index: faiss.Index, ivf, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One search with nprobe = nlist (every list scanned), the index's own nprobe restored."""
    params, nprobe = faiss.ParameterSpace(), ivf.nprobe
    params.set_index_parameter(index, "nprobe", ivf.nlist)
    try:
        return index.search(vectors, k)
    finally:
        params.set_index_parameter(index, "nprobe", nprobe)


def iter_neighbours(index: EmbeddingIndex, k: int, batch: int = 4096, stats: dict | None = None):
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
    ivf = _ivf_of(index.index)
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


ROWS_AT_A_TIME = 65_536  # rows scored / turned into list columns at a time (bounds the temporaries)


def knn_scores(similarities, k: int, score: str) -> np.ndarray:
    """Cosine distance to the k-th neighbour, or the mean over the k nearest (pure). ``similarities``
    is (n, >=k) with nan where a row has fewer neighbours (or a list of per-row arrays): a short
    row is scored over the neighbours it has, a row with none gets inf."""
    if not isinstance(similarities, np.ndarray):
        padded = np.full((len(similarities), max([k, *(len(s) for s in similarities)])), np.nan)
        for i, sims in enumerate(similarities):
            padded[i, : len(sims)] = sims
        similarities = padded
    similarities = similarities.reshape(len(similarities), -1)
    out = np.full(len(similarities), np.inf)
    for start in range(0, len(similarities), ROWS_AT_A_TIME):
        distances = 1.0 - similarities[start : start + ROWS_AT_A_TIME, :k].astype(np.float64)
        present = ~np.isnan(distances)
        count = present.sum(axis=1)
        has = np.flatnonzero(count > 0)
        if score == "kth":
            # Neighbours are packed to the left: the last present one is the k-th (or the furthest found).
            out[start + has] = distances[has, count[has] - 1]
        else:
            out[start + has] = np.where(present[has], distances[has], 0.0).sum(axis=1) / count[has]
    return out


def neighbour_lists(
    index: EmbeddingIndex, neighbour_ids: np.ndarray, neighbour_sims: np.ndarray, rows: np.ndarray | None = None
) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The ``neighbours`` (list<string>) and ``neighbour_similarities`` (list<float>) columns for
    these rows (all, by default), built from flat arrays and offsets a slice of rows at a time."""
    rows = np.arange(len(neighbour_ids)) if rows is None else np.asarray(rows)
    listings = index.ids.column("listing_id")
    names, sims = [], []
    for start in range(0, len(rows), ROWS_AT_A_TIME):
        part = rows[start : start + ROWS_AT_A_TIME]
        ids, similarities = neighbour_ids[part], neighbour_sims[part]
        present = ids >= 0
        offsets = pa.array(np.concatenate([[0], np.cumsum(present.sum(axis=1))]), pa.int32())
        names.append(
            pa.ListArray.from_arrays(offsets, listings.take(pa.array(index.rows_of_faiss_ids(ids[present]), pa.int64())).combine_chunks())
        )
        sims.append(pa.ListArray.from_arrays(offsets, pa.array(similarities[present], pa.float32())))
    return (pa.chunked_array(names, pa.list_(listings.type)), pa.chunked_array(sims, pa.list_(pa.float32())))


def run(config: AnomalyConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    faiss_ids, neighbour_ids, neighbour_sims, stats = neighbours_of_all(index, config.k, config.batch)
    if note := describe_short_rows(stats, config.k, len(faiss_ids)):
        print(note)
    scores = knn_scores(neighbour_sims, config.k, config.score)
    order = np.argsort(-scores, kind="stable")  # rows by rank: the table is built in that order
    n_flagged = int(np.ceil(config.contamination * len(scores)))
    rank = np.arange(1, len(scores) + 1, dtype=np.int64)
    neighbours, similarities = neighbour_lists(index, neighbour_ids, neighbour_sims, order)
    del neighbour_ids, neighbour_sims
    taken = index.ids.select(["listing_id", "image_uri"]).take(pa.array(order, pa.int64()))
    table = pa.table(
        {
            "listing_id": taken.column("listing_id"),
            "image_uri": taken.column("image_uri"),
            "score": pa.array(scores[order], pa.float64()),
            "rank": pa.array(rank),
            "is_outlier": pa.array(rank <= n_flagged),
            "neighbours": neighbours,
            "neighbour_similarities": similarities,
        }
    )
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    pq.write_table(table, config.out)
    print(
        f"{n_flagged} of {len(scores)} listings flagged (top {config.contamination:.1%} by {config.score} distance, k={config.k}) -> {config.out}"
    )
    for row in table.slice(0, min(5, n_flagged or 5)).to_pylist():
        print(f"  {row['rank']:>4}  {row['score']:.4f}  {row['listing_id']}")
    return table

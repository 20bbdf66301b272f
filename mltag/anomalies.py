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


def neighbours_of_all(index: EmbeddingIndex, k: int, batch: int = 4096):
    """For every indexed vector: its k nearest other vectors (ids, similarities), self removed,
    faiss's missing-neighbour placeholders (id -1) dropped.

    Returns (faiss ids, neighbour ids per row, similarities per row, stats): ``stats`` counts the
    rows searched again over every IVF list (``widened``) and those still left with fewer than
    k neighbours (``short``)."""
    ids = index.ids.column("faiss_id").to_numpy()
    ivf = _ivf_of(index.index)
    all_ids, all_sims, stats = [], [], {"widened": 0, "short": 0}
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        vectors = np.stack([index.index.reconstruct(int(i)) for i in chunk])
        sims, found = index.index.search(vectors, k + 1)
        padded = np.flatnonzero((found < 0).any(axis=1))
        if len(padded) and ivf is not None and ivf.nprobe < ivf.nlist:
            sims[padded], found[padded] = _search_every_list(index.index, ivf, vectors[padded], k + 1)
            stats["widened"] += len(padded)
        for row, own in enumerate(chunk):
            keep = (found[row] >= 0) & (found[row] != own)
            all_ids.append(found[row][keep][:k])
            all_sims.append(sims[row][keep][:k])
            stats["short"] += len(all_ids[-1]) < k
    return ids, all_ids, all_sims, stats


def describe_short_rows(stats: dict, k: int, total: int) -> str | None:
    """The console line about rows that had fewer than k neighbours (None when there were none)."""
    if not stats["widened"] and not stats["short"]:
        return None
    parts = []
    if stats["widened"]:
        parts.append(f"{stats['widened']} of {total} listings had fewer than k={k} neighbours in their probed IVF lists "
                     "and were searched again over every list")
    if stats["short"]:
        parts.append(f"{stats['short']} of {total} listings have fewer than k={k} neighbours (the index holds too few "
                     "vectors): scored over the neighbours found")
    return "; ".join(parts)


def knn_scores(similarities: list[np.ndarray], k: int, score: str) -> np.ndarray:
    """Cosine distance to the k-th neighbour, or the mean over the k nearest (pure)."""
    out = np.empty(len(similarities))
    for i, sims in enumerate(similarities):
        distances = 1.0 - np.asarray(sims[:k], dtype=np.float64)
        if distances.size == 0:
            out[i] = np.inf  # a catalog of one: nothing to compare with
        else:
            out[i] = distances[-1] if score == "kth" else distances.mean()
    return out


def run(config: AnomalyConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    faiss_ids, neighbour_ids, neighbour_sims, stats = neighbours_of_all(index, config.k, config.batch)
    if note := describe_short_rows(stats, config.k, len(faiss_ids)):
        print(note)
    scores = knn_scores(neighbour_sims, config.k, config.score)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    n_flagged = int(np.ceil(config.contamination * len(scores)))
    listing_of = dict(zip(index.ids.column("faiss_id").to_pylist(), index.ids.column("listing_id").to_pylist()))
    table = pa.table({
        "listing_id": index.ids.column("listing_id"),
        "image_uri": index.ids.column("image_uri"),
        "score": pa.array(scores, pa.float64()),
        "rank": pa.array(rank),
        "is_outlier": pa.array(rank <= n_flagged),
        "neighbours": pa.array([[listing_of[int(i)] for i in ids] for ids in neighbour_ids], pa.list_(pa.string())),
        "neighbour_similarities": pa.array([s.astype(np.float32) for s in neighbour_sims], pa.list_(pa.float32())),
    }).sort_by("rank")
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    pq.write_table(table, config.out)
    print(f"{n_flagged} of {len(scores)} listings flagged (top {config.contamination:.1%} by {config.score} distance, k={config.k}) -> {config.out}")
    for row in table.slice(0, min(5, n_flagged or 5)).to_pylist():
        print(f"  {row['rank']:>4}  {row['score']:.4f}  {row['listing_id']}")
    return table

"""``mltag anomalies``: listings whose image does not belong, by k-nearest-neighbour distance.

An image far from even its nearest neighbours in embedding space is unlike the rest of the
catalog: a wrong photo, a placeholder, a screenshot in a shoe category. The score is the cosine
distance (1 - similarity) to the k-th neighbour (``kth``) or the mean over the k nearest
(``mean``); the top ``contamination`` share is flagged.

Output Parquet: listing_id, image_uri, score, rank (1 = most anomalous), is_outlier, neighbours,
neighbour_similarities.

The neighbours come from ``mltag.search.neighbours`` (the kNN pass ``duplicates`` makes too), which never
takes faiss's missing-neighbour placeholders for neighbours; the run says how many rows had fewer
than k.

Example:
    mltag anomalies --index runs/index --out runs/anomalies.parquet --k 10 --contamination 0.01
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import provenance_beside, save_provenance
from mltag.search.embedding_index import EmbeddingIndex
from mltag.search.neighbours import log_short_rows, neighbours_of_all

logger = logging.getLogger(__name__)

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
    log_short_rows(logger, stats, config.k, len(faiss_ids))
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
    save_provenance(provenance_beside(config.out), config, **index.provenance_inputs())
    logger.info(
        "%d of %d listings flagged (top %.1f%% by %s distance, k=%d) -> %s",
        n_flagged,
        len(scores),
        100 * config.contamination,
        config.score,
        config.k,
        config.out,
    )
    for row in table.slice(0, min(5, n_flagged or 5)).to_pylist():
        logger.info("  %4d  %.4f  %s", row["rank"], row["score"], row["listing_id"])
    return table

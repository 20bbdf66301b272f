"""``mltag duplicates``: near-duplicate listings (the same photo re-posted, re-encoded, resized or
slightly cropped) as groups.

Every listing's k nearest neighbours are searched; pairs with cosine similarity at or above the
threshold are joined, and the connected components (scipy's csgraph, over the listings in such
a pair only) of two or more listings are the duplicate groups. k bounds the work: a group larger
than k+1 is still found whole, because membership is transitive. Neighbours are searched a batch
at a time and only the pairs at or above the threshold are kept, so memory follows the pairs
found, not the catalog times k.

Output Parquet: group_id, listing_id, image_uri, group_size, max_similarity (to another member).

Example:
    mltag duplicates --index runs/index --out runs/duplicates.parquet --threshold 0.95
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mltag.config import provenance_beside, save_provenance
from mltag.search.embedding_index import EmbeddingIndex
from mltag.search.neighbours import iter_neighbours, log_short_rows

logger = logging.getLogger(__name__)


@dataclass
class DuplicatesConfig:
    """Group near-duplicate listings by embedding similarity."""

    index: str = "runs/index"  # index directory built by `mltag index`
    out: str = "runs/duplicates.parquet"  # output Parquet file
    threshold: float = 0.95  # cosine similarity at or above which two images are duplicates
    k: int = 20  # neighbours checked per listing
    batch: int = 4096  # vectors searched per call

    def validate(self) -> None:
        if not -1 <= self.threshold <= 1:
            raise ValueError("threshold is a cosine similarity in [-1, 1]")


def group_arrays(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of size >= 2 of the graph on positions 0..n-1 with edges (a[i], b[i]),
    as flat arrays (pure): (members, group of each member, size of each group), groups largest
    first (ties: the smaller first member first), members ascending within a group. Only the
    positions in some edge enter the graph."""
    a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError(f"pair positions must be in [0, {n})")
    nodes = np.unique(np.concatenate([a, b]))
    if not len(nodes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes))).tocsr()
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    first = np.full(len(sizes), np.iinfo(np.int64).max)
    np.minimum.at(first, labels, nodes)  # nodes ascending: each component's smallest member
    groups = np.flatnonzero(sizes >= 2)  # a lone self-pair (i, i) makes a component of one
    ordered = groups[np.lexsort((first[groups], -sizes[groups]))]
    group_of_label = np.full(len(sizes), -1, np.int64)
    group_of_label[ordered] = np.arange(len(ordered))
    member_group = group_of_label[labels]
    inside = member_group >= 0
    order = np.lexsort((nodes[inside], member_group[inside]))
    return nodes[inside][order], member_group[inside][order], sizes[ordered].astype(np.int64)


def duplicate_groups(n: int, pairs) -> list[list[int]]:
    """Connected components of size >= 2 over positions 0..n-1, largest first, ties by smallest
    member, members ascending (pure). ``pairs``: (a, b) tuples or an (m, 2) array."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    members, group, _ = group_arrays(n, pairs[:, 0], pairs[:, 1])
    bounds = np.flatnonzero(np.diff(group)) + 1
    return [part.tolist() for part in np.split(members, bounds)] if len(members) else []


def duplicate_pairs(index: EmbeddingIndex, k: int, threshold: float, batch: int = 4096, stats: dict | None = None):
    """(a, b, similarity) of every row's neighbours at or above ``threshold``: rows of ``index.ids``,
    searched a batch at a time, only the pairs kept."""
    a_parts, b_parts, s_parts = [], [], []
    for start, _chunk, found, sims in iter_neighbours(index, k, batch, stats):
        hit = (found >= 0) & (sims >= threshold)  # nan (no neighbour) compares False
        row, col = np.nonzero(hit)
        target = index.rows_of_faiss_ids(found[row, col])
        known = target >= 0
        a_parts.append(start + row[known])
        b_parts.append(target[known])
        s_parts.append(sims[row, col][known].astype(np.float64))
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64), np.concatenate(s_parts)


def run(config: DuplicatesConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    n, stats = len(index.ids), {"widened": 0, "short": 0}
    a, b, sims = duplicate_pairs(index, config.k, config.threshold, config.batch, stats)
    log_short_rows(logger, stats, config.k, n)
    members, group, sizes = group_arrays(n, a, b)
    # Each member's highest similarity to another member (pairs count for both ends).
    nodes = np.unique(np.concatenate([a, b]))
    best = np.full(len(nodes), -np.inf)
    np.maximum.at(best, np.searchsorted(nodes, a), sims)
    np.maximum.at(best, np.searchsorted(nodes, b), sims)
    taken = index.ids.select(["listing_id", "image_uri"]).take(pa.array(members, pa.int64()))
    table = pa.table(
        {
            "group_id": pa.array(group, pa.int64()),
            "listing_id": taken.column("listing_id").cast(pa.string()),
            "image_uri": taken.column("image_uri").cast(pa.string()),
            "group_size": pa.array(sizes[group] if len(group) else np.zeros(0, np.int64), pa.int64()),
            "max_similarity": pa.array(best[np.searchsorted(nodes, members)] if len(members) else np.zeros(0), pa.float64()),
        }
    )
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    pq.write_table(table, config.out)
    save_provenance(provenance_beside(config.out), config, **index.provenance_inputs())
    logger.info("%d duplicate group(s), %d listings, similarity >= %s -> %s", len(sizes), table.num_rows, config.threshold, config.out)
    listing = table.column("listing_id")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for g in range(min(5, len(sizes))):
        shown = listing.slice(int(offsets[g]), int(min(sizes[g], 8))).to_pylist()
        logger.info("  group %d: %s%s", g, ", ".join(shown), " ..." if sizes[g] > 8 else "")
    return table

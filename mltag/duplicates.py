"""``mltag duplicates``: near-duplicate listings (the same photo re-posted, re-encoded, resized or
slightly cropped) as groups.

Every listing's k nearest neighbours are searched; pairs with cosine similarity at or above the
threshold are joined, and the connected components (union-find) of two or more listings are the
duplicate groups. k bounds the work: a group larger than k+1 is still found whole, because
membership is transitive.

Output Parquet: group_id, listing_id, image_uri, group_size, max_similarity (to another member).

Example:
    mltag duplicates --index runs/index --out runs/duplicates.parquet --threshold 0.95
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.anomalies import describe_short_rows, neighbours_of_all
from mltag.index import EmbeddingIndex


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


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of size >= 2 over positions 0..n-1, largest first (pure)."""
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def run(config: DuplicatesConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    faiss_ids, neighbour_ids, neighbour_sims, stats = neighbours_of_all(index, config.k, config.batch)
    if note := describe_short_rows(stats, config.k, len(faiss_ids)):
        print(note)
    position = {int(f): i for i, f in enumerate(faiss_ids)}
    pairs, best = [], np.full(len(faiss_ids), -np.inf)
    for i, (ids, sims) in enumerate(zip(neighbour_ids, neighbour_sims)):
        for j, s in zip(ids, sims):
            if s >= config.threshold:
                pairs.append((i, position[int(j)]))
                best[i] = max(best[i], s)
    groups = duplicate_groups(len(faiss_ids), pairs)
    listing, uri = index.ids.column("listing_id").to_pylist(), index.ids.column("image_uri").to_pylist()
    rows = [{"group_id": g, "listing_id": listing[i], "image_uri": uri[i], "group_size": len(members),
             "max_similarity": float(best[i])} for g, members in enumerate(groups) for i in members]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("group_id", pa.int64()), ("listing_id", pa.string()),
                                                          ("image_uri", pa.string()), ("group_size", pa.int64()),
                                                          ("max_similarity", pa.float64())]))
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    pq.write_table(table, config.out)
    print(f"{len(groups)} duplicate group(s), {table.num_rows} listings, similarity >= {config.threshold} -> {config.out}")
    for g, members in enumerate(groups[:5]):
        print(f"  group {g}: {', '.join(listing[i] for i in members[:8])}{' ...' if len(members) > 8 else ''}")
    return table

"""The embedding index: FAISS over L2-normalised tag-table embeddings, searched by inner product
(= cosine similarity), with the listing-id mapping beside it, and its versioned directory.

An index directory holds versions and a pointer to the current one:
  ``CURRENT``            the name of the current version (replaced atomically: a reader, or a
                         crash at any moment, sees the previous complete version or the new one)
  ``v000007/index.faiss`` the FAISS index; it maps vectors to 64-bit ids (IVF indexes themselves,
                         others through an IDMap2), so listings can be removed and re-added by id
  ``v000007/ids.parquet`` faiss_id -> listing_id, image_uri, tags
  ``v000007/index.json``  model version, the tag table and table version it reflects, dimension,
                         metric, factory string, count
  ``v000007/provenance.json``  the resolved config of the build or update that wrote the version,
                         its hash, the model and table versions (``config.provenance``)
A new version is written whole into ``.staging-*`` and renamed into place before ``CURRENT``
moves; the previous version is kept for readers that opened it.

The stages that write and read it: ``mltag.stages.index_build`` (``mltag index``), ``mltag.stages.index_update``
(``mltag index-update``), ``mltag.stages.index_search`` (``mltag search``).

Example:
    >>> index = EmbeddingIndex.load("demo_out/index")  # doctest: +SKIP
    >>> index.search_listing("L000123", k=5)           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from bisect import bisect_left

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag.config import PROVENANCE_FILE
from mltag.table import tag_table

INDEX_FILE, IDS_FILE, META_FILE, POINTER_FILE = "index.faiss", "ids.parquet", "index.json", "CURRENT"
VERSIONS_KEPT = 2  # the current version and the one before it (a reader may still have it open)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def embedding_batches(dataset, batch_rows: int, filter=None):
    """A tag table's rows as the index holds them, a batch at a time: (error rows skipped, table of
    listing_id/image_uri/tags, their normalised vectors or None for a batch of error rows only)."""
    for batch in dataset.scanner(
        columns=["listing_id", "image_uri", "tags", "embedding", "error"], batch_size=batch_rows, filter=filter
    ).to_batches():
        table = pa.Table.from_batches([batch])
        ok = table.filter(pc.is_null(table.column("error")))
        yield (
            table.num_rows - ok.num_rows,
            ok.select(["listing_id", "image_uri", "tags"]),
            l2_normalise(tag_table.embedding_matrix(ok.column("embedding"))) if ok.num_rows else None,
        )


def ivf_of(index: faiss.Index):
    """The IVF part of an index (behind any IDMap or transform); None for another kind."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


# ---- index versions: written whole, switched by one atomic rename -----------------------------------
def current_version_dir(directory: str) -> str:
    """The directory of the index's current version (what ``CURRENT`` names)."""
    pointer = os.path.join(directory, POINTER_FILE)
    if not os.path.exists(pointer):
        raise FileNotFoundError(f"no index at {directory} (missing {POINTER_FILE}); build one with `mltag index`")
    with open(pointer) as f:
        return os.path.join(directory, f.read().strip())


def _versions(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("v") and n[1:].isdigit()) if os.path.isdir(directory) else []


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)


def write_version(
    directory: str, index: faiss.Index, ids: pa.Table, meta: dict, provenance: dict | None = None, fail_after: str = ""
) -> str:
    """Writes a complete new version (index, id map, provenance, metadata) into a staging directory,
    renames it into place, then points ``CURRENT`` at it (temporary file + rename). A crash at any
    step leaves ``CURRENT`` on the previous complete version. ``provenance`` (``config.provenance``:
    the config that made this version, its hash, the model and table versions) is written inside
    the version, so it can never describe another one. ``fail_after`` names a step to crash after
    (fault tests only). Returns the new version's directory."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # a crashed writer's leftovers
        if name.startswith(".staging-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    staging = os.path.join(directory, f".staging-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    steps = [
        (INDEX_FILE, lambda p: faiss.write_index(index, p)),
        (IDS_FILE, lambda p: pq.write_table(ids, p)),
        *([(PROVENANCE_FILE, lambda p: _write_json(p, provenance))] if provenance is not None else []),
        (META_FILE, lambda p: _write_json(p, meta)),
    ]
    for name, write in steps:
        write(os.path.join(staging, name))
        if fail_after == name:
            raise RuntimeError(f"injected failure after writing {name}")
    versions = _versions(directory)
    name = f"v{(int(versions[-1][1:]) + 1 if versions else 1):06d}"
    final = os.path.join(directory, name)
    os.rename(staging, final)
    if fail_after == "rename":
        raise RuntimeError("injected failure after renaming the new version into place")
    tmp = os.path.join(directory, f".{POINTER_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, POINTER_FILE))
    for old in _versions(directory)[:-VERSIONS_KEPT]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


class EmbeddingIndex:
    """A loaded index with listing-id lookups. ``search_*`` return a pyarrow table of neighbours.

    The id map stays Arrow and numpy, a few bytes a row whatever the catalog's size: ``ids`` sorted
    by faiss id (a FAISS id maps to its row by binary search), and the rows' order by listing id
    (a listing maps to its rows by binary search, a batch of listings by one vectorised scan)."""

    def __init__(self, index: faiss.Index, ids: pa.Table, meta: dict):
        ids = ids.combine_chunks()
        faiss_ids = ids.column("faiss_id").to_numpy()
        if len(faiss_ids) > 1 and not (np.diff(faiss_ids) > 0).all():
            ids = ids.take(pa.array(np.argsort(faiss_ids, kind="stable"))).combine_chunks()
            faiss_ids = ids.column("faiss_id").to_numpy()
        self.index, self.ids, self.meta = index, ids, meta
        self.version_dir: str | None = None  # the version directory it was loaded from (recorded by what reads it)
        self._faiss_ids = faiss_ids.astype(np.int64, copy=False)  # sorted; a view of the Arrow column where it can be
        column = ids.column("listing_id")
        listings = self._listings = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        # Rows by listing id (a stable sort: a listing's rows stay in faiss-id order); nulls sort last, never looked up.
        order = pc.sort_indices(listings).to_numpy()
        self._by_listing = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        self._n_listed = len(listings) - listings.null_count

    @classmethod
    def load(cls, directory: str, mmap: bool = False) -> EmbeddingIndex:
        """The current version of the index at ``directory`` (a version directory also works)."""
        if not os.path.exists(os.path.join(directory, META_FILE)):
            directory = current_version_dir(directory)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(os.path.join(directory, INDEX_FILE), flags)
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
        loaded = cls(index, pq.read_table(os.path.join(directory, IDS_FILE)), meta)
        if meta.get("nprobe"):
            loaded.set_search_parameter("nprobe", meta["nprobe"])
        loaded.version_dir = os.path.abspath(directory)
        return loaded

    def provenance_inputs(self) -> dict:
        """What an output made from this index records about it (``config.provenance``'s
        ``model_version``, ``tag_table``, ``table_version`` and ``inputs``)."""
        return {
            "model_version": self.meta.get("model_version"),
            "tag_table": self.meta.get("tag_table"),
            "table_version": self.meta.get("table_version"),
            "inputs": {"index_version": self.version_dir, "index_config_hash": self.meta.get("config_hash")},
        }

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_search_parameter(self, name: str, value: float) -> None:
        """Sets a FAISS search-time knob (e.g. ``nprobe``) through any IDMap wrapper."""
        faiss.ParameterSpace().set_index_parameter(self.index, name, value)

    def rows_of_faiss_ids(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` holding these FAISS ids (any shape); -1 for an id not in the map (faiss's
        missing-neighbour placeholder -1 included)."""
        faiss_ids = np.asarray(faiss_ids, np.int64)
        rows = np.searchsorted(self._faiss_ids, faiss_ids)
        rows = np.minimum(rows, max(len(self._faiss_ids) - 1, 0))
        found = (self._faiss_ids[rows] == faiss_ids) if len(self._faiss_ids) else np.zeros(faiss_ids.shape, bool)
        return np.where(found, rows, -1)

    def _row_of_listing(self, listing_id: str) -> int:
        """The listing's first row (its first image), by binary search; -1 where it is not in the index."""
        listings, order = self._listings, self._by_listing
        at = bisect_left(range(self._n_listed), listing_id, key=lambda i: listings[int(order[i])].as_py())
        if at < self._n_listed and listings[int(order[at])].as_py() == listing_id:
            return int(order[at])
        return -1

    def _rows_of_listings(self, listing_ids: list[str]) -> np.ndarray:
        """Each listing's first row, -1 for one not in the index: one vectorised scan of the listing
        column against the (small) set of queries, not a lookup table of every listing."""
        queries = pa.array(listing_ids, pa.string())
        if len(queries) == 0 or not len(self._listings):
            return np.full(len(queries), -1, np.int64)
        hit_rows = np.flatnonzero(pc.is_in(self._listings, value_set=queries).to_numpy(zero_copy_only=False))
        # index_in gives the first occurrence: the smallest row, the listing's first image.
        at = pc.index_in(queries, value_set=self._listings.take(pa.array(hit_rows, pa.int64())))
        at = pc.fill_null(at, -1).to_numpy()
        return np.where(at >= 0, hit_rows[np.maximum(at, 0)] if len(hit_rows) else -1, -1).astype(np.int64)

    def vectors_of_faiss_ids(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Normalised vectors read back from the index for these FAISS ids, in one batch call where
        the index type has one."""
        faiss_ids = np.ascontiguousarray(faiss_ids, np.int64)
        if not len(faiss_ids):
            return np.zeros((0, self.index.d), np.float32)
        try:
            return self.index.reconstruct_batch(faiss_ids)
        except (RuntimeError, AttributeError):
            return np.stack([self.index.reconstruct(int(i)) for i in faiss_ids])

    def image_uri_of(self, listing_id: str) -> str | None:
        """The URI of the listing's (first) image; None for a listing not in the index."""
        row = self._row_of_listing(listing_id)
        return None if row < 0 else self.ids.column("image_uri")[row].as_py()

    def tags_of(self, listing_id: str) -> list[str] | None:
        """The listing's (first image's) tags as the index recorded them; None when not in the index."""
        row = self._row_of_listing(listing_id)
        return None if row < 0 else (self.ids.column("tags")[row].as_py() or [])

    def vector_of(self, listing_id: str) -> np.ndarray:
        """The listing's (first image's) normalised embedding, read back from the index."""
        row = self._row_of_listing(listing_id)
        if row < 0:
            raise KeyError(f"listing {listing_id!r} is not in the index")
        return self.index.reconstruct(int(self._faiss_ids[row])).reshape(1, -1)

    def _search_flat(self, queries: np.ndarray, k: int) -> tuple[pa.Table, np.ndarray]:
        """All queries' neighbours as one table (listing_id, image_uri, tags, similarity, rank), query
        by query, and how many rows each query has: faiss's placeholders (id -1) dropped, the rows
        taken from ``ids`` in one call."""
        scores, faiss_ids = self.index.search(l2_normalise(queries), k)
        rows = self.rows_of_faiss_ids(faiss_ids)
        keep = rows >= 0
        table = self.ids.take(pa.array(rows[keep], pa.int64())).drop_columns(["faiss_id"])
        table = table.append_column("similarity", pa.array(scores[keep], pa.float32()))
        rank = np.cumsum(keep, axis=1, dtype=np.int32)[keep]
        return table.append_column("rank", pa.array(rank, pa.int32())), keep.sum(axis=1)

    def search_vectors(self, queries: np.ndarray, k: int) -> list[pa.Table]:
        table, counts = self._search_flat(queries, k)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return [table.slice(int(offsets[i]), int(counts[i])) for i in range(len(counts))]

    def search_listing(self, listing_id: str, k: int = 5) -> pa.Table:
        """Top-k listings most similar to a listing in the index (itself first, similarity 1)."""
        return self.search_vectors(self.vector_of(listing_id), k)[0]

    def search_listings(self, listing_ids: list[str], k: int = 5) -> pa.Table:
        """Top-k for many listings in one batched search; ids not in the index are skipped.
        Returns query_listing_id, rank, listing_id, similarity, image_uri, tags."""
        rows = self._rows_of_listings(listing_ids)
        present = np.flatnonzero(rows >= 0)
        if not len(present):
            return pa.table({"query_listing_id": pa.array([], pa.string())})
        vectors = self.vectors_of_faiss_ids(self._faiss_ids[rows[present]])
        table, counts = self._search_flat(vectors, k)
        query = pa.array(listing_ids, pa.string()).take(pa.array(np.repeat(present, counts), pa.int64()))
        table = table.append_column("query_listing_id", query)
        return table.select(["query_listing_id", "rank", "listing_id", "similarity", "image_uri", "tags"])

"""``mltag index``: build a FAISS similarity index from a committed tag table.

The table's embeddings (error rows skipped) are streamed into an index chosen for their count and
the memory budget (``mltag.search.index_selection``); a trainable index (IVF, PQ) first learns from a
uniform sample of the whole table (``mltag.search.index_training``), and ``nprobe`` is tuned against
exact search (``mltag.search.index_tuning``). The result is a new version of the index directory
(``mltag.search.embedding_index``).

Example:
    mltag index --tag-table runs/tag_table --out runs/index [--as-of 2026-11-20]
    >>> run(IndexConfig(tag_table="demo_out/tag_table", out="demo_out/index"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.config import config_hash, provenance
from mltag.search.embedding_index import embedding_batches, write_version
from mltag.search.index_selection import IndexChoice, choose_index, parse_bytes
from mltag.search.index_training import (
    enable_reconstruct,
    factory_label,
    factory_nlist,
    new_index,
    train_index,
    train_sample_size,
    uniform_sample_positions,
)
from mltag.search.index_tuning import exact_neighbours, tune_nprobe
from mltag.table import tag_table

logger = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """Build a FAISS similarity index from a committed tag table."""

    tag_table: str = ""  # the Delta tag table
    as_of: str = ""  # table version number or date (2026-11-20) to index; empty: the latest
    out: str = "runs/index"  # index directory (local)
    factory: str = "auto"  # auto (chosen from N and the memory budget) or a FAISS factory string, e.g. IVF4096,PQ64
    max_index_memory: str = "4GiB"  # memory budget for the index (auto selection)
    target_recall: float = 0.95  # nprobe is raised until recall@10 on held-out queries reaches this
    tune_queries: int = 500  # queries sampled for nprobe tuning
    batch_rows: int = 65_536  # rows streamed from Parquet per add() call
    seed: int = 0  # training sample and tuning queries

    def validate(self) -> None:
        if not self.tag_table:
            raise ValueError("tag_table is required (--tag-table DIR)")
        if not 0 < self.target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")


def _rows_in_batch(positions: np.ndarray, start: int, length: int) -> np.ndarray:
    """The rows of a batch holding table positions [start, start + length) that ``positions`` (sorted) names."""
    lo, hi = np.searchsorted(positions, [start, start + length])
    return positions[lo:hi] - start


def run(config: IndexConfig) -> dict:
    """Streams the committed tag table's embeddings (error rows skipped) into a FAISS index
    chosen for its size, tunes nprobe, and saves index + id map + metadata. A trainable index
    (IVF, PQ) is trained on a uniform sample of the whole table, read by a first streamed pass;
    the pass that adds the vectors follows (a Flat index takes that one pass only)."""
    source = tag_table.open_dataset(config.tag_table, config.as_of or None)
    table_meta = tag_table.run_metadata(config.tag_table, config.as_of or None)
    dim = int(table_meta["embedding_dim"])
    n_expected = source.count_rows(filter=pc.field("error").is_null())
    budget = parse_bytes(config.max_index_memory)
    if config.factory == "auto":
        choice = choose_index(n_expected, dim, budget)
    else:
        choice = IndexChoice(config.factory, "given by --factory", 0.0, factory_nlist(config.factory), "IVF" in config.factory)
    index = new_index(dim, choice.factory)
    started = time.time()

    train_sample = None
    if not index.is_trained:
        # First streamed pass: a uniform sample of every embedding row, not the first rows in file
        # order (those follow however the table was written: one category, one night, one shard).
        positions = uniform_sample_positions(n_expected, train_sample_size(n_expected, dim, choice.nlist, budget), (config.seed, 0))
        sample, taken = np.empty((len(positions), dim), np.float32), 0
        for ids, vectors in _numbered_batches(source, config.batch_rows):
            rows = _rows_in_batch(positions, int(ids[0]), len(ids))
            sample[taken : taken + len(rows)] = vectors[rows]
            taken += len(rows)
        if taken:
            train_index(index, sample[:taken])
        train_sample = taken
        del sample

    # Tuning queries: a uniform sample too, read while adding.
    query_positions = uniform_sample_positions(n_expected, config.tune_queries, (config.seed, 1)) if choice.nlist else np.zeros(0, np.int64)
    queries, n_queries = np.empty((len(query_positions), dim), np.float32), 0
    next_id, skipped = 0, 0
    id_tables: list[pa.Table] = []
    for skipped_here, ok, vectors in embedding_batches(source, config.batch_rows):
        skipped += skipped_here
        if vectors is None:
            continue
        ids = np.arange(next_id, next_id + ok.num_rows, dtype=np.int64)
        rows = _rows_in_batch(query_positions, next_id, len(ids))
        queries[n_queries : n_queries + len(rows)] = vectors[rows]
        n_queries += len(rows)
        next_id += ok.num_rows
        id_tables.append(ok.append_column("faiss_id", pa.array(ids, pa.int64())))
        index.add_with_ids(vectors, ids)
    enable_reconstruct(index)
    if next_id == 0:
        raise ValueError(f"{config.tag_table} has no embeddings to index (every row is an error row)")

    nprobe, recall = None, None
    if choice.nlist and n_queries:
        queries = queries[:n_queries]
        k = min(10, next_id)
        truth = exact_neighbours(queries, _numbered_batches(source, config.batch_rows), k)  # a further streamed pass
        nprobe, recall = tune_nprobe(index, queries, truth, choice.nlist, config.target_recall, k)

    id_map = pa.concat_tables(id_tables)
    meta = {
        "model_version": table_meta["model_version"],
        "model": table_meta.get("model"),
        "tag_table": table_meta["table"],
        "table_version": table_meta["table_version"],
        "tag_table_run_id": table_meta.get("run_id"),
        "config_hash": config_hash(config),
        "dim": dim,
        "metric": "inner_product_on_l2_normalised",
        "factory": factory_label(index, choice.factory),
        "reason": choice.reason,
        "nprobe": nprobe,
        "tuned_recall_at_10": recall,
        "train_sample": train_sample,
        "count": int(index.ntotal),
        "next_id": int(next_id),
        "skipped_error_rows": skipped,
        "build_seconds": round(time.time() - started, 3),
    }
    record = provenance(config, model_version=meta["model_version"], tag_table=meta["tag_table"], table_version=meta["table_version"])
    version_dir = write_version(config.out, index, id_map.select(["faiss_id", "listing_id", "image_uri", "tags"]), meta, record)
    logger.info(
        "index: %d vectors (%d error rows skipped), %s, dim %d, table version %s -> %s",
        meta["count"],
        skipped,
        meta["factory"],
        dim,
        meta["table_version"],
        version_dir,
    )
    logger.info(
        "why: %s%s%s",
        choice.reason,
        f"; trained on a uniform sample of {train_sample} vectors" if train_sample else "",
        f"; nprobe {nprobe} gives recall@10 {recall:.3f}" if nprobe else "",
    )
    return meta


def _numbered_batches(source, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(FAISS ids, vectors) of the embedding rows in read order, numbered as the build numbers them."""
    next_id = 0
    for _, _, vectors in embedding_batches(source, batch_rows):
        if vectors is None:
            continue
        yield np.arange(next_id, next_id + len(vectors), dtype=np.int64), vectors
        next_id += len(vectors)

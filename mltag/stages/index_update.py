"""``mltag index-update``: bring an index to a newer version of its tag table, or remove listings,
without a rebuild.

Exactly the rows that changed between the table version the index reflects and the target are
applied, read from the table's change feed (Delta CDF): new and updated rows are (re-)added by
FAISS id, deleted rows and rows turned into error rows removed. The result is a new version of
the index directory (``mltag.search.embedding_index``); a table tagged by another model is refused.

Example:
    mltag index-update --index runs/index                       # to the table's latest version
    mltag index-update --index runs/index --remove-ids L1,L2    # or remove listings by hand
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.config import config_hash, provenance
from mltag.search.embedding_index import EmbeddingIndex, embedding_batches, write_version
from mltag.table import delta_table

logger = logging.getLogger(__name__)


@dataclass
class IndexUpdateConfig:
    """Bring an index to a newer version of its tag table, or remove listings, without a rebuild."""

    index: str = "runs/index"  # index directory to update
    tag_table: str = ""  # the tag table it follows; empty: the one the index records
    as_of: str = ""  # table version number or date to bring the index to; empty: the latest
    remove_ids: list[str] = field(default_factory=list)  # listing ids to remove (comma-separated on the command line)
    remove_ids_file: str = ""  # text file of listing ids to remove, one a line
    batch_rows: int = 65_536  # rows streamed per add() call


CHANGE_RANK = {"delete": 0, "update_preimage": 0, "insert": 1, "update_postimage": 1}


def net_changes(changes: pa.Table) -> tuple[pa.Table, pa.Table]:
    """From change-feed rows (listing_id, image_uri, _change_type, _commit_version) over several
    versions, the net effect per key: (keys whose last change wrote a row, keys whose last change
    deleted it). Within one version a written row wins over a removed one (an overwrite removes the
    old file and adds the new one)."""
    keys = ["listing_id", "image_uri"]
    changes = pa.table(
        {k: changes.column(k).cast(pa.string()) for k in keys + ["_change_type"]}
        | {"_commit_version": changes.column("_commit_version").cast(pa.int64())}
    )
    rank = pa.array([CHANGE_RANK[c] for c in changes.column("_change_type").to_pylist()], pa.int64())
    order = pc.add(pc.multiply(changes.column("_commit_version").cast(pa.int64()), 2), rank)
    keyed = changes.select(keys).append_column("_order", order).append_column("_rank", rank)
    last = keyed.group_by(keys, use_threads=False).aggregate([("_order", "max")]).rename_columns(keys + ["_order"])
    final = last.join(keyed, keys=keys + ["_order"], right_keys=keys + ["_order"], join_type="inner", use_threads=False)
    written = final.filter(pc.equal(final.column("_rank"), 1)).select(keys)
    removed = final.filter(pc.equal(final.column("_rank"), 0)).select(keys)
    return written, removed


def _faiss_ids_of_keys(ids: pa.Table, keys: pa.Table) -> np.ndarray:
    if keys.num_rows == 0:
        return np.zeros(0, np.int64)
    hit = ids.select(["faiss_id", "listing_id", "image_uri"]).join(
        keys, keys=["listing_id", "image_uri"], join_type="inner", use_threads=False
    )
    return np.sort(hit.column("faiss_id").to_numpy()).astype(np.int64)


def run(config: IndexUpdateConfig) -> dict:
    """Applies exactly the rows that changed between the table version the index reflects and the
    target version (read from the table's change feed): new and updated rows are (re-)added, rows
    deleted or turned into error rows are removed. Listings named in ``remove_ids`` or
    ``remove_ids_file`` go too. Writes a
    new index version; refuses a table tagged by another model than the index's."""
    index = EmbeddingIndex.load(config.index)
    meta = dict(index.meta)
    uri = config.tag_table or meta.get("tag_table")
    if not uri:
        raise ValueError("give --tag-table: the index does not record which table it was built from")
    dt = delta_table.open_table(uri, config.as_of or None)
    target = dt.version()
    table_meta = delta_table.commit_metadata(dt)
    if table_meta.get("model_version") != meta["model_version"]:
        raise ValueError(
            f"{uri} version {target} was tagged by model {table_meta.get('model_version')}, the index holds embeddings "
            f"of model {meta['model_version']}: rebuild it with `mltag index`"
        )
    start = int(meta.get("table_version", -1)) + 1
    written = removed = pa.table({"listing_id": pa.array([], pa.string()), "image_uri": pa.array([], pa.string())})
    if start <= target:
        changes = pa.table(
            dt.load_cdf(
                starting_version=start, ending_version=target, columns=["listing_id", "image_uri", "_change_type", "_commit_version"]
            ).read_all()
        )
        written, removed = net_changes(changes)
    remove = list(config.remove_ids)
    if config.remove_ids_file:
        with open(config.remove_ids_file) as f:
            remove += [line.strip() for line in f if line.strip()]
    doomed = np.union1d(
        _faiss_ids_of_keys(index.ids, pa.concat_tables([written, removed])),
        index.ids.filter(pc.is_in(index.ids.column("listing_id"), pa.array(remove, pa.string())))
        .column("faiss_id")
        .to_numpy()
        .astype(np.int64)
        if remove
        else np.zeros(0, np.int64),
    )
    if len(doomed):
        # An explicit array selector: the only kind an IVF hash-table direct map accepts.
        try:
            index.index.remove_ids(faiss.IDSelectorArray(len(doomed), faiss.swig_ptr(doomed)))
        except RuntimeError as exc:  # faiss has no removal for some types (a refine stage)
            raise ValueError(
                f"{meta['factory']} cannot remove or replace vectors ({len(doomed)} needed): "
                f"rebuild it with `mltag index`, or choose a factory without a refine stage"
            ) from exc
    ids = index.ids.filter(pc.invert(pc.is_in(index.ids.column("faiss_id"), pa.array(doomed, pa.int64()))))
    next_id = int(meta.get("next_id", int(index.ids.column("faiss_id").to_numpy().max(initial=-1)) + 1))
    new_tables = []
    if written.num_rows:
        # The written rows' embeddings, streamed from the target version (error rows skipped: they leave the index).
        wanted = pc.is_in(
            pc.binary_join_element_wise(pc.field("listing_id"), pc.field("image_uri"), "\x1f"),
            value_set=pc.binary_join_element_wise(written.column("listing_id"), written.column("image_uri"), "\x1f"),
        )
        for _, ok, vectors in embedding_batches(dt.to_pyarrow_dataset(), config.batch_rows, filter=wanted):
            if vectors is None:
                continue
            faiss_ids = np.arange(next_id, next_id + ok.num_rows, dtype=np.int64)
            next_id += ok.num_rows
            index.index.add_with_ids(vectors, faiss_ids)
            new_tables.append(ok.append_column("faiss_id", pa.array(faiss_ids, pa.int64())).select(ids.column_names))
    ids = pa.concat_tables([ids, *new_tables])
    added = sum(t.num_rows for t in new_tables)
    meta.update(
        {
            "count": int(index.index.ntotal),
            "next_id": next_id,
            "table_version": target,
            "tag_table": delta_table.table_uri(uri),
            "last_update": {
                "added": added,
                "removed": int(len(doomed)),
                "from_table_version": start - 1,
                "to_table_version": target,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "config_hash": config_hash(config),
            },
        }
    )
    record = provenance(
        config,
        model_version=meta["model_version"],
        tag_table=meta["tag_table"],
        table_version=target,
        inputs={"from_index_version": index.version_dir, "from_table_version": start - 1},
    )
    version_dir = write_version(config.index, index.index, ids, meta, record)
    logger.info(
        "index updated to table version %s: +%d vectors, -%d vectors, now %d -> %s", target, added, len(doomed), meta["count"], version_dir
    )
    return meta

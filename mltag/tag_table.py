"""The tag table: the Parquet contract between ``mltag tag`` and everyone downstream.

One row per manifest row, always:

============== =============================== ===============================================
column         type                            meaning
============== =============================== ===============================================
listing_id     string                          from the manifest
image_uri      string                          absolute URI the image was read from
tags           list<string>                    tags whose score passed their threshold, closed
                                               upward (a child implies its parents)
scores         list<float32>                   sigmoid score per vocabulary tag, vocabulary
                                               order (null on error rows)
embedding      fixed_size_list<float32>[D]     pooled backbone features (null on error rows)
model_version  string                          content hash of the tagger that produced the row
error          string                          null, or why this image could not be tagged
true_tags      list<string>                    the manifest's own ``tags``, when it had them
...            as in the manifest              any other manifest column, carried through
============== =============================== ===============================================

A committed run directory holds ``part-*.parquet`` files and ``_SUCCESS.json`` (written last,
with run id, model version, config hash, vocabulary and counts). Readers trust only directories
that have it (``committed_files``).

Example:
    >>> files = committed_files("demo_out/tag_table")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from mltag import storage

SUCCESS_FILE = "_SUCCESS.json"
EMBEDDING_DTYPES = ("float32", "float16")
CORE_COLUMNS = ("listing_id", "image_uri", "tags", "scores", "embedding", "model_version", "error")


class UncommittedRunError(FileNotFoundError):
    """A tag-table directory without ``_SUCCESS.json``: missing, still running, or failed."""


def schema(embedding_dim: int, embedding_dtype: str = "float32") -> pa.Schema:
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    return pa.schema([
        ("listing_id", pa.string()),
        ("image_uri", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(value_type, embedding_dim)),
        ("model_version", pa.string()),
        ("error", pa.string()),
    ])


def decide_tags(scores: np.ndarray, thresholds: np.ndarray, names: Sequence[str], ancestors: dict[str, list[str]],
                max_tags: int = 0) -> list[list[str]]:
    """Tags per row whose score reaches its tag's threshold (at most ``max_tags`` of them, best
    first, when set), plus their ancestors, in vocabulary order."""
    chosen = scores >= thresholds[None, :]
    if max_tags > 0 and scores.shape[1] > max_tags:
        rank = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
        chosen &= rank < max_tags
    index = {n: i for i, n in enumerate(names)}
    for child, parents in ancestors.items():
        for parent in parents:
            chosen[:, index[parent]] |= chosen[:, index[child]]
    return [[names[j] for j in np.flatnonzero(row)] for row in chosen]


def assemble(
    batch: pa.Table,
    ok_rows: np.ndarray,
    scores: np.ndarray,
    embeddings: np.ndarray,
    tags: list[list[str]],
    model_version: str,
    errors: list[str | None],
    embedding_dtype: str = "float32",
) -> pa.Table:
    """Builds tag-table rows for a whole batch: ``ok_rows`` (indices) got model outputs, the rest
    keep their error. Manifest columns other than the core ones are carried after them."""
    n, dim = batch.num_rows, embeddings.shape[1]
    full_scores: list = [None] * n
    full_tags: list = [[] for _ in range(n)]
    emb = np.zeros((n, dim), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    for k, i in enumerate(ok_rows):
        full_scores[i] = scores[k].astype(np.float32)
        full_tags[i] = tags[k]
        emb[i] = embeddings[k]
        valid[i] = True
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    values = pa.array(emb.ravel().astype(np.float16 if embedding_dtype == "float16" else np.float32), value_type)
    embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    columns = {
        "listing_id": batch.column("listing_id").cast(pa.string()),
        "image_uri": batch.column("image_uri").cast(pa.string()),
        "tags": pa.array(full_tags, pa.list_(pa.string())),
        "scores": pa.array(full_scores, pa.list_(pa.float32())),
        "embedding": embedding,
        "model_version": pa.array([model_version] * n, pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    table = pa.table(columns, schema=schema(dim, embedding_dtype))
    for name in batch.column_names:
        if name == "pixels" or (name in CORE_COLUMNS and name != "tags"):
            continue
        out_name = "true_tags" if name == "tags" else name
        table = table.append_column(out_name, batch.column(name))
    return table


# ---- reading a committed run ----------------------------------------------------------------
def latest_committed(table_path: str) -> str:
    """The run directory to read: ``table_path`` itself when it is a committed run, else its
    newest committed ``snapshot=*`` partition (uncommitted partitions are ignored)."""
    if storage.exists(storage.join(table_path, SUCCESS_FILE)):
        return table_path
    fs, path = storage.filesystem_for(table_path)
    snapshots = sorted((p for p in (fs.ls(path, detail=False) if fs.exists(path) else []) if "snapshot=" in p.rsplit("/", 1)[-1]),
                       reverse=True)
    for snap in snapshots:
        candidate = storage.join(table_path, snap.rsplit("/", 1)[-1])
        if storage.exists(storage.join(candidate, SUCCESS_FILE)):
            return candidate
    raise UncommittedRunError(f"{table_path} holds no committed tag table (no {SUCCESS_FILE}, no committed snapshot=* partition)")


def read_success(table_dir: str) -> dict:
    marker = storage.join(table_dir, SUCCESS_FILE)
    try:
        return json.loads(storage.read_bytes(marker))
    except FileNotFoundError as exc:
        raise UncommittedRunError(
            f"{table_dir} is not a committed tag table (no {SUCCESS_FILE}): the run is missing, still running or failed"
        ) from exc


def committed_files(table_dir: str) -> list[str]:
    """The Parquet files listed by a committed run's ``_SUCCESS.json`` (never stray files)."""
    success = read_success(table_dir)
    return [storage.join(table_dir, f) for f in success["files"]]


def open_dataset(table_dir: str) -> pads.Dataset:
    """A pyarrow dataset over a committed run (for streaming scans)."""
    files = committed_files(table_dir)
    fs, _ = storage.arrow_filesystem_for(table_dir)
    paths = [storage.arrow_filesystem_for(f)[1] for f in files]
    return pads.dataset(paths, format="parquet", filesystem=fs)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[D] (no nulls) -> (N, D) float32 without per-row copies."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = array.type.list_size
    return np.asarray(array.flatten(), dtype=np.float32).reshape(len(array), dim)

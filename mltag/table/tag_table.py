"""The tag table: the row contract between ``mltag tag`` and everyone downstream.

One row per (listing_id, image_uri) of the manifest, always:

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
error_reason   string                          null, or the error's reason code
                                               (``mltag.table.row_errors``: transient or permanent)
true_tags      list<string>                    the manifest's own ``tags``, when it had them
fingerprint    string                          (nightly re-index) the image's content fingerprint
...            as in the manifest              any other manifest column, carried through
<head>_scores  list<float32>                   (``mltag apply-head``) a head's scores, its tags'
<head>_tags    list<string>                    order; its decided tags; the head version that
<head>_head    string                          wrote them (``mltag.tagger.heads``; null on error rows)
============== =============================== ===============================================

The rows live in a Delta Lake table (``mltag.table.delta_table``): every run is one commit, and readers
open a version of it, never a directory of Parquet files.

Example:
    >>> rows = read_rows("demo_out/tag_table", columns=["listing_id", "tags"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mltag.data.uri_policy import redact_uri
from mltag.data.vocabulary import Vocabulary
from mltag.table import delta_table
from mltag.table.row_errors import reason_column

# Delta Lake has no half-precision type: embeddings are stored as float32.
EMBEDDING_DTYPES = ("float32",)
CORE_COLUMNS = ("listing_id", "image_uri", "tags", "scores", "embedding", "model_version", "error", "error_reason")


def schema(embedding_dim: int, embedding_dtype: str = "float32") -> pa.Schema:
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("listing_id", pa.string()),
            ("image_uri", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
            ("embedding", pa.list_(value_type, embedding_dim)),
            ("model_version", pa.string()),
            ("error", pa.string()),
            ("error_reason", pa.string()),
        ]
    )


def redact_uri_column(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Image URIs as the table stores them: presigned query strings and credentials removed. Only
    the URIs that carry a query or a user part go through Python; the rest pass as they are."""
    uris = pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris
    uris = uris.cast(pa.string()).combine_chunks()
    suspect = pc.fill_null(pc.match_substring_regex(uris, r"[?#@]"), False)
    positions = np.flatnonzero(suspect.to_numpy(zero_copy_only=False))
    if positions.size == 0:
        return uris
    values = uris.to_pylist()
    for i in positions:
        values[i] = redact_uri(values[i])
    return pa.array(values, pa.string())


def chosen_tags(scores: np.ndarray, thresholds: np.ndarray, vocab: Vocabulary, max_tags: int = 0) -> np.ndarray:
    """Rows x tags mask: a score reaching its tag's threshold (at most ``max_tags`` per row, best
    first, when set), closed upward (a chosen child chooses its parents: ``Vocabulary.close_matrix``)."""
    chosen = scores >= thresholds[None, :]
    if max_tags > 0 and scores.shape[1] > max_tags:
        rank = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
        chosen &= rank < max_tags
    return vocab.close_matrix(chosen)


def decide_tags(scores: np.ndarray, thresholds: np.ndarray, vocab: Vocabulary, max_tags: int = 0) -> list[list[str]]:
    """``chosen_tags`` as tag names per row, in vocabulary order."""
    names = vocab.names
    return [[names[j] for j in np.flatnonzero(row)] for row in chosen_tags(scores, thresholds, vocab, max_tags)]


def tags_column(chosen: np.ndarray, names: Sequence[str]) -> pa.Array:
    """A rows x tags mask as a list<string> column (vocabulary order), built without a per-row loop."""
    rows, cols = np.nonzero(chosen)  # row-major: each row's tags in vocabulary order
    offsets = np.zeros(chosen.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=chosen.shape[0]), out=offsets[1:])
    values = pa.array(list(names), pa.string()).take(pa.array(cols, pa.int64()))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def assemble(
    batch: pa.Table,
    ok_rows: np.ndarray,
    scores: np.ndarray,
    embeddings: np.ndarray,
    tags: np.ndarray | list[list[str]],
    model_version: str,
    errors: list[str | None],
    embedding_dtype: str = "float32",
    names: Sequence[str] | None = None,
) -> pa.Table:
    """Builds tag-table rows for a whole batch: ``ok_rows`` (indices) got model outputs, the rest
    keep their error. ``tags`` is the ok rows' mask from ``chosen_tags`` (with ``names``) or their
    tag lists. Columns are built from whole arrays, never row by row. Manifest columns other than
    the core ones are carried after them."""
    n, dim, n_tags = batch.num_rows, embeddings.shape[1], scores.shape[1]
    ok_rows = np.asarray(ok_rows, np.int64)
    valid = np.zeros(n, dtype=bool)
    valid[ok_rows] = True
    order = np.argsort(ok_rows, kind="stable")  # output values follow row order
    emb = np.zeros((n, dim), dtype=np.float32)
    emb[ok_rows] = embeddings
    score_offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.where(valid, n_tags, 0), out=score_offsets[1:])
    score_values = pa.array(np.ascontiguousarray(scores[order], np.float32).ravel(), pa.float32())
    if isinstance(tags, np.ndarray):
        mask = np.zeros((n, tags.shape[1]), bool)
        mask[ok_rows] = tags
        tags_array = tags_column(mask, names)
    else:
        full_tags: list = [[] for _ in range(n)]
        for k, i in enumerate(ok_rows):
            full_tags[i] = tags[k]
        tags_array = pa.array(full_tags, pa.list_(pa.string()))
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    values = pa.array(emb.ravel().astype(np.float16 if embedding_dtype == "float16" else np.float32), value_type)
    embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))
    error_array = pa.array(errors, pa.string())
    columns = {
        "listing_id": batch.column("listing_id").cast(pa.string()),
        "image_uri": redact_uri_column(batch.column("image_uri")),
        "tags": tags_array,
        "scores": pa.ListArray.from_arrays(pa.array(score_offsets), score_values, mask=pa.array(~valid)),
        "embedding": embedding,
        "model_version": pa.repeat(pa.scalar(model_version, pa.string()), n),
        "error": error_array,
        "error_reason": reason_column(error_array),
    }
    table = pa.table(columns, schema=schema(dim, embedding_dtype))
    for name in batch.column_names:
        if name in ("pixels", "image_bytes") or (name in CORE_COLUMNS and name != "tags"):
            continue
        out_name = "true_tags" if name == "tags" else name
        table = table.append_column(out_name, batch.column(name))
    return table


# ---- reading the table -------------------------------------------------------------------------
def open_dataset(table_uri: str, as_of: str | int | None = None) -> pads.Dataset:
    """A pyarrow dataset over one version of the table (the latest, or ``as_of``): only the files
    that version's log names, so a run in progress or a failed one is never read."""
    return delta_table.open_table(table_uri, as_of).to_pyarrow_dataset()


def read_rows(table_uri: str, columns: list[str] | None = None, as_of: str | int | None = None) -> pa.Table:
    """One version of the table in memory (small tables, tests; stream ``open_dataset`` otherwise)."""
    return open_dataset(table_uri, as_of).to_table(columns=columns)


def run_metadata(table_uri: str, as_of: str | int | None = None) -> dict:
    """What mltag recorded about the version: run id, model version, embedding dim, counts..."""
    dt = delta_table.open_table(table_uri, as_of)
    meta = delta_table.commit_metadata(dt)
    meta["table_version"] = dt.version()
    meta["table"] = delta_table.table_uri(table_uri)
    return meta


def list_matrix(column: pa.ChunkedArray | pa.Array, dtype: np.dtype | type | None = np.float32, width: int | None = None) -> np.ndarray:
    """A list (or fixed-size list) column, every row of the same length D -> an (N, D) matrix,
    without per-row copies: ``scores``, ``embedding``, an evaluation's ``labels``. ``dtype`` None
    keeps the values' own type. Null rows are an error (error rows hold null scores and embeddings:
    filter them first), and so are null values inside a row and rows of different lengths.
    ``width`` is D where it is known (a vocabulary's length): zero rows then give (0, D), and rows
    of another length are an error; without it, zero rows give (0, 0), or (0, D) for a fixed-size list.

    Example:
        >>> list_matrix(pa.array([[1, 2], [3, 4]])).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        first = int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))
        raise ValueError(f"{array.null_count} null row(s) in a list column (the first: row {first}); filter the error rows first")
    values = array.flatten()  # the rows' values only, from the slice's own offset
    if values.null_count:
        raise ValueError(f"{values.null_count} null value(s) inside the rows of a list column")
    if width is None:
        width = array.type.list_size if pa.types.is_fixed_size_list(array.type) else (len(values) // len(array) if len(array) else 0)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(array) and (lengths.min() != width or lengths.max() != width):
        raise ValueError(f"list rows differ in length from {width}: lengths {int(lengths.min())} to {int(lengths.max())}")
    matrix = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    return matrix.reshape(len(array), width)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An embedding column without nulls -> (N, D) float32 (``list_matrix``). Delta has no
    fixed-size list type, so the column reads back as list<float>; every row has the same D."""
    return list_matrix(column, np.float32)

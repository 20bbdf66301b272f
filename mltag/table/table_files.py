"""A tag-table version's Parquet files, read directly and in parallel: one Ray task per file.

Stages that stream a column over every row (``mltag apply-head`` rewrites each file with new
columns, ``mltag train-head`` picks the embeddings of its labelled images) read the files the
version's log names, each in its own task, instead of one scan on the driver. Files written at
different times differ in their Arrow types (ours hold ``fixed_size_list`` embeddings, files
delta-rs rewrote in a MERGE hold ``string_view`` text, older files lack later columns); each
batch is conformed to the table's schema, so every consumer sees one schema.

Example:
    >>> dt = delta_table.open_table("runs/tag_table")                           # doctest: +SKIP
    >>> for batch in read_file(data_files(dt)[0], table_schema(dt)): ...      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mltag.data import storage

BATCH_ROWS = 8192  # rows per batch read from a file: a few tens of MB of 1280-d embeddings


def data_files(dt) -> list[str]:
    """The data files of the loaded version, refusing table features that make the files alone
    not the table: deletion vectors (rows hidden outside the file) and column mapping (columns
    renamed outside it). mltag never writes either; another engine may have."""
    features = set(dt.protocol().reader_features or [])
    if "deletionVectors" in features:
        raise ValueError(
            f"{dt.table_uri} uses deletion vectors (written by another engine): mltag reads its files directly "
            "and cannot apply them; rewrite the table without them (OPTIMIZE / REORG ... PURGE)"
        )
    mapping = (dt.metadata().configuration or {}).get("delta.columnMapping.mode", "none")
    if "columnMapping" in features or mapping != "none":
        raise ValueError(
            f"{dt.table_uri} uses column mapping ({mapping}): mltag reads its files directly and cannot follow renamed columns"
        )
    if dt.metadata().partition_columns:
        raise ValueError(f"{dt.table_uri} is partitioned by {dt.metadata().partition_columns}: mltag's tag tables are not")
    return list(dt.file_uris())


def _plain(type_: pa.DataType) -> pa.DataType:
    """View and large types as their plain equivalents (one type per column, whatever wrote it)."""
    if pa.types.is_string_view(type_) or pa.types.is_large_string(type_):
        return pa.string()
    if pa.types.is_binary_view(type_) or pa.types.is_large_binary(type_):
        return pa.binary()
    if pa.types.is_list_view(type_) or pa.types.is_large_list(type_) or pa.types.is_large_list_view(type_):
        return pa.list_(_plain(type_.value_type))
    if pa.types.is_list(type_):
        return pa.list_(_plain(type_.value_type))
    return type_


def table_schema(dt) -> pa.Schema:
    """The loaded version's schema in plain Arrow types (Delta has no fixed-size list: the
    embedding column is ``list<float>``)."""
    schema = pa.schema(dt.schema().to_arrow())
    return pa.schema([pa.field(f.name, _plain(f.type), f.nullable) for f in schema])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order and types; columns a file lacks
    (written before the column existed) are null, as Delta reads them."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def read_file(uri: str, schema: pa.Schema, filter=None, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Streams one data file in batches conformed to ``schema`` (its columns only, so a
    narrow schema reads only those columns); ``filter`` is a pyarrow expression over them."""
    fs, path = storage.arrow_filesystem_for(uri)
    parquet = pq.ParquetFile(path, filesystem=fs)
    present = [name for name in schema.names if name in parquet.schema_arrow.names]
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
        table = conform(pa.Table.from_batches([batch]), schema)
        if filter is not None:
            table = table.filter(filter)
        if table.num_rows:
            yield table


def file_dataset(files: list[str]):
    """A Ray Dataset of ``{"file_index", "path"}``, one block per file, so that a map over it
    runs one task per file."""
    import ray.data

    items = [{"file_index": i, "path": path} for i, path in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))

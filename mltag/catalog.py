"""The catalog manifest: the input contract of every stage.

A manifest is Parquet or CSV (local or ``s3://``) with
  - ``listing_id`` (string, required)
  - ``image_uri``  (string, required): a local path or URI; relative paths resolve against the
    manifest's own directory
  - ``tags``       (labelled data only): list<string> in Parquet, ``|``-separated in CSV
  - ``split``      (optional): train / val / test
Any other column is carried through to the outputs untouched. Problems with the manifest itself
(missing file, missing column, no rows) are errors raised before any work starts.

Example:
    >>> table = read_manifest("catalog/manifest.csv", require_tags=True)  # doctest: +SKIP
    >>> table.column_names[:3]                                            # doctest: +SKIP
    ['listing_id', 'image_uri', 'tags']
"""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mltag import storage

REQUIRED_COLUMNS = ("listing_id", "image_uri")
TAG_SEPARATOR = "|"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest cannot be used as it is (the job stops before any work)."""


def _read_table(uri: str) -> pa.Table:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest not found: {uri}") from exc
    lowered = uri.lower()
    if lowered.endswith((".parquet", ".pq")):
        return pq.read_table(io.BytesIO(data))
    if lowered.endswith((".csv", ".csv.gz", ".tsv")):
        # Every column is read as text: listing ids such as 000123 must not become integers.
        parse = pacsv.ParseOptions(delimiter="\t" if lowered.endswith(".tsv") else ",")
        names = pacsv.open_csv(io.BytesIO(data), parse_options=parse).schema.names
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    raise ManifestError(f"manifest {uri}: unsupported format (use .parquet or .csv)")


def _tags_as_lists(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.cast(pa.list_(pa.string()))
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # "" means "no tags" (an unlabelled negative), not one empty tag.
        lists = [
            [t.strip() for t in v.split(TAG_SEPARATOR) if t.strip()] if v is not None else None
            for v in column.to_pylist()
        ]
        return pa.chunked_array([pa.array(lists, type=pa.list_(pa.string()))])
    raise ManifestError(f"column 'tags' must be list<string> or '|'-separated text, got {column.type}")


MANIFEST_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")


def manifest_files(uri: str) -> list[str]:
    """A manifest may be one file, a directory of files, or a glob (``s3://b/day=*/part-*.parquet``)."""
    fs, path = storage.filesystem_for(uri)
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        found = sorted(p for p in fs.find(path) if not os.path.basename(p).startswith(("_", ".")))
    else:
        return [uri]
    prefix = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    files = [prefix + p if prefix and not p.startswith(prefix) else p for p in found if p.lower().endswith(MANIFEST_SUFFIXES)]
    if not files:
        raise ManifestError(f"no manifest files (.parquet/.csv) at {uri}")
    return files


def read_manifest(uri: str, require_tags: bool = False) -> pa.Table:
    """Reads and validates a manifest (one file, a directory or a glob of files); returns it with
    absolute image URIs and list<string> tags."""
    files = manifest_files(uri)
    if len(files) > 1:
        tables = [read_manifest(f, require_tags) for f in files]
        return pa.concat_tables(tables, promote_options="default")
    uri = files[0]
    table = _read_table(uri)
    missing = [c for c in REQUIRED_COLUMNS + (("tags",) if require_tags else ()) if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {uri} lacks required column(s) {missing}; it has {table.column_names}"
        )
    if table.num_rows == 0:
        raise ManifestError(f"manifest {uri} has no rows")
    for name in REQUIRED_COLUMNS:
        column = table.column(name).cast(pa.string())
        nulls = column.null_count + (pc.sum(pc.equal(column, "")).as_py() or 0)
        if nulls:
            raise ManifestError(f"manifest {uri}: {nulls} row(s) have an empty '{name}'")
        table = table.set_column(table.schema.get_field_index(name), name, column)

    base = storage.parent_dir(uri)
    uris = [storage.resolve_relative(u, base) for u in table.column("image_uri").to_pylist()]
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string()))
    if "tags" in table.column_names:
        table = table.set_column(table.schema.get_field_index("tags"), "tags", _tags_as_lists(table.column("tags")))
    if "split" in table.column_names:
        splits = set(table.column("split").cast(pa.string()).to_pylist()) - {None}
        bad = splits - set(SPLITS)
        if bad:
            raise ManifestError(f"manifest {uri}: unknown split value(s) {sorted(bad)}; use {list(SPLITS)}")
    return table


def select_split(table: pa.Table, split: str) -> pa.Table:
    """Rows of one split; a manifest with no ``split`` column is all 'train'."""
    if "split" not in table.column_names:
        return table if split == "train" else table.slice(0, 0)
    return table.filter(pc.equal(table.column("split"), split))


def chunk_table(table: pa.Table, rows_per_chunk: int) -> list[pa.Table]:
    """Splits a table into row slices, the unit of parallel work for Ray Data."""
    rows_per_chunk = max(1, rows_per_chunk)
    return [table.slice(i, rows_per_chunk) for i in range(0, table.num_rows, rows_per_chunk)]

"""The catalog manifest: the input contract of every stage.

A manifest is Parquet or CSV (local or ``s3://``) with
  - ``listing_id`` (string, required)
  - ``image_uri``  (string, required): a local path or URI; relative paths resolve against the
    manifest's own directory
  - ``tags``       (labelled data only): list<string> in Parquet, ``|``-separated in CSV
  - ``split``      (optional): train / val / test
Any other column is carried through to the outputs untouched. Problems with the manifest itself
(missing file, missing column, no rows) are errors raised before any work starts.

Two ways to read one: ``manifest_dataset`` gives a Ray Dataset read by Ray's own readers across
the cluster (the catalog never passes through the driver: what ``mltag tag`` and ``mltag
reindex`` use), checked from the files' schemas and footers first; ``read_manifest`` gives a
pyarrow table in memory (training and evaluation sets, tests). Both normalise rows with the same
``normalise_batch``: ids as text, relative URIs resolved against the file's directory
(vectorised), ``tags`` as list<string>.

Example:
    >>> table = read_manifest("catalog/manifest.csv", require_tags=True)  # doctest: +SKIP
    >>> table.column_names[:3]                                            # doctest: +SKIP
    ['listing_id', 'image_uri', 'tags']
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mltag.data import storage
from mltag.errors import InputError

REQUIRED_COLUMNS = ("listing_id", "image_uri")
TAG_SEPARATOR = "|"
SPLITS = ("train", "val", "test")


class ManifestError(InputError, ValueError):
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


def _tags_as_lists(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """list<string> tags; ``a|b|c`` text is split, trimmed and "" dropped ("" means "no tags": an
    unlabelled negative, not one empty tag), vectorised with Arrow compute."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.cast(pa.list_(pa.string()))
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ManifestError(f"column 'tags' must be list<string> or '|'-separated text, got {column.type}")
    text = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lists = pc.split_pattern(text.cast(pa.string()), TAG_SEPARATOR)
    values = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = pc.not_equal(values, "")
    parents = pc.list_parent_indices(lists).filter(keep).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=len(lists)))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(keep), mask=pc.is_null(lists))


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
    """Reads and validates a manifest (one file, a directory or a glob of files) into memory;
    returns it with absolute image URIs and list<string> tags. For catalogs use
    ``manifest_dataset``, which never collects the rows on the driver."""
    files = manifest_files(uri)
    check_manifest_files(files, require_tags)
    tables = []
    for file in files:
        table = _read_table(file)
        if table.num_rows == 0:
            raise ManifestError(f"manifest {file} has no rows")
        try:
            tables.append(normalise_batch(table, base=storage.parent_dir(file)))
        except ManifestError as exc:
            raise ManifestError(str(exc).replace("manifest:", f"manifest {file}:", 1)) from None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


# ---- the streaming reader --------------------------------------------------------------------------
PATH_COLUMN = "path"  # Ray's include_paths column: the file a row came from


def _csv_options(path: str) -> dict:
    """Ray read_csv options: every column as text (ids such as 000123 keep their zeros)."""
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    fs, inner = storage.filesystem_for(path)
    with fs.open(inner, "rb") as f:
        head = f.read(1 << 20)
    parse = pacsv.ParseOptions(delimiter=delimiter)
    names = pacsv.open_csv(io.BytesIO(head), parse_options=parse).schema.names
    return {
        "parse_options": parse,
        "convert_options": pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
    }


def check_manifest_files(files: list[str], require_tags: bool = False) -> int | None:
    """Checks columns and emptiness from the files' schemas and footers (Parquet) or headers
    (CSV), reading no data; returns the row count when the footers give it (Parquet), else None."""
    rows: int | None = 0
    for uri in files:
        fs, path = storage.arrow_filesystem_for(uri)
        try:
            if uri.lower().endswith((".parquet", ".pq")):
                meta = pq.read_metadata(path, filesystem=fs)
                names, count = meta.schema.to_arrow_schema().names, meta.num_rows
            else:
                with fs.open_input_stream(path) as f:
                    head = f.read(1 << 20)
                delimiter = "\t" if uri.lower().endswith(".tsv") else ","
                reader = pacsv.open_csv(io.BytesIO(head), parse_options=pacsv.ParseOptions(delimiter=delimiter))
                names = reader.schema.names
                count = None if reader.read_next_batch().num_rows else 0
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest not found: {uri}") from exc
        except StopIteration:
            names, count = names, 0
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"manifest {uri} cannot be read: {exc}") from exc
        missing = [c for c in REQUIRED_COLUMNS + (("tags",) if require_tags else ()) if c not in names]
        if missing:
            raise ManifestError(f"manifest {uri} lacks required column(s) {missing}; it has {names}")
        if count == 0:
            raise ManifestError(f"manifest {uri} has no rows")
        rows = None if rows is None or count is None else rows + count
    return rows


def normalise_batch(batch: pa.Table, base: str | None = None) -> pa.Table:
    """One batch of manifest rows as every stage expects them: listing_id and image_uri as
    non-empty text, relative URIs resolved against the directory of the row's file (the ``path``
    column Ray adds, or ``base``), ``tags`` as list<string>, ``split`` checked. Vectorised."""
    for name in REQUIRED_COLUMNS:
        column = batch.column(name).cast(pa.string())
        empty = column.null_count + (pc.sum(pc.equal(column, "")).as_py() or 0)
        if empty:
            raise ManifestError(f"manifest: {empty} row(s) have an empty '{name}'")
        batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    uris = batch.column("image_uri")
    relative = pc.invert(pc.or_(pc.starts_with(uris, "/"), pc.match_substring(uris, "://")))
    if pc.any(relative).as_py():
        if PATH_COLUMN in batch.column_names:
            paths = batch.column(PATH_COLUMN).cast(pa.string())
            bases = pa.array([storage.parent_dir(p if "://" in p or p.startswith("/") else "/" + p) for p in pc.unique(paths).to_pylist()])
            dirs = pc.take(bases, pc.index_in(paths, value_set=pc.unique(paths)))
        else:
            dirs = pa.array([base or "."] * batch.num_rows, pa.string())
        resolved = pc.binary_join_element_wise(dirs, uris, "/")
        joined = pc.if_else(relative, resolved, uris)
        if pc.any(pc.and_(relative, pc.match_substring(uris, ".."))).as_py():  # rare: normalise those few in Python
            joined = pa.array(
                [storage.resolve_relative(u, d) if r else u for u, d, r in zip(uris.to_pylist(), dirs.to_pylist(), relative.to_pylist())],
                pa.string(),
            )
        batch = batch.set_column(batch.schema.get_field_index("image_uri"), "image_uri", joined)
    if PATH_COLUMN in batch.column_names:
        batch = batch.drop_columns([PATH_COLUMN])
    if "tags" in batch.column_names:
        batch = batch.set_column(batch.schema.get_field_index("tags"), "tags", _tags_as_lists(batch.column("tags")))
    if "split" in batch.column_names:
        bad = set(pc.unique(batch.column("split").cast(pa.string())).to_pylist()) - set(SPLITS) - {None}
        if bad:
            raise ManifestError(f"manifest: unknown split value(s) {sorted(bad)}; use {list(SPLITS)}")
    return batch


def manifest_dataset(uri: str, require_tags: bool = False):
    """The manifest as a Ray Dataset (read by Ray's readers, rows normalised in Ray tasks) and its
    row count when the file footers give it. Missing columns and empty files are found first,
    from schemas and footers: before any work."""
    import ray.data

    files = manifest_files(uri)
    rows = check_manifest_files(files, require_tags)
    fs, _ = storage.arrow_filesystem_for(files[0])
    paths = [storage.arrow_filesystem_for(f)[1] for f in files]
    if files[0].lower().endswith((".parquet", ".pq")):
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
    else:
        ds = ray.data.read_csv(paths, filesystem=fs, include_paths=True, **_csv_options(files[0]))
    prefix = files[0].split("://", 1)[0] + "://" if storage.is_remote(files[0]) else ""
    return ds.map_batches(_normalise_with_prefix, fn_kwargs={"prefix": prefix}, batch_format="pyarrow", udf_modifying_row_count=False), rows


def _normalise_with_prefix(batch: pa.Table, prefix: str) -> pa.Table:
    """Ray's ``path`` column has no scheme for remote files: put it back before resolving."""
    if prefix and PATH_COLUMN in batch.column_names:
        paths = batch.column(PATH_COLUMN).cast(pa.string())
        batch = batch.set_column(
            batch.schema.get_field_index(PATH_COLUMN),
            PATH_COLUMN,
            pc.binary_join_element_wise(pa.array([prefix[:-3]] * batch.num_rows), paths, "://"),
        )
    return normalise_batch(batch)


def select_split(table: pa.Table, split: str) -> pa.Table:
    """Rows of one split; a manifest with no ``split`` column is all 'train'."""
    if "split" not in table.column_names:
        return table if split == "train" else table.slice(0, 0)
    return table.filter(pc.equal(table.column("split"), split))


def train_val_split(table: pa.Table, val_fold: int = -1) -> tuple[pa.Table, pa.Table]:
    """The (train, val) rows a training run uses. ``val_fold`` -1: the ``split`` column's 'train'
    and 'val'. ``val_fold`` k >= 0: the rows of fold k (the ``fold`` column ``mltag split``
    writes) are val, every other fold is train; rows in no fold (-1, the test split) are in neither."""
    if val_fold < 0:
        return select_split(table, "train"), select_split(table, "val")
    if "fold" not in table.column_names:
        raise ManifestError("--val-fold needs a 'fold' column in the manifest: run `mltag split` first")
    folds = pc.fill_null(table.column("fold").cast(pa.int64()), -1)
    if not pc.any(pc.equal(folds, val_fold)).as_py():
        raise ManifestError(f"no row is in fold {val_fold}; the manifest's folds are {sorted(set(pc.unique(folds).to_pylist()) - {-1})}")
    return table.filter(pc.and_(pc.greater_equal(folds, 0), pc.not_equal(folds, val_fold))), table.filter(pc.equal(folds, val_fold))


def chunk_table(table: pa.Table, rows_per_chunk: int) -> list[pa.Table]:
    """Splits a table into row slices, the unit of parallel work for Ray Data."""
    rows_per_chunk = max(1, rows_per_chunk)
    return [table.slice(i, rows_per_chunk) for i in range(0, table.num_rows, rows_per_chunk)]

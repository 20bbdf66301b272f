"""The tag table on Delta Lake (delta-rs): open at a version, commit a run, merge a night, history.

Why Delta: a tag table is rewritten by whole runs and patched by nightly upserts, read meanwhile by
analysts and by ``mltag index``. Delta's transaction log makes each of those one atomic commit
(readers see the previous version or the new one, never part of a run), detects a second writer
(its commit fails instead of mixing rows), keeps every version for time travel, and records a
change feed from which the index applies exactly what changed. None of that is mltag's code: we
call delta-rs's transaction, merge, history and vacuum APIs.

S3: delta-rs (1.x) commits with S3 conditional writes (``If-None-Match``), which AWS S3 has
supported since 2024, so concurrent writers need no lock table. ``storage_options`` sets it
explicitly (``aws_conditional_put: etag``) and takes the endpoint from ``AWS_ENDPOINT_URL``, as
the rest of mltag does. Stores without conditional writes need ``AWS_S3_ALLOW_UNSAFE_RENAME=true``
and a single writer.

Example:
    >>> dt = open_table("demo_out/tag_table", as_of="2026-11-20")   # doctest: +SKIP
    >>> dt.to_pyarrow_dataset().count_rows()                          # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from mltag.data import storage

logger = logging.getLogger(__name__)

# Every commit mltag makes carries its facts under this key of the commit info (delta's
# ``custom_metadata``); ``userMetadata`` repeats a one-line summary for Spark's DESCRIBE HISTORY.
METADATA_KEY = "mltag"
TABLE_PROPERTIES = {
    # The index follows the table through its change feed (inserts, updates, deletes per version).
    "delta.enableChangeDataFeed": "true",
}
COMMIT_RETRIES = 3


class TableNotFoundError(FileNotFoundError):
    """No Delta table at the path (never written, or the path is wrong)."""


class TableConflictError(RuntimeError):
    """Another writer committed to the table while this run was working; nothing was committed."""


def table_uri(path: str) -> str:
    """The canonical URI delta-rs is given: absolute local paths, ``s3://bucket/prefix`` as is."""
    path = path.rstrip("/")
    if storage.is_remote(path):
        return path
    return os.path.abspath(path[len("file://") :] if path.startswith("file://") else path)


def storage_options(uri: str) -> dict[str, str] | None:
    """delta-rs options for ``uri``: the S3 endpoint mltag uses elsewhere and conditional puts."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    options = {"aws_conditional_put": "etag"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"  # an S3-compatible server on a private network
    return options


def exists(uri: str) -> bool:
    from deltalake import DeltaTable

    uri = table_uri(uri)
    return DeltaTable.is_deltatable(uri, storage_options=storage_options(uri))


def open_table(uri: str, as_of: str | int | None = None):
    """The table at its latest version, or as of a version number or a date (see ``resolve_as_of``)."""
    from deltalake import DeltaTable

    uri = table_uri(uri)
    if not exists(uri):
        raise TableNotFoundError(f"no tag table at {uri} (no Delta transaction log): write one with `mltag tag`")
    dt = DeltaTable(uri, storage_options=storage_options(uri))
    if as_of not in (None, ""):
        dt.load_as_version(resolve_as_of(dt, as_of))
    return dt


def resolve_as_of(dt, as_of: str | int) -> int:
    """A version number, or the newest version committed on or before a date (``2026-11-20``) or
    time. mltag's own commits are dated by their snapshot label (the night they describe, which
    a late or re-run job does not change); other commits by their commit time."""
    if isinstance(as_of, int) or re.fullmatch(r"\d+", str(as_of)):
        version = int(as_of)
        if version > dt.version():
            raise ValueError(f"version {version} does not exist yet: the table is at version {dt.version()}")
        return version
    text = str(as_of)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ][0-9:.+Z-]*)?", text):
        raise ValueError(f"--as-of {text!r}: give a version number or a date such as 2026-11-20")
    candidates = [entry for entry in history_entries(dt) if _as_of_key(entry) <= text or _as_of_key(entry)[: len(text)] == text]
    if not candidates:
        raise ValueError(f"the table has no version on or before {text}")
    return max(entry["version"] for entry in candidates)


def _as_of_key(entry: dict) -> str:
    label = (entry.get(METADATA_KEY) or {}).get("snapshot")
    if label:
        return str(label)
    stamp = entry.get("timestamp")
    return _dt.datetime.fromtimestamp(stamp / 1000, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") if stamp else ""


def history_entries(dt) -> list[dict[str, Any]]:
    """Commit infos, newest first, with mltag's metadata decoded under ``METADATA_KEY``."""
    entries = []
    for entry in dt.history():
        meta = entry.get(METADATA_KEY)
        if isinstance(meta, str):
            try:
                entry[METADATA_KEY] = json.loads(meta)
            except ValueError:
                entry[METADATA_KEY] = {}
        entries.append(entry)
    return entries


def commit_metadata(dt, version: int | None = None) -> dict[str, Any]:
    """mltag's metadata of the commit that made ``version`` (default: the loaded version); for a
    version made by a commit other than mltag's, the newest mltag commit before it."""
    version = dt.version() if version is None else version
    for entry in history_entries(dt):
        if entry["version"] <= version and entry.get(METADATA_KEY):
            return dict(entry[METADATA_KEY])
    return {}


def add_action(relative_path: str, size: int, rows: int):
    from deltalake.transaction import AddAction

    return AddAction(
        path=relative_path,
        size=int(size),
        partition_values={},
        modification_time=int(time.time() * 1000),
        data_change=True,
        stats=json.dumps({"numRecords": int(rows)}),
    )


def _commit_properties(metadata: dict[str, Any], app_id: str | None):
    from deltalake.transaction import CommitProperties, Transaction

    summary = metadata.get("summary") or f"mltag {metadata.get('operation', '')} run {metadata.get('run_id', '')}"
    return CommitProperties(
        custom_metadata={METADATA_KEY: metadata, "userMetadata": summary},
        app_transactions=[Transaction(app_id, 1, int(time.time() * 1000))] if app_id else None,
    )


def app_committed(uri: str, app_id: str) -> bool:
    """Whether a run recorded its application transaction ``app_id``: a run that committed and
    then crashed before cleaning up is recognised on restart and not committed twice."""
    if not exists(uri):
        return False
    return open_table(uri).transaction_version(app_id) is not None


def commit_overwrite(uri: str, actions: list, schema: pa.Schema, metadata: dict[str, Any], app_id: str | None = None) -> int:
    """Replaces the whole table by the files in ``actions`` (already written under the table) in
    one commit; creates the table on first use. A writer that committed meanwhile is overwritten
    on top, whole: never a mix of two runs. Returns the new version."""
    from deltalake import DeltaTable, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import create_table_with_add_actions

    uri = table_uri(uri)
    options = storage_options(uri)
    properties = _commit_properties(metadata, app_id)
    for attempt in range(COMMIT_RETRIES):
        try:
            if not DeltaTable.is_deltatable(uri, storage_options=options):
                create_table_with_add_actions(
                    uri,
                    Schema.from_arrow(schema),
                    actions,
                    mode="error",
                    configuration=TABLE_PROPERTIES,
                    storage_options=options,
                    commit_properties=properties,
                )
            else:
                dt = DeltaTable(uri, storage_options=options)
                dt.create_write_transaction(actions, "overwrite", schema, commit_properties=properties)
            return DeltaTable(uri, storage_options=options).version()
        except (CommitFailedError, DeltaError) as exc:
            if attempt == COMMIT_RETRIES - 1 or not _is_conflict(exc):
                raise
            logger.warning(
                f"another writer committed to {uri} meanwhile; committing this run's overwrite on top ({exc.__class__.__name__})"
            )
    raise AssertionError("unreachable")


def commit_rewrite(
    uri: str, read_version: int, actions: list, schema: pa.Schema, metadata: dict[str, Any], app_id: str | None = None
) -> int:
    """Replaces the table's content by the files in ``actions``, which were derived from version
    ``read_version`` (every row of it rewritten, e.g. with new columns; ``schema`` may add or drop
    columns). Unlike a run's overwrite, a rewrite must not land on top of a commit it did not
    read: delta-rs lets a blind overwrite through, so the table's version is checked here first
    and a newer one raises ``TableConflictError`` (nothing committed). The check and the commit
    are not one atomic step; a writer committing within that window is overwritten. Returns the
    new version."""
    from deltalake import DeltaTable

    uri = table_uri(uri)
    options = storage_options(uri)
    dt = DeltaTable(uri, storage_options=options)
    if dt.version() != read_version:
        raise TableConflictError(
            f"{uri} moved from version {read_version} to {dt.version()} while this rewrite was working; nothing was "
            f"committed. Run the same command again to rewrite the new version."
        )
    dt.create_write_transaction(actions, "overwrite", schema, commit_properties=_commit_properties(metadata, app_id))
    return DeltaTable(uri, storage_options=options).version()


def write_table(uri: str, table: pa.Table, metadata: dict[str, Any], mode: str = "overwrite") -> int:
    """Writes an in-memory table as one commit (small tables: tests, fixtures, derived tables).
    Runs of ``mltag tag`` write their files from Ray tasks and commit them with ``commit_overwrite``."""
    from deltalake import write_deltalake

    uri = table_uri(uri)
    write_deltalake(
        uri,
        table,
        mode=mode,
        storage_options=storage_options(uri),
        configuration=TABLE_PROPERTIES,
        commit_properties=_commit_properties(metadata, None),
    )
    return latest_version(uri)


def _is_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "concurrent" in text or "already exists" in text or "version" in text and "exists" in text


def merge_rows(dt, batches: Iterable[pa.RecordBatch], schema: pa.Schema, metadata: dict[str, Any], app_id: str | None = None) -> dict:
    """One MERGE commit keyed on (listing_id, image_uri): source rows whose ``_action`` is
    ``upsert`` update their row or are inserted, ``delete`` rows remove theirs; rows the source
    does not name are not touched. ``dt`` is the version the caller planned against: if another
    writer committed since, delta-rs refuses and this raises ``TableConflictError``."""
    from deltalake.exceptions import CommitFailedError

    reader = pa.RecordBatchReader.from_batches(schema, iter(batches))
    merger = dt.merge(
        reader,
        "t.listing_id = s.listing_id AND t.image_uri = s.image_uri",
        source_alias="s",
        target_alias="t",
        merge_schema=True,
        commit_properties=_commit_properties(metadata, app_id),
    )
    try:
        return (
            merger.when_matched_delete(predicate="s._action = 'delete'")
            .when_matched_update_all(predicate="s._action = 'upsert'", except_cols=["_action"])
            .when_not_matched_insert_all(predicate="s._action = 'upsert'", except_cols=["_action"])
            .execute()
        )
    except CommitFailedError as exc:
        raise TableConflictError(
            f"another writer committed to {dt.table_uri} after version {dt.version()}, which this night was planned "
            f"against; nothing was committed. Run the same command again to plan against the new version. ({exc})"
        ) from exc


def latest_version(uri: str) -> int:
    return open_table(uri).version()

"""A tagging run's commit: its id, the error gate, the metadata recorded with it, and the one Delta
commit (an overwrite for ``mltag tag``, a MERGE for ``--retry-errors`` and the nightly re-index).

A run's shards are written by ``mltag.tagging.pipeline.tag_shards``; nothing is visible to readers
until the commit here. A run id already committed (a crash between commit and clean-up) is found
by its Delta application id and not committed twice.
"""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import config_dict, config_hash
from mltag.data import catalog, storage
from mltag.runtime.cluster import on_worker
from mltag.table import delta_table, tag_table
from mltag.table.sharded_run import Plan, ShardedRun, Totals, format_reasons


class ErrorGateError(RuntimeError):
    """Too many rows failed: the run was not committed (the table is as it was)."""


def manifest_signature(uri: str) -> str:
    """Changes when any manifest file does (path, size, modification time or ETag): a rewritten
    manifest is a new run, the same one resumes."""
    parts = []
    for path in catalog.manifest_files(uri):
        fs, inner = storage.filesystem_for(path)
        info = fs.info(inner)
        parts.append([path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""), str(info.get("ETag") or "")])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def derived_run_id(prefix: str, *parts) -> str:
    return f"{prefix}-{hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]}"


def check_error_gate(run: ShardedRun, totals: Totals, max_error_rate: float) -> None:
    """Refuses to commit a run whose share of error rows is above ``max_error_rate``: its files
    and shards are removed, so the same command after the cause is fixed tags everything again."""
    if totals.error_rate <= max_error_rate:
        return
    run.remove_data_files()
    run.remove()
    raise ErrorGateError(
        f"{totals.errors} of {totals.rows} rows ({totals.error_rate:.1%}) failed, over max_error_rate {max_error_rate:.1%}: "
        f"not committed, the table is unchanged. Reasons:\n{format_reasons(totals.reasons, totals.rows)}"
    )


def commit_metadata(config, spec, run_id: str, operation: str, plan: Plan, totals: Totals, started: float, **counts) -> dict:
    return {
        "operation": operation,
        "run_id": run_id,
        "snapshot": config.snapshot or time.strftime("%Y-%m-%d", time.gmtime()),
        "model_version": spec.version,
        "model": storage.absolute(config.model),
        "manifest": config.manifest,
        "config_hash": config_hash(config),
        "config": config_dict(config),
        "embedding_dim": spec.embedding_dim,
        "embedding_dtype": getattr(config, "embedding_dtype", "float32"),
        "vocabulary": list(spec.vocab.names),
        "rows": totals.rows,
        "errors": totals.errors,
        "ok": totals.rows - totals.errors,
        "bytes_tagged": sum(f["size"] for f in totals.files),
        "error_reasons": {k: v["count"] for k, v in totals.reasons.items()},
        "duplicates_dropped": plan.duplicates,
        "seconds": round(time.time() - started, 2),
        **counts,
        "summary": f"mltag {operation} {run_id}: {totals.rows} rows, {totals.errors} errors, model {spec.version}",
    }


def open_run(uri: str, run_id: str) -> tuple[ShardedRun, str, dict | None]:
    """A run's working directory and application id, and, when that run already committed (a
    crash came after its commit, before its clean-up), the table's metadata for it instead."""
    run = ShardedRun(uri, run_id)
    app_id = f"mltag-{run_id}"
    if delta_table.app_committed(uri, app_id):
        run.remove()
        return run, app_id, tag_table.run_metadata(uri)
    return run, app_id, None


def commit_run_files(uri: str, totals: Totals, metadata: dict, app_id: str) -> int:
    """The run's files as one commit that replaces the table's content; returns the new version."""
    fs, root = storage.arrow_filesystem_for(uri)
    schema = pq.read_schema(f"{root}/{totals.files[0]['path']}", filesystem=fs)
    actions = [delta_table.add_action(f["path"], f["size"], f["rows"]) for f in totals.files]
    return delta_table.commit_overwrite(uri, actions, schema, metadata, app_id)


def merge_tagged(uri: str, dt, totals: Totals, deleted_files: list[str], metadata: dict, app_id: str) -> dict:
    """One MERGE commit: the run's tagged rows (files under the run directory) upserted, the keys
    in ``deleted_files`` removed; both streamed. Returns delta-rs's merge metrics.

    Runs on a worker: delta-rs joins the source with every table file holding one of its keys,
    and that join's memory grows with the table, which the driver must not hold."""
    return on_worker(_merge_tagged, uri, dt.version(), totals.files, deleted_files, metadata, app_id)


def _merge_tagged(uri: str, version: int, files: list[dict], deleted_files: list[str], metadata: dict, app_id: str) -> dict:
    dt = delta_table.open_table(uri, version)  # the version the caller planned against: a later commit is a conflict
    fs, root = storage.arrow_filesystem_for(uri)
    paths = [f"{root}/{f['path']}" for f in files]
    table_schema = pa.schema(dt.schema().to_arrow())
    source_schema = pq.read_schema(paths[0], filesystem=fs) if paths else table_schema
    for name in table_schema.names:  # a source without a table column (e.g. fingerprint) gets nulls
        if name not in source_schema.names:
            source_schema = source_schema.append(table_schema.field(name))
    schema = source_schema.append(pa.field("_action", pa.string()))

    def batches():
        for path in paths:
            for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=8192):
                table = pa.Table.from_batches([batch])
                for field in source_schema:
                    if field.name not in table.column_names:
                        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
                table = table.select(source_schema.names).cast(source_schema)
                yield from table.append_column("_action", pa.array(["upsert"] * table.num_rows, pa.string())).to_batches()
        for uri_ in deleted_files:
            dfs, dpath = storage.arrow_filesystem_for(uri_)
            deleted = pq.read_table(dpath, filesystem=dfs)
            columns = {
                f.name: (deleted.column(f.name) if f.name in ("listing_id", "image_uri") else pa.nulls(deleted.num_rows, f.type))
                for f in source_schema
            }
            table = pa.table(columns, schema=source_schema)
            yield from table.append_column("_action", pa.array(["delete"] * table.num_rows, pa.string())).to_batches()

    return delta_table.merge_rows(dt, batches(), schema, metadata, app_id)

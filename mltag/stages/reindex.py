"""``mltag reindex``: the nightly incremental re-index, one MERGE commit that pays only for what changed.

Each image's identity is (listing_id, image_uri) plus a content fingerprint: the object's ETag,
size and modification time (``--fingerprint stat``, cheap) or a hash of its bytes (``hash``).
Against the table's current version, today's catalog splits into
  new        keys the table does not have                       -> tagged, inserted
  changed    another fingerprint, or another model version       -> tagged, updated
  retry      same fingerprint, but a transient error last time   -> tagged again, updated
             (fetch failed, timeout, throttled, credentials: ``mltag.table.row_errors``)
  unchanged  same fingerprint and model, tagged or a permanent error -> not touched
  deleted    keys in the table but not in today's catalog         -> deleted
and the whole night is one Delta MERGE keyed on (listing_id, image_uri). A table written by
another model version is re-tagged whole (one overwrite commit). A manifest that repeats a key
keeps its first row; the repeats are counted in the night's metadata, never a failed night.

Resumable: the tagging is a sharded run (``mltag.table.sharded_run``) whose id is derived from the
table version it was planned against and today's manifest, so the same command after a crash
tags only the shards it had not finished. Re-running a night that committed finds nothing to do.

    mltag reindex --manifest s3://bucket/catalog/today.parquet --model s3://bucket/models/v3 \\
        --table s3://bucket/tag_table --snapshot 2026-11-24 --index /data/index
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.data import catalog, storage
from mltag.data.fingerprints import FINGERPRINTS, fingerprint_batch
from mltag.data.identifiers import validate_identifier
from mltag.data.uri_policy import DEFAULT_SCHEMES
from mltag.runtime.cluster import init_ray, on_worker
from mltag.table import delta_table, tag_table
from mltag.table.row_errors import TRANSIENT
from mltag.table.sharded_run import KEY_COLUMNS, Plan, Totals
from mltag.table.tag_table import redact_uri_column
from mltag.tagger.spec import load_checked_spec
from mltag.tagging.commits import (
    check_error_gate,
    commit_metadata,
    commit_run_files,
    derived_run_id,
    manifest_signature,
    merge_tagged,
    open_run,
)
from mltag.tagging.pipeline import TagConfig, tag_shards

logger = logging.getLogger(__name__)


@dataclass
class ReindexConfig:
    """Nightly incremental re-index: tag only new, changed or transiently failed images; one MERGE."""

    manifest: str = ""  # today's catalog manifest
    model: str = ""  # tagger directory
    table: str = "runs/tag_table"  # the Delta tag table (local or s3://)
    snapshot: str = ""  # the night's label recorded with the commit; empty: today's UTC date
    index: str = ""  # index directory to bring to the new table version; empty: none
    fingerprint: str = "stat"  # stat: ETag/size/mtime | hash: sha256 of the bytes
    max_error_rate: float = 0.1  # a night whose tagged rows fail more often than this is not committed
    shard_rows: int = 50_000  # rows per shard (the unit of resume)
    batch_size: int = 64  # inference batch size
    num_actors: int = 0  # inference actors (0: from the cluster's resources)
    allowed_schemes: str = ",".join(DEFAULT_SCHEMES)  # image URI schemes that may be fetched (see mltag tag)
    allow_private_networks: bool = False  # http(s) only: also loopback, link-local and private addresses
    allowed_roots: str = ""  # comma-separated local dirs / URI prefixes images must lie under; empty: anywhere
    fetch_timeout_s: float = 30.0  # per image fetch attempt; a timeout is a transient error, retried the next night
    chain: str = ""  # chain YAML (as for mltag tag): the rows tagged tonight get their triggered specialists' tags

    def validate(self) -> None:
        if not self.manifest or not self.model:
            raise ValueError("manifest and model are required")
        if self.chain:
            from mltag.tagging.chain import load_chain

            load_chain(self.chain)  # a bad chain file stops here, before any work
        if self.fingerprint not in FINGERPRINTS:
            raise ValueError(f"unknown fingerprint {self.fingerprint!r}; choose one of: {', '.join(FINGERPRINTS)}")
        if self.snapshot:
            validate_identifier("snapshot", self.snapshot)

    def snapshot_value(self) -> str:
        return self.snapshot or time.strftime("%Y-%m-%d", time.gmtime())


# ---- pure pieces ----------------------------------------------------------------------------------
OUTCOMES = ("new", "changed", "retry", "unchanged")


def plan(today: pa.Table, previous: pa.Table, model_version: str) -> tuple[pa.Array, pa.Table]:
    """Classifies today's rows (keys unique, with ``fingerprint``) against the table's key,
    fingerprint, model_version and error_reason columns, with Arrow joins (no Python objects
    per row). Returns (outcome per row of ``today``, in its order; deleted keys)."""
    keys = list(KEY_COLUMNS)
    # The table stores image URIs redacted (no presigned query strings): compare like with like.
    today = today.set_column(today.schema.get_field_index("image_uri"), "image_uri", redact_uri_column(today.column("image_uri")))
    left = today.select(keys + ["fingerprint"]).append_column("_row", pa.array(np.arange(today.num_rows, dtype=np.int64)))
    prev_cols = {"fingerprint": pa.string(), "model_version": pa.string(), "error_reason": pa.string()}
    right = previous.select(keys + [c for c in prev_cols if c in previous.column_names])
    for name, type_ in prev_cols.items():
        if name not in right.column_names:
            right = right.append_column(name, pa.nulls(right.num_rows, type_))
    right = right.rename_columns(keys + ["prev_" + c for c in right.column_names[len(keys) :]])
    right = right.append_column("_present", pa.array(np.ones(right.num_rows, dtype=bool)))
    joined = left.join(right, keys=keys, join_type="left outer", use_threads=False).sort_by("_row")
    present = pc.fill_null(joined.column("_present"), False)
    fingerprint = joined.column("fingerprint")
    same_print = pc.fill_null(pc.and_(pc.equal(fingerprint, joined.column("prev_fingerprint")), pc.not_equal(fingerprint, "")), False)
    same_model = pc.fill_null(pc.equal(joined.column("prev_model_version"), model_version), False)
    transient = pc.fill_null(pc.is_in(joined.column("prev_error_reason"), pa.array(sorted(TRANSIENT))), False)
    outcome = pc.if_else(
        pc.invert(present),
        "new",
        pc.if_else(pc.invert(pc.and_(same_print, same_model)), "changed", pc.if_else(transient, "retry", "unchanged")),
    )
    deleted = right.select(keys).join(today.select(keys), keys=keys, join_type="left anti", use_threads=False)
    return outcome.combine_chunks() if isinstance(outcome, pa.ChunkedArray) else outcome, deleted


# ---- the stage ------------------------------------------------------------------------------------
def previous_keys(dt):
    """A Ray Dataset of the current version's key, fingerprint, model and error-reason columns, read
    from its data files by Ray (never collected on the driver)."""
    import ray.data

    if "deletionVectors" in (dt.protocol().reader_features or []):
        raise ValueError(
            f"{dt.table_uri} uses deletion vectors (written by another engine): mltag reads its files directly "
            "and cannot apply them; rewrite the table without them (OPTIMIZE / REORG ... PURGE)"
        )
    names = dt.schema().to_arrow().names
    columns = [c for c in ("listing_id", "image_uri", "fingerprint", "model_version", "error_reason") if c in names]
    files = dt.file_uris()
    # One task per file, each casting to plain strings: files delta-rs rewrote hold string_view
    # columns, ours string, and a single read_parquet would refuse to unify them.
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, min(len(files), 1000))).map_batches(
        _read_key_columns, fn_kwargs={"columns": columns}, batch_format="pyarrow", batch_size=1, udf_modifying_row_count=True
    )


def _read_key_columns(batch: pa.Table, columns: list[str]) -> pa.Table:
    import pyarrow.parquet as pq

    tables = []
    for uri in batch.column("path").to_pylist():
        fs, path = storage.arrow_filesystem_for(uri)
        table = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in pq.read_schema(path, filesystem=fs).names])
        tables.append(
            pa.table(
                {
                    c: (table.column(c).cast(pa.string()) if c in table.column_names else pa.nulls(table.num_rows, pa.string()))
                    for c in columns
                }
            )
        )
    return pa.concat_tables(tables)


def run(config: ReindexConfig) -> dict:
    started = time.time()
    snapshot = config.snapshot_value()
    spec = load_checked_spec(config.model)  # a missing or modified model stops here, before Ray starts
    uri = delta_table.table_uri(config.table)
    init_ray()
    manifest, rows = catalog.manifest_dataset(config.manifest)  # a bad manifest stops here, before any work
    tag_config = TagConfig(
        manifest=config.manifest,
        model=config.model,
        out=uri,
        snapshot=snapshot,
        shard_rows=config.shard_rows,
        batch_size=config.batch_size,
        num_actors=config.num_actors,
        max_error_rate=config.max_error_rate,
        allowed_schemes=config.allowed_schemes,
        allow_private_networks=config.allow_private_networks,
        allowed_roots=config.allowed_roots,
        fetch_timeout_s=config.fetch_timeout_s,
        chain=config.chain,
    )
    tag_config.validate()
    # Fingerprints in Ray tasks: a stat (or a read) per image is the slow part of the planning.
    today = manifest.map_batches(
        fingerprint_batch,
        fn_kwargs={"mode": config.fingerprint, "policy": tag_config.fetch_policy()},
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )

    table_model = tag_table.run_metadata(uri).get("model_version") if delta_table.exists(uri) else None
    if table_model != spec.version:
        # First night, or a new model: every row is tagged by it, and the night replaces the table.
        why = "no table yet" if table_model is None else f"model {spec.version} replaces {table_model}"
        logger.info(f"reindex {snapshot}: {why}: tagging every row (one overwrite commit)")
        summary = _overwrite(tag_config, today, rows, spec, started)
    else:
        summary = _merge_night(config, tag_config, uri, today, rows, spec, started, snapshot)
    if config.index and summary.get("committed", True):
        from mltag.search import IndexConfig, IndexUpdateConfig, build_index, update_index

        # On a worker: the index holds every embedding of the catalog, the driver none.
        if summary.get("mode") == "overwrite":  # every row re-tagged (maybe by a new model): a fresh index version
            on_worker(build_index, IndexConfig(tag_table=uri, out=config.index))
        else:
            on_worker(update_index, IndexUpdateConfig(index=config.index, tag_table=uri))
    return summary


def _report_duplicates(plan_: Plan) -> None:
    if plan_.duplicates:
        logger.warning(
            f"manifest repeats {plan_.duplicates} (listing_id, image_uri) row(s): each key kept once, e.g. {plan_.duplicate_examples[:3]}"
        )


def _chain_parts(chain: str) -> list[str]:
    """A chain changes what a night writes, so it is part of the night's run id (a resumed night
    with another chain starts afresh); without one the ids are what they were before chains."""
    if not chain:
        return []
    from mltag.tagging.chain import chain_signature

    return [chain_signature(chain)]


def _overwrite(tag_config: TagConfig, today, rows: int | None, spec, started: float) -> dict:
    uri = tag_config.out
    run_id = derived_run_id(
        "night", tag_config.snapshot, manifest_signature(tag_config.manifest), spec.version, "overwrite", *_chain_parts(tag_config.chain)
    )
    tag_config.run_id = run_id
    run, app_id, committed = open_run(uri, run_id)
    if committed is not None:
        return {**committed, "committed": False}
    plan_, totals, resumed = tag_shards(tag_config, run, today, data_prefix="", rows=rows)
    _report_duplicates(plan_)
    check_error_gate(run, totals, tag_config.max_error_rate)
    metadata = commit_metadata(
        tag_config,
        spec,
        run_id,
        "reindex",
        plan_,
        totals,
        started,
        new=totals.rows,
        changed=0,
        retry=0,
        unchanged=0,
        deleted=0,
        manifest_rows=plan_.rows + plan_.duplicates,
        shards_resumed=resumed,
    )
    version = commit_run_files(uri, totals, metadata, app_id)
    run.remove()
    logger.info(f"reindex {tag_config.snapshot}: {totals.rows} rows tagged ({totals.errors} errors) -> {uri} version {version}")
    return {**metadata, "table_version": version, "table": uri, "mode": "overwrite"}


def _merge_night(
    config: ReindexConfig, tag_config: TagConfig, uri: str, today, rows: int | None, spec, started: float, snapshot: str
) -> dict:
    dt = delta_table.open_table(uri)
    run_id = derived_run_id(
        "night", snapshot, dt.version(), manifest_signature(config.manifest), spec.version, config.fingerprint, *_chain_parts(config.chain)
    )
    tag_config.run_id = run_id
    run, app_id, committed = open_run(uri, run_id)
    if committed is not None:
        return {**committed, "committed": False}
    # The plan, shard by shard in Ray tasks: today's rows against the table's rows of the same listings.
    table_rows = int(pc.sum(pa.table(dt.get_add_actions(flatten=True)).column("num_records")).as_py() or 0)
    plan_ = run.prepare(
        today,
        config.shard_rows,
        rows,
        previous=previous_keys(dt),
        classify=plan,
        classify_kwargs={"model_version": spec.version},
        previous_rows=table_rows,
    )
    _report_duplicates(plan_)
    counts = {name: int(plan_.counts.get(name, 0)) for name in OUTCOMES + ("deleted",)}
    deleted_files = run.deleted_key_files()
    if plan_.rows == 0 and counts["deleted"] == 0:
        run.remove()
        logger.info(f"reindex {snapshot}: nothing changed since version {dt.version()} ({counts['unchanged']} rows unchanged); no commit")
        return {
            **counts,
            "committed": False,
            "table_version": dt.version(),
            "rows": counts["unchanged"],
            "snapshot": snapshot,
            "duplicates_dropped": plan_.duplicates,
        }
    if plan_.rows:
        plan_, totals, resumed = tag_shards(tag_config, run, None, data_prefix=f"_mltag_runs/{run_id}/data/", plan=plan_)
        check_error_gate(run, totals, config.max_error_rate)
    else:  # only deletions tonight
        totals, resumed = Totals(0, 0, {}, []), 0
    today_rows = sum(counts[name] for name in OUTCOMES)
    metadata = commit_metadata(
        tag_config,
        spec,
        run_id,
        "reindex",
        plan_,
        totals,
        started,
        **counts,
        read_version=dt.version(),
        manifest_rows=today_rows + plan_.duplicates,
        shards_resumed=resumed,
    )
    metadata.update(
        rows=today_rows,
        summary=f"mltag reindex {snapshot}: {counts['new']} new, {counts['changed']} changed, {counts['retry']} retried, "
        f"{counts['deleted']} deleted",
    )
    metrics = merge_tagged(uri, dt, totals, deleted_files, metadata, app_id)
    run.remove()
    version = delta_table.latest_version(uri)
    logger.info(
        f"reindex {snapshot}: {counts['new']} new, {counts['changed']} changed, {counts['retry']} retried, "
        f"{counts['unchanged']} unchanged, {counts['deleted']} deleted, {totals.errors} errors, "
        f"{round(time.time() - started, 1)} s -> {uri} version {version}"
    )
    return {**metadata, "table_version": version, "table": uri, "merge": metrics}

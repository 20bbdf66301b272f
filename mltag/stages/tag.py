"""Tag a catalog with Ray Data: manifest -> bytes -> pixels (CPU tasks) -> tagger actors -> Delta.

Launch:
    mltag tag --manifest catalog/manifest.parquet --model runs/train/model --out runs/tag_table
    ray job submit --working-dir . -- python jobs/tag_catalog.py --config configs/demo.yaml

Every manifest row becomes exactly one tag-table row (see ``mltag.table.tag_table``): images that
cannot be read or decoded become rows with an ``error``; a (listing_id, image_uri) the manifest
repeats is kept once and counted. The run is cut into shards (``mltag.table.sharded_run``) whose files
are written beside the table and recorded as each shard finishes; when every shard is done, the
run is one Delta commit (``mltag.table.delta_table``) that replaces the table's content. Until then
readers see the previous version. The same command after a crash tags only the shards that were
not finished. A run whose error rows exceed ``max_error_rate`` is not committed.
"""

from __future__ import annotations

import logging
import time

import pyarrow.compute as pc

from mltag.data import catalog
from mltag.data.fingerprints import fingerprint_batch
from mltag.runtime.cluster import init_ray
from mltag.table import delta_table, tag_table
from mltag.table.sharded_run import ShardedRun
from mltag.tagger.spec import load_checked_spec
from mltag.tagging.chain import SPECIALISTS_COLUMN
from mltag.tagging.commits import (
    ErrorGateError,
    check_error_gate,
    commit_metadata,
    commit_run_files,
    derived_run_id,
    manifest_signature,
    merge_tagged,
    open_run,
)
from mltag.tagging.pipeline import TagConfig, build_pipeline, physical_plan, tag_shards

# TagConfig is this stage's config; the pipeline pieces are re-exported for scripts written before
# they moved down to mltag.tagging (TaggerActor too, by ``__getattr__`` at the end: it loads torch).
__all__ = ["ErrorGateError", "TagConfig", "build_pipeline", "physical_plan", "retry_errors", "run"]

logger = logging.getLogger(__name__)


def run(config: TagConfig) -> dict:
    """Tags the manifest and commits the run as one new table version; returns the commit's
    metadata (rows, errors, run id, table version...)."""
    if config.retry_errors:
        return retry_errors(config)
    started = time.time()
    spec = load_checked_spec(config.model)  # a missing or modified model stops here, before Ray starts
    init_ray()
    manifest, rows = catalog.manifest_dataset(config.manifest)  # a bad manifest fails here, before any work
    if config.fingerprint != "none":  # so that a nightly re-index can tell what changed since this run
        manifest = manifest.map_batches(
            fingerprint_batch,
            fn_kwargs={"mode": config.fingerprint, "policy": config.fetch_policy()},
            batch_format="pyarrow",
            udf_modifying_row_count=False,
        )
    uri = delta_table.table_uri(config.out)
    run_id = config.run_id or derived_run_id("tag", manifest_signature(config.manifest), spec.version, config.result_fields())
    run, app_id, meta = open_run(uri, run_id)
    if meta is not None:
        logger.info(
            f"run {run_id} is already committed to {uri} (table version {meta['table_version']}); nothing to do. "
            f"Give --run-id to tag again."
        )
        return meta
    plan, totals, resumed = tag_shards(config, run, manifest, data_prefix="", rows=rows)
    check_error_gate(run, totals, config.max_error_rate)
    metadata = commit_metadata(
        config,
        spec,
        run_id,
        "tag",
        plan,
        totals,
        started,
        manifest_rows=plan.rows + plan.duplicates,
        shards=plan.n_shards,
        shards_resumed=resumed,
    )
    version = commit_run_files(uri, totals, metadata, app_id)
    run.remove()
    metadata["table_version"], metadata["table"] = version, uri
    rate = totals.rows / max(time.time() - started, 1e-9)
    logger.info(
        f"tag table: {totals.rows} rows ({totals.errors} errors, {plan.duplicates} duplicate rows dropped) in "
        f"{metadata['seconds']} s ({rate:.1f} images/s) -> {uri} version {version}"
        + (f"; {resumed} of {plan.n_shards} shards were done before this run" if resumed else "")
    )
    return metadata


def retry_errors(config: TagConfig) -> dict:
    """Re-tags the error rows of the table's current version; one MERGE commit updates them."""
    started = time.time()
    spec = load_checked_spec(config.model)
    uri = delta_table.table_uri(config.out)
    dt = delta_table.open_table(uri)
    failed = dt.to_pyarrow_dataset().to_table(filter=pc.field("error").is_valid())
    # What the pipeline writes anew is dropped from the rows it re-reads (a chained table's
    # specialists too: the actor appends that column again when the retry has a chain).
    output_columns = (set(tag_table.CORE_COLUMNS) | {SPECIALISTS_COLUMN}) - {"listing_id", "image_uri"}
    manifest = failed.drop_columns([c for c in failed.column_names if c in output_columns])
    if "true_tags" in manifest.column_names:
        manifest = manifest.rename_columns(["tags" if c == "true_tags" else c for c in manifest.column_names])
    if manifest.num_rows == 0:
        logger.info(f"{uri} version {dt.version()} has no error rows; nothing to retry")
        return {"rows": 0, "errors": 0, "table_version": dt.version()}
    run_id = config.run_id or derived_run_id("retry", uri, dt.version(), spec.version, config.result_fields())
    run = ShardedRun(uri, run_id)
    plan, totals, resumed = tag_shards(config, run, manifest, data_prefix=f"_mltag_runs/{run_id}/data/")
    metadata = commit_metadata(
        config,
        spec,
        run_id,
        "retry-errors",
        plan,
        totals,
        started,
        retried=totals.rows,
        healed=totals.rows - totals.errors,
        read_version=dt.version(),
    )
    metrics = merge_tagged(uri, dt, totals, [], metadata, f"mltag-{run_id}")
    run.remove()
    metadata.update(table_version=delta_table.latest_version(uri), table=uri, merge=metrics)
    logger.info(
        f"retried {totals.rows} error rows of version {dt.version()}: {totals.rows - totals.errors} now tagged, "
        f"{totals.errors} still failing -> {uri} version {metadata['table_version']}"
    )
    return metadata


def __getattr__(name: str):
    # TaggerActor is imported on first use: it brings torch and timm.
    if name == "TaggerActor":
        from mltag.tagging.actor import TaggerActor

        return TaggerActor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""``mltag apply-head``: a fitted head's tags on every row of the tag table, as one new version.

    mltag apply-head --tag-table runs/tag_table --head runs/heads/sleeves

Streams the table's files with Ray Data, one task per file: each reads its file in batches,
scores the stored embeddings with the head (a matrix product: no image is read, no model
loaded), and writes the file again with the head's three columns (``mltag.tagger.heads``:
``<name>_scores``, ``<name>_tags``, ``<name>_head``). When every file is written, the new files
replace the version they were read from in one Delta commit; until then readers see the
previous version, and a crash leaves only files no version names (``vacuum`` removes them).

- Re-applying a head replaces its columns (same name, new values): never a second copy of a
  column or of a row. Re-running a command whose head is already on the table's latest version
  does nothing.
- Another tagger version: a head reads one tagger's feature space. A table whose latest mltag
  commit was tagged by another model than the head's is refused before any work (fit the head
  again on the new embeddings). Single rows embedded by another version (a table other writers
  touched) get null head columns and are counted in the commit and the summary; if no row at
  all has the head's model version, nothing is committed.
- Error rows (no embedding) get null head columns.
- The head's rows go stale when a row changes: ``mltag reindex`` writes the head's columns of
  the rows it re-tags as null, and ``mltag tag`` (a new run) drops them; apply the head again.
- A commit of another writer (a nightly reindex) between this run's read and its commit stops
  it (``TableConflictError``, nothing committed): run it again.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag.config import config_dict, config_hash
from mltag.data import storage
from mltag.table import delta_table, table_files
from mltag.tagger.heads import HeadMismatchError, HeadSpec, column_names, head_columns, head_schema, load_head

RECORD_SCHEMA = pa.schema(
    [
        ("file_index", pa.int64()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("rows", pa.int64()),
        ("scored", pa.int64()),
        ("error_rows", pa.int64()),
        ("other_model", pa.int64()),
    ]
)


@dataclass
class ApplyHeadConfig:
    """Add a fitted head's scores and tags to every row of a tag table (one new table version)."""

    tag_table: str = ""  # the Delta tag table (local or s3://)
    head: str = ""  # head directory written by mltag train-head
    batch_rows: int = 8192  # rows per batch streamed through the head in each file's task
    num_cpus: float = 1.0  # CPUs per file task (reading, a matrix product, writing)

    def validate(self) -> None:
        if not self.tag_table or not self.head:
            raise ValueError("tag_table and head are required")
        if self.batch_rows < 1 or self.num_cpus <= 0:
            raise ValueError("batch_rows and num_cpus must be positive")


# ---- pure pieces ----------------------------------------------------------------------------------
def output_schema(table_schema: pa.Schema, spec: HeadSpec) -> pa.Schema:
    """The table's schema with the head's columns at the end (replacing them if present). A head
    name whose columns would overwrite other columns is refused: existing columns count as the
    head's only when all three are there."""
    mine = column_names(spec.name)
    present = [c for c in mine if c in table_schema.names]
    if present and len(present) < len(mine):
        raise HeadMismatchError(
            f"the table has column(s) {present} but not {sorted(set(mine) - set(present))}: they belong to something else "
            f"than a head named {spec.name!r}; fit the head under another --name"
        )
    kept = [f for f in table_schema if f.name not in mine]
    return pa.schema(kept + head_schema(spec.name))


def rewrite_batch(batch: pa.Table, linear, spec: HeadSpec, schema: pa.Schema) -> tuple[pa.Table, dict]:
    """One batch of table rows (conformed to the table's schema) with the head's columns set."""
    columns, counts = head_columns(batch, linear, spec)
    mine = set(column_names(spec.name))
    kept = [batch.column(name) for name in schema.names if name not in mine]
    return pa.Table.from_arrays(kept + columns, schema=schema), counts


# ---- the Ray Data stage ---------------------------------------------------------------------------
def _rewrite_files(
    batch: pa.Table, table_uri: str, run_id: str, weight, bias, spec: dict, read_schema: pa.Schema, schema: pa.Schema, batch_rows: int
) -> pa.Table:
    """One task per data file: the file streamed through the head into a new file under the
    table (a fresh name per attempt, so a retried task never overwrites a file another attempt
    reported); returns one record per file."""
    from mltag.tagger.linear_probe import LinearHead

    linear = LinearHead(weight, bias, bias * 0)
    head_spec = HeadSpec(**spec)
    fs, root = storage.arrow_filesystem_for(table_uri)
    records = []
    for index, source in zip(batch.column("file_index").to_pylist(), batch.column("path").to_pylist()):
        relative = f"part-{run_id}-f{index:05d}-{uuid.uuid4().hex[:12]}.parquet"
        path = f"{root}/{relative}"
        totals = {"rows": 0, "scored": 0, "error_rows": 0, "other_model": 0}
        with pq.ParquetWriter(path, schema, filesystem=fs) as writer:
            for part in table_files.read_file(source, read_schema, batch_rows=batch_rows):
                rows, counts = rewrite_batch(part, linear, head_spec, schema)
                writer.write_table(rows)
                for key in totals:
                    totals[key] += counts[key]
        records.append({"file_index": index, "path": relative, "size": fs.get_file_info(path).size, **totals})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


# ---- the stage ------------------------------------------------------------------------------------
def run(config: ApplyHeadConfig) -> dict:
    from mltag.runtime.cluster import init_ray

    started = time.time()
    linear, spec = load_head(config.head)
    uri = delta_table.table_uri(config.tag_table)
    dt = delta_table.open_table(uri)
    read_version = dt.version()
    table_meta = delta_table.commit_metadata(dt)
    table_model = table_meta.get("model_version")
    if table_model and table_model != spec.model_version:
        raise HeadMismatchError(
            f"{uri} version {read_version} was tagged by model {table_model}; the head {spec.name} ({spec.version}) reads "
            f"embeddings of model {spec.model_version}. Fit it again on this table: mltag train-head --tag-table {config.tag_table} ..."
        )
    table_dim = table_meta.get("embedding_dim")
    if table_dim and int(table_dim) != spec.embedding_dim:
        raise HeadMismatchError(f"{uri} holds {table_dim}-d embeddings; the head {spec.name} reads {spec.embedding_dim}-d ones")
    latest = delta_table.history_entries(dt)[0]
    applied = (latest.get(delta_table.METADATA_KEY) or {}) if latest.get("version") == read_version else {}
    if applied.get("operation") == "apply-head" and (applied.get("heads") or {}).get(spec.name, {}).get("version") == spec.version:
        print(f"head {spec.name} ({spec.version}) is already on {uri} version {read_version}; nothing to do")
        return {**applied, "committed": False, "table_version": read_version, "table": uri}

    read_schema = table_files.table_schema(dt)
    for needed in ("embedding", "model_version"):
        if needed not in read_schema.names:
            raise HeadMismatchError(f"{uri} has no {needed} column: it is not a tag table")
    schema = output_schema(read_schema, spec)
    files = table_files.data_files(dt)
    run_id = "head-" + hashlib.sha256(json.dumps([uri, read_version, spec.version]).encode()).hexdigest()[:16]
    app_id = f"mltag-{run_id}"  # recorded with the commit: which rewrite made the version

    init_ray()
    ds = table_files.file_dataset(files).map_batches(
        _rewrite_files,
        fn_kwargs={
            "table_uri": uri,
            "run_id": run_id,
            "weight": linear.weight,
            "bias": linear.bias,
            "spec": {**asdict(spec), "extra": {}},
            "read_schema": read_schema,
            "schema": schema,
            "batch_rows": config.batch_rows,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=config.num_cpus,
        udf_modifying_row_count=True,
    )
    records: list[dict] = []
    try:
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            records.extend(block.to_pylist())
        totals = {k: sum(r[k] for r in records) for k in ("rows", "scored", "error_rows", "other_model")}
        expected = int(pc.sum(pa.table(dt.get_add_actions(flatten=True)).column("num_records")).as_py() or 0) if files else 0
        if len(records) != len(files) or totals["rows"] != expected:
            raise RuntimeError(f"rewrote {totals['rows']} rows in {len(records)} files, the version holds {expected} in {len(files)}")
        if totals["scored"] == 0 and totals["other_model"]:
            raise HeadMismatchError(
                f"no row of {uri} version {read_version} was embedded by model {spec.model_version} (the head's); "
                f"{totals['other_model']} rows were embedded by other versions: nothing committed"
            )
        metadata = _metadata(table_meta, config, spec, run_id, read_version, totals, started)
        actions = [delta_table.add_action(r["path"], r["size"], r["rows"]) for r in records]
        version = delta_table.commit_rewrite(uri, read_version, actions, schema, metadata, app_id)
    except BaseException:
        _remove_files(uri, records)
        raise
    print(
        f"head {spec.name} ({spec.version}): {totals['scored']} rows scored, {totals['error_rows']} error rows and "
        f"{totals['other_model']} rows of another model left null, {round(time.time() - started, 1)} s -> {uri} version {version} "
        f"(columns {', '.join(column_names(spec.name))})"
    )
    return {**metadata, "committed": True, "table_version": version, "table": uri}


def _metadata(
    table_meta: dict, config: ApplyHeadConfig, spec: HeadSpec, run_id: str, read_version: int, totals: dict, started: float
) -> dict:
    """The previous commit's facts (model version, embedding size, vocabulary: the rows' own, which
    ``mltag index`` and ``reindex`` read) with this run's on top; ``heads`` lists every head on the
    version since the last commit that was not an apply-head (a reindex or a tag run makes the
    heads' values stale: they are applied again)."""
    heads = dict(table_meta.get("heads") or {}) if table_meta.get("operation") == "apply-head" else {}
    heads[spec.name] = {
        "version": spec.version,
        "tags": spec.tags,
        "thresholds": spec.thresholds,
        "model_version": spec.model_version,
        "columns": column_names(spec.name),
        "head": storage.absolute(config.head),
    }
    return {
        **table_meta,
        "operation": "apply-head",
        "run_id": run_id,
        "read_version": read_version,
        "heads": heads,
        "head_rows": totals,
        "apply_head_config": config_dict(config),
        "apply_head_config_hash": config_hash(config),
        "seconds": round(time.time() - started, 2),
        "summary": f"mltag apply-head {spec.name} {spec.version}: {totals['scored']} of {totals['rows']} rows scored",
    }


def _remove_files(uri: str, records: list[dict]) -> None:
    fs, root = storage.arrow_filesystem_for(uri)
    for record in records:
        try:
            fs.delete_file(f"{root}/{record['path']}")
        except (FileNotFoundError, OSError):
            pass

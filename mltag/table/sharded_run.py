"""A tagging run cut into shards, so that a run cut short resumes where it stopped.

A run has an id (given, or derived from its inputs so that the same command finds its own work
again) and a working directory ``<table>/_mltag_runs/<run id>/`` beside the Delta log. Delta
readers and ``vacuum`` ignore directories whose name starts with ``_``, so nothing here is ever
mistaken for table data:

  ``manifest/shard-00017.parquet``  the manifest rows of shard 17 (duplicates already dropped)
  ``plan.json``                     shard count and rows per shard; written after the shard files,
                                    so its presence means the sharding is complete
  ``done/shard-00017.json``         the data files holding shard 17's tagged rows, with their row
                                    counts and error histogram; written once every row of the
                                    shard is in a file, so a shard is done or it is not

A listing's shard is a stable hash of its id, so all images of a listing share one shard and the
assignment does not depend on the manifest's order. Finished shards cost one small JSON each: a
restart reads the ``done/`` listing (thousands of names at most) and never a set of row ids.

Example:
    >>> shard_of(pa.array(["L1", "L2", "L1"]), 4).tolist()[0] == shard_of(pa.array(["L1"]), 4)[0]
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag.data import storage

RUNS_DIR = "_mltag_runs"
SHARD_COLUMN = "_shard"
KEY_COLUMNS = ("listing_id", "image_uri")
EXAMPLES_PER_REASON = 3
FILE_RECORD_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("reasons", pa.string()),
    ]
)


# ---- pure pieces ----------------------------------------------------------------------------------
def shard_of(listing_ids: pa.Array | pa.ChunkedArray, n_shards: int) -> np.ndarray:
    """Stable shard number per listing id (blake2b of the id: the same on every machine and run)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % n_shards for v in listing_ids.to_pylist()),
        dtype=np.int32,
        count=len(listing_ids),
    )


def drop_duplicate_keys(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keeps the first row of each (listing_id, image_uri); returns (rows kept, duplicate keys with
    how many extra copies each had)."""
    rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
    keyed = table.select(list(KEY_COLUMNS)).append_column("_row", rows)
    groups = keyed.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("_row", "min"), ("_row", "count")])
    keep = np.sort(groups.column("_row_min").to_numpy())
    duplicated = groups.filter(pc.greater(groups.column("_row_count"), 1))
    duplicated = duplicated.select(list(KEY_COLUMNS)).append_column("extra_copies", pc.subtract(duplicated.column("_row_count"), 1))
    return (table if len(keep) == table.num_rows else table.take(pa.array(keep))), duplicated


def add_shard_column(batch: pa.Table, n_shards: int) -> pa.Table:
    """Ray Data stage: the row's shard (a stable hash of its listing id)."""
    if SHARD_COLUMN in batch.column_names:
        batch = batch.drop_columns([SHARD_COLUMN])
    return batch.append_column(SHARD_COLUMN, pa.array(shard_of(batch.column("listing_id"), n_shards), pa.int32()))


def _write_group(group: pa.Table, directory: str, dedupe: bool) -> pa.Table:
    """``map_groups`` stage: one shard's rows -> one Parquet file; returns the shard's counts."""
    shard = int(group.column(SHARD_COLUMN)[0].as_py())
    duplicated = None
    if dedupe:
        # A shuffle does not keep the manifest's order: keep the duplicate that sorts first, so the
        # choice does not depend on which task ran first.
        group = group.sort_by([(c, "ascending") for c in KEY_COLUMNS])
        group, duplicated = drop_duplicate_keys(group)
    fs, path = storage.arrow_filesystem_for(storage.join(directory, f"shard-{shard:05d}.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(group, path, filesystem=fs)
    extra = int(pc.sum(duplicated.column("extra_copies")).as_py() or 0) if duplicated is not None and duplicated.num_rows else 0
    examples = duplicated.slice(0, 3).select(list(KEY_COLUMNS)).to_pylist() if extra else []
    return pa.table({"shard": [shard], "rows": [group.num_rows], "duplicates": [extra], "examples": [json.dumps(examples)]})


def _group_by_shard(ds, n_shards: int, directory: str, dedupe: bool) -> list[dict]:
    from mltag.runtime.cluster import cluster_cpus

    if n_shards == 1:
        # One shard holds at most shard_rows rows (by construction of n_shards): bounded, so it is
        # gathered here, without the start-up of a shuffle.
        batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
        if not batches:
            return []
        table = pa.concat_tables(batches, promote_options="default")
        return _write_group(add_shard_column(table, 1), directory, dedupe).to_pylist()

    # Shuffle partitions: no more than shards, nor than the cluster has CPUs (Ray's default of 200
    # partitions costs more in start-up than a small run spends in work).
    partitions = max(1, min(n_shards, cluster_cpus()))
    grouped = ds.map_batches(
        add_shard_column, fn_kwargs={"n_shards": n_shards}, batch_format="pyarrow", udf_modifying_row_count=False
    ).groupby(SHARD_COLUMN, num_partitions=partitions)
    return grouped.map_groups(_write_group, fn_kwargs={"directory": directory, "dedupe": dedupe}, batch_format="pyarrow").take_all()


def _read_shard_file(directory: str, shard: int) -> pa.Table | None:
    fs, path = storage.arrow_filesystem_for(storage.join(directory, f"shard-{shard:05d}.parquet"))
    if not fs.get_file_info(path).type == 2:  # pyarrow FileType.File
        return None
    return pq.read_table(path, filesystem=fs)


def _classify_shards(batch: pa.Table, run_dir: str, classify, classify_kwargs: dict) -> pa.Table:
    """Per shard: today's rows against the table's rows of the same listings. Rows to tag go to
    ``manifest/``, keys gone from the catalog to ``deleted/``."""
    out = []
    for shard in batch.column("shard").to_pylist():
        today = _read_shard_file(storage.join(run_dir, "today"), shard)
        previous = _read_shard_file(storage.join(run_dir, "previous"), shard)
        counts: dict = {}
        to_tag = 0
        if today is None and previous is None:
            out.append({"shard": shard, "to_tag": 0, "counts": "{}"})
            continue
        if previous is None:
            previous = pa.table({c: pa.array([], pa.string()) for c in KEY_COLUMNS})
        if today is None:
            outcome, deleted = pa.array([], pa.string()), previous.select(list(KEY_COLUMNS))
        else:
            outcome, deleted = classify(
                today, previous.drop_columns([SHARD_COLUMN]) if SHARD_COLUMN in previous.column_names else previous, **classify_kwargs
            )
            for name in pc.unique(outcome).to_pylist():
                counts[name] = int(pc.sum(pc.equal(outcome, name)).as_py())
            tagged = today.filter(pc.is_in(outcome, pa.array(["new", "changed", "retry"])))
            to_tag = tagged.num_rows
            if to_tag:
                fs, path = storage.arrow_filesystem_for(storage.join(run_dir, "manifest", f"shard-{shard:05d}.parquet"))
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                pq.write_table(tagged, path, filesystem=fs)
        counts["deleted"] = deleted.num_rows
        if deleted.num_rows:
            fs, path = storage.arrow_filesystem_for(storage.join(run_dir, "deleted", f"shard-{shard:05d}.parquet"))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pq.write_table(deleted.select(list(KEY_COLUMNS)), path, filesystem=fs)
        out.append({"shard": shard, "to_tag": to_tag, "counts": json.dumps(counts)})
    return pa.Table.from_pylist(out, schema=pa.schema([("shard", pa.int64()), ("to_tag", pa.int64()), ("counts", pa.string())]))


def _reason_summary(part: pa.Table) -> dict:
    """{reason: {"count": n, "examples": [uri, ...]}} for the error rows of one file."""
    if "error_reason" not in part.column_names:
        return {}
    failed = part.filter(pc.is_valid(part.column("error_reason")))
    summary: dict = {}
    for reason, uri in zip(failed.column("error_reason").to_pylist(), failed.column("image_uri").to_pylist()):
        entry = summary.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(uri)
    return summary


def merge_reasons(total: dict, part: dict) -> dict:
    for reason, entry in part.items():
        into = total.setdefault(reason, {"count": 0, "examples": []})
        into["count"] += entry["count"]
        into["examples"] = (into["examples"] + entry["examples"])[:EXAMPLES_PER_REASON]
    return total


def read_shard_manifests(batch: pa.Table) -> pa.Table:
    """Ray Data stage: the manifest rows of the shard files named in ``batch`` (column ``path``)."""
    tables = []
    for uri in batch.column("path").to_pylist():
        fs, path = storage.arrow_filesystem_for(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def write_shard_files(batch: pa.Table, table_uri: str, data_prefix: str, run_id: str) -> pa.Table:
    """Ray Data stage after the taggers: writes a batch's rows as one Parquet file per shard under
    ``table_uri/data_prefix`` and returns one record per file (shard, path, rows, errors...).

    File names are fresh per call, so a retried task never overwrites a file another attempt
    reported; files no record names are orphans that ``vacuum`` removes."""
    fs, root = storage.arrow_filesystem_for(table_uri)
    shards = batch.column(SHARD_COLUMN).to_numpy()
    data = batch.drop_columns([SHARD_COLUMN])
    records = []
    for shard in np.unique(shards):
        part = data.filter(pa.array(shards == shard))
        relative = f"{data_prefix}part-{run_id}-s{int(shard):05d}-{uuid.uuid4().hex[:12]}.parquet"
        path = f"{root}/{relative}"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(part, path, filesystem=fs)
        records.append(
            {
                "shard": int(shard),
                "path": relative,
                "size": fs.get_file_info(path).size,
                "rows": part.num_rows,
                "errors": part.num_rows - part.column("error").null_count,
                "reasons": json.dumps(_reason_summary(part)),
            }
        )
    return pa.Table.from_pylist(records, schema=FILE_RECORD_SCHEMA)


# ---- the run's working directory -------------------------------------------------------------------
@dataclass
class Plan:
    run_id: str
    n_shards: int
    shard_rows: list[int]  # rows to tag per shard
    duplicates: int = 0
    duplicate_examples: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # the nightly plan's outcome counts (new, changed, retry, unchanged, deleted)

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)


@dataclass
class Totals:
    rows: int
    errors: int
    reasons: dict
    files: list[dict]

    @property
    def error_rate(self) -> float:
        return self.errors / self.rows if self.rows else 0.0


class ShardedRun:
    """The working directory of one run under a table (local or s3)."""

    def __init__(self, table_uri: str, run_id: str):
        self.table_uri, self.run_id = table_uri, run_id
        self.dir = storage.join(table_uri, RUNS_DIR, run_id)

    def _path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def shard_manifest(self, shard: int) -> str:
        return self._path("manifest", f"shard-{shard:05d}.parquet")

    def load_plan(self) -> Plan | None:
        try:
            return Plan(**json.loads(storage.read_bytes(self._path("plan.json"))))
        except FileNotFoundError:
            return None

    def prepare(
        self,
        manifest,
        shard_rows: int,
        rows: int | None = None,
        previous=None,
        classify=None,
        classify_kwargs: dict | None = None,
        previous_rows: int | None = None,
    ) -> Plan:
        """Shards the manifest once (a restart reuses the plan) and returns the plan.

        ``manifest`` is a Ray Dataset of normalised manifest rows (or, for small inputs, a pyarrow
        table). Rows are grouped by shard with a Ray shuffle, so no stage holds more than a shard;
        repeated keys are dropped within their shard (a listing's rows share one). With
        ``previous`` (a Ray Dataset of the table's key columns) each shard's rows are then
        classified by ``classify(today, previous, **classify_kwargs) -> (outcome, deleted)``
        (the nightly plan) and only rows that need tagging go into the shard's manifest."""
        import ray.data

        plan = self.load_plan()
        if plan is not None:
            return plan
        if isinstance(manifest, pa.Table):
            rows = manifest.num_rows
            manifest = ray.data.from_arrow(manifest)
        if rows is None:
            rows = manifest.count()
        # Shards are sized by the larger side: the table's rows of a shard are gathered with it.
        n_shards = max(1, math.ceil(max(rows, previous_rows or 0) / max(1, shard_rows)))
        today_dir = self._path("today") if previous is not None else self._path("manifest")
        stats = _group_by_shard(manifest, n_shards, today_dir, dedupe=True)
        counts = {"duplicates": sum(r["duplicates"] for r in stats)}
        examples = [e for r in stats for e in json.loads(r["examples"])][:5]
        shard_rows_list = [0] * n_shards
        if previous is None:
            for r in stats:
                shard_rows_list[r["shard"]] = r["rows"]
        else:
            _group_by_shard(previous, n_shards, self._path("previous"), dedupe=False)
            shards = ray.data.from_items([{"shard": s} for s in range(n_shards)], override_num_blocks=min(n_shards, 1000))
            classified = shards.map_batches(
                _classify_shards,
                fn_kwargs={"run_dir": self.dir, "classify": classify, "classify_kwargs": classify_kwargs or {}},
                batch_format="pyarrow",
                batch_size=1,
                num_cpus=0.5,
            ).take_all()
            for r in classified:
                shard_rows_list[r["shard"]] = r["to_tag"]
                for name, value in json.loads(r["counts"]).items():
                    counts[name] = counts.get(name, 0) + value
        plan = Plan(self.run_id, n_shards, shard_rows_list, counts["duplicates"], examples, counts)
        storage.write_bytes_atomic(self._path("plan.json"), json.dumps(plan.__dict__).encode())
        return plan

    def deleted_key_files(self) -> list[str]:
        """The files of keys the nightly plan found gone from the catalog (one per shard with any)."""
        uri = self._path("deleted")
        fs, path = storage.filesystem_for(uri)
        if not fs.exists(path):
            return []
        return [storage.join(uri, n) for n in sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".parquet"))]

    def done_shards(self) -> set[int]:
        fs, path = storage.filesystem_for(self._path("done"))
        if not fs.exists(path):
            return set()
        return {int(name.rsplit("/", 1)[-1][len("shard-") : -len(".json")]) for name in fs.ls(path, detail=False) if name.endswith(".json")}

    def mark_done(self, shard: int, files: list[dict]) -> None:
        storage.write_bytes_atomic(self._path("done", f"shard-{shard:05d}.json"), json.dumps({"shard": shard, "files": files}).encode())

    def unfinished_manifests(self, plan: Plan) -> list[int]:
        done = self.done_shards()
        for shard, count in enumerate(plan.shard_rows):
            if count == 0 and shard not in done:
                self.mark_done(shard, [])
        return [s for s, count in enumerate(plan.shard_rows) if count and s not in done]

    def collect(self, records, plan: Plan, progress=None) -> None:
        """Consumes the stream of file records from ``write_shard_files`` and marks each shard done
        as soon as all its rows are in files. Holds only the records of unfinished shards."""
        written = {s: 0 for s in range(plan.n_shards)}
        pending: dict[int, list[dict]] = {}
        for batch in records:
            for record in batch.to_pylist():
                shard = record["shard"]
                pending.setdefault(shard, []).append(record)
                written[shard] += record["rows"]
                if written[shard] > plan.shard_rows[shard]:
                    raise RuntimeError(f"shard {shard} got {written[shard]} rows for {plan.shard_rows[shard]} manifest rows")
                if written[shard] == plan.shard_rows[shard]:
                    self.mark_done(shard, pending.pop(shard))
                    if progress is not None:
                        progress()

    def totals(self, plan: Plan) -> Totals:
        rows = errors = 0
        reasons: dict = {}
        files: list[dict] = []
        for shard in range(plan.n_shards):
            try:
                record = json.loads(storage.read_bytes(self._path("done", f"shard-{shard:05d}.json")))
            except FileNotFoundError as exc:
                raise RuntimeError(f"run {self.run_id}: shard {shard} is not done; rows out would not equal rows in") from exc
            got = sum(f["rows"] for f in record["files"])
            if got != plan.shard_rows[shard]:
                raise RuntimeError(f"run {self.run_id}: shard {shard} has {got} rows for {plan.shard_rows[shard]} manifest rows")
            for f in record["files"]:
                rows += f["rows"]
                errors += f["errors"]
                merge_reasons(reasons, json.loads(f["reasons"]))
                files.append(f)
        return Totals(rows, errors, reasons, files)

    def remove_data_files(self) -> None:
        """Deletes the data files this run wrote (a run that will not be committed)."""
        for shard in self.done_shards():
            try:
                record = json.loads(storage.read_bytes(self._path("done", f"shard-{shard:05d}.json")))
            except FileNotFoundError:
                continue
            for f in record["files"]:
                storage.remove_tree(storage.join(self.table_uri, f["path"]))

    def remove(self) -> None:
        storage.remove_tree(self.dir)
        parent = storage.join(self.table_uri, RUNS_DIR)
        fs, path = storage.filesystem_for(parent)
        try:
            if not storage.is_remote(parent) and fs.exists(path) and not fs.ls(path):
                fs.rmdir(path)
        except OSError:
            pass  # another run is using it


def format_reasons(reasons: dict, rows: int) -> str:
    """The error histogram a person reads: reason, count, share, example URIs."""
    lines = []
    for reason, entry in sorted(reasons.items(), key=lambda kv: -kv[1]["count"]):
        lines.append(f"  {reason:<20} {entry['count']:>9}  ({entry['count'] / max(rows, 1):6.1%})  e.g. {', '.join(entry['examples'])}")
    return "\n".join(lines)

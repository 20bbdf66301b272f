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

from mltag import storage

RUNS_DIR = "_mltag_runs"
SHARD_COLUMN = "_shard"
KEY_COLUMNS = ("listing_id", "image_uri")
EXAMPLES_PER_REASON = 3
FILE_RECORD_SCHEMA = pa.schema([("shard", pa.int32()), ("path", pa.string()), ("size", pa.int64()), ("rows", pa.int64()),
                                ("errors", pa.int64()), ("reasons", pa.string())])


# ---- pure pieces ----------------------------------------------------------------------------------
def shard_of(listing_ids: pa.Array | pa.ChunkedArray, n_shards: int) -> np.ndarray:
    """Stable shard number per listing id (blake2b of the id: the same on every machine and run)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % n_shards
                        for v in listing_ids.to_pylist()), dtype=np.int32, count=len(listing_ids))


def drop_duplicate_keys(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Keeps the first row of each (listing_id, image_uri); returns (rows kept, duplicate keys with
    how many extra copies each had)."""
    rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
    keyed = table.select(list(KEY_COLUMNS)).append_column("_row", rows)
    groups = keyed.group_by(list(KEY_COLUMNS), use_threads=False).aggregate([("_row", "min"), ("_row", "count")])
    keep = np.sort(groups.column("_row_min").to_numpy())
    duplicated = groups.filter(pc.greater(groups.column("_row_count"), 1))
    duplicated = duplicated.select(list(KEY_COLUMNS)).append_column(
        "extra_copies", pc.subtract(duplicated.column("_row_count"), 1))
    return (table if len(keep) == table.num_rows else table.take(pa.array(keep))), duplicated


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
        records.append({"shard": int(shard), "path": relative, "size": fs.get_file_info(path).size, "rows": part.num_rows,
                        "errors": part.num_rows - part.column("error").null_count,
                        "reasons": json.dumps(_reason_summary(part))})
    return pa.Table.from_pylist(records, schema=FILE_RECORD_SCHEMA)


# ---- the run's working directory -------------------------------------------------------------------
@dataclass
class Plan:
    run_id: str
    n_shards: int
    shard_rows: list[int]
    duplicates: int = 0
    duplicate_examples: list = field(default_factory=list)

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

    def prepare(self, manifest: pa.Table, shard_rows: int) -> Plan:
        """Shards the manifest (once: a restart reuses the plan) and returns the plan."""
        plan = self.load_plan()
        if plan is not None:
            return plan
        manifest, duplicated = drop_duplicate_keys(manifest)
        n_shards = max(1, math.ceil(manifest.num_rows / max(1, shard_rows)))
        shards = shard_of(manifest.column("listing_id"), n_shards)
        order = np.argsort(shards, kind="stable")
        counts = np.bincount(shards, minlength=n_shards)
        ordered = manifest.take(pa.array(order)).append_column(SHARD_COLUMN, pa.array(shards[order], pa.int32()))
        start = 0
        fs, _ = storage.arrow_filesystem_for(self.dir)
        for shard, count in enumerate(counts):
            if count:
                path = storage.arrow_filesystem_for(self.shard_manifest(shard))[1]
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                pq.write_table(ordered.slice(start, int(count)), path, filesystem=fs)
            start += int(count)
        plan = Plan(self.run_id, n_shards, [int(c) for c in counts], int(pc.sum(duplicated.column("extra_copies")).as_py() or 0),
                    duplicated.slice(0, 5).to_pylist())
        storage.write_bytes_atomic(self._path("plan.json"), json.dumps(plan.__dict__).encode())
        return plan

    def done_shards(self) -> set[int]:
        fs, path = storage.filesystem_for(self._path("done"))
        if not fs.exists(path):
            return set()
        return {int(name.rsplit("/", 1)[-1][len("shard-"):-len(".json")]) for name in fs.ls(path, detail=False)
                if name.endswith(".json")}

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

    def remove_data_files(self, totals: Totals | None = None) -> None:
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

"""``mltag reindex``: the nightly incremental re-index. Only new or changed images are tagged.

Each image's identity is (listing_id, image_uri) plus a content fingerprint: the object's ETag,
size and modification time from its filesystem (``--fingerprint stat``, cheap) or a hash of its
bytes (``--fingerprint hash``). Against the last committed snapshot of the tag table:
  new       (listing, image) pairs not in it           -> tagged
  changed   a different fingerprint or model version   -> tagged
  unchanged the same fingerprint and model version     -> carried over, row for row
  deleted   in the snapshot but not in today's catalog -> dropped (and removed from the index)
The new snapshot is written as ``<table>/snapshot=<date>/`` with its ``_SUCCESS.json`` and the
FAISS index, when given, is updated in place. A new model version re-tags everything.

Idempotent and resumable: work happens in ``<table>/.reindex-<date>/``; the tagged part is a
committed run of its own, reused on restart when it covers the same rows, and the snapshot is
swapped in whole at the end. Re-running a finished date gives the same snapshot.

    mltag reindex --manifest s3://bucket/catalog/today.parquet --model s3://bucket/models/v3 \\
        --table s3://bucket/tag_table --index /data/index --snapshot 2026-11-24
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag import catalog, storage, tag_table
from mltag.model import load_spec

FINGERPRINTS = ("stat", "hash")


@dataclass
class ReindexConfig:
    """Nightly incremental re-index: tag only new or changed images, carry the rest over."""

    manifest: str = ""  # today's catalog manifest
    model: str = ""  # tagger directory
    table: str = "runs/tag_table"  # tag-table root holding snapshot=* partitions (local)
    snapshot: str = ""  # today's partition value; empty: today's UTC date
    index: str = ""  # FAISS index directory to update in place; empty: none
    fingerprint: str = "stat"  # stat: ETag/size/mtime | hash: sha256 of the bytes
    batch_size: int = 64  # inference batch size
    num_actors: int = 0  # inference actors (0: from the cluster's resources)

    def validate(self) -> None:
        if not self.manifest or not self.model:
            raise ValueError("manifest and model are required")
        if self.fingerprint not in FINGERPRINTS:
            raise ValueError(f"unknown fingerprint {self.fingerprint!r}; choose one of: {', '.join(FINGERPRINTS)}")
        if storage.is_remote(self.table):
            raise ValueError("reindex swaps snapshot directories in place: --table must be a local or mounted path")

    def snapshot_value(self) -> str:
        return self.snapshot or time.strftime("%Y-%m-%d", time.gmtime())


# ---- pure pieces ----------------------------------------------------------------------------------
def fingerprint_of(uri: str, mode: str) -> str:
    """A string that changes when the image's content does ('' if it cannot be read)."""
    try:
        fs, path = storage.filesystem_for(uri)
        if mode == "hash":
            with fs.open(path, "rb") as f:
                return "sha256:" + hashlib.sha256(f.read()).hexdigest()
        info = fs.info(path)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
        return f"stat:{info.get('size')}:{mtime}:{etag}"
    except (OSError, ValueError):
        return ""  # unreadable now: tag it, and the tag table records why


def fingerprint_batch(batch: pa.Table, mode: str) -> pa.Table:
    prints = [fingerprint_of(u, mode) for u in batch.column("image_uri").to_pylist()]
    if "fingerprint" in batch.column_names:
        batch = batch.drop_columns(["fingerprint"])
    return batch.append_column("fingerprint", pa.array(prints, pa.string()))


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("listing_id").to_pylist(), table.column("image_uri").to_pylist()))


def plan(today: pa.Table, previous: pa.Table | None, model_version: str) -> dict[str, list[tuple[str, str]]]:
    """Splits today's (listing, image) keys into new / changed / unchanged, and lists deleted ones."""
    if previous is None:
        return {"new": _keys(today), "changed": [], "unchanged": [], "deleted": []}
    before = {}
    has_print = "fingerprint" in previous.column_names
    for key, fp, version in zip(_keys(previous), previous.column("fingerprint").to_pylist() if has_print else [None] * previous.num_rows,
                                previous.column("model_version").to_pylist()):
        before[key] = (fp, version)
    out = {"new": [], "changed": [], "unchanged": [], "deleted": []}
    for key, fp in zip(_keys(today), today.column("fingerprint").to_pylist()):
        if key not in before:
            out["new"].append(key)
        elif not fp or before[key][0] != fp or before[key][1] != model_version:
            out["changed"].append(key)
        else:
            out["unchanged"].append(key)
    today_keys = set(_keys(today))
    out["deleted"] = [k for k in before if k not in today_keys]
    return out


def _select(table: pa.Table | pa.RecordBatch, wanted: set[tuple[str, str]]) -> pa.Table | pa.RecordBatch:
    """The rows whose (listing, image) key is in ``wanted``, in their order."""
    return table.filter(pa.array([k in wanted for k in _keys(table)], pa.bool_()))


def _plan_columns(snapshot_dir: str) -> pa.Table:
    """What planning needs of a snapshot: keys, fingerprints, model versions (not its embeddings)."""
    dataset = tag_table.open_dataset(snapshot_dir)
    return dataset.to_table(columns=[c for c in ("listing_id", "image_uri", "fingerprint", "model_version") if c in dataset.schema.names])


def _carry_over(snapshot_dir: str, keys: list[tuple[str, str]], path: str) -> None:
    """Streams a snapshot file by file, batch by batch, and writes the rows whose key is in
    ``keys`` to ``path`` exactly as they were, in their order."""
    wanted = set(keys)
    dataset = tag_table.open_dataset(snapshot_dir)
    with pq.ParquetWriter(path, dataset.schema) as writer:
        for fragment in dataset.get_fragments():  # the committed files, in their listed order
            for batch in fragment.to_batches():
                kept = _select(batch, wanted)
                if kept.num_rows:  # no empty row groups
                    writer.write_batch(kept)


def _previous_snapshot(table_root: str, snapshot: str) -> str | None:
    """The newest committed snapshot strictly before today's (so a re-run of today is idempotent)."""
    if not os.path.isdir(table_root):
        return None
    names = sorted((n for n in os.listdir(table_root) if n.startswith("snapshot=") and n < f"snapshot={snapshot}"), reverse=True)
    for name in names:
        if os.path.exists(os.path.join(table_root, name, tag_table.SUCCESS_FILE)):
            return os.path.join(table_root, name)
    return None


# ---- the stage ------------------------------------------------------------------------------------
def run(config: ReindexConfig) -> dict:
    import ray
    import ray.data

    from mltag.index import IndexUpdateConfig, update_index
    from mltag.tag import TagConfig
    from mltag.tag import run as tag_run

    started = time.time()
    snapshot = config.snapshot_value()
    root = os.path.abspath(config.table)
    spec = load_spec(config.model)
    today = catalog.read_manifest(config.manifest)
    if not ray.is_initialized():
        ray.init()
    # Fingerprints in parallel: a stat (or a read) per image is the slow part of the planning.
    ds = ray.data.from_arrow(catalog.chunk_table(today, 256))
    today = pa.concat_tables(list(ds.map_batches(fingerprint_batch, fn_kwargs={"mode": config.fingerprint},
                                                 batch_format="pyarrow").iter_batches(batch_format="pyarrow", batch_size=None)))
    previous_dir = _previous_snapshot(root, snapshot)
    parts = plan(today, _plan_columns(previous_dir) if previous_dir else None, spec.version)
    work = os.path.join(root, f".reindex-{snapshot}")
    os.makedirs(work, exist_ok=True)

    # 1. Tag new and changed rows: a committed run of its own, reused on restart.
    to_tag = _select(today, set(parts["new"] + parts["changed"]))
    signature = hashlib.sha256(json.dumps(sorted(_keys(to_tag)) + [spec.version, config.fingerprint]).encode()).hexdigest()[:16]
    tagged_dir = os.path.join(work, "tagged")
    reused = False
    if to_tag.num_rows:
        marker = os.path.join(tagged_dir, tag_table.SUCCESS_FILE)
        if os.path.exists(marker) and json.load(open(marker)).get("run_id") == signature:
            reused = True
        else:
            subset = os.path.join(work, "to_tag.parquet")
            pq.write_table(to_tag, subset)
            tag_run(TagConfig(manifest=subset, model=config.model, out=tagged_dir, run_id=signature,
                              batch_size=config.batch_size, num_actors=config.num_actors))
    # 2. Carry unchanged rows over, exactly as they were.
    staging = os.path.join(work, f"snapshot={snapshot}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    files = []
    if to_tag.num_rows:
        for name in tag_table.read_success(tagged_dir)["files"]:
            shutil.copyfile(os.path.join(tagged_dir, name), os.path.join(staging, f"tagged-{name}"))
            files.append(f"tagged-{name}")
    if parts["unchanged"]:
        _carry_over(previous_dir, parts["unchanged"], os.path.join(staging, "carried.parquet"))
        files.append("carried.parquet")
    rows = sum(pq.read_metadata(os.path.join(staging, f)).num_rows for f in files)
    if rows != today.num_rows:
        raise RuntimeError(f"snapshot would have {rows} rows for {today.num_rows} catalog rows; not committing")
    clean = sum(pq.read_table(os.path.join(staging, f), columns=["error"]).column("error").null_count for f in files)
    summary = {
        "run_id": f"reindex-{snapshot}", "snapshot": snapshot, "model_version": spec.version, "manifest": config.manifest,
        "previous_snapshot": os.path.basename(previous_dir) if previous_dir else None,
        "new": len(parts["new"]), "changed": len(parts["changed"]), "unchanged": len(parts["unchanged"]),
        "deleted": len(parts["deleted"]), "rows": rows, "errors": rows - clean, "manifest_rows": today.num_rows,
        "tagged_reused_after_restart": reused, "embedding_dim": spec.embedding_dim, "vocabulary": list(spec.vocab.names),
        "files": files,
    }
    # 3. Swap the snapshot in whole, then mark it committed.
    final = os.path.join(root, f"snapshot={snapshot}")
    if os.path.exists(final):
        os.replace(final, final + ".previous")
    os.replace(staging, final)
    shutil.rmtree(final + ".previous", ignore_errors=True)
    summary["seconds"] = round(time.time() - started, 2)
    with open(os.path.join(final, tag_table.SUCCESS_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    # 4. The index follows: changed and new rows replace, deleted ones go.
    if config.index:
        deleted_ids = sorted({k[0] for k in parts["deleted"]} - {k[0] for k in _keys(today)})
        update_index(IndexUpdateConfig(index=config.index, add_tag_table=tagged_dir if to_tag.num_rows else ""),
                     remove=deleted_ids) if (to_tag.num_rows or deleted_ids) else None
    shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(root, f"_reindex-{snapshot}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"reindex {snapshot}: {summary['new']} new, {summary['changed']} changed, {summary['unchanged']} unchanged, "
          f"{summary['deleted']} deleted, {summary['errors']} errors, {summary['seconds']} s -> {final}")
    return summary

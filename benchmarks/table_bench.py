"""The tag table's storage layer over one night: a Delta MERGE (what `mltag reindex` does) against
the full-snapshot copy the table used before (every unchanged row copied into a new
`snapshot=DATE/` directory each night). Same catalog, same changes, same tagged rows.

A catalog of N rows (default 100k): a few hundred tiny real JPEGs (crops of scikit-learn's sample
photos) under N distinct listing ids (hard links: one file per row, so a row's photo can change
alone), tagged by a tiny timm model at 64 px, so the storage layer, not the forward pass, is
measured. Night 2 changes 1% of the photos, adds 0.5% new listings and deletes 0.5%.

    python benchmarks/table_bench.py                 # 100k rows: ~10 min on 2 cores
    python benchmarks/table_bench.py --rows 20000    # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import files_under, save  # noqa: E402
from synthetic_catalog import link_rows, make_images, tiny_model  # noqa: E402

GOAL_SHARE = 0.05  # bytes written per night <= 5% of the table's size


def build_catalog(work: str, rows: int, seed: int = 0):
    import pyarrow as pa

    links = os.path.join(work, "rows")
    uris = link_rows(make_images(os.path.join(work, "images"), 400, seed, crop=128), links, rows)
    return pa.table({"listing_id": [f"L{i:07d}" for i in range(rows)], "image_uri": uris}), links


def night2_changes(catalog, links: str, work: str, seed: int = 1):
    """1% of rows get new photo bytes (same listing and URI), 0.5% new listings, 0.5% deleted."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    rows = catalog.num_rows
    order = rng.permutation(rows)
    changed, deleted = order[: rows // 100], order[rows // 100 : rows // 100 + rows // 200]
    fresh = make_images(os.path.join(work, "images2"), 50, seed + 10, crop=128)
    for k, i in enumerate(changed):
        path = catalog.column("image_uri")[int(i)].as_py()
        os.unlink(path)
        shutil.copyfile(fresh[k % len(fresh)], path)
    keep = np.setdiff1d(np.arange(rows), deleted)
    new_ids = [f"N{i:07d}" for i in range(rows // 200)]
    new_uris = []
    for k, _ in enumerate(new_ids):
        path = os.path.join(links, f"new-{k:07d}.jpg")
        os.link(fresh[k % len(fresh)], path)
        new_uris.append(path)
    today = pa.concat_tables([catalog.take(pa.array(keep)), pa.table({"listing_id": new_ids, "image_uri": new_uris})])
    return today, len(changed), len(new_ids), len(deleted)


def full_snapshot_copy(table_uri: str, version: int, tagged_files: list[str], unchanged_keys, out_dir: str) -> tuple[float, int]:
    """The previous design's night: a new snapshot directory holding the newly tagged rows plus a
    copy of every unchanged row of the previous snapshot, streamed file by file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mltag.table import delta_table

    started = time.time()
    os.makedirs(out_dir)
    for k, path in enumerate(tagged_files):
        shutil.copyfile(path, os.path.join(out_dir, f"tagged-{k}.parquet"))
    keys = pa.table({"listing_id": unchanged_keys[0], "image_uri": unchanged_keys[1], "_keep": np.ones(len(unchanged_keys[0]), bool)})
    dataset = delta_table.open_table(table_uri, version).to_pyarrow_dataset()
    with pq.ParquetWriter(os.path.join(out_dir, "carried.parquet"), dataset.schema) as writer:
        for batch in dataset.to_batches(batch_size=65_536):
            table = pa.Table.from_batches([batch])
            marks = table.select(["listing_id", "image_uri"]).append_column("_row", pa.array(np.arange(table.num_rows)))
            hit = marks.join(keys, keys=["listing_id", "image_uri"], join_type="inner", use_threads=False).column("_row")
            if len(hit):
                writer.write_table(table.take(pa.array(np.sort(hit.to_numpy()))))
    return time.time() - started, sum(files_under(out_dir).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "local")
    import pyarrow.parquet as pq
    import ray

    from mltag.stages.reindex import ReindexConfig, run
    from mltag.table import delta_table, tag_table

    work = args.work or tempfile.mkdtemp(prefix="table-bench-")
    print(f"work dir {work}", flush=True)
    catalog, links = build_catalog(work, args.rows)
    model = tiny_model(work)
    ray.init(address="local", log_to_driver=False)
    table_uri = os.path.join(work, "tag_table")

    pq.write_table(catalog, os.path.join(work, "night1.parquet"))
    started = time.time()
    night1 = run(
        ReindexConfig(manifest=os.path.join(work, "night1.parquet"), model=model, table=table_uri, snapshot="2026-11-20", batch_size=256)
    )
    night1_s = time.time() - started
    table_bytes = sum(size for path, size in files_under(table_uri).items() if "/_delta_log/" not in path)
    print(f"night 1: {night1['rows']} rows in {night1_s:.0f} s, table {table_bytes / 2**20:.1f} MiB", flush=True)

    today, n_changed, n_new, n_deleted = night2_changes(catalog, links, work)
    pq.write_table(today, os.path.join(work, "night2.parquet"))
    before = files_under(table_uri)
    started = time.time()
    night2 = run(
        ReindexConfig(manifest=os.path.join(work, "night2.parquet"), model=model, table=table_uri, snapshot="2026-11-21", batch_size=256)
    )
    merge_wall = time.time() - started
    after = files_under(table_uri)
    written = {p: s for p, s in after.items() if p not in before}
    merge_bytes = sum(written.values()) + night2["bytes_tagged"]  # + the tagged rows staged before the MERGE read them
    metrics = night2["merge"]
    merge_files = metrics["num_target_files_added"] + metrics["num_target_files_removed"]
    print(
        f"night 2 (MERGE): {night2['new']} new, {night2['changed']} changed, {night2['deleted']} deleted in {merge_wall:.1f} s, "
        f"{merge_bytes / 2**20:.1f} MiB written",
        flush=True,
    )

    # The previous design on the same night: the rows tagged tonight (taken from the MERGE's change
    # feed: inserts and updates) plus a copy of every unchanged row of night 1, in a new directory.
    import pyarrow as pa
    import pyarrow.compute as pc

    rows_now = tag_table.read_rows(table_uri, columns=["listing_id"]).num_rows
    feed = pa.table(delta_table.open_table(table_uri).load_cdf(starting_version=1, ending_version=1).read_all())
    feed = feed.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else f for f in feed.schema]))
    touched = set(zip(feed.column("listing_id").to_pylist(), feed.column("image_uri").to_pylist()))
    tagged_rows = feed.filter(pc.is_in(feed.column("_change_type"), pa.array(["insert", "update_postimage"])))
    tagged_dir = os.path.join(work, "tagged-only")
    os.makedirs(tagged_dir)
    pq.write_table(
        tagged_rows.drop_columns([c for c in tagged_rows.column_names if c.startswith("_")]), os.path.join(tagged_dir, "part-0.parquet")
    )
    night1_keys = tag_table.read_rows(table_uri, columns=["listing_id", "image_uri"], as_of=0)
    today_keys = set(zip(today.column("listing_id").to_pylist(), today.column("image_uri").to_pylist()))
    unchanged = [
        k
        for k in zip(night1_keys.column("listing_id").to_pylist(), night1_keys.column("image_uri").to_pylist())
        if k in today_keys and k not in touched
    ]
    copy_s, copy_bytes = full_snapshot_copy(
        table_uri,
        0,
        [os.path.join(tagged_dir, "part-0.parquet")],
        ([k[0] for k in unchanged], [k[1] for k in unchanged]),
        os.path.join(work, "snapshot=2026-11-21"),
    )
    copy_files = 2
    print(
        f"night 2 (full snapshot copy): {len(unchanged):,} rows carried, {copy_bytes / 2**20:.1f} MiB written in {copy_s:.1f} s", flush=True
    )

    # Night 3, new listings only (0.5%): what a MERGE costs when no existing file holds a changed row.
    import pyarrow as pa

    fresh = make_images(os.path.join(work, "images3"), 20, 33, crop=128)
    more_ids = [f"M{i:07d}" for i in range(args.rows // 200)]
    more_uris = []
    for k, _ in enumerate(more_ids):
        path = os.path.join(links, f"more-{k:07d}.jpg")
        os.link(fresh[k % len(fresh)], path)
        more_uris.append(path)
    pq.write_table(
        pa.concat_tables([today, pa.table({"listing_id": more_ids, "image_uri": more_uris})]), os.path.join(work, "night3.parquet")
    )
    before = files_under(table_uri)
    started = time.time()
    night3 = run(
        ReindexConfig(manifest=os.path.join(work, "night3.parquet"), model=model, table=table_uri, snapshot="2026-11-22", batch_size=256)
    )
    append_wall = time.time() - started
    append_written = {p: s for p, s in files_under(table_uri).items() if p not in before}
    append_bytes = sum(append_written.values()) + night3["bytes_tagged"]
    append_metrics = night3["merge"]
    append_files = append_metrics["num_target_files_added"] + append_metrics["num_target_files_removed"]

    merge_share, copy_share = merge_bytes / table_bytes, copy_bytes / table_bytes
    rows = [
        ("Delta MERGE (mltag reindex)", merge_wall, metrics["execution_time_ms"] / 1000, merge_bytes, merge_files, merge_share),
        ("full-snapshot copy (previous design)", None, copy_s, copy_bytes, copy_files, copy_share),
        (
            "night 3, 0.5% new listings only: Delta MERGE",
            append_wall,
            append_metrics["execution_time_ms"] / 1000,
            append_bytes,
            append_files,
            append_bytes / table_bytes,
        ),
    ]
    lines = [
        f"Catalog: {args.rows:,} rows (400 real 64 px JPEGs under distinct ids), tiny model (timm test_efficientnet, 64 px). "
        f"Night 2: {n_changed:,} photos changed (1%), {n_new:,} new listings (0.5%), {n_deleted:,} deleted (0.5%). "
        f"Table after night 1: {table_bytes / 2**20:.1f} MiB of data files ({night1_s:.0f} s to tag and commit it).",
        "",
        "| night | wall, whole night (s) | storage step (s) | bytes written | files added + removed | share of the table |",
        "|---|---|---|---|---|---|",
    ]
    for name, wall, step, written_bytes, files, share in rows:
        lines.append(
            f"| {name} | {'' if wall is None else f'{wall:.1f}'} | {step:.1f} | {written_bytes / 2**20:.1f} MiB | {files} | {share:.1%} |"
        )
    met = merge_share <= GOAL_SHARE
    lines += [
        "",
        f"Goal: bytes written per night <= {GOAL_SHARE:.0%} of the table: **{'met' if met else 'not met'}** "
        f"({merge_share:.1%}). Rows after night 2: {rows_now:,}.",
    ]
    save(
        "table_bench",
        {
            "rows": args.rows,
            "table_bytes": table_bytes,
            "night1_s": night1_s,
            "merge_wall_s": merge_wall,
            "merge_step_s": metrics["execution_time_ms"] / 1000,
            "merge_bytes": merge_bytes,
            "merge_files": merge_files,
            "merge_metrics": metrics,
            "copy_s": copy_s,
            "copy_bytes": copy_bytes,
            "goal_met": met,
            "changed": n_changed,
            "new": n_new,
            "deleted": n_deleted,
            "append_bytes": append_bytes,
            "append_wall_s": append_wall,
            "append_metrics": append_metrics,
        },
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""A 20,000-row catalog through every stage that streams: tag (several shards), a night, index
build and update, anomalies and duplicates. Correctness only: rows out = rows in, keys identical,
counts right. (Speed and driver memory at 100k and 1M rows: benchmarks/scale.py.)"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mltag.data.catalog import read_manifest
from mltag.table import tag_table

pytestmark = pytest.mark.slow
ROWS = 20_000


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("listing_id").to_pylist(), table.column("image_uri").to_pylist()))


@pytest.fixture(scope="module")
def big_catalog(tiny_catalog, tmp_path_factory):
    """The 48 sample JPEGs under 20,000 listing ids, one hard link per row (so a row's photo can
    change alone), as a CSV manifest with relative URIs (the streaming reader resolves them)."""
    root = tmp_path_factory.mktemp("scale")
    base = read_manifest(tiny_catalog["manifest"])
    images = base.column("image_uri").to_pylist()
    os.makedirs(root / "rows")
    ids, uris = [], []
    for i in range(ROWS):
        os.link(images[i % len(images)], root / "rows" / f"{i:06d}.jpg")
        ids.append(f"{i:06d}")  # leading zeros: ids stay text
        uris.append(f"rows/{i:06d}.jpg")
    pa.csv.write_csv(pa.table({"listing_id": ids, "image_uri": uris}), root / "manifest.csv")
    return root


def test_twenty_thousand_rows_through_every_streaming_stage(ray_local, big_catalog, tiny_model_dir, tmp_path):
    import pyarrow.csv  # noqa: F401 (the fixture writes CSV)

    from mltag.search import EmbeddingIndex, IndexConfig, IndexUpdateConfig, build_index, update_index
    from mltag.stages import anomalies, duplicates
    from mltag.stages.reindex import ReindexConfig
    from mltag.stages.reindex import run as reindex
    from mltag.stages.tag import TagConfig
    from mltag.stages.tag import run as tag

    table_uri, index_dir = str(tmp_path / "t"), str(tmp_path / "index")
    meta = tag(
        TagConfig(
            manifest=str(big_catalog / "manifest.csv"),
            model=tiny_model_dir,
            out=table_uri,
            shard_rows=5_000,
            batch_size=256,
            decode_batch_size=256,
        )
    )
    rows = tag_table.read_rows(table_uri, columns=["listing_id", "image_uri", "error"])
    expected = [(f"{i:06d}", str(big_catalog / "rows" / f"{i:06d}.jpg")) for i in range(ROWS)]
    assert meta["rows"] == rows.num_rows == ROWS and meta["shards"] == 4 and rows.column("error").null_count == ROWS
    assert _keys(rows) == sorted(expected)

    built = build_index(IndexConfig(tag_table=table_uri, out=index_dir))
    assert built["count"] == ROWS

    # A night: 200 rows gone, 100 photos replaced, 150 new listings.
    manifest = pa.csv.read_csv(
        big_catalog / "manifest.csv",
        convert_options=pa.csv.ConvertOptions(column_types={"listing_id": pa.string(), "image_uri": pa.string()}),
    )
    kept = manifest.slice(200)
    for i in range(200, 300):
        path = big_catalog / "rows" / f"{i:06d}.jpg"
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data + b"\0\0")  # new bytes (past the end marker), the same picture
    new = pa.table({"listing_id": [f"NEW{i}" for i in range(150)], "image_uri": [f"rows/{i:06d}.jpg" for i in range(150)]})
    pq.write_table(pa.concat_tables([kept, new]), big_catalog / "night.parquet")
    night = reindex(
        ReindexConfig(
            manifest=str(big_catalog / "night.parquet"),
            model=tiny_model_dir,
            table=table_uri,
            snapshot="2026-11-24",
            shard_rows=5_000,
            batch_size=256,
        )
    )
    assert (night["new"], night["changed"], night["deleted"]) == (150, 100, 200)
    after = tag_table.read_rows(table_uri, columns=["listing_id", "image_uri"])
    assert after.num_rows == ROWS - 200 + 150 == len(set(_keys(after)))

    updated = update_index(IndexUpdateConfig(index=index_dir))
    assert updated["count"] == after.num_rows and updated["table_version"] == 1
    index = EmbeddingIndex.load(index_dir)
    assert sorted(index.ids.column("listing_id").to_pylist()) == sorted(after.column("listing_id").to_pylist())

    outliers = anomalies.run(anomalies.AnomalyConfig(index=index_dir, out=str(tmp_path / "anomalies.parquet"), k=5))
    assert outliers.num_rows == after.num_rows and len(set(outliers.column("listing_id").to_pylist())) == after.num_rows
    assert pc.sum(outliers.column("is_outlier")).as_py() == -(-after.num_rows // 100)  # the top 1%, rounded up
    groups = duplicates.run(duplicates.DuplicatesConfig(index=index_dir, out=str(tmp_path / "duplicates.parquet"), k=5, threshold=0.999))
    # The same 48 photos under ~400 ids each: every listing is in a near-duplicate group.
    assert groups.num_rows > 0.9 * after.num_rows

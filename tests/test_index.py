import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag import tag_table
from mltag.index import EmbeddingIndex, IndexConfig, build_index, l2_normalise
from mltag.tag_table import UncommittedRunError


def write_committed_table(directory, embeddings, errors, files=2):
    """A real committed tag table (Parquet parts + _SUCCESS.json) with the given embeddings."""
    directory.mkdir(parents=True, exist_ok=True)
    n, dim = embeddings.shape
    batch = pa.table({"listing_id": [f"L{i}" for i in range(n)], "image_uri": [f"/img/{i}.jpg" for i in range(n)]})
    ok = np.array([i for i in range(n) if errors[i] is None])
    tags = [[f"t{i % 3}"] for i in ok]
    table = tag_table.assemble(batch, ok, np.zeros((len(ok), 3), np.float32), embeddings[ok], tags, "v1", errors)
    names = []
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        names.append(f"part-{k}.parquet")
        pq.write_table(table.take(part), directory / names[-1])
    (directory / "_SUCCESS.json").write_text(json.dumps({"run_id": "r1", "model_version": "v1", "embedding_dim": dim, "files": names,
                                                                  "rows": n, "errors": sum(e is not None for e in errors)}))
    return table


@pytest.fixture()
def clustered(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    emb = (centres[np.arange(60) % 5] + 0.05 * rng.normal(size=(60, 16))).astype(np.float32)
    errors = [None] * 60
    errors[7] = "corrupt image: broken data stream"
    write_committed_table(tmp_path / "tags", emb, errors)
    return tmp_path, emb, errors


def test_search_by_listing_returns_itself_first_then_true_neighbours(clustered):
    tmp_path, emb, _ = clustered
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    assert meta["count"] == 59 and meta["skipped_error_rows"] == 1
    index = EmbeddingIndex.load(str(tmp_path / "idx"))
    result = index.search_listing("L12", k=6).to_pylist()
    assert result[0]["listing_id"] == "L12" and result[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    # Brute-force cosine reference over the non-error rows.
    normed = l2_normalise(emb)
    sims = normed @ normed[12]
    sims[7] = -np.inf
    expected = [f"L{i}" for i in np.argsort(-sims)[:6]]
    assert [r["listing_id"] for r in result] == expected
    assert all(int(r["listing_id"][1:]) % 5 == 12 % 5 for r in result)  # same cluster
    assert [r["rank"] for r in result] == list(range(1, 7))


def test_error_rows_are_not_searchable(clustered):
    tmp_path, _, _ = clustered
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    with pytest.raises(KeyError, match="L7"):
        EmbeddingIndex.load(str(tmp_path / "idx")).search_listing("L7")


def test_trainable_factory_streams_and_trains(clustered):
    tmp_path, _, _ = clustered
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "ivf"), factory="IVF4,Flat", batch_rows=16))
    assert meta["count"] == 59 and meta["factory"] == "IVF4,Flat"
    index = EmbeddingIndex.load(str(tmp_path / "ivf"))
    index.set_search_parameter("nprobe", 4)  # all lists: exact
    assert index.search_listing("L3", k=1).column("listing_id").to_pylist() == ["L3"]


def test_uncommitted_table_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(UncommittedRunError, match="_SUCCESS"):
        build_index(IndexConfig(tag_table=str(tmp_path / "half"), out=str(tmp_path / "idx")))


def test_table_root_uses_the_newest_committed_snapshot(tmp_path):
    rng = np.random.default_rng(1)
    write_committed_table(tmp_path / "root" / "snapshot=2026-11-21", rng.normal(size=(5, 8)).astype(np.float32), [None] * 5)
    write_committed_table(tmp_path / "root" / "snapshot=2026-11-22", rng.normal(size=(7, 8)).astype(np.float32), [None] * 7)
    half = tmp_path / "root" / "snapshot=2026-11-23"  # still being written: no _SUCCESS.json
    half.mkdir()
    (half / "part-0.parquet").write_bytes(b"PAR1")
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "root"), out=str(tmp_path / "idx")))
    assert meta["count"] == 7 and meta["tag_table"].endswith("snapshot=2026-11-22")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_incremental_update_adds_removes_and_replaces(tmp_path, factory):
    from mltag.index import IndexUpdateConfig, update_index

    rng = np.random.default_rng(3)
    first = rng.normal(size=(30, 8)).astype(np.float32)
    write_committed_table(tmp_path / "day1", first, [None] * 30)
    build_index(IndexConfig(tag_table=str(tmp_path / "day1"), out=str(tmp_path / "idx"), factory=factory))

    # Day 2: L0..L4 changed (new vectors), L30..L34 new; L10 and L11 deleted from the catalog.
    second = rng.normal(size=(35, 8)).astype(np.float32)
    table = write_committed_table(tmp_path / "day2", second, [None] * 35)
    changed = table.filter(pa.compute.is_in(table.column("listing_id"), pa.array([f"L{i}" for i in list(range(5)) + list(range(30, 35))])))
    (tmp_path / "day2-delta").mkdir()
    pq.write_table(changed, tmp_path / "day2-delta" / "part-0.parquet")
    (tmp_path / "day2-delta" / "_SUCCESS.json").write_text(json.dumps({"run_id": "d", "model_version": "v1", "embedding_dim": 8,
                                                                      "files": ["part-0.parquet"], "rows": 10, "errors": 0}))
    (tmp_path / "gone.txt").write_text("L10\nL11\n")
    meta = update_index(IndexUpdateConfig(index=str(tmp_path / "idx"), add_tag_table=str(tmp_path / "day2-delta"),
                                          remove_ids_file=str(tmp_path / "gone.txt")))
    assert meta["count"] == 30 - 2 + 5 and meta["last_update"]["added"] == 10 and meta["last_update"]["removed"] == 7
    index = EmbeddingIndex.load(str(tmp_path / "idx"))
    if "IVF" in factory:
        index.set_search_parameter("nprobe", 4)
    listings = index.ids.column("listing_id").to_pylist()
    assert len(listings) == len(set(listings)) == 33 and "L10" not in listings and "L34" in listings
    # A replaced listing is found by its new vector, an untouched one by its old.
    assert index.search_vectors(second[2:3], 1)[0].column("listing_id").to_pylist() == ["L2"]
    assert index.search_vectors(first[20:21], 1)[0].column("listing_id").to_pylist() == ["L20"]
    np.testing.assert_allclose(index.vector_of("L2")[0], l2_normalise(second[2:3])[0], atol=1e-6)


def test_batch_search_by_ids(clustered):
    tmp_path, _, _ = clustered
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    result = EmbeddingIndex.load(str(tmp_path / "idx")).search_listings(["L1", "L2", "NOPE"], k=3)
    assert result.column("query_listing_id").to_pylist() == ["L1"] * 3 + ["L2"] * 3
    assert result.to_pandas().groupby("query_listing_id")["rank"].max().tolist() == [3, 3]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_memory_mapped_loading_gives_the_same_answers(clustered, factory):
    tmp_path, _, _ = clustered
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / factory), factory=factory))
    plain = EmbeddingIndex.load(str(tmp_path / factory)).search_listing("L3", k=5)
    mapped = EmbeddingIndex.load(str(tmp_path / factory), mmap=True).search_listing("L3", k=5)
    assert plain.column("listing_id").to_pylist() == mapped.column("listing_id").to_pylist()

import numpy as np
import pyarrow as pa
import pytest

from mltag.search import EmbeddingIndex, IndexConfig, build_index, l2_normalise
from mltag.table import tag_table
from mltag.table.delta_table import TableNotFoundError, write_table


def write_committed_table(directory, embeddings, errors, files=2):
    """A real Delta tag table (one commit) with the given embeddings."""
    n, dim = embeddings.shape
    batch = pa.table({"listing_id": [f"L{i}" for i in range(n)], "image_uri": [f"/img/{i}.jpg" for i in range(n)]})
    ok = np.array([i for i in range(n) if errors[i] is None])
    tags = [[f"t{i % 3}"] for i in ok]
    table = tag_table.assemble(batch, ok, np.zeros((len(ok), 3), np.float32), embeddings[ok], tags, "v1", errors)
    write_table(
        str(directory),
        table,
        {"run_id": "r1", "model_version": "v1", "embedding_dim": dim, "rows": n, "errors": sum(e is not None for e in errors)},
    )
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
    assert meta["train_sample"] == 59  # the whole (small) table: a uniform sample never exceeds it
    index = EmbeddingIndex.load(str(tmp_path / "ivf"))
    index.set_search_parameter("nprobe", 4)  # all lists: exact
    assert index.search_listing("L3", k=1).column("listing_id").to_pylist() == ["L3"]


def test_a_path_without_a_delta_table_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "part-0.parquet").write_bytes(b"PAR1")  # Parquet files without a transaction log
    with pytest.raises(TableNotFoundError, match="no tag table"):
        build_index(IndexConfig(tag_table=str(tmp_path / "half"), out=str(tmp_path / "idx")))


def test_as_of_indexes_an_older_version(tmp_path):
    rng = np.random.default_rng(1)
    write_committed_table(tmp_path / "t", rng.normal(size=(5, 8)).astype(np.float32), [None] * 5)
    write_committed_table(tmp_path / "t", rng.normal(size=(7, 8)).astype(np.float32), [None] * 7)
    assert build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "old"), as_of="0"))["count"] == 5
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "new")))
    assert meta["count"] == 7 and meta["table_version"] == 1 and meta["model_version"] == "v1"


def merge_into(directory, upserts: pa.Table, deleted_ids: list[str], model_version: str = "v1"):
    """One MERGE commit, as the nightly re-index makes: rows upserted, listings deleted."""
    from mltag.table import delta_table

    dt = delta_table.open_table(str(directory))
    schema = upserts.schema.append(pa.field("_action", pa.string()))
    gone = pa.table(
        {
            f.name: (
                pa.array(deleted_ids, pa.string())
                if f.name == "listing_id"
                else pa.array([f"/img/{i[1:]}.jpg" for i in deleted_ids], pa.string())
                if f.name == "image_uri"
                else pa.nulls(len(deleted_ids), f.type)
            )
            for f in upserts.schema
        },
        schema=upserts.schema,
    )
    batches = [
        *upserts.append_column("_action", pa.array(["upsert"] * upserts.num_rows)).to_batches(),
        *gone.append_column("_action", pa.array(["delete"] * gone.num_rows)).to_batches(),
    ]
    delta_table.merge_rows(dt, batches, schema, {"model_version": model_version, "embedding_dim": 8, "run_id": "night"})


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_update_applies_exactly_what_changed_between_table_versions(tmp_path, factory):
    from mltag.search import IndexUpdateConfig, update_index

    rng = np.random.default_rng(3)
    first = rng.normal(size=(30, 8)).astype(np.float32)
    write_committed_table(tmp_path / "t", first, [None] * 30)
    build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx"), factory=factory))

    # Night 2, one MERGE: L0..L4 changed (new vectors), L30..L34 new, L10 and L11 deleted from the catalog.
    second = rng.normal(size=(35, 8)).astype(np.float32)
    batch = pa.table({"listing_id": [f"L{i}" for i in range(35)], "image_uri": [f"/img/{i}.jpg" for i in range(35)]})
    full = tag_table.assemble(batch, np.arange(35), np.zeros((35, 3), np.float32), second, [["t0"]] * 35, "v1", [None] * 35)
    changed = full.filter(pa.compute.is_in(full.column("listing_id"), pa.array([f"L{i}" for i in list(range(5)) + list(range(30, 35))])))
    merge_into(tmp_path / "t", changed, ["L10", "L11"])
    (tmp_path / "gone.txt").write_text("L20\n")  # and one listing removed by hand
    meta = update_index(IndexUpdateConfig(index=str(tmp_path / "idx"), remove_ids_file=str(tmp_path / "gone.txt")))
    assert meta["count"] == 30 - 2 - 1 + 5 == tag_table.read_rows(str(tmp_path / "t")).num_rows - 1
    assert meta["last_update"]["added"] == 10 and meta["last_update"]["removed"] == 5 + 2 + 1 and meta["table_version"] == 1
    index = EmbeddingIndex.load(str(tmp_path / "idx"))
    if "IVF" in factory:
        index.set_search_parameter("nprobe", 4)
    listings = index.ids.column("listing_id").to_pylist()
    assert len(listings) == len(set(listings)) == 32 and "L10" not in listings and "L20" not in listings and "L34" in listings
    # A replaced listing is found by its new vector, an untouched one by its old.
    assert index.search_vectors(second[2:3], 1)[0].column("listing_id").to_pylist() == ["L2"]
    assert index.search_vectors(first[21:22], 1)[0].column("listing_id").to_pylist() == ["L21"]
    np.testing.assert_allclose(index.vector_of("L2")[0], l2_normalise(second[2:3])[0], atol=1e-6)
    # Nothing new in the table: a second update changes nothing.
    again = update_index(IndexUpdateConfig(index=str(tmp_path / "idx")))
    assert again["count"] == meta["count"] and again["last_update"]["added"] == 0


def test_update_takes_listings_to_remove_from_its_one_config():
    from mltag.config import parse_config
    from mltag.search import IndexUpdateConfig

    assert parse_config(IndexUpdateConfig, ["--remove-ids", "L1,L2"]).remove_ids == ["L1", "L2"]
    assert parse_config(IndexUpdateConfig, []).remove_ids == []


def test_update_refuses_a_table_tagged_by_another_model(tmp_path):
    from mltag.search import IndexUpdateConfig, update_index

    rng = np.random.default_rng(4)
    write_committed_table(tmp_path / "t", rng.normal(size=(10, 8)).astype(np.float32), [None] * 10)
    build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx")))
    batch = pa.table({"listing_id": ["L1"], "image_uri": ["/img/1.jpg"]})
    row = tag_table.assemble(
        batch, np.arange(1), np.zeros((1, 3), np.float32), rng.normal(size=(1, 8)).astype(np.float32), [[]], "v2", [None]
    )
    merge_into(tmp_path / "t", row, [], model_version="v2")
    with pytest.raises(ValueError, match="rebuild it with `mltag index`"):
        update_index(IndexUpdateConfig(index=str(tmp_path / "idx")))
    assert len(EmbeddingIndex.load(str(tmp_path / "idx"))) == 10  # untouched


@pytest.mark.parametrize("step", ["index.faiss", "ids.parquet", "index.json", "rename"])
def test_a_crash_at_any_step_leaves_the_previous_index_searchable_and_a_rerun_converges(tmp_path, step, monkeypatch):
    from mltag.search import IndexUpdateConfig, update_index
    from mltag.stages import index_build, index_update

    rng = np.random.default_rng(5)
    first = rng.normal(size=(20, 8)).astype(np.float32)
    write_committed_table(tmp_path / "t", first, [None] * 20)
    real_write = index_build.write_version

    def crashing_write(*args, **kwargs):
        return real_write(*args, **kwargs, fail_after=step)

    # The build crashes after writing `step` of the first version: nothing is searchable yet,
    # and no half-written version is taken for one.
    monkeypatch.setattr(index_build, "write_version", crashing_write)
    with pytest.raises(RuntimeError, match="injected failure"):
        build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx")))
    with pytest.raises(FileNotFoundError):
        EmbeddingIndex.load(str(tmp_path / "idx"))
    monkeypatch.setattr(index_build, "write_version", real_write)
    assert build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx")))["count"] == 20

    batch = pa.table({"listing_id": [f"N{i}" for i in range(3)], "image_uri": [f"/img/N{i}.jpg" for i in range(3)]})
    new = tag_table.assemble(
        batch, np.arange(3), np.zeros((3, 3), np.float32), rng.normal(size=(3, 8)).astype(np.float32), [[]] * 3, "v1", [None] * 3
    )
    merge_into(tmp_path / "t", new, ["L0"])
    monkeypatch.setattr(index_update, "write_version", crashing_write)
    with pytest.raises(RuntimeError, match="injected failure"):
        update_index(IndexUpdateConfig(index=str(tmp_path / "idx")))
    monkeypatch.setattr(index_update, "write_version", real_write)
    survivor = EmbeddingIndex.load(str(tmp_path / "idx"))  # the previous version, whole
    assert len(survivor) == 20 and survivor.meta["table_version"] == 0
    assert survivor.search_listing("L5", k=1).column("listing_id").to_pylist() == ["L5"]
    meta = update_index(IndexUpdateConfig(index=str(tmp_path / "idx")))
    rows = tag_table.read_rows(str(tmp_path / "t"))
    assert meta["count"] == rows.num_rows == 22 and meta["table_version"] == 1
    assert sorted(EmbeddingIndex.load(str(tmp_path / "idx")).ids.column("listing_id").to_pylist()) == sorted(
        rows.column("listing_id").to_pylist()
    )


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


def read_provenance(path):
    import json

    return json.loads(open(path).read())


def test_every_index_version_and_search_output_records_its_config_and_versions(tmp_path):
    from mltag.config import config_hash
    from mltag.search import IndexUpdateConfig, SearchConfig, run_search, update_index
    from mltag.search.embedding_index import current_version_dir

    rng = np.random.default_rng(6)
    write_committed_table(tmp_path / "t", rng.normal(size=(12, 8)).astype(np.float32), [None] * 12)
    build = IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx"))
    build_index(build)
    record = read_provenance(f"{current_version_dir(str(tmp_path / 'idx'))}/provenance.json")
    assert record["config_hash"] == config_hash(build) and record["config"]["tag_table"] == str(tmp_path / "t")
    assert (
        record["model_version"] == "v1"
        and record["table_version"] == 0
        and record["config_class"] == "mltag.stages.index_build.IndexConfig"
    )

    update = IndexUpdateConfig(index=str(tmp_path / "idx"), remove_ids=["L3"])
    update_index(update)
    record = read_provenance(f"{current_version_dir(str(tmp_path / 'idx'))}/provenance.json")
    assert record["config_hash"] == config_hash(update) and record["config"]["remove_ids"] == ["L3"]
    assert record["model_version"] == "v1" and record["table_version"] == 0 and record["from_index_version"].endswith("v000001")

    (tmp_path / "ids.txt").write_text("L1\nL2\n")
    search = SearchConfig(index=str(tmp_path / "idx"), ids_file=str(tmp_path / "ids.txt"), out=str(tmp_path / "found.parquet"), k=2)
    run_search(search)
    record = read_provenance(tmp_path / "found.provenance.json")
    assert record["config_hash"] == config_hash(search) and record["model_version"] == "v1" and record["table_version"] == 0
    assert record["index_version"].endswith("v000002")


def test_status_goes_to_stderr_and_the_search_answer_to_stdout(clustered, capsys):
    from mltag.runtime import log
    from mltag.search import SearchConfig, run_search

    log.configure()
    tmp_path, _, _ = clustered
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    captured = capsys.readouterr()
    assert captured.out == "" and "I mltag.stages.index_build: index: 59 vectors (1 error rows skipped)" in captured.err
    run_search(SearchConfig(index=str(tmp_path / "idx"), listing_id="L12", k=3))
    captured = capsys.readouterr()
    assert captured.out.startswith("listings most similar to L12:\nrank  similarity") and captured.err == ""

import numpy as np
import pytest

from mltag.index import EmbeddingIndex, IndexConfig, build_index, exact_neighbours, l2_normalise, recall_at_k
from mltag.index_selection import choose_index, parse_bytes
from test_index import write_committed_table

GiB = 2**30


@pytest.mark.parametrize("n,dim,budget,expected", [
    (10_000, 2048, 4 * GiB, "Flat"),
    (150_000, 1280, 4 * GiB, "Flat"),
    (1_000_000, 256, 4 * GiB, "IVF4096,Flat"),
    (1_000_000, 2048, 4 * GiB, "OPQ256_1024,IVF4096,PQ256x8"),
    (1_000_000, 2048, 64 * 2**20, "OPQ48_192,IVF4096,PQ48x8"),
    (100_000_000, 2048, 16 * GiB, "OPQ128_512,IVF32768_HNSW32,PQ128x8"),
])
def test_auto_selection(n, dim, budget, expected):
    choice = choose_index(n, dim, budget)
    assert choice.factory == expected
    assert n * choice.bytes_per_vector <= budget
    assert choice.reason


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="max-index-memory"):
        choose_index(10**9, 2048, 2**20)


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * GiB and parse_bytes("500MB") == 500 * 10**6 and parse_bytes("1024") == 1024


@pytest.fixture()
def clustered(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    emb = (centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))).astype(np.float32)
    write_committed_table(tmp_path / "tags", emb, [None] * len(emb), files=3)
    return tmp_path, l2_normalise(emb)


def test_nprobe_is_tuned_to_the_target_recall(clustered):
    tmp_path, vectors = clustered
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "ivf"), factory="IVF64,Flat",
                                   target_recall=0.95, batch_rows=1000))
    assert meta["factory"] == "IVF64,Flat" and 1 <= meta["nprobe"] <= 64
    assert meta["tuned_recall_at_10"] >= 0.95
    index = EmbeddingIndex.load(str(tmp_path / "ivf"))  # nprobe applied on load
    queries = vectors[np.random.default_rng(5).choice(len(vectors), 200, replace=False)]
    truth = exact_neighbours(queries, [(np.arange(len(vectors)), vectors)], 10)
    _, found = index.index.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.93  # fresh queries: close to the tuned figure
    if meta["nprobe"] > 1:
        index.set_search_parameter("nprobe", meta["nprobe"] // 2)
        _, fewer = index.index.search(queries, 10)
        assert recall_at_k(fewer, truth) <= recall_at_k(found, truth)


def test_auto_picks_product_quantisation_under_a_small_budget(clustered):
    tmp_path, vectors = clustered
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "pq"), max_index_memory="200KB",
                                   target_recall=0.5))
    assert "PQ" in meta["factory"] and meta["count"] == 4000
    index = EmbeddingIndex.load(str(tmp_path / "pq"))
    hits = sum(index.search_listing(f"L{i}", k=5).column("listing_id").to_pylist().count(f"L{i}") for i in range(50))
    assert hits >= 45  # a compressed index still finds the listing itself


def test_exact_neighbours_streaming_matches_one_shot():
    rng = np.random.default_rng(2)
    data = l2_normalise(rng.normal(size=(500, 16)))
    queries = data[:20]
    one_shot = np.argsort(-(queries @ data.T), axis=1)[:, :7]
    streamed = exact_neighbours(queries, [(np.arange(i, min(i + 64, 500)), data[i:i + 64]) for i in range(0, 500, 64)], 7)
    np.testing.assert_array_equal(streamed, one_shot)

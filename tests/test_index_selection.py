import numpy as np
import pytest
from test_index import write_committed_table

from mltag.search import EmbeddingIndex, IndexConfig, build_index, exact_neighbours, l2_normalise, recall_at_k
from mltag.search.index_selection import choose_index, parse_bytes

GiB = 2**30


@pytest.mark.parametrize(
    "n,dim,budget,expected",
    [
        (10_000, 2048, 4 * GiB, "Flat"),
        (150_000, 1280, 4 * GiB, "Flat"),
        (1_000_000, 256, 4 * GiB, "IVF4096,Flat"),
        (1_000_000, 2048, 4 * GiB, "OPQ256_1024,IVF4096,PQ256x8"),
        (1_000_000, 2048, 64 * 2**20, "OPQ48_192,IVF4096,PQ48x8"),
        (100_000_000, 2048, 16 * GiB, "OPQ128_512,IVF32768_HNSW32,PQ128x8"),
    ],
)
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
    meta = build_index(
        IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "ivf"), factory="IVF64,Flat", target_recall=0.95, batch_rows=1000)
    )
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
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "pq"), max_index_memory="80KB", target_recall=0.5))
    assert "PQ8x8" in meta["factory"] and meta["count"] == 4000 and "78.1 KiB" in meta["reason"]
    index = EmbeddingIndex.load(str(tmp_path / "pq"))
    hits = sum(index.search_listing(f"L{i}", k=5).column("listing_id").to_pylist().count(f"L{i}") for i in range(50))
    assert hits >= 45  # a compressed index still finds the listing itself


def test_exact_neighbours_streaming_matches_one_shot():
    rng = np.random.default_rng(2)
    data = l2_normalise(rng.normal(size=(500, 16)))
    queries = data[:20]
    one_shot = np.argsort(-(queries @ data.T), axis=1)[:, :7]
    streamed = exact_neighbours(queries, [(np.arange(i, min(i + 64, 500)), data[i : i + 64]) for i in range(0, 500, 64)], 7)
    np.testing.assert_array_equal(streamed, one_shot)


def test_nprobe_tuning_stops_where_recall_stops_growing(clustered):
    """Tiny PQ codes cap recall far below the target: the tuning must not climb to a full scan
    for recall it cannot get, and what it keeps is as good as scanning every list."""
    import faiss

    from mltag.search import PLATEAU_GAIN, tune_nprobe

    _, vectors = clustered
    index = faiss.index_factory(vectors.shape[1], "IVF64,PQ2", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    queries = vectors[np.random.default_rng(6).choice(len(vectors), 200, replace=False)]
    truth = exact_neighbours(queries, [(np.arange(len(vectors)), vectors)], 10)
    nprobe, recall = tune_nprobe(index, queries, truth, 64, target=0.99)
    assert nprobe < 64 and recall < 0.99
    assert index.nprobe == nprobe  # left set to the value it returns
    index.nprobe = 64
    _, everything = index.search(queries, 10)
    assert recall_at_k(everything, truth) < recall + 2 * PLATEAU_GAIN


def test_refine_stage_reranks_exactly_and_refuses_removal_clearly(clustered):
    """`--factory ...,RFlat`: 4-byte codes alone are far from the target; the refine stage
    re-ranks candidates with the raw vectors (its k_factor saved with the index) and reaches it."""
    import faiss

    from mltag.search import REFINE_K_FACTOR, IndexUpdateConfig, update_index

    tmp_path, vectors = clustered
    meta = build_index(
        IndexConfig(
            tag_table=str(tmp_path / "tags"), out=str(tmp_path / "rf"), factory="IVF64,PQ4,RFlat", target_recall=0.95, batch_rows=1000
        )
    )
    assert meta["tuned_recall_at_10"] >= 0.95 and meta["factory"] == "IDMap2,IVF64,PQ4,RFlat"
    index = EmbeddingIndex.load(str(tmp_path / "rf"))
    refine = faiss.downcast_index(faiss.downcast_index(index.index).index)
    assert refine.k_factor == REFINE_K_FACTOR
    queries = vectors[np.random.default_rng(8).choice(len(vectors), 200, replace=False)]
    truth = exact_neighbours(queries, [(np.arange(len(vectors)), vectors)], 10)
    _, found = index.index.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.93
    refine.k_factor = 1  # the codes alone
    _, coarse = index.index.search(queries, 10)
    assert recall_at_k(coarse, truth) < 0.8
    with pytest.raises(ValueError, match="cannot remove"):
        update_index(IndexUpdateConfig(index=str(tmp_path / "rf"), remove_ids=["L1"]))

"""Catalog scale: the index's id map, its training sample, anomalies and duplicates hold arrays,
not a Python object a row; each is checked against a plain brute-force reference."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from test_index import write_committed_table

from mltag.search import (
    EmbeddingIndex,
    IndexConfig,
    build_index,
    index_training,
    l2_normalise,
    neighbours,
    train_sample_size,
    uniform_sample_positions,
)
from mltag.stages import anomalies, duplicates, index_build
from mltag.stages.duplicates import duplicate_groups


# ---- the training sample ---------------------------------------------------------------------------
def test_uniform_sample_positions_is_a_reproducible_uniform_subset(monkeypatch):
    one = uniform_sample_positions(100_000, 2_000, seed=(7, 0))
    assert len(one) == 2_000 and len(np.unique(one)) == 2_000 and (np.diff(one) > 0).all()
    assert one.min() >= 0 and one.max() < 100_000
    np.testing.assert_array_equal(one, uniform_sample_positions(100_000, 2_000, seed=(7, 0)))
    assert not np.array_equal(one, uniform_sample_positions(100_000, 2_000, seed=(8, 0)))
    # The chunking that bounds memory does not change the sample.
    monkeypatch.setattr(index_training, "SAMPLE_CHUNK", 777)
    np.testing.assert_array_equal(one, uniform_sample_positions(100_000, 2_000, seed=(7, 0)))
    # Every part of the table in proportion (the first half holds 1000 +- 22 of them).
    assert abs((one < 50_000).sum() - 1_000) < 110
    assert stats.kstest(one / 100_000, "uniform").pvalue > 1e-3
    # Edge sizes.
    np.testing.assert_array_equal(uniform_sample_positions(10, 50, seed=0), np.arange(10))
    assert len(uniform_sample_positions(0, 5, seed=0)) == len(uniform_sample_positions(10, 0, seed=0)) == 0


def test_every_position_is_equally_likely_to_be_sampled():
    n, m, runs = 200, 20, 2_000
    counts = np.zeros(n)
    for seed in range(runs):
        counts[uniform_sample_positions(n, m, seed=seed)] += 1
    expected = runs * m / n  # 200 each
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, n - 1) > 1e-4, chi2
    # Reference: numpy's own uniform choice without replacement gives the same mean and spread.
    assert abs(counts.mean() - expected) < 1e-9 and counts.std() < 3 * np.sqrt(expected)


def test_train_sample_size_is_39_a_centroid_within_the_budget_and_the_table():
    GiB = 2**30
    assert train_sample_size(50, 32, 4, 4 * GiB) == 50  # the whole (small) table
    assert train_sample_size(10_000_000, 256, 16384, 4 * GiB) == 39 * 16384  # 39 a centroid, not 6
    assert train_sample_size(10_000_000, 256, 64, 4 * GiB) == 100_000  # never under TRAIN_SAMPLE
    # A quarter of a 1 GiB budget at 2048 floats a vector: 32768 vectors, whatever nlist asks.
    assert train_sample_size(10_000_000, 2048, 16384, GiB) == GiB // 4 // (4 * 2048)
    assert train_sample_size(10_000_000, 2048, 16384, 2**20) == index_training.TRAIN_MIN  # a tiny budget still trains
    assert train_sample_size(4_000, 2048, 16384, 2**20) == 4_000


@pytest.fixture()
def two_halves(tmp_path):
    """A table written in a biased order: its first half all one cluster, its second half another."""
    rng = np.random.default_rng(11)
    a, b = np.zeros(16), np.zeros(16)
    a[0], b[1] = 1.0, 1.0
    emb = np.concatenate([a + 0.05 * rng.normal(size=(2000, 16)), b + 0.05 * rng.normal(size=(2000, 16))]).astype(np.float32)
    write_committed_table(tmp_path / "tags", emb, [None] * len(emb))
    return tmp_path, a, b


def test_ivf_trains_on_a_uniform_sample_not_the_first_rows(two_halves, monkeypatch):
    tmp_path, a, b = two_halves
    monkeypatch.setattr(index_training, "TRAIN_SAMPLE", 400)
    monkeypatch.setattr(index_training, "TRAIN_MIN", 400)
    seen = []
    real_train = index_build.train_index
    monkeypatch.setattr(index_build, "train_index", lambda index, sample: (seen.append(sample.copy()), real_train(index, sample))[1])

    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "ivf"), factory="IVF8,Flat", batch_rows=300))
    assert meta["train_sample"] == 400 and meta["count"] == 4000
    sample = seen[0]
    from_b = int((sample @ b > sample @ a).sum())
    assert abs(from_b - 200) < 50  # hypergeometric: 200 +- 9.5; the first 400 rows would give 0
    # The centroids cover both halves of the table.
    loaded = EmbeddingIndex.load(str(tmp_path / "ivf"))  # held: the extracted IVF does not own it
    ivf = faiss.extract_index_ivf(loaded.index)
    centroids = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
    near_b = int((centroids @ b > centroids @ a).sum())
    assert 2 <= near_b <= 6, near_b

    # The same seed gives the same sample, however the table is cut into batches; another seed another.
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "again"), factory="IVF8,Flat", batch_rows=1000))
    np.testing.assert_array_equal(seen[1], sample)
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "other"), factory="IVF8,Flat", seed=1))
    assert not np.array_equal(seen[2], sample)


def test_flat_takes_one_pass_and_ivf_a_sampling_pass_first(two_halves, monkeypatch):
    tmp_path, _, _ = two_halves
    passes = []
    real = index_build.embedding_batches
    monkeypatch.setattr(index_build, "embedding_batches", lambda *a, **k: (passes.append(1), real(*a, **k))[1])
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "flat"), factory="Flat"))
    assert len(passes) == 1 and meta["train_sample"] is None
    passes.clear()
    meta = build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "ivf"), factory="IVF8,Flat"))
    assert len(passes) == 3 and meta["train_sample"] == 4000  # sample, add, recall ground truth


# ---- the id map ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_map():
    """50k rows, non-contiguous faiss ids, the map written out of order, some listings with several
    images, non-ASCII ids."""
    rng = np.random.default_rng(3)
    n, dim = 50_000, 8
    faiss_ids = rng.choice(10 * n, n, replace=False).astype(np.int64)
    listing = [f"L{rng.integers(0, 40_000)}" if i % 3 else f"Lé{i}" for i in range(n)]
    vectors = l2_normalise(rng.normal(size=(n, dim)))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vectors, faiss_ids)
    ids = pa.table(
        {
            "faiss_id": pa.array(faiss_ids, pa.int64()),
            "listing_id": listing,
            "image_uri": [f"/img/{f}.jpg" for f in faiss_ids],
            "tags": pa.array([[f"t{f % 5}"] for f in faiss_ids], pa.list_(pa.string())),
        }
    )
    # The plain-dict reference the index used to keep.
    row_of = {int(f): i for i, f in enumerate(faiss_ids)}
    first_of: dict[str, int] = {}
    for f, name in sorted(zip(faiss_ids.tolist(), listing)):  # a listing's first image: its smallest faiss id
        first_of.setdefault(name, f)
    return EmbeddingIndex(index, ids, {}), ids.to_pylist(), row_of, first_of, vectors[np.argsort(faiss_ids)], np.sort(faiss_ids)


def test_listing_and_faiss_id_lookups_match_a_dict_reference(big_map):
    index, rows, row_of, first_of, _, _ = big_map
    assert len(index) == 50_000 and (np.diff(index.ids.column("faiss_id").to_numpy()) > 0).all()
    probe = np.random.default_rng(4).choice(sorted(first_of), 3000, replace=False)
    for name in probe:
        np.testing.assert_array_equal(index.vector_of(name)[0], index.index.reconstruct(first_of[name]))
    with pytest.raises(KeyError, match=r"^\"listing 'NOPE' is not in the index\"$"):
        index.vector_of("NOPE")
    asked = [*probe[:500], "NOPE", "", probe[0]]
    expected = [index.ids.column("faiss_id")[int(r)].as_py() if r >= 0 else None for r in index._rows_of_listings(asked)]
    assert expected == [first_of.get(name) for name in asked]
    some = np.concatenate([index.ids.column("faiss_id").to_numpy()[::97], [-1, 10**9, 7]])
    got = index.rows_of_faiss_ids(some)
    for f, r in zip(some, got):
        assert (index.ids.column("faiss_id")[int(r)].as_py() == f) if int(f) in row_of else r == -1


def test_batched_search_matches_a_per_row_dict_reference(big_map):
    index, rows, row_of, first_of, _, _ = big_map
    queries = np.random.default_rng(5).normal(size=(300, 8)).astype(np.float32)
    k = 50
    scores, found = index.index.search(l2_normalise(queries), k)
    results = index.search_vectors(queries, k)
    assert len(results) == 300
    for q, table in enumerate(results):
        expected = [rows[row_of[int(f)]] for f in found[q]]
        got = table.to_pylist()
        assert [g["listing_id"] for g in got] == [e["listing_id"] for e in expected]
        assert [g["image_uri"] for g in got] == [e["image_uri"] for e in expected]
        assert [g["tags"] for g in got] == [e["tags"] for e in expected]
        assert [g["rank"] for g in got] == list(range(1, k + 1))
        np.testing.assert_allclose([g["similarity"] for g in got], scores[q], rtol=1e-6)

    asked = ["NOPE", *sorted(first_of)[:40:3], "NOPE2", sorted(first_of)[0]]
    table = index.search_listings(asked, k=4)
    present = [name for name in asked if name in first_of]
    assert table.column_names == ["query_listing_id", "rank", "listing_id", "similarity", "image_uri", "tags"]
    assert table.column("query_listing_id").to_pylist() == [name for name in present for _ in range(4)]
    for q, name in [*enumerate(present[:5]), (len(present) - 1, present[-1])]:  # the last: a repeated query
        mine = table.slice(4 * q, 4).column("listing_id").to_pylist()
        assert mine == index.search_listing(name, k=4).column("listing_id").to_pylist()
        vector = index.index.reconstruct(first_of[name])[None]
        assert mine == [rows[row_of[int(f)]]["listing_id"] for f in index.index.search(vector, 4)[1][0]]
    assert index.search_listings(["NOPE"], k=3).num_rows == 0


def test_search_drops_faiss_placeholders_and_ranks_what_is_left():
    rng = np.random.default_rng(6)
    x = l2_normalise(rng.normal(size=(40, 16)))
    ivf = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add_with_ids(x, np.arange(40, dtype=np.int64) * 2)
    ivf.nprobe = 1
    ids = pa.table(
        {
            "faiss_id": pa.array(np.arange(40) * 2, pa.int64()),
            "listing_id": [f"L{i}" for i in range(40)],
            "image_uri": [f"/{i}" for i in range(40)],
            "tags": pa.array([[]] * 40, pa.list_(pa.string())),
        }
    )
    index = EmbeddingIndex(ivf, ids, {})
    _, found = ivf.search(x, 20)
    assert (found < 0).any()
    for q, table in enumerate(index.search_vectors(x, 20)):
        assert table.column("listing_id").to_pylist() == [f"L{f // 2}" for f in found[q] if f >= 0]
        assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))
        assert min(table.column("similarity").to_pylist(), default=0) > -1.01


# ---- anomalies and duplicates ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3000 random listings and planted near-duplicate groups (one larger than k + 1), indexed Flat."""
    tmp_path = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(9)
    dim, n = 32, 3000
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    sizes = [25, 5, 3, 3, 2, 2, 2]
    slots = rng.choice(n, sum(sizes), replace=False)
    groups, at = [], 0
    for size in sizes:
        members = np.sort(slots[at : at + size])
        at += size
        emb[members] = emb[members[0]] + 0.01 * rng.normal(size=(size, dim))
        groups.append(members.tolist())
    write_committed_table(tmp_path / "tags", emb, [None] * n)
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx"), factory="Flat"))
    expected = sorted(groups, key=lambda g: (-len(g), g[0]))
    return tmp_path, l2_normalise(emb), expected


def test_duplicates_finds_exactly_the_planted_groups(planted):
    tmp_path, x, expected = planted
    table = duplicates.run(
        duplicates.DuplicatesConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "d.parquet"), threshold=0.95, k=20, batch=700)
    )
    assert table.schema == pa.schema(
        [
            ("group_id", pa.int64()),
            ("listing_id", pa.string()),
            ("image_uri", pa.string()),
            ("group_size", pa.int64()),
            ("max_similarity", pa.float64()),
        ]
    )
    rows = table.to_pylist()
    got: dict[int, list[int]] = {}
    for row in rows:
        got.setdefault(row["group_id"], []).append(int(row["listing_id"][1:]))
    assert [got[g] for g in sorted(got)] == expected  # largest first, members ascending; the 25 found whole with k = 20
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    for row in rows:
        i = int(row["listing_id"][1:])
        assert row["group_size"] == len(got[row["group_id"]])
        assert row["max_similarity"] == pytest.approx(sims[i].max(), abs=1e-5)
        assert row["image_uri"] == f"/img/{i}.jpg"


@pytest.mark.parametrize("score", ["kth", "mean"])
def test_anomaly_scores_match_a_brute_force_reference(planted, score):
    tmp_path, x, _ = planted
    k = 10
    table = anomalies.run(
        anomalies.AnomalyConfig(
            index=str(tmp_path / "idx"), out=str(tmp_path / f"a-{score}.parquet"), k=k, score=score, contamination=0.02, batch=512
        )
    )
    assert table.schema.field("neighbours").type == pa.list_(pa.string())
    assert table.schema.field("neighbour_similarities").type == pa.list_(pa.float32())
    assert table.column("rank").to_pylist() == list(range(1, 3001))
    assert table.column("is_outlier").to_pylist() == [True] * 60 + [False] * 2940
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :k]
    reference = 1.0 - (top[:, -1] if score == "kth" else top.mean(axis=1))
    order = np.array([int(i[1:]) for i in table.column("listing_id").to_pylist()])
    np.testing.assert_allclose(table.column("score").to_numpy(), reference[order], atol=1e-5)
    assert (np.diff(table.column("score").to_numpy()) <= 0).all()
    np.testing.assert_allclose(np.array(table.column("neighbour_similarities").to_pylist()), top[order], atol=1e-5)
    neighbours = table.column("neighbours").to_pylist()
    nearest = np.argsort(-sims, axis=1)[:, :k]
    for position, i in enumerate(order[:200]):
        if top[i, 0] < 0.95:  # not a planted duplicate (those are near-ties among themselves)
            assert neighbours[position] == [f"L{j}" for j in nearest[i]]


def test_neighbours_of_all_pads_short_rows(tmp_path):
    rng = np.random.default_rng(1)
    write_committed_table(tmp_path / "tags", rng.normal(size=(6, 8)).astype(np.float32), [None] * 6)
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx"), factory="Flat"))
    index = EmbeddingIndex.load(str(tmp_path / "idx"))
    faiss_ids, found, sims, counts = neighbours.neighbours_of_all(index, 10, batch=4)
    assert found.shape == sims.shape == (6, 10) and found.dtype == np.int64 and sims.dtype == np.float32
    assert (found[:, :5] >= 0).all() and (found[:, 5:] == -1).all()
    assert np.isfinite(sims[:, :5]).all() and np.isnan(sims[:, 5:]).all()
    assert (found != faiss_ids[:, None]).all() and counts == {"widened": 0, "short": 6}
    scores = anomalies.knn_scores(sims, 10, "kth")
    np.testing.assert_allclose(scores, 1.0 - sims[:, 4], rtol=1e-6)
    np.testing.assert_array_equal(anomalies.knn_scores(np.full((2, 3), np.nan), 3, "mean"), [np.inf, np.inf])
    # The list-of-rows form the function used to take gives the same scores.
    np.testing.assert_allclose(anomalies.knn_scores([s[:5] for s in sims], 10, "kth"), scores)


def _reference_groups(n, pairs):
    """Components by breadth-first search over an adjacency dict (the reference)."""
    adjacent: dict[int, set[int]] = {}
    for a, b in pairs:
        adjacent.setdefault(a, set()).add(b)
        adjacent.setdefault(b, set()).add(a)
    seen, groups = set(), []
    for start in range(n):
        if start in seen or start not in adjacent:
            continue
        group, frontier = {start}, [start]
        while frontier:
            for j in adjacent[frontier.pop()]:
                if j not in group:
                    group.add(j)
                    frontier.append(j)
        seen |= group
        if len(group) > 1:
            groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_duplicate_groups_match_a_reference_on_random_graphs():
    rng = np.random.default_rng(12)
    for trial in range(30):
        n = int(rng.integers(1, 300))
        pairs = [tuple(p) for p in rng.integers(0, n, size=(int(rng.integers(0, n)), 2))]
        assert duplicate_groups(n, pairs) == _reference_groups(n, pairs), trial
        assert duplicate_groups(n, np.array(pairs, np.int64).reshape(-1, 2)) == _reference_groups(n, pairs)

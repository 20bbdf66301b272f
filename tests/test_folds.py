"""`mltag split`: deterministic, listing-grouped, stratified folds; stable for listings that
already have one; `--val-fold` selects train/val without leakage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.data.catalog import ManifestError, read_manifest, train_val_split
from mltag.stages.folds import SplitConfig, assign_folds, extend_folds, fold_report, run, stratified_folds

K = 5


def long_tailed_catalog(n_listings: int = 600, n_tags: int = 30, seed: int = 0):
    """Listings with 1-3 images each, tags with a Zipf-like frequency (a few tags on half the
    listings, the tail on a handful), some listings with no tag."""
    rng = np.random.default_rng(seed)
    prevalence = 0.5 / (1 + np.arange(n_tags)) ** 1.3
    ids, tags = [], []
    for i in range(n_listings):
        listing_tags = [f"t{j:02d}" for j in np.flatnonzero(rng.random(n_tags) < prevalence)]
        for _ in range(int(rng.integers(1, 4))):
            ids.append(f"L{i:05d}")
            tags.append(listing_tags)
    return ids, tags


def test_folds_are_deterministic_and_ignore_row_order():
    ids, tags = long_tailed_catalog()
    first = assign_folds(ids, tags, K, seed=7)
    assert np.array_equal(first, assign_folds(ids, tags, K, seed=7))
    perm = np.random.default_rng(1).permutation(len(ids))
    shuffled = assign_folds([ids[i] for i in perm], [tags[i] for i in perm], K, seed=7)
    assert np.array_equal(shuffled, first[perm])
    assert not np.array_equal(first, assign_folds(ids, tags, K, seed=8))  # the seed matters


def test_every_image_of_a_listing_is_in_its_listings_fold():
    ids, tags = long_tailed_catalog()
    folds = assign_folds(ids, tags, K)
    by_listing: dict[str, set[int]] = {}
    for lid, fold in zip(ids, folds):
        by_listing.setdefault(lid, set()).add(int(fold))
    assert all(len(f) == 1 for f in by_listing.values())
    assert set(folds.tolist()) == set(range(K))


def test_every_fold_has_every_tag_on_at_least_k_listings_on_a_long_tail():
    ids, tags = long_tailed_catalog()
    folds = assign_folds(ids, tags, K)
    listings = {t: len({i for i, ts in zip(ids, tags) if t in ts}) for t in {t for ts in tags for t in ts}}
    assert sum(K <= c < 2 * K for c in listings.values()) >= 3  # the set has a real tail near K
    assert fold_report(folds, tags, K, ids)["tags_missing_from_a_fold"] == {}
    sizes = np.bincount(folds, minlength=K)
    assert sizes.max() - sizes.min() < 0.15 * sizes.mean()
    # One image per listing: then every tag on >= K images is in every fold.
    first = [i for i, lid in enumerate(ids) if i == 0 or ids[i - 1] != lid]
    single_ids, single_tags = [ids[i] for i in first], [tags[i] for i in first]
    assert fold_report(assign_folds(single_ids, single_tags, K), single_tags, K)["tags_missing_from_a_fold"] == {}


def test_our_continuation_is_the_packages_algorithm_when_nothing_is_assigned():
    rng = np.random.default_rng(3)
    labels = rng.random((300, 12)) < 0.3 / (1 + np.arange(12))
    assert np.array_equal(extend_folds(labels, np.full(300, -1), 4, seed=5), stratified_folds(labels, 4, seed=5))


def test_listings_with_a_previous_fold_keep_it_when_rows_are_added():
    ids, tags = long_tailed_catalog(600)
    old = assign_folds(ids, tags, K)
    previous = dict(zip(ids, old.tolist()))
    more_ids, more_tags = long_tailed_catalog(800, seed=0)  # the same first 600 listings, then 200 new
    more_ids = [i if i in previous else i.replace("L", "N") for i in more_ids]
    new = assign_folds(more_ids, more_tags, K, previous=previous)
    kept = [i for i, lid in enumerate(more_ids) if lid in previous]
    assert all(new[i] == previous[more_ids[i]] for i in kept)
    added = [i for i, lid in enumerate(more_ids) if lid not in previous]
    assert set(new[added].tolist()) == set(range(K))  # the new listings are dealt out, not piled up
    with pytest.raises(ValueError, match="outside"):
        assign_folds(ids, tags, 3, previous=previous)


def test_split_stage_writes_a_fold_column_and_val_fold_has_no_leakage(tiny_catalog, tmp_path):
    out = tmp_path / "folds.parquet"
    result = run(SplitConfig(manifest=tiny_catalog["manifest"], out=str(out), folds=3, include_test=True))
    table = pq.read_table(out)
    assert table.num_rows == 48 and "fold" in table.column_names
    assert sorted(set(table.column("fold").to_pylist())) == [0, 1, 2]
    assert result["images_per_fold"] == np.bincount(table.column("fold").to_numpy()).tolist()
    again = tmp_path / "again.parquet"
    run(SplitConfig(manifest=tiny_catalog["manifest"], out=str(again), folds=3, include_test=True))
    assert pq.read_table(again).equals(table)

    manifest = read_manifest(str(out), require_tags=True)
    for k in range(3):
        train, val = train_val_split(manifest, k)
        assert set(val.column("fold").to_pylist()) == {k}
        assert not set(train.column("listing_id").to_pylist()) & set(val.column("listing_id").to_pylist())
        assert train.num_rows + val.num_rows == 48
    with pytest.raises(ManifestError, match="no row is in fold 7"):
        train_val_split(manifest, 7)
    with pytest.raises(ManifestError, match="mltag split"):
        train_val_split(read_manifest(tiny_catalog["manifest"]), 0)
    train, val = train_val_split(read_manifest(tiny_catalog["manifest"]), -1)  # the split column, as before
    assert set(train.column("split").to_pylist()) == {"train"} and set(val.column("split").to_pylist()) == {"val"}


def test_test_rows_are_in_no_fold_and_an_existing_fold_column_is_kept(tmp_path):
    table = pa.table(
        {
            "listing_id": [f"L{i}" for i in range(20)],
            "image_uri": [f"/img/{i}.jpg" for i in range(20)],
            "tags": [["a"] if i % 2 else ["b"] for i in range(20)],
            "split": ["test" if i < 4 else "train" for i in range(20)],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    run(SplitConfig(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "f.parquet"), folds=2))
    first = pq.read_table(tmp_path / "f.parquet")
    assert first.column("fold").to_pylist()[:4] == [-1] * 4
    # Re-splitting the output (its fold column travels with it) changes nothing.
    run(SplitConfig(manifest=str(tmp_path / "f.parquet"), out=str(tmp_path / "g.parquet"), folds=2))
    assert pq.read_table(tmp_path / "g.parquet").column("fold").equals(first.column("fold"))

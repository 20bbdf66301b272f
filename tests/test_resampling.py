import numpy as np
import pyarrow as pa
import pytest

from mltag.maths.resampling import repeat_counts, repeat_factors, tag_repeat_factors
from mltag.tagger.train_loop import resampled_batches


def _labels(seed=0, n=300, t=6):
    rng = np.random.default_rng(seed)
    return (rng.random((n, t)) < np.array([0.5, 0.2, 0.05, 0.01, 0.3, 0.0])).astype(np.float32)


@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.3])
def test_factors_match_the_formula_brute_force(sqrt, threshold):
    y = _labels()
    tags, images = tag_repeat_factors(y, threshold, sqrt), repeat_factors(y, threshold, sqrt)
    for h in range(y.shape[1]):
        f = y[:, h].mean()
        expected = 1.0 if f == 0 else max(1.0, (np.sqrt if sqrt else float)(threshold / f))
        assert tags[h] == pytest.approx(expected)
    for i in range(len(y)):
        present = [tags[h] for h in range(y.shape[1]) if y[i, h]]
        assert images[i] == pytest.approx(max(present, default=1.0))


def test_counts_are_deterministic_order_free_and_average_to_the_factor():
    factors = np.array([1.0, 1.5, 2.25, 3.0])
    keys = ["a", "b", "c", "d"]
    first = repeat_counts(factors, keys, seed=0, epoch=0)
    assert first.tolist() == repeat_counts(factors, keys, seed=0, epoch=0).tolist()
    reversed_ = repeat_counts(factors[::-1], keys[::-1], seed=0, epoch=0)
    assert reversed_[::-1].tolist() == first.tolist()  # the order data arrives in does not matter
    assert np.all(first >= np.floor(factors)) and np.all(first <= np.ceil(factors))
    epochs = np.array([repeat_counts(factors, keys, seed=1, epoch=e) for e in range(4000)])
    np.testing.assert_allclose(epochs.mean(axis=0), factors, atol=0.03)
    assert len({tuple(row) for row in epochs[:50]}) > 1  # epochs differ


def test_resampled_batches_repeat_rows_and_keep_batch_size():
    ids = [f"L{i}" for i in range(50)]
    factors = np.where(np.arange(50) % 5 == 0, 3.0, 1.0)
    table = pa.table({"listing_id": ids, "repeat_factor": factors})
    batches = list(resampled_batches([table.slice(0, 20), table.slice(20)], batch_size=16, seed=0, epoch=2))
    seen = pa.concat_tables(batches).column("listing_id").to_pylist()
    assert all(b.num_rows == 16 for b in batches[:-1])
    counts = repeat_counts(factors, ids, seed=0, epoch=2)
    assert len(seen) == counts.sum()
    assert {i: seen.count(i) for i in ids} == dict(zip(ids, counts.tolist()))

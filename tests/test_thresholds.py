import functools

import numpy as np
import pytest
from sklearn import metrics as skm

from mltag.maths.thresholds import choose_threshold, choose_thresholds


def _tag(seed, n=400, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.random(n) * 0.7 + 0.5 * y * rng.random(n)
    return y, (np.round(s, 2) if ties else s)


@functools.cache
def _precision_recall_at_every_threshold(seed: int, ties: bool) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) for every candidate threshold, by scikit-learn (computed once
    per tag: each of the four targets below searches the same list)."""
    y, s = _tag(seed, ties=ties)
    return [
        (t, skm.precision_score(y, (s >= t).astype(int), zero_division=0), skm.recall_score(y, (s >= t).astype(int))) for t in np.unique(s)
    ]


def _brute_force(seed, ties, mode, target):
    """The best threshold for the target, found by trying every candidate."""
    best = None
    for t, p, r in _precision_recall_at_every_threshold(seed, ties):
        if mode == "precision" and p >= target and (best is None or r > best[2] or (r == best[2] and t > best[0])):
            best = (t, p, r)
        if mode == "recall" and r >= target and (best is None or p > best[1] or (p == best[1] and t > best[0])):
            best = (t, p, r)
    return best


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
@pytest.mark.parametrize("mode,target", [("precision", 0.9), ("precision", 0.7), ("recall", 0.8), ("recall", 0.5)])
def test_threshold_matches_brute_force_over_sklearn(seed, ties, mode, target):
    y, s = _tag(seed, ties=ties)
    chosen = choose_threshold(y, s, mode, target)
    expected = _brute_force(seed, ties, mode, target)
    assert chosen.reached == (expected is not None)
    if expected is not None:
        assert chosen.threshold == pytest.approx(expected[0])
        assert chosen.precision == pytest.approx(expected[1]) and chosen.recall == pytest.approx(expected[2])


def test_unreachable_precision_falls_back_to_best_f1_and_is_flagged():
    rng = np.random.default_rng(9)
    y, s = (rng.random(300) < 0.5).astype(int), rng.random(300)  # scores carry no information
    chosen = choose_threshold(y, s, "precision", 0.99)
    assert not chosen.reached and "unreachable" in chosen.note
    f1 = max(skm.f1_score(y, (s >= t).astype(int)) for t in np.unique(s))
    assert skm.f1_score(y, (s >= chosen.threshold).astype(int)) == pytest.approx(f1)


def test_tag_without_positives_keeps_its_threshold():
    chosen = choose_thresholds(np.zeros((10, 2)), np.random.default_rng(0).random((10, 2)), ["a", "b"], current=np.array([0.3, 0.7]))
    assert [c.threshold for c in chosen] == [0.3, 0.7] and not any(c.reached for c in chosen)

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mltag.tagger.linear_probe import fit_head, fit_probe, positive_weights, sigmoid


def _data(seed, n=600, dim=24, tags=5, noise=1.0, scales=True):
    """Separable-ish multi-label data: each tag a noisy linear rule on a few features, the
    features on very different scales and offsets (as pooled CNN features are)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    if scales:
        x = x * rng.uniform(0.01, 20, dim) + rng.uniform(-5, 5, dim)
    z = (x - x.mean(0)) / x.std(0)
    rules = rng.normal(size=(tags, dim)) * (rng.random((tags, dim)) < 0.3)
    offsets = np.linspace(-2.5, 0, tags)  # prevalences from ~10% to ~50%
    y = (z @ rules.T + offsets + noise * rng.normal(size=(n, tags)) > 0).astype(np.float32)
    return x.astype(np.float32), y


def _sklearn_logits(x_train, y_train, x_eval, c):
    scaler = StandardScaler().fit(x_train)
    out = np.zeros((len(x_eval), y_train.shape[1]))
    with threadpool_limits(1):  # tiny problems: threads only add contention
        for j in range(y_train.shape[1]):
            model = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(scaler.transform(x_train), y_train[:, j])
            out[:, j] = model.decision_function(scaler.transform(x_eval))
    return out


@pytest.mark.parametrize("seed,l2", [(0, 1e-2), (1, 1e-1), (2, 1e-3)])
def test_fixed_l2_is_sklearns_logistic_regression(seed, l2):
    """Same objective (C = 1 / (l2 * N) on standardised features): same function of the raw features."""
    x, y = _data(seed)
    train, test = slice(0, 400), slice(400, None)
    head = fit_head(x[train], y[train], l2=l2)
    reference = _sklearn_logits(x[train], y[train], x[test], c=1.0 / (l2 * 400))
    np.testing.assert_allclose(head.logits(x[test]), reference, atol=2e-3 * max(1.0, np.abs(reference).max()))
    ours_ap = skm.average_precision_score(y[test], head.scores(x[test]), average="macro")
    assert ours_ap == pytest.approx(skm.average_precision_score(y[test], reference, average="macro"), abs=1e-3)


def test_easy_problem_ranks_like_sklearn():
    x, y = _data(3, noise=0.05)
    head = fit_head(x[:400], y[:400], l2=1e-2)
    reference = _sklearn_logits(x[:400], y[:400], x[400:], c=1.0 / (1e-2 * 400))
    ours = head.logits(x[400:])
    for j in range(y.shape[1]):
        assert np.array_equal(np.argsort(-ours[:, j], kind="stable"), np.argsort(-reference[:, j], kind="stable"))


def test_the_head_is_an_nn_linear_on_raw_embeddings():
    x, y = _data(4)
    head = fit_head(x, y, l2=1e-2)
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head.weight))
        linear.bias.copy_(torch.from_numpy(head.bias))
        expected = torch.sigmoid(linear(torch.from_numpy(x))).numpy()
    assert head.weight.dtype == np.float32 and head.bias.dtype == np.float32
    np.testing.assert_allclose(head.scores(x), expected, atol=1e-6)


def test_grid_choice_beats_or_matches_every_fixed_value_on_val_and_is_deterministic():
    x, y = _data(5, n=900, dim=60, noise=1.5)
    train, val = slice(0, 300), slice(300, 600)
    fit = fit_probe(x[train], y[train], x[val], y[val], grid=(10.0, 1.0, 0.1, 0.01, 1e-3))
    assert fit.val_map[fit.grid.index(fit.l2)] == max(fit.val_map)
    assert fit.grid == sorted(fit.grid, reverse=True)  # strongest first: warm starts go from simple to complex
    again = fit_probe(x[train], y[train], x[val], y[val], grid=(10.0, 1.0, 0.1, 0.01, 1e-3))
    assert np.array_equal(fit.head.weight, again.head.weight) and np.array_equal(fit.head.bias, again.head.bias)


def test_per_tag_selection_picks_each_tags_best_value():
    x, y = _data(6, n=900, dim=60, noise=1.5)
    grid = (3.0, 0.1, 1e-3)
    fit = fit_probe(x[:300], y[:300], x[300:600], y[300:600], grid=grid, selection="per_tag")
    for j in range(y.shape[1]):
        aps = [skm.average_precision_score(y[300:600, j], fit_head(x[:300], y[:300], l2=v).scores(x[300:600])[:, j]) for v in grid]
        assert fit.head.l2[j] == grid[int(np.argmax(np.round(aps, 9)))]


def test_balance_weights_positives_by_the_class_ratio():
    y = np.zeros((100, 3))
    y[:10, 0], y[:50, 1] = 1, 1
    np.testing.assert_allclose(positive_weights(y, 1.0), [9.0, 1.0, 1.0])
    np.testing.assert_allclose(positive_weights(y, 0.5), [3.0, 1.0, 1.0])
    x, labels = _data(7)
    plain, balanced = fit_head(x, labels, 1e-2), fit_head(x, labels, 1e-2, balance=1.0)
    rare = int(np.argmin(labels.mean(0)))
    assert balanced.scores(x)[:, rare].mean() > plain.scores(x)[:, rare].mean()  # a rare tag's scores rise


def test_refuses_a_grid_without_validation_rows():
    x, y = _data(8)
    with pytest.raises(ValueError, match="validation"):
        fit_probe(x, y, None, None, grid=(1.0, 0.1))
    assert fit_probe(x, y, None, None, grid=(0.1,)).l2 == 0.1


def test_sigmoid_does_not_overflow():
    out = sigmoid(np.array([-1000.0, 0.0, 1000.0], np.float32))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])


def test_a_tag_without_positives_or_negatives_gets_its_smoothed_prevalence():
    x, y = _data(9, n=200)
    y[:, 1], y[:, 2] = 0, 1
    head = fit_head(x, y, l2=1e-2)
    assert not head.weight[1].any() and not head.weight[2].any()
    np.testing.assert_allclose(head.scores(x[:3])[:, 1:3], [[0.5 / 201, 200.5 / 201]] * 3, rtol=1e-5)
    others = fit_head(x, y[:, [0, 3, 4]], l2=1e-2)  # the other tags are fitted as if alone
    np.testing.assert_allclose(head.logits(x)[:, [0, 3, 4]], others.logits(x), rtol=1e-4, atol=1e-4)


def test_the_grid_walk_stops_past_the_peak_and_keeps_the_full_walks_choice():
    x, y = _data(9, n=900, dim=60, noise=1.5)
    grid = (30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
    full = fit_probe(x[:300], y[:300], x[300:600], y[300:600], grid=grid, patience=0)
    early = fit_probe(x[:300], y[:300], x[300:600], y[300:600], grid=grid, patience=2)
    peak = int(np.nanargmax(full.val_map))
    if all(np.diff(full.val_map[peak:]) <= 0):  # unimodal past the peak: the early walk finds the same value
        assert early.l2 == full.l2 and np.array_equal(early.head.weight, full.head.weight)
    fitted = np.isfinite(early.val_map)
    assert len(early.val_map) == len(grid) and fitted.sum() < len(grid)  # it stopped before the end
    assert np.allclose(np.asarray(early.val_map)[fitted], np.asarray(full.val_map)[fitted])
    assert not fitted[fitted.argmin() :].any()  # once stopped, nothing after is fitted

import numpy as np
import pytest
from sklearn import metrics as skm

from mltag.maths.metrics import (
    average_precision,
    chance_mean_average_precision,
    hamming_loss,
    mean_average_precision,
    precision_recall_curve,
    top_k_accuracy,
)


def _data(seed, n=200, t=7, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, t)) < rng.uniform(0.05, 0.5, t)).astype(int)
    y[0] = 1  # every tag has a positive
    scores = rng.random((n, t)) + 0.8 * y * rng.random((n, t))
    if ties:
        scores = np.round(scores, 1)
    return y, scores


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_map_matches_sklearn(seed, ties):
    y, s = _data(seed, ties=ties)
    ours = mean_average_precision(y, s)
    assert ours["macro"] == pytest.approx(skm.average_precision_score(y, s, average="macro"), abs=1e-12)
    assert ours["micro"] == pytest.approx(skm.average_precision_score(y, s, average="micro"), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_pr_curve_matches_sklearn(seed):
    y, s = _data(seed, ties=True)
    p, r, t = precision_recall_curve(y[:, 0], s[:, 0])
    sp, sr, st = skm.precision_recall_curve(y[:, 0], s[:, 0])
    # sklearn lists thresholds ascending and appends the (1, 0) end point.
    np.testing.assert_allclose(p[::-1], sp[:-1][-len(p) :])
    np.testing.assert_allclose(r[::-1], sr[:-1][-len(r) :])
    np.testing.assert_allclose(t[::-1], st[-len(t) :])


def test_tags_without_positives_are_excluded_from_macro():
    y, s = _data(7)
    y[:, 2] = 0
    ours = mean_average_precision(y, s)
    keep = [j for j in range(y.shape[1]) if j != 2]
    assert np.isnan(average_precision(y[:, 2], s[:, 2]))
    assert ours["tags_scored"] == y.shape[1] - 1
    assert ours["macro"] == pytest.approx(skm.average_precision_score(y[:, keep], s[:, keep], average="macro"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hamming_loss_matches_sklearn(seed):
    y, s = _data(seed)
    pred = (s > 0.7).astype(int)
    assert hamming_loss(y, pred) == pytest.approx(skm.hamming_loss(y, pred))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_matches_sklearn_on_single_label(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 10, 300)
    scores = rng.random((300, 10)) + 0.3 * np.eye(10)[labels]
    y = np.eye(10)[labels]
    assert top_k_accuracy(y, scores, k) == pytest.approx(skm.top_k_accuracy_score(labels, scores, k=k, labels=range(10)))


def test_chance_map_is_what_random_scores_get():
    y, _ = _data(11, n=4000, t=5)
    rng = np.random.default_rng(0)
    random_map = np.mean([mean_average_precision(y, rng.random(y.shape))["macro"] for _ in range(5)])
    assert random_map == pytest.approx(chance_mean_average_precision(y), abs=0.02)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_f1_match_sklearn(seed):
    y, s = _data(seed)
    pred = (s > 0.75).astype(int)
    ours = __import__("mltag.maths.metrics", fromlist=["x"]).precision_recall_f1(y, pred)
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    np.testing.assert_allclose(ours["precision"], p)
    np.testing.assert_allclose(ours["recall"], r)
    np.testing.assert_allclose(ours["f1"], f)
    for avg in ("micro", "macro"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert (ours[f"{avg}_precision"], ours[f"{avg}_recall"], ours[f"{avg}_f1"]) == pytest.approx((ap, ar, af))


def test_level_accuracy_on_a_flat_single_label_set_is_top1_and_balanced_accuracy():
    from mltag.maths.metrics import level_accuracy

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + 0.4 * np.eye(4)[labels]
    result = level_accuracy(np.eye(4)[labels], scores, np.eye(4, dtype=bool))
    assert result["micro"] == pytest.approx(skm.accuracy_score(labels, scores.argmax(1)))
    assert result["macro"] == pytest.approx(skm.balanced_accuracy_score(labels, scores.argmax(1)))
    np.testing.assert_array_equal(result["confusion"], skm.confusion_matrix(labels, scores.argmax(1), labels=range(4)))


def test_level_accuracy_collapses_a_small_taxonomy_by_hand():
    from mltag.data.vocabulary import Vocabulary
    from mltag.maths.metrics import level_accuracy

    # plant > tree > {forest}, plant > flower; animal > dog
    vocab = Vocabulary.from_dict(
        {
            "tags": [
                "plant",
                "animal",
                {"name": "tree", "parent": "plant"},
                {"name": "flower", "parent": "plant"},
                {"name": "forest", "parent": "tree"},
                {"name": "dog", "parent": "animal"},
            ]
        }
    )
    classes, mapping = vocab.level_map(1)
    assert classes == ["plant", "animal"]
    assert vocab.level_map(2)[0] == ["tree", "flower", "dog"] and vocab.level_map(3)[0] == ["forest"]
    y = vocab.encode([["forest"], ["dog"], ["flower"], ["dog"]]).astype(bool)
    #            plant animal tree flower forest dog
    scores = np.array(
        [
            [0.1, 0.2, 0.1, 0.1, 0.9, 0.3],  # forest wins -> plant: correct
            [0.1, 0.1, 0.8, 0.1, 0.1, 0.5],  # tree wins -> plant: wrong (dog)
            [0.2, 0.1, 0.1, 0.7, 0.1, 0.1],  # flower -> plant: correct
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.6],
        ]
    )  # dog -> animal: correct
    l1 = level_accuracy(y, scores, mapping)
    assert l1["micro"] == pytest.approx(3 / 4)
    assert l1["macro"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert l1["confusion"].tolist() == [[2, 0], [1, 1]]
    l2 = level_accuracy(y, scores, vocab.level_map(2)[1])  # tree, flower, dog
    assert l2["micro"] == pytest.approx(3 / 4)

"""The vocabulary's one upward closure, against a brute-force walk up the parents on random
hierarchies: every reader of it (close, encode, close_matrix, close_columns, the streamed
TagIndex, chosen_tags) gives the same answer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mltag.data.vocabulary import Vocabulary, VocabularyError
from mltag.maths.resampling import TagIndex
from mltag.table import tag_table


def _random_vocabulary(rng: np.random.Generator, n_tags: int) -> Vocabulary:
    names = [f"t{i}" for i in rng.permutation(n_tags)]  # vocabulary order unrelated to depth
    parents = {}
    for k in range(1, n_tags):  # a parent earlier in creation order: a forest, never a cycle
        if rng.random() < 0.7:
            parents[names[k]] = names[int(rng.integers(0, k))]
    order = list(rng.permutation(names))
    synonyms = {f"alias_{n}": n for n in order[: n_tags // 4]}
    return Vocabulary(tuple(order), parents, synonyms)


def _walk_up(vocab: Vocabulary, tag: str) -> set[str]:
    seen = {tag}
    while tag in vocab.parents:
        tag = vocab.parents[tag]
        seen.add(tag)
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_every_reader_of_the_closure_matches_a_walk_up_the_parents(seed):
    rng = np.random.default_rng(seed)
    vocab = _random_vocabulary(rng, int(rng.integers(1, 30)))
    spellings = list(vocab.names) + list(vocab.synonyms)
    rows = [list(rng.choice(spellings, size=int(rng.integers(0, 4)))) for _ in range(25)] + [[]]
    reference = np.zeros((len(rows), len(vocab)), bool)
    for r, tags in enumerate(rows):
        for tag in tags:
            for t in _walk_up(vocab, vocab.canonical(tag)):
                reference[r, vocab.index[t]] = True

    assert [vocab.close(tags) for tags in rows] == [[n for n, on in zip(vocab.names, row) if on] for row in reference]
    np.testing.assert_array_equal(vocab.encode(rows), reference.astype(np.float32))
    np.testing.assert_array_equal(TagIndex(vocab).encode(pa.array(rows, pa.list_(pa.string()))), reference.astype(np.float32))
    unclosed = np.zeros_like(reference)
    for r, tags in enumerate(rows):
        unclosed[r, [vocab.index[vocab.canonical(t)] for t in tags]] = True
    np.testing.assert_array_equal(vocab.close_matrix(unclosed), reference)
    np.testing.assert_array_equal(
        tag_table.chosen_tags(unclosed.astype(np.float32), np.full(len(vocab), 0.5, np.float32), vocab), reference
    )

    columns = rng.integers(0, len(vocab), size=12)
    which, closed = vocab.close_columns(columns)
    assert np.all(np.diff(which) >= 0) and set(which.tolist()) == set(range(len(columns)))
    for k, column in enumerate(columns):
        mine = closed[which == k].tolist()
        assert mine[0] == column and {vocab.names[c] for c in mine} == _walk_up(vocab, vocab.names[column])


def test_the_closure_is_computed_once_and_survives_a_pickle():
    import pickle

    vocab = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
    assert vocab.closure is vocab.closure
    again = pickle.loads(pickle.dumps(vocab))
    assert again == vocab and [c.tolist() for c in again.closure] == [[0, 2, 3], [0, 1, 1]]


def test_a_parent_given_to_a_name_that_is_not_a_tag_is_refused():
    with pytest.raises(VocabularyError, match="'x' has a parent but is not a tag"):
        Vocabulary(("a",), {"x": "a"})

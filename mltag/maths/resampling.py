"""Repeat-factor resampling of rare tags (Gupta et al., LVIS 2019), as pure functions.

Tag factor   r(h) = max(1, phi(t / f(h)))   f(h): share of training images carrying tag h,
                                            t: target frequency, phi: identity or square root
Image factor r(I) = max over the image's tags of r(h)   (1 for an image without tags)

Each epoch an image appears floor(r) times plus once more with probability frac(r). The extra
draw is a hash of (seed, epoch, listing id), so the counts are the same for a seed whatever order
the data arrives in, and differ from epoch to epoch.

The dense functions take an (images x tags) 0/1 matrix; training uses the streamed ones, which
read the manifest's ``tags`` column (list<string>) a slice at a time and keep O(tags) state, so
the driver never holds an images x tags matrix: ``TagIndex`` closes tags upward with the
vocabulary's own closure (``Vocabulary.close_columns``), ``tag_counts`` gives positives per
tag, ``tag_repeat_factors_from_counts`` r(h), and ``repeat_factors_from_tags`` r(I) per row (the
same numbers as the dense functions).

Example:
    >>> labels = np.array([[1, 0], [1, 0], [1, 0], [1, 1]], np.float32)
    >>> repeat_factors(labels, threshold=0.5).round(3).tolist()
    [1.0, 1.0, 1.0, 1.414]
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROWS_PER_SLICE = 65_536  # rows of the tags column the streamed functions expand at a time


def _factors_from_frequency(frequency: np.ndarray, threshold: float, sqrt: bool) -> np.ndarray:
    with np.errstate(divide="ignore"):
        ratio = np.where(frequency > 0, threshold / np.maximum(frequency, 1e-300), 1.0)
    ratio = np.sqrt(ratio) if sqrt else ratio
    return np.maximum(1.0, ratio)


def tag_repeat_factors(labels: np.ndarray, threshold: float, sqrt: bool = True) -> np.ndarray:
    """r(h) per tag from a (images x tags) 0/1 matrix; tags never seen get factor 1."""
    return _factors_from_frequency(np.asarray(labels, dtype=np.float64).mean(axis=0), threshold, sqrt)


def tag_repeat_factors_from_counts(positives: np.ndarray, n_images: int, threshold: float, sqrt: bool = True) -> np.ndarray:
    """r(h) per tag from the number of images carrying each tag (``tag_counts``) and the number
    of images: the same values as ``tag_repeat_factors`` on the matrix they were counted from."""
    frequency = np.asarray(positives, dtype=np.float64) / n_images
    return _factors_from_frequency(frequency, threshold, sqrt)


def repeat_factors(labels: np.ndarray, threshold: float, sqrt: bool = True) -> np.ndarray:
    """r(I) per image: the largest tag factor among its tags (1 when it has none)."""
    labels = np.asarray(labels) > 0
    per_tag = tag_repeat_factors(labels, threshold, sqrt)
    return np.where(labels, per_tag[None, :], 1.0).max(axis=1, initial=1.0)


class TagIndex:
    """Vocabulary columns for an Arrow list<string> column of tags, vectorised: synonyms become
    their tag, and each tag brings its ancestors (``Vocabulary.close_columns``, the closure
    ``Vocabulary.encode`` applies). A tag the vocabulary does not know raises VocabularyError
    naming the row, as ``encode`` does."""

    def __init__(self, vocab) -> None:
        names = list(vocab.names)
        column = vocab.index
        aliases = sorted(vocab.synonyms)
        self.vocab = vocab
        self.num_tags = len(names)
        self._lookup = pa.array(names + aliases, pa.string())  # a string -> its position here
        self._column = np.array([column[n] for n in names] + [column[vocab.synonyms[a]] for a in aliases], np.int64)

    def pairs(self, tags: pa.Array | pa.ChunkedArray, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(row, tag column) of every closed tag of every row, rows ascending; a row's tag may
        repeat (a duplicate, or a parent also listed). Null rows have no tags. ``first_row``
        only numbers rows in errors."""
        if isinstance(tags, pa.ChunkedArray):
            tags = tags.combine_chunks() if tags.num_chunks != 1 else tags.chunk(0)
        lengths = pc.list_value_length(tags).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(tags)  # skips null rows, like the lengths above
        if values.type != pa.string():
            values = values.cast(pa.string())
        found = pc.index_in(values, value_set=self._lookup)
        rows = np.repeat(np.arange(len(tags), dtype=np.int64), lengths)
        if found.null_count:
            self._raise_unknown(values, found, rows, first_row)
        which, closed = self.vocab.close_columns(self._column[found.to_numpy(zero_copy_only=False)])
        return rows[which], closed

    @staticmethod
    def _raise_unknown(values: pa.Array, found: pa.Array, rows: np.ndarray, first_row: int) -> None:
        from mltag.data.vocabulary import VocabularyError

        missing = np.asarray(found.is_null().to_numpy(zero_copy_only=False))
        row = rows[int(np.argmax(missing))]
        bad = {values[int(i)].as_py() for i in np.flatnonzero(missing & (rows == row))}
        raise VocabularyError(f"row {first_row + int(row)}: tag(s) not in the vocabulary: {sorted(bad, key=str)}")

    def encode(self, tags: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Multi-hot float32 (rows x tags) for these rows only: ``Vocabulary.encode``'s result."""
        rows, columns = self.pairs(tags)
        out = np.zeros((len(tags), self.num_tags), dtype=np.float32)
        out[rows, columns] = 1.0
        return out


def _slices(tags: pa.Array | pa.ChunkedArray, rows_per_slice: int):
    for start in range(0, len(tags), max(1, rows_per_slice)):
        yield start, tags.slice(start, rows_per_slice)


def tag_counts(tags: pa.Array | pa.ChunkedArray, index: TagIndex, rows_per_slice: int = ROWS_PER_SLICE) -> tuple[np.ndarray, int]:
    """Images carrying each tag (closed upward, each image once per tag; int64 per tag) and the
    number of images, from a pass over the tags column: the column sums of the dense matrix."""
    positives = np.zeros(index.num_tags, dtype=np.int64)
    for start, part in _slices(tags, rows_per_slice):
        rows, columns = index.pairs(part, start)
        distinct = np.unique(rows * index.num_tags + columns)  # a tag counts once per image
        positives += np.bincount(distinct % index.num_tags, minlength=index.num_tags)
    return positives, len(tags)


def repeat_factors_from_tags(
    tags: pa.Array | pa.ChunkedArray, index: TagIndex, per_tag: np.ndarray, rows_per_slice: int = ROWS_PER_SLICE
) -> np.ndarray:
    """r(I) per row from its tags and the tag factors r(h) (``tag_repeat_factors_from_counts``):
    the largest factor among the row's closed tags, 1 when it has none."""
    per_tag = np.asarray(per_tag, dtype=np.float64)
    out = np.ones(len(tags), dtype=np.float64)
    for start, part in _slices(tags, rows_per_slice):
        rows, columns = index.pairs(part, start)
        if len(rows):
            first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # where each row's tags begin
            out[start + rows[first]] = np.maximum(1.0, np.maximum.reduceat(per_tag[columns], first))
    return out


def _uniform(seed: int, epoch: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def repeat_counts(factors: np.ndarray, keys: list[str], seed: int, epoch: int) -> np.ndarray:
    """How many times each image appears this epoch: floor(r) + Bernoulli(frac(r))."""
    factors = np.asarray(factors, dtype=np.float64)
    base = np.floor(factors)
    u = np.array([_uniform(seed, epoch, k) for k in keys])
    return (base + (u < factors - base)).astype(np.int64)

"""A ranked review queue of (image, tag) labels that look wrong, from out-of-fold scores.

cleanlab's multi-label confident learning (``cleanlab.multilabel_classification``) does the
work: ``filter.find_multilabel_issues_per_class`` flags, tag by tag, the labels whose given
value disagrees with the out-of-fold score more than that tag's estimated noise rates allow
(``prune_by_noise_rate``); ``rank.get_label_quality_scores_per_class`` scores every label
(self-confidence: the score of the given value, 1 - score for a missing tag), and
``rank.get_label_quality_scores`` gives each image one score. The queue is the flagged labels,
worst quality first. Scores must be out-of-fold (``mltag oof``): a model scoring images it was
trained on agrees with their wrong labels.

Example:
    >>> labels = np.array([[1, 0]] * 30 + [[0, 1]] * 30, bool); scores = labels * 0.8 + 0.1
    >>> scores[0] = [0.05, 0.95]                  # image 0 looks like tag 1 but is labelled 0
    >>> queue = review_queue(labels, scores)
    >>> sorted({(int(r), int(t)) for r, t in zip(queue["row"], queue["tag"])})
    [(0, 0), (0, 1)]
"""

from __future__ import annotations

import numpy as np

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


def _as_lists(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(row).tolist() for row in labels]


def review_queue(
    labels: np.ndarray,
    scores: np.ndarray,
    filter_by: str = "prune_by_noise_rate",
    method: str = "self_confidence",
    min_examples: int = 5,
) -> dict[str, np.ndarray]:
    """Flagged labels ranked worst first: arrays row, tag (column), given (0/1), score, quality
    (per label), example_quality (per image). Tags with fewer than ``min_examples`` positives or
    no negative are not judged (confident learning needs both sides of each tag)."""
    from cleanlab.multilabel_classification import filter as cl_filter
    from cleanlab.multilabel_classification import rank as cl_rank

    if filter_by not in FILTERS:
        raise ValueError(f"unknown filter_by {filter_by!r}; choose one of: {', '.join(FILTERS)}")
    labels = np.asarray(labels, dtype=bool)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    positives = labels.sum(axis=0)
    judged = np.flatnonzero((positives >= min_examples) & (positives < len(labels)))
    empty = {k: np.zeros(0, dtype=t) for k, t in (("row", np.int64), ("tag", np.int64), ("given", np.int8))}
    empty.update({k: np.zeros(0) for k in ("score", "quality", "example_quality")})
    if len(judged) == 0:
        return empty
    sub_labels, sub_scores = labels[:, judged], scores[:, judged]
    as_lists = _as_lists(sub_labels)
    flagged = np.asarray(
        cl_filter.find_multilabel_issues_per_class(as_lists, sub_scores, filter_by=filter_by, n_jobs=1),
        dtype=bool,
    )
    quality = np.asarray(cl_rank.get_label_quality_scores_per_class(as_lists, sub_scores, method=method), dtype=np.float64)
    if quality.shape != sub_scores.shape:  # a list of K arrays of N
        quality = quality.T
    example_quality = np.asarray(cl_rank.get_label_quality_scores(as_lists, sub_scores, method=method), dtype=np.float64)
    rows, cols = np.nonzero(flagged)
    # Worst first; ties by image, then tag: the same inputs give the same queue.
    order = np.lexsort((cols, rows, quality[rows, cols]))
    rows, cols = rows[order], cols[order]
    return {
        "row": rows.astype(np.int64),
        "tag": judged[cols].astype(np.int64),
        "given": sub_labels[rows, cols].astype(np.int8),
        "score": sub_scores[rows, cols],
        "quality": quality[rows, cols],
        "example_quality": example_quality[rows],
    }


def precision_at(queue: dict[str, np.ndarray], planted: np.ndarray, n: int) -> float:
    """Share of the queue's first ``n`` labels that are in ``planted`` (rows x tags, True where a
    label was flipped on purpose); NaN for an empty queue."""
    rows, tags = queue["row"][:n], queue["tag"][:n]
    return float(np.asarray(planted, dtype=bool)[rows, tags].mean()) if len(rows) else float("nan")

"""Tuning a FAISS index's search: exact top-k by brute force (the ground truth, streamed), recall@k
against it, and the smallest ``nprobe`` that reaches a target recall (or the one after which
doubling stops paying).

Example:
    >>> truth = exact_neighbours(queries, [(ids, vectors)], k=10)             # doctest: +SKIP
    >>> nprobe, recall = tune_nprobe(index, queries, truth, nlist=4096, target=0.95)  # doctest: +SKIP
"""

from __future__ import annotations

import faiss
import numpy as np

PLATEAU_GAIN = 0.005  # recall@k a doubling of nprobe must add to be worth its cost


def exact_neighbours(queries: np.ndarray, batches, k: int) -> np.ndarray:
    """Brute-force top-k ids by inner product, streaming over (ids, vectors) batches: the
    ground truth for recall, in memory O(queries x k)."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for ids, vectors in batches:
        scores = queries @ vectors.T
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids that the index returned (order ignored)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def tune_nprobe(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, nlist: int, target: float, k: int = 10) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@k reaches ``target``; where the index
    cannot reach it (compressed codes cap recall), the nprobe after which doubling stops helping,
    so a search never scans every list for recall it will not get."""
    params = faiss.ParameterSpace()
    nprobe, best_nprobe, best_recall = 1, 1, -1.0
    while True:
        params.set_index_parameter(index, "nprobe", nprobe)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, truth)
        if recall >= target:
            return nprobe, recall
        if recall < best_recall + PLATEAU_GAIN:
            params.set_index_parameter(index, "nprobe", best_nprobe)
            return best_nprobe, best_recall
        best_nprobe, best_recall = nprobe, recall
        if nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)

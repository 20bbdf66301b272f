"""Making a FAISS index for a catalog: the index type from its factory string, the uniform
training sample its quantisers learn from (sized by centroid count and memory budget), and the
training itself (IVF-Flat k-means on every GPU when faiss-gpu is there, OPQ's rotation search
bounded). Which factory suits N vectors and a budget is ``mltag.search.index_selection``'s question.

Example:
    >>> index = new_index(64, "IVF16,Flat")
    >>> train_index(index, np.random.default_rng(0).random((16 * 39, 64), dtype=np.float32))
    >>> index.is_trained
    True
"""

from __future__ import annotations

import logging
import re

import faiss
import numpy as np

from mltag.search.embedding_index import ivf_of

logger = logging.getLogger(__name__)

TRAIN_SAMPLE = 100_000  # vectors a trainable index learns its quantisers from, at least (a uniform sample of the table)
TRAIN_PER_CENTROID = 39  # training vectors faiss wants a k-means centroid to have
TRAIN_MIN = 10_000  # the sample never shrinks below this for the budget: PQ's 256-centroid sub-quantisers want 39 x 256
TRAIN_BUDGET_SHARE = 4  # the training sample may use 1/4 of --max-index-memory (or TRAIN_MIN vectors, if more)
REFINE_K_FACTOR = 16  # candidates a refine stage (RFlat) re-ranks exactly, times k
OPQ_ITERATIONS = 10  # rotation updates when training OPQ (faiss defaults to 50)


def train_sample_size(n: int, dim: int, nlist: int, max_memory_bytes: int) -> int:
    """Vectors a trainable index learns from: 39 a centroid and at least ``TRAIN_SAMPLE``, at most
    a quarter of the memory budget (but never under ``TRAIN_MIN`` for it) and at most the table (pure)."""
    wanted = max(TRAIN_PER_CENTROID * nlist, TRAIN_SAMPLE)
    affordable = max(max_memory_bytes // TRAIN_BUDGET_SHARE // (4 * max(dim, 1)), TRAIN_MIN)
    return int(max(0, min(n, wanted, affordable)))


SAMPLE_CHUNK = 1 << 20  # positions given random keys at a time by uniform_sample_positions


def uniform_sample_positions(n: int, m: int, seed) -> np.ndarray:
    """``m`` distinct positions out of ``range(n)``, sorted, every m-subset equally likely and the
    same for the same ``seed`` (pure). Each position gets a random key, chunk by chunk, and the m
    smallest keys so far are kept (argpartition): memory O(m + chunk), never O(n), and the result
    does not depend on how a table is cut into batches."""
    n, m = int(n), max(0, min(int(m), int(n)))
    if m == 0:
        return np.zeros(0, np.int64)
    if m == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chunk = max(m, SAMPLE_CHUNK)
    keys, positions = np.zeros(0), np.zeros(0, np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        keys = np.concatenate([keys, rng.random(stop - start)])
        positions = np.concatenate([positions, np.arange(start, stop, dtype=np.int64)])
        if len(keys) > m:
            keep = np.argpartition(keys, m - 1)[:m]
            keys, positions = keys[keep], positions[keep]
    return np.sort(positions)


def new_index(dim: int, factory: str) -> faiss.Index:
    """IVF indexes (alone or behind a transform such as OPQ) store our 64-bit ids themselves and
    remove them correctly; anything else (Flat, HNSW, a refine stage) is wrapped in an IDMap2."""
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    top = faiss.downcast_index(inner)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    if isinstance(top, faiss.IndexRefine):
        # Re-rank k_factor x k candidates exactly; faiss's default 1 re-ranks nothing. Saved with the index.
        top.k_factor = REFINE_K_FACTOR
    return inner if isinstance(top, faiss.IndexIVF) else faiss.IndexIDMap2(inner)


def enable_reconstruct(index: faiss.Index) -> None:
    """IVF indexes need a direct map to give vectors back (search by listing id); a hash-table
    one also survives removals (incremental updates)."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def factory_label(index: faiss.Index, factory: str) -> str:
    """The factory string as built: an IDMap2 wrapper shows (it changes what removal costs)."""
    return f"IDMap2,{factory}" if isinstance(index, faiss.IndexIDMap2) else factory


def factory_nlist(factory: str) -> int:
    """The list count of an IVF factory string (``IVF4096,PQ64`` -> 4096); 0 for another kind."""
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


def _train_ivf_on_gpus(ivf: faiss.Index, sample: np.ndarray) -> bool:
    """k-means of an IVF-Flat coarse quantiser on every GPU faiss sees (the faiss-gpu extra).
    False where there is none, or GPU faiss refuses: the caller trains on CPU."""
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return False
    try:
        clustering = faiss.Clustering(ivf.d, ivf.nlist)
        clustering.train(sample, faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d)))
        ivf.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(ivf.nlist, ivf.d))
        ivf.is_trained = True
        return True
    except (RuntimeError, AttributeError) as exc:
        logger.warning("GPU training not used (%s); training on CPU", exc)
        return False


def train_index(index: faiss.Index, sample: np.ndarray) -> None:
    """Trains a fresh index's quantisers on ``sample``: IVF-Flat centroids by GPU k-means when
    faiss-gpu is there, everything else on CPU, with OPQ's rotation search bounded."""
    if isinstance(index, faiss.IndexIVFFlat) and _train_ivf_on_gpus(index, sample):
        return
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                # Each OPQ iteration retrains the whole PQ; faiss's default 50 of them take hours
                # at 256 sub-quantisers on a few cores, for little recall over the first ten.
                transform.niter = min(transform.niter, OPQ_ITERATIONS)
    index.train(sample)

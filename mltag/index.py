"""The embedding index, re-exported from the modules that own each part, so that
``from mltag.index import EmbeddingIndex, build_index, ...`` keeps working. New code imports the
owning module:

  ``mltag.embedding_index``  ``EmbeddingIndex``, ``l2_normalise``, the versioned directory
                             (``write_version``, ``current_version_dir``), ``embedding_batches``
  ``mltag.index_training``   ``new_index``, ``train_index`` (GPU k-means), ``train_sample_size``,
                             ``uniform_sample_positions``
  ``mltag.index_tuning``     ``exact_neighbours``, ``recall_at_k``, ``tune_nprobe``
  ``mltag.index_build``      ``mltag index``:        ``IndexConfig``, ``run`` (= ``build_index``)
  ``mltag.index_update``     ``mltag index-update``: ``IndexUpdateConfig``, ``run`` (= ``update_index``), ``net_changes``
  ``mltag.index_search``     ``mltag search``:       ``SearchConfig``, ``run`` (= ``run_search``), ``search_image``
  ``mltag.neighbours``       every vector's k nearest (``anomalies`` and ``duplicates``)

Patching a name here changes nothing the stages do: patch it in the module that uses it.
"""

from mltag.embedding_index import (
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    POINTER_FILE,
    VERSIONS_KEPT,
    EmbeddingIndex,
    current_version_dir,
    embedding_batches,
    l2_normalise,
    write_version,
)
from mltag.index_build import IndexConfig
from mltag.index_build import run as build_index
from mltag.index_search import SearchConfig, format_neighbours, search_image
from mltag.index_search import run as run_search
from mltag.index_training import (
    OPQ_ITERATIONS,
    REFINE_K_FACTOR,
    SAMPLE_CHUNK,
    TRAIN_BUDGET_SHARE,
    TRAIN_MIN,
    TRAIN_PER_CENTROID,
    TRAIN_SAMPLE,
    new_index,
    train_index,
    train_sample_size,
    uniform_sample_positions,
)
from mltag.index_tuning import PLATEAU_GAIN, exact_neighbours, recall_at_k, tune_nprobe
from mltag.index_update import CHANGE_RANK, IndexUpdateConfig, net_changes
from mltag.index_update import run as update_index

__all__ = [
    "CHANGE_RANK",
    "IDS_FILE",
    "INDEX_FILE",
    "META_FILE",
    "OPQ_ITERATIONS",
    "PLATEAU_GAIN",
    "POINTER_FILE",
    "REFINE_K_FACTOR",
    "SAMPLE_CHUNK",
    "TRAIN_BUDGET_SHARE",
    "TRAIN_MIN",
    "TRAIN_PER_CENTROID",
    "TRAIN_SAMPLE",
    "VERSIONS_KEPT",
    "EmbeddingIndex",
    "IndexConfig",
    "IndexUpdateConfig",
    "SearchConfig",
    "build_index",
    "current_version_dir",
    "embedding_batches",
    "exact_neighbours",
    "format_neighbours",
    "l2_normalise",
    "net_changes",
    "new_index",
    "recall_at_k",
    "run_search",
    "search_image",
    "train_index",
    "train_sample_size",
    "tune_nprobe",
    "uniform_sample_positions",
    "update_index",
    "write_version",
]

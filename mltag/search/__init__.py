"""Similarity search over the tag table's embeddings: the FAISS index and the maths around it.

  ``embedding_index``  ``EmbeddingIndex``, ``l2_normalise``, the versioned directory
                       (``write_version``, ``current_version_dir``), ``embedding_batches``
  ``index_training``   ``new_index``, ``train_index`` (GPU k-means), ``train_sample_size``,
                       ``uniform_sample_positions``
  ``index_tuning``     ``exact_neighbours``, ``recall_at_k``, ``tune_nprobe``
  ``index_selection``  which index type fits N vectors in a memory budget
  ``neighbours``       every vector's k nearest (``anomalies`` and ``duplicates``)

The stages over it live in ``mltag.stages``: ``index_build`` (``mltag index``), ``index_update``
(``mltag index-update``), ``index_search`` (``mltag search``).

``from mltag.search import EmbeddingIndex, build_index, ...`` (and the old ``mltag.index``) keeps
working: every name below is resolved on first use, so importing one module of this package
loads neither the others nor the stages. Patching a name here changes nothing the stages do:
patch it in the module that uses it.
"""

import importlib

_EXPORTS = {
    "mltag.search.embedding_index": "IDS_FILE INDEX_FILE META_FILE POINTER_FILE VERSIONS_KEPT EmbeddingIndex "
    "current_version_dir embedding_batches l2_normalise write_version",
    "mltag.search.index_training": "OPQ_ITERATIONS REFINE_K_FACTOR SAMPLE_CHUNK TRAIN_BUDGET_SHARE TRAIN_MIN "
    "TRAIN_PER_CENTROID TRAIN_SAMPLE new_index train_index train_sample_size uniform_sample_positions",
    "mltag.search.index_tuning": "PLATEAU_GAIN exact_neighbours recall_at_k tune_nprobe",
    "mltag.stages.index_build": "IndexConfig run:build_index",
    "mltag.stages.index_search": "SearchConfig format_neighbours search_image run:run_search",
    "mltag.stages.index_update": "CHANGE_RANK IndexUpdateConfig net_changes run:update_index",
}
_WHERE = {
    alias: (module, name)
    for module, names in _EXPORTS.items()
    for name, alias in (entry.partition(":")[::2] for entry in names.split())
    for alias in [alias or name]
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mltag.search' has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""mltag: multi-label tagging, embeddings and similarity search for very large image catalogs.

The package, in the order data flows (each layer imports only the layers above it in this list):

  ``errors``   InputError, the base of every error a person fixes in their input
  ``runtime``  joining Ray, one console format
  ``data``     manifest, image fetch and decode, vocabulary, storage (local / S3)
  ``config``   typed configs: dataclass defaults, then YAML, then flags; provenance
  ``maths``    metrics, thresholds, resampling, curation maths (pure numpy)
  ``table``    the tag table: row contract, Delta transactions, resumable shards
  ``tagger``   the timm model, losses, training state and loop, linear heads
  ``tagging``  the Ray Data tagging pipeline and its actor, a run's commit, chained specialists
  ``search``   the FAISS embedding index
  ``stages``   one module per ``mltag`` subcommand: ``run(config)``
  ``cli``      the ``mltag`` command

Until 0.1 the modules sat flat in ``mltag/``; the old names (``mltag.tag``, ``mltag.index``,
``mltag.model``, ...) still import, as the same module objects, through ``_MovedModules``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_GROUPS = {
    "runtime": "cluster log ray_console",
    "data": "catalog images device_decode staging augment storage identifiers uri_policy fingerprints vocabulary wordnet",
    "table": "tag_table delta_table table_files sharded_run row_errors",
    "maths": "metrics thresholds resampling hierarchy_checks label_issues pseudo_labels tag_merges tag_pruning",
    "tagger": "model weights losses train_state train_loop linear_probe heads embed",
    "tagging": "chain predict",
    "search": "embedding_index index_training index_tuning index_selection neighbours",
    "stages": "anomalies apply_head calibrate curate demo duplicates evaluate folds history index_build index_search "
    "index_update oof reindex report sample serve tag train train_head curation_report",
}
# old flat name -> where the module lives now; ``mltag.index`` was the search facade
MOVED = {f"mltag.{m}": f"mltag.{group}.{m}" for group, ms in _GROUPS.items() for m in ms.split()}
MOVED["mltag.index"] = "mltag.search"


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import mltag.tag`` (and ``from mltag.tag import run``) give ``mltag.stages.tag``
    itself: one module object under two names, so patching or isinstance checks agree."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system stamped the alias's spec on the real module: give it its own back
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.append(_MovedModules())

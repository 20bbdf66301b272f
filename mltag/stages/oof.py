"""``mltag oof``: out-of-fold scores for every labelled image, and the cross-validated mAP.

One Ray Train run per fold (``mltag train --val-fold k`` on the manifest ``mltag split`` wrote),
each scoring the fold it did not train on through the tagging pipeline (Ray Data, the same code as
``mltag eval``). Every image is scored by a model that never saw it: what label-issue detection
and pseudo-labelling need (``mltag curate --oof``).

Folds train at once when the cluster has room: a fold needs its Ray Train workers' CPUs and GPUs
(``num_workers``, ``cpus_per_worker`` of the training config) plus one CPU for its data pipeline,
and as many folds as the cluster's CPUs and GPUs hold run together (``concurrent_folds`` sets the
number instead). Each concurrent fold is one Ray task (no CPUs of its own) that drives its
training run; on a 2-core machine one fold fits, and they go one after the other. The held-out
folds are then scored one at a time, each with the whole cluster.

Outputs under ``out``:
  ``oof.parquet``  listing_id, image_uri, fold, scores (vocabulary order), model_version
  ``oof.json``     the tags (score order), per fold: model version, images, mAP macro/micro; the
                   cross-validated mAP (mean, std, min, max over folds) and the pooled mAP
  ``fold-K/``      each fold's training run (model/, ray_train/, config.yaml)

Each fold's best checkpoint is chosen by its validation mAP, i.e. on the fold it then scores: the
CV mAP is slightly optimistic by that choice (epochs are few; the last and the best epoch rarely
differ much). Re-running resumes finished folds from their records (``mltag train``'s resume).

Example:
    mltag split --manifest catalog/manifest.parquet --folds 5 --out catalog/manifest_folds.parquet
    mltag oof --manifest catalog/manifest_folds.parquet --train-config configs/train.yaml --out runs/oof
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag.config import config_dict, config_from_dict, load_yaml
from mltag.data import catalog, storage
from mltag.maths.metrics import mean_average_precision
from mltag.stages.folds import FOLD_COLUMN

logger = logging.getLogger(__name__)

PER_FOLD_FIELDS = ("manifest", "vocabulary", "out", "name", "val_fold", "storage_path")


@dataclass
class OofConfig:
    """Out-of-fold scores: one training run per fold, each scoring its held-out fold."""

    manifest: str = ""  # manifest with a fold column (mltag split)
    vocabulary: str = ""  # vocabulary YAML; empty: vocabulary.yaml beside the manifest
    out: str = "runs/oof"  # output directory: oof.parquet, oof.json, fold-K/
    train_config: str = ""  # YAML of mltag train settings used for every fold (manifest, out, name, val_fold are set per fold)
    epochs: int = 0  # overrides the training config's epochs; 0: keep it
    backbone: str = ""  # overrides the training config's backbone; empty: keep it
    pretrained: str = ""  # overrides the training config's pretrained weights; empty: keep it
    img_size: int = 0  # overrides the training config's img_size; 0: keep it
    only_folds: list[int] | None = None  # run only these folds (e.g. 0,1); empty: every fold
    batch_size: int = 64  # inference batch size when scoring a held-out fold
    num_actors: int = 0  # inference actors (0: from the cluster's resources)
    concurrent_folds: int = 0  # folds trained at once; 0: as many as the cluster's CPUs and GPUs hold (1 on a small machine)

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH; write one with mltag split)")
        if self.concurrent_folds < 0:
            raise ValueError("concurrent_folds must be >= 0 (0: as many as the cluster holds)")


def folds_that_fit(cpus: int, gpus: int, num_workers: int, cpus_per_worker: float, use_gpu: bool, folds: int) -> int:
    """How many folds can train at once on a cluster of ``cpus`` and ``gpus``: each needs its
    workers' CPUs and GPUs and one CPU more for its data pipeline (decoding): a fold
    whose workers held every CPU left would wait for its own data. At least 1, at most ``folds``.

    Example:
        >>> folds_that_fit(cpus=16, gpus=4, num_workers=1, cpus_per_worker=2, use_gpu=True, folds=5)
        4
        >>> folds_that_fit(cpus=2, gpus=0, num_workers=1, cpus_per_worker=1, use_gpu=False, folds=5)
        1
    """
    fit = int(cpus // (num_workers * cpus_per_worker + 1))
    if use_gpu:
        fit = min(fit, gpus // num_workers)
    return max(1, min(fit, folds))


def train_config_for_fold(config: OofConfig, fold: int):
    """The ``TrainConfig`` of one fold's run: the shared settings, this fold's held-out part,
    and its own output directory and run name."""
    from mltag.stages.train import TrainConfig

    values = load_yaml(config.train_config) if config.train_config else {}
    clashes = sorted(set(values) & set(PER_FOLD_FIELDS))
    if clashes:
        raise ValueError(f"{config.train_config}: {', '.join(clashes)} are set per fold by mltag oof; remove them")
    for name in ("epochs", "backbone", "pretrained", "img_size"):
        if getattr(config, name):
            values[name] = getattr(config, name)
    values.update(
        manifest=config.manifest,
        vocabulary=config.vocabulary,
        out=storage.join(config.out, f"fold-{fold}"),
        name=f"oof-fold-{fold}",
        val_fold=fold,
    )
    return config_from_dict(TrainConfig, values)


def cross_validated_map(per_fold: list[float]) -> dict[str, float]:
    """Mean, standard deviation (population: these are all the folds), min and max over folds."""
    values = np.asarray(per_fold, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def oof_table(parts: list[dict]) -> pa.Table:
    """The out-of-fold rows of every fold, sorted by listing id then image (stable output)."""
    rows = sum(len(p["ids"]) for p in parts)
    n_tags = parts[0]["scores"].shape[1]
    table = pa.table(
        {
            "listing_id": pa.array([i for p in parts for i in p["ids"]], pa.string()),
            "image_uri": pa.array([u for p in parts for u in p["uris"]], pa.string()),
            FOLD_COLUMN: pa.array(np.concatenate([np.full(len(p["ids"]), p["fold"]) for p in parts]), pa.int32()),
            "scores": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([p["scores"] for p in parts]).ravel(), pa.float32()), n_tags
            ),
            "model_version": pa.array([p["model_version"] for p in parts for _ in p["ids"]], pa.string()),
        }
    )
    assert table.num_rows == rows
    return table.sort_by([("listing_id", "ascending"), ("image_uri", "ascending")])


def run(config: OofConfig) -> dict:
    from mltag.data.vocabulary import Vocabulary

    manifest = catalog.read_manifest(config.manifest, require_tags=True)
    if FOLD_COLUMN not in manifest.column_names:
        raise catalog.ManifestError(f"{config.manifest} has no '{FOLD_COLUMN}' column: run `mltag split` first")
    folds = sorted(f for f in pc.unique(manifest.column(FOLD_COLUMN).cast(pa.int64())).to_pylist() if f is not None and f >= 0)
    chosen = [f for f in folds if not config.only_folds or f in config.only_folds]
    if not chosen:
        raise ValueError(f"no fold to run: the manifest has folds {folds}, asked for {config.only_folds}")
    fold_configs = {fold: train_config_for_fold(config, fold) for fold in chosen}  # a bad training config stops here
    at_once = concurrent_folds(config, fold_configs[chosen[0]], len(chosen))
    if at_once > 1:
        logger.info(f"training {len(chosen)} folds, {at_once} at once")
        trained = _train_on_cluster(fold_configs, at_once)
    else:
        trained = {}
    results = []
    for fold in chosen:  # one fold at a time: each scoring has the whole cluster, and takes minutes where training takes hours
        fold_run = trained[fold] if fold in trained else train_fold(fold_configs[fold])
        results.append(score_fold(config, fold_configs[fold], fold, manifest, fold_run))
    parts, summaries = [part for part, _ in results], [summary for _, summary in results]

    vocab = Vocabulary.load(fold_configs[chosen[0]].vocabulary_uri())
    table = oof_table(parts)
    pooled = mean_average_precision(np.concatenate([p["labels"] for p in parts]), np.concatenate([p["scores"] for p in parts]))
    result = {
        "tags": list(vocab.names),
        "manifest": config.manifest,
        "folds": summaries,
        "cv_map_macro": cross_validated_map([s["map_macro"] for s in summaries]),
        "cv_map_micro": cross_validated_map([s["map_micro"] for s in summaries]),
        "pooled_map_macro": pooled["macro"],
        "images": table.num_rows,
        "config": config_dict(config),
    }
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(config.out, "oof.parquet"), sink.getvalue().to_pybytes())
    storage.write_bytes(storage.join(config.out, "oof.json"), json.dumps(result, indent=2, default=str).encode())
    cv = result["cv_map_macro"]
    logger.info(
        f"cross-validated mAP {cv['mean']:.4f} +- {cv['std']:.4f} over {len(summaries)} folds (min {cv['min']:.4f}, max {cv['max']:.4f}); "
        f"pooled out-of-fold mAP {pooled['macro']:.4f} -> {os.path.join(config.out, 'oof.parquet')}"
    )
    return result


def concurrent_folds(config: OofConfig, fold_config, folds: int) -> int:
    """The configured number of folds at once, or as many as the cluster holds (``folds_that_fit``)."""
    if config.concurrent_folds:
        return min(config.concurrent_folds, folds)
    from mltag.runtime.cluster import cluster_cpus, cluster_gpus, wants_gpu

    use_gpu = wants_gpu(fold_config.use_gpu)
    return folds_that_fit(
        cluster_cpus(), cluster_gpus() if use_gpu else 0, fold_config.num_workers, fold_config.cpus_per_worker, use_gpu, folds
    )


def train_fold(fold_config) -> dict:
    """One fold's training run: its model version and wall-clock span (a resumed run that had
    finished: its export only)."""
    from mltag.stages import train

    started = time.time()
    spec = train.run(fold_config)
    return {"model_version": spec.version, "trained_from": started, "trained_to": time.time()}


def score_fold(config: OofConfig, fold_config, fold: int, manifest: pa.Table, trained: dict) -> tuple[dict, dict]:
    """Scores one fold's held-out rows with the model its run trained: (scores part, summary)."""
    from mltag.tagging.predict import predict_rows

    _, held_out = catalog.train_val_split(manifest, fold)
    labels, scores, ids, uris = predict_rows(held_out, storage.join(fold_config.out, "model"), config.batch_size, config.num_actors)
    maps = mean_average_precision(labels, scores)
    version = trained["model_version"]
    logger.info(f"fold {fold}: model {version}, {len(ids)} held-out images, mAP {maps['macro']:.4f} (micro {maps['micro']:.4f})")
    part = {"fold": fold, "ids": ids, "uris": uris, "scores": scores, "labels": labels, "model_version": version}
    summary = {
        "fold": fold,
        "model_version": version,
        "images": len(ids),
        "map_macro": maps["macro"],
        "map_micro": maps["micro"],
        "trained_from": trained["trained_from"],
        "trained_to": trained["trained_to"],
        "train_config": config_dict(fold_config),
    }
    return part, summary


def _train_on_cluster(fold_configs: dict, at_once: int) -> dict[int, dict]:
    """Each fold's ``train_fold`` as a Ray task, ``at_once`` in flight: {fold: its run}.

    A task reserves no CPU (its training run's workers and data tasks reserve their own), and
    runs on the driver's node: a local ``out`` is then this machine's directory, as in a run of
    one fold at a time. Not retried: a fold that fails stops the command, and a re-run resumes
    the folds that finished (``mltag train``'s resume)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mltag.runtime.cluster import with_console

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(with_console)
    waiting, running, done = list(fold_configs), {}, {}
    while waiting or running:
        while waiting and len(running) < at_once:
            fold = waiting.pop(0)
            options = {"name": f"oof-fold-{fold}", "num_cpus": 0, "max_retries": 0, "scheduling_strategy": here}
            running[task.options(**options).remote(train_fold, fold_configs[fold])] = fold
        (finished,), _ = ray.wait(list(running), num_returns=1)
        done[running.pop(finished)] = ray.get(finished)
    return done

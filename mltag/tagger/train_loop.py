"""What each Ray Train worker runs: restore the run's state, then for each epoch train one epoch,
validate (rank 0, on the whole validation set) and checkpoint.

``train_loop_per_worker`` is the TorchTrainer's entry point. Its argument is ``LoopConfig.to_dict()``
(Ray Train's ``train_loop_config`` is a dict, which it also exports as JSON to its state API);
the worker turns it back into the typed ``LoopConfig`` before anything else reads it.

Only rank 0 reports: a progress bar during each epoch when the driver's console is a terminal
(or a progress line a minute in a log file), then one summary line per epoch.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from mltag.data.augment import augment
from mltag.data.images import pixels_from_arrow
from mltag.data.staging import StagingBuffers
from mltag.data.vocabulary import Vocabulary
from mltag.maths.metrics import chance_mean_average_precision, mean_average_precision
from mltag.maths.resampling import TagIndex, repeat_counts
from mltag.runtime import log
from mltag.runtime.ray_console import progress_notices_off, quiet_ray_train_reports
from mltag.tagger.losses import MultiLabelLoss
from mltag.tagger.model import Tagger, backbone_stages, load_tagger, normalise
from mltag.tagger.train_state import TrainState

logger = logging.getLogger(__name__)

PROGRESS_BAR_REFRESH_S = 1.0  # how often the bar's loss and rate are read (each read waits for the device)
PROGRESS_LOG_INTERVAL_S = 60.0  # how often an epoch in progress is logged where no bar can be drawn


@dataclass
class LoopConfig:
    """What a worker needs to train, built on the driver from a TrainConfig (``train.loop_config``)."""

    backbone: str  # timm model name
    pretrained: str  # none | hub | a weights package or file (see TrainConfig)
    pooling: str  # avg | max | avgmax
    img_size: int  # square input side, pixels
    loss: str  # bce | focal | asl
    gamma_pos: float  # ASL focusing for positives
    gamma_neg: float  # ASL focusing for negatives
    clip: float  # ASL probability margin on negatives
    focal_gamma: float  # focal loss gamma
    epochs: int  # epochs of the whole run (a resumed run trains the ones its checkpoint lacks)
    head_epochs: int  # the first epochs train only the head
    backbone_lr_scale: float  # backbone learning rate = lr x this
    batch_norm: str  # train | frozen: batch-norm layers keep their pretrained statistics
    batch_size: int  # images per worker per step
    optimizer: str  # adamw | sgd
    lr: float  # peak learning rate
    weight_decay: float
    warmup_epochs: float  # linear warmup, then cosine decay
    ema_decay: float  # 0: no EMA
    seed: int
    num_tags: int
    vocabulary: dict  # Vocabulary.to_dict(): labels are encoded per batch on the worker
    threads: int  # torch intra-op threads
    mean: Sequence[float]  # the backbone's input normalisation
    std: Sequence[float]
    pos_weight: list[float] | None  # per-tag positive weights, or None
    resample: bool  # repeat-factor resampling on: rows carry their repeat_factor
    n_train_effective: float  # images in an epoch after resampling: the scheduler's epoch length
    progress: str = "off"  # bar | log | off: how rank 0 shows an epoch in progress (EpochProgress)
    start_from: str = ""  # a saved tagger whose weights the run starts from (LP-FT's probe model); empty: timm's init
    pseudo_label_weight: float = 1.0  # loss weight of a pseudo label; rows then carry pseudo_tags and human_tags
    augment: bool = True  # random resized crops and colour jitter, on the device (mltag.data.augment)
    crop_scale: float = 0.7  # smallest share of the image area a crop keeps
    frozen_stages: int = 0  # fine-tuning keeps the backbone's first N layer groups (stem, stages) as they start
    jitter: float = 0.2  # colour jitter strength
    hflip: bool = True  # random horizontal flips

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LoopConfig:
        return cls(**values)


# ---- pure pieces --------------------------------------------------------------------------------
def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warmup from ~0 to 1, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_arrays(batch: pa.Table, img_size: int, tags: TagIndex) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and the multi-hot labels (closed upward) of this batch's ``tags``, encoded here,
    one batch at a time."""
    # A read-only view of the Arrow buffer: StagingBuffers copies it once, into the tensor the model reads.
    return pixels_from_arrow(batch.column("pixels"), img_size), tags.encode(batch.column("tags"))


def augmentation_generator(loop: LoopConfig, rank: int, epoch: int, device: torch.device) -> torch.Generator:
    """The random stream of one worker's epoch of augmentation: reproducible from the run's seed,
    different for every rank and epoch (a resumed run redraws the epochs it trains)."""
    seed = int(np.random.SeedSequence([loop.seed, rank, epoch]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def label_weights(batch: pa.Table, tags: TagIndex, pseudo_label_weight: float) -> np.ndarray | None:
    """Per image and tag, the weight of its loss term: ``pseudo_label_weight`` where the positive
    comes only from a pseudo label (closed upward: a parent a person gave keeps weight 1), 1
    elsewhere; None when every term weighs 1 (no weighting asked, or rows without provenance)."""
    if pseudo_label_weight == 1.0 or "pseudo_tags" not in batch.column_names:
        return None
    pseudo_only = tags.encode(batch.column("pseudo_tags")).astype(bool) & ~tags.encode(batch.column("human_tags")).astype(bool)
    return np.where(pseudo_only, np.float32(pseudo_label_weight), np.float32(1.0))


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


# ---- the model and its optimiser ----------------------------------------------------------------
def freeze_backbone(model: Tagger, frozen: bool, frozen_stages: int = 0) -> None:
    """Phase 1 (frozen) trains only the head; phase 2 trains everything but the backbone's first
    ``frozen_stages`` layer groups (``backbone_stages``: the stem, then each stage). Nothing before
    the first trained layer needs a gradient, so autograd records no graph there: the backward
    pass stops at the input of the first trained stage, which on a CNN skips its costliest part
    (the early, high-resolution layers)."""
    stages = backbone_stages(model.backbone) if frozen_stages else {}
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(not frozen and stages.get(name, frozen_stages) >= frozen_stages)


def freeze_batch_norm_statistics(model: torch.nn.Module, only_frozen_layers: bool = False) -> None:
    """Puts every batch-norm layer in eval mode: it normalises with the pretrained running
    statistics and stops updating them, while its scale and shift still learn. A head fitted on
    the frozen backbone's features (LP-FT's probe) then sees the same features when fine-tuning
    starts, and small batches of a small catalog cannot drag ImageNet's statistics around.
    ``only_frozen_layers``: just the layers whose scale and shift are frozen too (``frozen_stages``),
    so a frozen stage computes exactly what it computed before training."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if not only_frozen_layers or (module.weight is not None and not module.weight.requires_grad):
                module.eval()


def set_phase(model: Tagger, head_only: bool, frozen_stages: int = 0) -> torch.nn.Module:
    """Freezes or unfreezes the backbone, then (re)builds DDP: DDP only synchronises the
    parameters that required grad when it was built."""
    import ray.train.torch

    freeze_backbone(model, head_only, frozen_stages)
    return ray.train.torch.prepare_model(model)


def load_start_weights(model: Tagger, model_dir: str) -> None:
    """Starts the run from a saved tagger's weights: LP-FT's probe model (the pretrained backbone
    with a head already fitted to its frozen features), so the first steps' gradients, coming
    from a head that fits, do not distort the pretrained features as a random head's would."""
    start, spec = load_tagger(model_dir)
    try:
        model.load_state_dict(start.state_dict())
    except RuntimeError as exc:
        raise ValueError(
            f"start model {model_dir} ({spec.backbone}, {len(spec.vocabulary)} tags) does not fit this run's model: {exc}"
        ) from exc


def build_optimizer(model: Tagger, name: str, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Two parameter groups so phase 2 can give the backbone a lower learning rate."""
    groups = [
        {"params": list(model.backbone.parameters()), "lr": lr * backbone_lr_scale, "name": "backbone"},
        {"params": list(model.head.parameters()), "lr": lr, "name": "head"},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def new_state(loop: LoopConfig, device: torch.device, world: int) -> TrainState:
    """A fresh run's state: the model (initialised from the seeded RNG), its optimiser, the
    warmup-cosine schedule over the whole run, and the EMA when on."""
    from timm.utils import ModelEmaV3

    tagger = Tagger(loop.backbone, loop.num_tags, loop.pooling, loop.pretrained)
    if loop.start_from:
        load_start_weights(tagger, loop.start_from)
    tagger = tagger.to(device=device, memory_format=torch.channels_last)
    optimizer = build_optimizer(tagger, loop.optimizer, loop.lr, loop.weight_decay, loop.backbone_lr_scale)
    steps_per_epoch = max(1, math.ceil(loop.n_train_effective / (loop.batch_size * world)))
    total_steps = steps_per_epoch * loop.epochs
    warmup = int(loop.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))
    ema = ModelEmaV3(tagger, decay=loop.ema_decay) if loop.ema_decay > 0 else None
    return TrainState(tagger, optimizer, scheduler, ema)


# ---- showing an epoch in progress ----------------------------------------------------------------
class EpochProgress:
    """Rank 0's view of a training epoch while it runs.

    ``bar``: a tqdm bar, drawn on the driver's console by Ray's ``tqdm_ray`` (a worker's stderr is
    a file that Ray forwards a line at a time, so a plain tqdm bar there would not move until the
    epoch ended); its description carries the running loss, its rate the samples/s. ``log``: a
    line every PROGRESS_LOG_INTERVAL_S, for consoles that are files (job logs), where a bar's
    carriage returns would pile up. ``off``: nothing. Counts are global samples (this rank's x
    world size).
    """

    def __init__(self, mode: str, epoch: int, epochs: int, total: int):
        self.mode, self.total, self.seen = mode, total, 0
        self.desc = f"epoch {epoch}/{epochs}"
        self.started = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(desc=self.desc, total=total, unit="samples")

    def update(self, samples: int, loss_sum: torch.Tensor, steps: int) -> None:
        self.seen += samples
        if self.bar is not None:
            self.bar.update(samples)  # tqdm_ray sends at most one update a second
        now = time.monotonic()
        if self.mode == "off" or now - self.last < (PROGRESS_BAR_REFRESH_S if self.bar is not None else PROGRESS_LOG_INTERVAL_S):
            return
        self.last = now
        loss = float(loss_sum) / max(1, steps)  # waits for the device: once an interval, not every step
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} loss {loss:.4f}")  # the bar shows the rate itself
        else:
            rate = self.seen / max(now - self.started, 1e-9)
            logger.info("%s: %d/%d samples, loss %.4f, %.1f samples/s", self.desc, self.seen, self.total, loss, rate)

    def close(self, loss: float | None = None) -> None:
        """Ends the bar (it stays on screen, with the epoch's loss when given)."""
        if self.bar is not None:
            if loss is not None:
                self.bar.set_description(f"{self.desc} loss {loss:.4f}")
            self.bar.close()  # sends the final state whatever the last update sent
            self.bar = None


# ---- the loop's steps ----------------------------------------------------------------------------
@dataclass
class Worker:
    """What every step of one worker's loop shares."""

    loop: LoopConfig
    rank: int
    world: int
    device: torch.device
    tag_index: TagIndex
    loss_fn: MultiLabelLoss
    staging: StagingBuffers  # pinned host buffers on GPUs: asynchronous copies

    @classmethod
    def build(cls, loop: LoopConfig, rank: int, world: int, device: torch.device) -> Worker:
        """The loss (with its per-tag positive weights), the tag index and the staging buffers of one worker."""
        pos_weight = torch.tensor(loop.pos_weight, device=device) if loop.pos_weight else None
        loss_fn = MultiLabelLoss(loop.loss, loop.gamma_pos, loop.gamma_neg, loop.clip, loop.focal_gamma, pos_weight=pos_weight)
        return cls(loop, rank, world, device, TagIndex(Vocabulary.from_dict(loop.vocabulary)), loss_fn, StagingBuffers(device))


def restore(state: TrainState, checkpoint) -> None:
    """Continues from Ray Train's latest checkpoint, if any: a restart after a failure, or a
    resumed run."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        state.load(d)
    state.restarts += 1
    logger.info("resuming from checkpoint after epoch %d (restart %d)", state.epochs_done, state.restarts)


def train_one_epoch(worker: Worker, model: torch.nn.Module, state: TrainState, shard, epoch: int) -> dict:
    """One pass over this worker's shard (``epoch`` 0-based); returns the epoch's training metrics."""
    loop, device = worker.loop, worker.device
    head_only = epoch < loop.head_epochs
    model.train()
    if head_only:
        state.model.backbone.eval()  # a frozen backbone keeps its batch-norm statistics too
    else:
        freeze_batch_norm_statistics(state.model, only_frozen_layers=loop.batch_norm != "frozen")
    # The loss is summed on the device and read once an epoch (and by the progress bar once a
    # second): reading it every step would wait for the device every step.
    started, seen, loss_sum, steps = time.time(), 0, torch.zeros((), device=device), 0
    use_amp = device.type == "cuda"
    batches = shard.iter_batches(
        batch_size=loop.batch_size,
        batch_format="pyarrow",
        local_shuffle_buffer_size=4 * loop.batch_size,
        local_shuffle_seed=loop.seed + epoch,
        prefetch_batches=2,
    )
    if loop.resample:
        batches = resampled_batches(batches, loop.batch_size, loop.seed + worker.rank, epoch)
    progress = EpochProgress(loop.progress if worker.rank == 0 else "off", epoch + 1, loop.epochs, math.ceil(loop.n_train_effective))
    generator = augmentation_generator(loop, worker.rank, epoch, device)
    crop_scale, jitter = (loop.crop_scale, loop.jitter) if loop.augment else (1.0, 0.0)
    try:
        first_batch_s, data_wait_s, asked = None, 0.0, time.time()
        for batch in batches:
            now = time.time()
            if first_batch_s is None:  # how long the epoch waited for its data to start flowing
                first_batch_s = now - started
            else:  # how long the later steps waited for their batch: an input-bound run shows here
                data_wait_s += now - asked
            pixels, labels = batch_arrays(batch, loop.img_size, worker.tag_index)
            weights = label_weights(batch, worker.tag_index, loop.pseudo_label_weight)
            on_device = augment(worker.staging.to_device(pixels), generator, crop_scale, jitter, loop.hflip)
            x = normalise(on_device, loop.mean, loop.std)
            y = torch.from_numpy(labels).to(device, non_blocking=True)
            w = None if weights is None else torch.from_numpy(weights).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits, _ = model(x)
            loss = worker.loss_fn(logits, y, w)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            if state.ema is not None:
                state.ema.update(state.model, step=state.step)
            seen, steps, loss_sum = seen + len(labels), steps + 1, loss_sum + loss.detach()
            progress.update(len(labels) * worker.world, loss_sum, steps)
            asked = time.time()
        train_time = time.time() - started
        train_loss = float(loss_sum) / max(1, steps)
        progress.close(train_loss)
    finally:
        progress.close()  # on an error too, so the driver does not keep drawing it
    return {
        "epoch": epoch + 1,
        "phase": 1 if head_only else 2,
        "train_loss": train_loss,
        "samples_per_s": seen * worker.world / max(train_time, 1e-9),
        "train_s": train_time,
        "first_batch_s": first_batch_s or 0.0,
        "data_wait_s": data_wait_s,
        "lr": state.scheduler.get_last_lr()[-1],
        "restarts": state.restarts,
    }


@torch.inference_mode()
def validate(model: torch.nn.Module, shard, loop: LoopConfig, device: torch.device, tag_index: TagIndex | None = None) -> dict:
    """Validation mAP on the whole validation set (rank 0 sees all of it); labels are encoded
    per batch, then the (small) validation labels and scores are gathered for the metrics."""
    if tag_index is None:
        tag_index = TagIndex(Vocabulary.from_dict(loop.vocabulary))
    was_training = model.training
    model.eval()
    all_scores, all_labels = [], []
    staging = StagingBuffers(device)
    for batch in shard.iter_batches(batch_size=loop.batch_size, batch_format="pyarrow", prefetch_batches=2):
        pixels, labels = batch_arrays(batch, loop.img_size, tag_index)
        logits, _ = model(normalise(staging.to_device(pixels), loop.mean, loop.std))
        all_scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        all_labels.append(labels)
    model.train(was_training)
    if not all_scores:
        return {"val_map": float("nan"), "val_map_micro": float("nan"), "val_chance_map": float("nan")}
    y, s = np.concatenate(all_labels), np.concatenate(all_scores)
    m = mean_average_precision(y, s)
    return {"val_map": m["macro"], "val_map_micro": m["micro"], "val_chance_map": chance_mean_average_precision(y)}


def checkpoint(state: TrainState, metrics: dict, rank: int) -> None:
    """Reports the epoch's metrics to Ray Train, with rank 0's checkpoint of the whole state
    (Ray Train keeps the best ``num_to_keep`` by validation mAP)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            state.save(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def epoch_summary(metrics: dict, epochs: int, seconds: float) -> str:
    """The one line an epoch leaves on the console (``seconds``: training and validation)."""
    return (
        f"epoch {metrics['epoch']}/{epochs} (phase {metrics['phase']}): train loss {metrics['train_loss']:.4f}  "
        f"val mAP {metrics['val_map']:.4f} (micro {metrics['val_map_micro']:.4f}, chance {metrics['val_chance_map']:.4f})  "
        f"{metrics['samples_per_s']:.1f} samples/s  in {seconds:.1f} s"
    )


def train_loop_per_worker(config: dict) -> None:
    """TorchTrainer's ``train_loop_per_worker``: ``config`` is ``LoopConfig.to_dict()``."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # This is a fresh process: give mltag's logger its handler here. Ranks other than 0 only
    # speak up when something is wrong.
    log.configure(None if rank == 0 else logging.WARNING)
    quiet_ray_train_reports()
    loop = LoopConfig.from_dict(config)
    torch.set_num_threads(max(1, loop.threads))
    torch.manual_seed(loop.seed)  # a resumed run then restores its RNG states from the checkpoint
    random.seed(loop.seed)
    np.random.seed(loop.seed)
    device = ray.train.torch.get_device()

    state = new_state(loop, device, world)
    worker = Worker.build(loop, rank, world, device)
    restore(state, ray.train.get_checkpoint())

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    phase = None
    with progress_notices_off():  # the datasets' bars are off on purpose (ray_console.quiet_per_epoch)
        for epoch in range(state.epochs_done, loop.epochs):
            started = time.time()
            head_only = epoch < loop.head_epochs
            if phase != head_only:
                model, phase = set_phase(state.model, head_only, loop.frozen_stages), head_only
            metrics = train_one_epoch(worker, model, state, train_shard, epoch)
            state.epochs_done = epoch + 1
            if rank == 0:
                metrics.update(validate(state.scored_model, val_shard, loop, device, worker.tag_index))
                state.history.append(metrics)
                logger.info(epoch_summary(metrics, loop.epochs, time.time() - started))
            else:
                metrics.update({"val_map": float("nan")})
            checkpoint(state, metrics, rank)

"""A training run's state in one place: what a checkpoint holds, written by ``TrainState.save``
and read back by ``TrainState.load`` and nothing else.

A checkpoint directory holds tensors (``state.pt``: model, optimiser, scheduler, EMA and torch's
RNG states, loaded with ``weights_only=True``) and JSON (``training_state.json``: epoch, step,
history, restarts, Python's and NumPy's RNG states), never pickled objects: whoever can write to
the checkpoint storage cannot make a worker, or the driver exporting a model, run code.

    state = TrainState(model, optimizer, scheduler, ema)
    state.save(directory)                    # rank 0, after each epoch
    TrainState(model2, ...).load(directory)  # a restarted worker, or the driver exporting
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mltag.errors import InputError

STATE_FILE = "state.pt"  # tensors only: model, optimiser, scheduler, EMA, torch RNG states
STATE_META_FILE = "training_state.json"  # the rest of a checkpoint: epoch, step, history, Python/NumPy RNG


class UnsafeCheckpointError(InputError, RuntimeError):
    """A checkpoint file that holds more than tensors and plain containers (refused, not loaded)."""


@dataclass
class TrainState:
    """Everything a run continues from. ``model`` is the bare module (not DDP-wrapped), so the
    weights' names carry no ``module.`` prefix; the EMA (timm ``ModelEmaV3``) saves and loads its
    own ``state_dict``. Slots left ``None`` (the optimiser when exporting) are not restored.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs_done=2, step=20)
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     state.save(d)
        ...     TrainState(torch.nn.Linear(3, 2)).load(d, rng=False).step
        20
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None  # a torch.optim.lr_scheduler.LRScheduler
    ema: Any = None  # a timm.utils.ModelEmaV3 when EMA is on
    epochs_done: int = 0  # completed epochs; the next one to train is this (0-based)
    step: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)  # one metrics dict per completed epoch (rank 0)
    restarts: int = 0  # times this run continued from a checkpoint

    @property
    def scored_model(self) -> torch.nn.Module:
        """The weights validation scores and export saves: the EMA's when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, directory: str) -> None:
        """Writes this state, and this process's RNG states, into ``directory``."""
        rng_tensors, rng_meta = capture_rng()
        tensors = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_tensors,
        }
        # "epoch" is the 0-based index of the last completed epoch: the format checkpoints have
        # always had, so runs started before this class can still be resumed.
        meta = {"epoch": self.epochs_done - 1, "step": self.step, "history": self.history, "restarts": self.restarts, "rng": rng_meta}
        save_training_state(directory, tensors, meta)

    def load(self, directory: str, *, rng: bool = True) -> TrainState:
        """Restores the state ``save`` wrote into this one's slots (and, with ``rng``, this
        process's RNG states); returns ``self``. Raises UnsafeCheckpointError for a ``state.pt``
        that holds anything but tensors and plain containers, before any of it runs.

        An EMA slot with no EMA in the checkpoint (a run continued with --resume force and EMA
        newly on) starts from the restored weights."""
        tensors, meta = load_training_state(directory)
        self.model.load_state_dict(tensors["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(tensors["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(tensors["scheduler"])
        if self.ema is not None:
            if tensors.get("ema") is not None:
                self.ema.load_state_dict(tensors["ema"])
            else:
                self.ema.set(self.model)
        if rng:
            restore_rng(tensors.get("rng") or {}, meta.get("rng") or {})
        self.epochs_done = meta["epoch"] + 1
        self.step = meta.get("step", 0)
        self.history = meta.get("history", [])
        self.restarts = meta.get("restarts", 0)
        return self


# ---- the files: tensors and JSON, nothing that runs code when loaded ------------------------------
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

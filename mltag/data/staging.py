"""Moving uint8 image batches from Arrow to the model's device.

Pixels arrive as a read-only view of an Arrow buffer. Wrapping that view in a tensor would warn
(torch cannot promise not to write it) and, on a GPU, copy from pageable memory, which makes
``non_blocking`` synchronous. Instead each batch is written with one memcpy into a reusable host
buffer, pinned on GPUs so the host-to-device copy is asynchronous and overlaps the work already
queued. Two buffers alternate, each guarded by an event, so a batch is never overwritten while
its copy is still in flight.
"""

from __future__ import annotations

import numpy as np
import torch


class StagingBuffers:
    def __init__(self, device: torch.device, slots: int = 2):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.events: list = [None] * slots
        self.next = 0

    def to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """``pixels`` (N, H, W, C) uint8 as a tensor on the device (on CPU: the host buffer itself,
        valid until the slot comes round again, after ``slots - 1`` further calls)."""
        slot, self.next = self.next, (self.next + 1) % len(self.buffers)
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # this slot's previous copy has left the buffer
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < len(pixels) or buffer.shape[1:] != pixels.shape[1:]:
            buffer = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=self.pinned)
            self.buffers[slot] = buffer
        host = buffer[: len(pixels)]
        host.numpy()[...] = pixels
        if self.device.type == "cpu":
            return host
        on_device = host.to(self.device, non_blocking=self.pinned)
        if self.pinned:
            self.events[slot] = torch.cuda.Event()
            self.events[slot].record()
        return on_device

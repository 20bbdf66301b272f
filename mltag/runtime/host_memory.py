"""How the worker processes that run a model on the CPU get host memory back between steps.

glibc's malloc serves every allocation over its mmap threshold (32 MiB at most) with a fresh
``mmap`` and returns it with ``munmap`` when freed; a thread other than the main one allocates
from an arena of at most 64 MiB heaps, so anything larger is mapped afresh whatever the settings.
A CNN's early activations are far over both (EfficientNet-Lite0 at 288 px, batch 32: 85 MB
each), so every training step maps them in anew and the kernel zeroes each page on first touch:
in a Ray Train worker on 2 cores, 250,000 page faults a second, kernel time near 40% of the
worker's CPU time. PyTorch's CPU tuning guide swaps the allocator (jemalloc or tcmalloc through
``LD_PRELOAD``), which needs a library on every node; glibc's own settings do the same for a
loop that allocates the same tensors every step: one arena (Ray Train runs the training loop in
a thread), no ``mmap`` for large blocks, freed memory kept for reuse. glibc reads them when a
process starts, so they travel in the runtime environment of the workers Ray starts.
"""

from __future__ import annotations

import os
import platform

OPT_OUT_ENV = "MLTAG_KEEP_FREED_MEMORY"  # 0: leave malloc as it is
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, which has no size limit
    "MALLOC_MMAP_MAX_": "0",  # large blocks come from the heap too, not from fresh mappings
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # up to 2 GiB of freed heap kept for the next step
}


def cpu_malloc_env(use_gpu: bool) -> dict[str, str]:
    """The environment variables (for Ray's ``runtime_env``) of a worker that runs its model on
    the CPU: glibc's malloc set to keep freed memory for reuse. The price is that such a worker
    keeps its peak heap. None for a GPU worker (``use_gpu``), whose activations live on the device,
    off Linux, with ``MLTAG_KEEP_FREED_MEMORY=0``, or where the environment already tunes malloc
    (``MALLOC_*``) or preloads another allocator; glibc ignores them under another C library.
    """
    if use_gpu or os.environ.get(OPT_OUT_ENV, "1") == "0" or platform.system() != "Linux":
        return {}
    if os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        return {}
    return dict(MALLOC_ENV)

"""keep_freed_memory_for_reuse: a loop that allocates the same large tensor every step stops
page-faulting it in anew (what makes CPU training steps spend a quarter of their time in the kernel)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from mltag.runtime.host_memory import keep_freed_memory_for_reuse

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")

# A fresh process each time: mallopt changes the whole process, and must not leak into the suite.
LOOP = """
import resource, sys
import torch
from mltag.runtime.host_memory import keep_freed_memory_for_reuse
applied = keep_freed_memory_for_reuse() if sys.argv[1] == "on" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the heap grows to its steady size over the first few (aligned) allocations
    torch.ones(16 * 2**20)  # 64 MiB, every page touched, then freed
before = faults()
for _ in range(10):
    torch.ones(16 * 2**20)
print(applied, faults() - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    import os

    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, env={**os.environ, **env}, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


def test_freed_large_tensors_are_reused_instead_of_faulted_in_again():
    applied, kept = _faults("on")
    _, default = _faults("off")
    pages = 10 * 64 * 2**20 // 4096
    assert applied == "True"
    assert default > 0.5 * pages  # glibc maps each 64 MiB tensor in anew and the kernel faults it in
    assert kept < 0.05 * pages  # the freed heap is reused: almost no new pages


def test_left_alone_when_asked_or_when_the_environment_tunes_malloc(monkeypatch):
    monkeypatch.setenv("MLTAG_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory_for_reuse() is False
    monkeypatch.delenv("MLTAG_KEEP_FREED_MEMORY")
    assert _faults("on", MALLOC_TRIM_THRESHOLD_="0")[0] == "False"

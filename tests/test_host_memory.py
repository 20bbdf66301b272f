"""glibc's malloc settings for CPU model workers: a thread that allocates the same large tensor
every step (Ray Train runs the training loop in a thread) stops page-faulting it in anew, the
kernel time that took ~40% of a CPU training worker."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mltag.runtime.host_memory import MALLOC_ENV, cpu_malloc_env

# A fresh process each time: glibc reads its settings when a process starts.
LOOP = """
import resource, threading
import torch
out = []
def steps():
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # the heap grows to its steady size over the first few (aligned) allocations
        torch.ones(32 * 2**20)  # 128 MiB, every page touched, then freed
    before = faults()
    for _ in range(10):
        torch.ones(32 * 2**20)
    out.append(faults() - before)
worker = threading.Thread(target=steps)
worker.start(); worker.join()
print(out[0])
"""


def _faults(env: dict) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, env={**clean, **env}, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_a_thread_reuses_freed_large_tensors_instead_of_faulting_them_in_again():
    pages = 10 * 128 * 2**20 // 4096
    assert _faults({}) > 0.5 * pages  # by default each 128 MiB tensor is mapped in anew
    assert _faults(MALLOC_ENV) < 0.05 * pages  # kept: almost no new pages


def test_only_cpu_workers_on_linux_get_it_and_a_user_setting_wins(monkeypatch):
    for name in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "MLTAG_KEEP_FREED_MEMORY"]:
        monkeypatch.delenv(name, raising=False)
    expected = MALLOC_ENV if platform.system() == "Linux" else {}
    assert cpu_malloc_env(use_gpu=False) == expected and cpu_malloc_env(use_gpu=True) == {}
    monkeypatch.setenv("MLTAG_KEEP_FREED_MEMORY", "0")
    assert cpu_malloc_env(use_gpu=False) == {}
    monkeypatch.delenv("MLTAG_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own tuning is left alone
    assert cpu_malloc_env(use_gpu=False) == {}

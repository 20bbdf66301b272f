"""Shared by the benchmark scripts: the machine's name, JSON results, and RESULTS.md sections.

Each benchmark owns one section of RESULTS.md (between markers) and rewrites only that one, so
the scripts can run in any order and on different machines.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


def save(name: str, payload: dict, markdown: str) -> None:
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    section = f"<!-- {name}:start -->\n## {name}\n\nMachine: {payload['machine']}. Run {payload['date']}.\n\n{markdown.strip()}\n<!-- {name}:end -->"
    text = (
        open(RESULTS_MD).read()
        if os.path.exists(RESULTS_MD)
        else "# Benchmark results\n\nWritten by the scripts in benchmarks/; each owns one section.\n"
    )
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(RESULTS_MD, "w") as f:
        f.write(text)
    print(f"-> {RESULTS_MD} and benchmarks/results/{name}.json")


def files_under(root: str) -> dict[str, int]:
    """path -> size of every file under ``root`` (what a run wrote is the difference of two calls)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[path] = os.path.getsize(path)
    return out

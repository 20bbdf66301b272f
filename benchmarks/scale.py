"""Catalog scale: every streaming stage at N rows, with the driver's peak memory, against a plain
multiprocessing script for tagging.

A synthetic catalog of N rows: 2,000 small real JPEGs (64 px crops of scikit-learn's sample
photos) under N distinct listing ids (one hard link per row, so a night can change a row's photo
alone), a tiny timm model at 64 px: the machinery, not the forward pass, is measured. Each stage
runs as its own `mltag` process (its driver); a sampler reads that process's PSS and the
machine's cgroup memory (not a sum of RSS, which counts shared pages many times) every 0.2 s.

    python benchmarks/scale.py --rows 100000
    python benchmarks/scale.py --rows 100000 --rows 1000000     # both sizes in one table
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import GIB, measured  # noqa: E402
from results import files_under, save  # noqa: E402
from synthetic_catalog import link_rows, make_images, tiny_model  # noqa: E402


def build_catalog(work: str, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = link_rows(make_images(os.path.join(work, "images"), 2000, 0), os.path.join(work, "rows"), rows)
    manifest = os.path.join(work, "manifest.parquet")
    pq.write_table(pa.table({"listing_id": [f"L{i:08d}" for i in range(rows)], "image_uri": uris}), manifest, row_group_size=100_000)
    return manifest


PLAIN = r'''
"""The plain alternative: a multiprocessing.Pool over the manifest that fetches, decodes, runs the
same model and writes Parquet, one file per chunk."""
import os, sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
from multiprocessing import Pool
from mltag.data.images import load_image
from mltag.tagger.model import load_tagger, normalise

MODEL, OUT = sys.argv[2], sys.argv[3]

def init():
    global model, spec
    torch.set_num_threads(1)
    model, spec = load_tagger(MODEL)

def work(args):
    k, ids, uris = args
    pixels, ok, errors = [], [], []
    for i, uri in enumerate(uris):
        array, error = load_image(uri, spec.img_size)
        errors.append(error)
        if array is not None:
            pixels.append(array); ok.append(i)
    with torch.inference_mode():
        x = normalise(torch.from_numpy(np.stack(pixels)), spec.mean, spec.std)
        logits, emb = model(x)
    scores = torch.sigmoid(logits).numpy()
    table = pa.table({"listing_id": ids, "image_uri": uris, "error": errors,
                      "scores": pa.array([list(s) for s in scores]), "embedding": pa.array([list(e) for e in emb.numpy()])})
    pq.write_table(table, os.path.join(OUT, f"part-{k:06d}.parquet"))
    return len(ids)

if __name__ == "__main__":
    manifest = pq.read_table(sys.argv[1])
    os.makedirs(OUT, exist_ok=True)
    ids, uris = manifest.column("listing_id").to_pylist(), manifest.column("image_uri").to_pylist()
    chunks = [(k, ids[i:i + 256], uris[i:i + 256]) for k, i in enumerate(range(0, len(ids), 256))]
    with Pool(os.cpu_count(), initializer=init) as pool:
        print(sum(pool.imap_unordered(work, chunks)), "rows")
'''


def night_manifest(work: str, manifest: str) -> str:
    """1% of photos changed, 0.5% new listings, 0.5% deleted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(manifest)
    rows = table.num_rows
    rng = np.random.default_rng(1)
    order = rng.permutation(rows)
    changed, deleted = order[: rows // 100], order[rows // 100 : rows // 100 + rows // 200]
    fresh = make_images(os.path.join(work, "images2"), 100, 5)
    uris = table.column("image_uri").to_pylist()
    for k, i in enumerate(changed):
        os.unlink(uris[i])
        shutil.copyfile(fresh[k % len(fresh)], uris[i])
    new_uris = []
    for k in range(rows // 200):
        path = os.path.join(work, "rows", f"new-{k:08d}.jpg")
        os.link(fresh[k % len(fresh)], path)
        new_uris.append(path)
    keep = np.setdiff1d(np.arange(rows), deleted)
    night = pa.concat_tables(
        [table.take(pa.array(keep)), pa.table({"listing_id": [f"N{k:08d}" for k in range(len(new_uris))], "image_uri": new_uris})]
    )
    path = os.path.join(work, "night.parquet")
    pq.write_table(night, path, row_group_size=100_000)
    return path


def one_size(rows: int, keep: bool) -> dict:
    work = tempfile.mkdtemp(prefix=f"scale-{rows}-")
    print(f"== {rows:,} rows in {work}", flush=True)
    manifest = build_catalog(work, rows)
    model = tiny_model(work)
    cli = [sys.executable, "-m", "mltag.cli"]
    env = {"RAY_ADDRESS": "local"}
    table, index = os.path.join(work, "tag_table"), os.path.join(work, "index")
    result = {}
    result["tag"] = measured(
        cli + ["tag", "--manifest", manifest, "--model", model, "--out", table, "--batch-size", "256", "--decode-batch-size", "256"], env
    )
    print(f"   tag: {result['tag']['wall_s']:.0f} s", flush=True)
    result["plain"] = measured([sys.executable, "-c", PLAIN, manifest, model, os.path.join(work, "plain")])
    print(f"   plain: {result['plain']['wall_s']:.0f} s", flush=True)
    result["index"] = measured(cli + ["index", "--tag-table", table, "--out", index], env)
    night = night_manifest(work, manifest)
    before = files_under(table)
    result["nightly"] = measured(cli + ["reindex", "--manifest", night, "--model", model, "--table", table, "--batch-size", "256"], env)
    result["nightly"]["bytes"] = sum(s for p, s in files_under(table).items() if p not in before)
    result["index-update"] = measured(cli + ["index-update", "--index", index], env)
    result["anomalies"] = measured(cli + ["anomalies", "--index", index, "--out", os.path.join(work, "anomalies.parquet")], env)
    result["duplicates"] = measured(cli + ["duplicates", "--index", index, "--out", os.path.join(work, "duplicates.parquet")], env)
    for name, r in result.items():
        r.pop("output", None)
        print(
            f"   {name}: {r['wall_s']:.1f} s, driver peak {r['driver_peak'] / GIB:.2f} GiB, total peak {r['total_peak'] / GIB:.2f} GiB",
            flush=True,
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="catalog sizes (repeatable); default 100000")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args()
    sizes = args.rows or [100_000]
    results = {n: one_size(n, args.keep) for n in sizes}
    stages = ["tag", "plain", "nightly", "index", "index-update", "anomalies", "duplicates"]
    lines = [
        "| stage | " + " | ".join(f"{n:,} rows: wall (s) / rows/s / driver peak / total peak" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for stage in stages:
        cells = []
        for n in sizes:
            r = results[n][stage]
            extra = f" / {r['bytes'] / 2**20:.0f} MiB written" if "bytes" in r else ""
            cells.append(
                f"{r['wall_s']:.0f} / {n / r['wall_s']:.0f} / {r['driver_peak'] / GIB:.2f} GiB / {r['total_peak'] / GIB:.2f} GiB{extra}"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    goals = []
    for n in sizes:
        ratio = results[n]["plain"]["wall_s"] / results[n]["tag"]["wall_s"]
        worst = max(results[n][s]["driver_peak"] for s in stages if s != "plain")
        goals.append(
            f"- {n:,} rows: `mltag tag` at {ratio:.2f}x the plain script's rows/s (goal >= 0.8 at 1M: "
            f"{'met' if ratio >= 0.8 else 'not met'} here); largest driver peak {worst / GIB:.2f} GiB (goal <= 1.5 GiB: "
            f"{'met' if worst <= 1.5 * GIB else 'not met'})"
        )
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        growth = max(results[large][s]["driver_peak"] / max(results[small][s]["driver_peak"], 1) for s in stages if s != "plain")
        goals.append(
            f"- driver peak at {large:,} rows / at {small:,} rows: at most {growth:.2f}x over the stages "
            f"(goal <= 1.3x: {'met' if growth <= 1.3 else 'not met'})"
        )
    save("scale", {"sizes": sizes, "results": {str(n): results[n] for n in sizes}}, "\n".join(lines + [""] + goals))
    print("\n".join(lines + [""] + goals))


if __name__ == "__main__":
    main()

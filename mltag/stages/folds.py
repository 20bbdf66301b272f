"""``mltag split``: a cross-validation fold for every listing, written as a ``fold`` column.

Folds are made of listings, never of images: every image of a listing lands in the fold of its
listing, so no listing is ever on both sides of a train/val cut. They are stratified for
multi-label data with iterative stratification (Sechidis, Tsoumakas and Vlahavas, ECML PKDD 2011;
the ``iterative-stratification`` package's implementation): the rarest tag is dealt
out first, one listing at a time to the fold that still wants it most, so a tag on at least K
listings reaches every fold where the greedy order allows it (``fold_report`` lists any that
does not; a tag on fewer listings than folds cannot reach them all).

What is guaranteed:
  - **Deterministic**: the same listings, tags, K and seed give the same folds, whatever the
    order of the manifest's rows (listings are put in the order of a hash of seed and id first).
  - **Listing-grouped**: one fold per listing.
  - **Stable when rows are added, for listings that already have a fold**: give the previous
    output (``--previous``) or a manifest that still has its ``fold`` column, and every listing
    found there keeps its fold; only the new listings are dealt out, by the same greedy rule
    continued from the counts the kept folds already hold. Without a previous assignment the
    folds are a function of the whole set: adding rows may move other listings (iterative
    stratification is global), so keep the ``fold`` column once CV results depend on it.

Rows of the ``test`` split get fold -1 (in no fold) unless ``--include-test``.

Example:
    mltag split --manifest catalog/manifest.parquet --folds 5 --out catalog/manifest_folds.parquet
    mltag train --manifest catalog/manifest_folds.parquet --val-fold 0 --out runs/fold0
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag.data import catalog, storage
from mltag.data.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

FOLD_COLUMN = "fold"
NO_FOLD = -1


@dataclass
class SplitConfig:
    """Assign every listing a stratified cross-validation fold (a `fold` column)."""

    manifest: str = ""  # labelled catalog manifest (Parquet/CSV, local or s3)
    vocabulary: str = ""  # vocabulary YAML (tags closed upward before stratifying); empty: vocabulary.yaml beside the manifest, if there
    out: str = ""  # output manifest (Parquet) with a fold column; empty: <manifest dir>/manifest_folds.parquet
    folds: int = 5  # K, the number of folds
    seed: int = 0  # listing order and tie-breaking
    previous: str = ""  # an earlier split output: its listings keep their folds (also the input's own fold column)
    include_test: bool = False  # put rows of the 'test' split in folds too (default: fold -1)

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH)")
        if self.folds < 2:
            raise ValueError("folds must be at least 2")


# ---- pure pieces --------------------------------------------------------------------------------
def listing_order(listing_ids: Sequence[str], seed: int) -> np.ndarray:
    """Indices of ``listing_ids`` sorted by SHA-256 of (seed, id): an order that no manifest's row
    order changes and that is not the ids' own order (ids often encode time or source)."""
    keys = [hashlib.sha256(f"{seed}:{lid}".encode()).hexdigest() for lid in listing_ids]
    return np.array(sorted(range(len(keys)), key=lambda i: (keys[i], listing_ids[i])), dtype=np.int64)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row of a (rows x tags) 0/1 matrix by iterative stratification
    (``iterstrat``'s ``IterativeStratification``, the algorithm of its ``MultilabelStratifiedKFold``;
    ties broken by ``seed``)."""
    # The package's own function, not MultilabelStratifiedKFold: the splitter would shuffle the
    # rows again with its random_state (or refuse a seed without shuffling); our order is the hash's.
    from iterstrat.ml_stratifiers import IterativeStratification

    labels = np.asarray(labels, dtype=bool)
    folds = IterativeStratification(labels=labels, r=np.full(k, 1.0 / k), random_state=np.random.RandomState(seed))
    return folds


def extend_folds(labels: np.ndarray, folds: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Deals out the rows whose fold is -1, keeping the others: iterative stratification
    continued from the tag counts the assigned rows already put in each fold.

    The same greedy rule and tie-breaking as ``iterstrat.IterativeStratification``, with the
    wanted counts (an equal share of every tag and of the rows per fold) reduced by what the kept
    rows hold: with no row assigned it gives exactly ``stratified_folds``'s answer."""
    labels = np.asarray(labels, dtype=bool)
    folds = np.asarray(folds, dtype=np.int64).copy()
    rng = np.random.RandomState(seed)
    r = np.full(k, 1.0 / k)
    kept = folds >= 0
    wanted_rows = r * len(labels) - np.bincount(folds[kept], minlength=k)
    wanted_tags = np.outer(r, labels.sum(axis=0)).astype(np.float64)
    for fold in range(k):
        wanted_tags[fold] -= labels[kept & (folds == fold)].sum(axis=0)
    pending = ~kept
    while pending.any():
        remaining = labels[pending].sum(axis=0)
        if remaining.sum() == 0:  # only rows without tags are left: spread them by size
            for row in np.flatnonzero(pending):
                best = np.flatnonzero(wanted_rows == wanted_rows.max())
                fold = best[rng.choice(len(best))] if len(best) > 1 else best[0]
                folds[row] = fold
                wanted_rows[fold] -= 1
            break
        rarest = np.flatnonzero(remaining == remaining[remaining > 0].min())
        tag = rarest[rng.choice(len(rarest))] if len(rarest) > 1 else rarest[0]
        for row in np.flatnonzero(labels[:, tag] & pending):
            want = wanted_tags[:, tag]
            best = np.flatnonzero(want == want.max())
            if len(best) > 1:
                by_size = np.flatnonzero(wanted_rows[best] == wanted_rows[best].max())
                fold = best[by_size[rng.choice(len(by_size))]] if len(by_size) > 1 else best[by_size[0]]
            else:
                fold = best[0]
            folds[row] = fold
            pending[row] = False
            wanted_tags[fold, labels[row]] -= 1
            wanted_rows[fold] -= 1
    return folds


def listing_labels(listing_ids: Sequence[str], tag_lists: Sequence[Sequence[str] | None], vocab: Vocabulary | None):
    """One row per listing (ids sorted) with the union of its images' tags (closed upward when a
    vocabulary is given): (unique ids, 0/1 matrix, tag names, index of each input row's listing)."""
    ids, inverse = np.unique(np.asarray(listing_ids, dtype=object).astype(str), return_inverse=True)
    if vocab is not None:
        names = list(vocab.names)
        per_row = [vocab.close(tags or []) for tags in tag_lists]
    else:
        names = sorted({t for tags in tag_lists for t in (tags or [])})
        per_row = [list(tags or []) for tags in tag_lists]
    column = {n: j for j, n in enumerate(names)}
    labels = np.zeros((len(ids), len(names)), dtype=bool)
    for row, tags in enumerate(per_row):
        labels[inverse[row], [column[t] for t in tags]] = True
    return ids, labels, names, inverse


def assign_folds(
    listing_ids: Sequence[str],
    tag_lists: Sequence[Sequence[str] | None],
    k: int,
    seed: int = 0,
    previous: dict[str, int] | None = None,
    vocab: Vocabulary | None = None,
) -> np.ndarray:
    """Fold of every row (image): its listing's fold. ``previous`` (listing id -> fold) is kept.

    Example:
        >>> assign_folds(["a", "a", "b", "c", "d"], [["x"], [], ["x"], ["y"], ["x", "y"]], k=2).tolist()
        [1, 1, 0, 1, 0]
    """
    ids, labels, _, inverse = listing_labels(listing_ids, tag_lists, vocab)
    order = listing_order(list(ids), seed)
    ordered_labels = labels[order]
    previous = previous or {}
    prior = np.array([previous.get(str(ids[i]), NO_FOLD) for i in order], dtype=np.int64)
    bad = prior[(prior >= k) | (prior < NO_FOLD)]
    if len(bad):
        raise ValueError(f"previous folds {sorted(set(bad.tolist()))} are outside 0..{k - 1}: was it split with other --folds?")
    if (prior >= 0).any():
        ordered_folds = extend_folds(ordered_labels, prior, k, seed)
    else:
        ordered_folds = stratified_folds(ordered_labels, k, seed)
    by_listing = np.empty(len(ids), dtype=np.int64)
    by_listing[order] = ordered_folds
    return by_listing[inverse]


def fold_report(folds: np.ndarray, tag_lists: Sequence[Sequence[str] | None], k: int, listing_ids: Sequence[str] | None = None) -> dict:
    """Images per fold, and the tags missing from a fold although at least k listings carry them
    (a tag on fewer listings than folds cannot reach them all: listings are never cut). Without
    ``listing_ids`` every row counts as its own listing."""
    folds = np.asarray(folds)
    listing_ids = listing_ids if listing_ids is not None else [str(i) for i in range(len(folds))]
    seen: dict[str, list[set]] = {}
    for lid, fold, ts in zip(listing_ids, folds, tag_lists):
        if fold >= 0:
            for t in set(ts or []):
                seen.setdefault(t, [set() for _ in range(k)])[fold].add(lid)
    missing = {}
    for t, per_fold in sorted(seen.items()):
        listings = sum(len(s) for s in per_fold)
        empty = [f for f, s in enumerate(per_fold) if not s]
        if listings >= k and empty:
            missing[t] = empty
    return {"images_per_fold": np.bincount(folds[folds >= 0], minlength=k).tolist(), "tags_missing_from_a_fold": missing}


# ---- the stage ------------------------------------------------------------------------------------
def _previous_folds(table: pa.Table, previous_uri: str) -> dict[str, int]:
    out: dict[str, int] = {}
    sources = [table] if FOLD_COLUMN in table.column_names else []
    if previous_uri:
        sources.append(catalog.read_manifest(previous_uri))
    for source in sources:
        if FOLD_COLUMN not in source.column_names:
            raise catalog.ManifestError(f"{previous_uri}: no '{FOLD_COLUMN}' column to keep")
        for lid, fold in zip(source.column("listing_id").to_pylist(), source.column(FOLD_COLUMN).cast(pa.int64()).to_pylist()):
            if fold is not None and fold >= 0:
                out[str(lid)] = int(fold)
    return out


def run(config: SplitConfig) -> dict:
    table = catalog.read_manifest(config.manifest, require_tags=True)
    vocab_uri = config.vocabulary or storage.join(storage.parent_dir(config.manifest), "vocabulary.yaml")
    vocab = Vocabulary.load(vocab_uri) if config.vocabulary or storage.exists(vocab_uri) else None
    previous = _previous_folds(table, config.previous)
    in_folds = np.ones(table.num_rows, dtype=bool)
    if not config.include_test and "split" in table.column_names:
        in_folds = ~np.asarray(pc.fill_null(pc.equal(table.column("split"), "test"), False).to_numpy(zero_copy_only=False))
    ids = table.column("listing_id").to_pylist()
    tags = table.column("tags").to_pylist()
    folds = np.full(table.num_rows, NO_FOLD, dtype=np.int64)
    rows = np.flatnonzero(in_folds)
    folds[rows] = assign_folds([ids[i] for i in rows], [tags[i] for i in rows], config.folds, config.seed, previous, vocab)
    if FOLD_COLUMN in table.column_names:
        table = table.drop_columns([FOLD_COLUMN])
    table = table.append_column(FOLD_COLUMN, pa.array(folds, pa.int32()))
    out = config.out or os.path.join(storage.parent_dir(config.manifest), "manifest_folds.parquet")
    if storage.is_remote(out):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(out, sink.getvalue().to_pybytes())
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        pq.write_table(table, out)
    report = fold_report(folds, tags, config.folds, ids)
    kept = sum(1 for lid in set(ids) if lid in previous)
    logger.info(
        f"{len(set(ids))} listings, {table.num_rows} images into {config.folds} folds "
        f"(images per fold {report['images_per_fold']}; {kept} listings kept their previous fold; "
        f"{int((folds < 0).sum())} test rows in no fold) -> {out}"
    )
    if report["tags_missing_from_a_fold"]:
        logger.warning(f"tags on >= {config.folds} listings missing from some fold: {report['tags_missing_from_a_fold']}")
    return {"out": out, **report, "listings_kept": kept}

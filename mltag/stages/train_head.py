"""``mltag train-head``: fit new tags on the embeddings already in the tag table (no image decoded).

    mltag train-head --tag-table runs/tag_table --labels sleeves.csv --out runs/heads/sleeves
    mltag apply-head --tag-table runs/tag_table --head runs/heads/sleeves

The labels are a manifest (``listing_id, image_uri, tags``, optional ``split``; CSV tags
``a|b``) naming the new tags of some catalog images. Their embeddings are picked from the tag
table by image URI, in Ray tasks over the table's files (an Arrow filter, no per-row Python), all
from one tagger version: labelled images embedded by another version stop the job (the head would
mix two feature spaces), and images missing from the table or failed there are counted, listed
and left out (above ``max_missing_rate`` the job stops: the labels probably name another catalog).

The head is ``mltag.tagger.linear_probe``'s: one L2-regularised logistic regression per tag, the
strength chosen on the ``val`` split (macro mAP), then per-tag thresholds chosen on ``val`` as
``mltag calibrate`` does. Labels without a split column hold out ``val_fraction`` of their
listings (a stable hash of the listing id). Metrics on val and test go into head.json.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.config import config_dict, config_hash
from mltag.data import catalog
from mltag.data.vocabulary import Vocabulary, VocabularyError
from mltag.maths.metrics import chance_mean_average_precision, mean_average_precision, per_tag_average_precision, precision_recall_f1
from mltag.maths.thresholds import MODES, choose_thresholds
from mltag.table import delta_table, table_files, tag_table
from mltag.table.sharded_run import drop_duplicate_keys, shard_of
from mltag.tagger.heads import HeadMismatchError, HeadSpec, default_name, save_head, validate_name
from mltag.tagger.linear_probe import DEFAULT_L2_GRID, SELECTIONS, fit_probe

EXAMPLES = 5  # missing or failed images named in the report


@dataclass
class TrainHeadConfig:
    """Fit a head for new tags on the embeddings stored in a tag table (no image is read)."""

    tag_table: str = ""  # the Delta tag table whose embeddings the head reads (local or s3://)
    labels: str = ""  # labelled manifest: listing_id, image_uri, tags ('|'-separated in CSV), optional split (train/val/test)
    out: str = ""  # head directory to write (head.safetensors + head.json)
    name: str = ""  # column prefix in the tag table (<name>_scores, <name>_tags, <name>_head); empty: from out's last folder
    vocabulary: str = ""  # optional YAML of the new tags (order, parents, synonyms); empty: the labels' tags, sorted
    as_of: str = ""  # table version or date to read the embeddings from; empty: the latest
    model_version: str = ""  # tagger version whose embeddings to use; empty: the table's (its latest mltag commit)
    l2: list[float] = field(
        default_factory=lambda: list(DEFAULT_L2_GRID)
    )  # L2 strengths tried, chosen on val (default 3,1,0.3,...,1e-4); one value: no choice
    selection: str = "global"  # global: one L2 for every tag (val macro mAP) | per_tag: each tag's best val AP
    balance: float = 0.0  # class-balanced positive weight ((N-P)/P)**balance; 0: plain BCE
    min_positives: int = 1  # tags with fewer training positives are left out (listed in head.json)
    val_fraction: float = 0.2  # labels without a split column: share of listings held out for val
    threshold_mode: str = "precision"  # per-tag thresholds as mltag calibrate: precision | recall
    threshold_target: float = 0.9  # the precision (or recall floor) each tag's threshold aims at on val
    max_missing_rate: float = 0.2  # stop when more labelled images than this are missing from the table or failed there
    max_iter: int = 500  # L-BFGS iterations per L2 value

    def validate(self) -> None:
        if not self.tag_table or not self.labels or not self.out:
            raise ValueError("tag_table, labels and out are required")
        validate_name(self.head_name())
        if not self.l2 or min(self.l2) < 0:
            raise ValueError("l2 needs at least one value, none negative")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of: {', '.join(SELECTIONS)}")
        if self.threshold_mode not in MODES:
            raise ValueError(f"unknown threshold_mode {self.threshold_mode!r}; choose one of: {', '.join(MODES)}")
        if not 0 < self.threshold_target <= 1 or not 0 <= self.val_fraction < 1 or not 0 <= self.max_missing_rate <= 1:
            raise ValueError("threshold_target must be in (0, 1], val_fraction in [0, 1), max_missing_rate in [0, 1]")
        if self.balance < 0 or self.min_positives < 1 or self.max_iter < 1:
            raise ValueError("balance must be >= 0, min_positives and max_iter >= 1")

    def head_name(self) -> str:
        return self.name or default_name(self.out)


# ---- pure pieces ----------------------------------------------------------------------------------
def label_matrix(tags: pa.Array | pa.ChunkedArray, vocab: Vocabulary) -> np.ndarray:
    """Rows x vocabulary 0/1 matrix of list<string> tags, closed upward, built from the flattened
    values (one dictionary lookup per distinct tag, not per row); unknown tags are an error."""
    tags = tags.combine_chunks() if isinstance(tags, pa.ChunkedArray) else tags
    values = pc.list_flatten(tags)
    parents = pc.list_parent_indices(tags).to_numpy()
    distinct = pc.unique(values).to_pylist()
    unknown = sorted(vocab.unknown(distinct))
    if unknown:
        raise VocabularyError(f"label tag(s) not in the head's vocabulary: {unknown}")
    canonical = pa.array([vocab.canonical(t) for t in distinct], pa.string())
    column = pc.index_in(canonical, value_set=pa.array(vocab.names, pa.string())).to_numpy()
    positions = column[pc.index_in(values, value_set=pa.array(distinct, pa.string())).to_numpy()]
    y = np.zeros((len(tags), len(vocab)), bool)
    y[parents, positions] = True
    return vocab.close_matrix(y).astype(np.float32)


def assign_splits(labels: pa.Table, val_fraction: float) -> np.ndarray:
    """Each row's split: the labels' own column, or (without one) val for ``val_fraction`` of the
    listings by a stable hash of the listing id, so every image of a listing is on one side."""
    if "split" in labels.column_names:
        return np.asarray(pc.fill_null(labels.column("split"), "train").to_pylist(), dtype=object)
    held_out = shard_of(labels.column("listing_id"), 10_000) < int(round(val_fraction * 10_000))
    return np.where(held_out, "val", "train").astype(object)


def match_embeddings(labels: pa.Table, found: pa.Table, model_version: str) -> tuple[pa.Table, dict]:
    """Joins the labelled rows to the table rows of their image URIs (``found``: image_uri,
    embedding, model_version, error), in Arrow. Returns (labelled rows with an ``embedding``, in
    labels order; a report of the images missing from the table, failed there, or embedded by
    another tagger version). The same image in several table rows (several listings) counts once."""
    found = found.filter(pc.is_valid(found.column("embedding"))).combine_chunks()
    ok_uris = found.column("image_uri")
    other = found.filter(pc.not_equal(found.column("model_version"), model_version))
    same = found.filter(pc.equal(found.column("model_version"), model_version))
    first = same.select(["image_uri"]).append_column("_row", pa.array(np.arange(same.num_rows, dtype=np.int64)))
    first = first.group_by(["image_uri"], use_threads=False).aggregate([("_row", "min")])
    same = same.take(first.column("_row_min"))
    # Arrow's join carries no list columns: join row numbers, then take the rows on each side.
    left = labels.select(["image_uri"]).append_column("_label_row", pa.array(np.arange(labels.num_rows, dtype=np.int64)))
    right = same.select(["image_uri"]).append_column("_found_row", pa.array(np.arange(same.num_rows, dtype=np.int64)))
    pairs = left.join(right, keys="image_uri", join_type="inner", use_threads=False).sort_by("_label_row")
    joined = labels.take(pairs.column("_label_row")).append_column("embedding", same.column("embedding").take(pairs.column("_found_row")))
    unmatched = labels.filter(pc.invert(pc.is_in(labels.column("image_uri"), value_set=joined.column("image_uri"))))
    in_table_ok = pc.is_in(unmatched.column("image_uri"), value_set=ok_uris)
    other_uris = pc.is_in(unmatched.column("image_uri"), value_set=other.column("image_uri"))
    failed = unmatched.filter(pc.invert(in_table_ok))
    report = {
        "labelled": labels.num_rows,
        "matched": joined.num_rows,
        "missing_or_failed": failed.num_rows,
        "missing_or_failed_examples": failed.column("image_uri").slice(0, EXAMPLES).to_pylist(),
        "other_model": int(pc.sum(other_uris).as_py() or 0),
        "other_model_versions": dict(Counter(other.column("model_version").to_pylist()).most_common(3)),
        "other_model_examples": unmatched.filter(other_uris).column("image_uri").slice(0, EXAMPLES).to_pylist(),
    }
    return joined, report


def split_metrics(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, names: list[str]) -> dict:
    """mAP (macro, micro), chance, per-tag AP and decision metrics at the thresholds, of one split."""
    if len(y) == 0:
        return {"rows": 0}
    maps = mean_average_precision(y, scores)
    decisions = precision_recall_f1(y, scores >= thresholds[None, :])
    per_tag = per_tag_average_precision(y, scores)
    return {
        "rows": int(len(y)),
        "macro_map": maps["macro"],
        "micro_map": maps["micro"],
        "tags_scored": maps["tags_scored"],
        "chance_map": chance_mean_average_precision(y) if y.any() else float("nan"),
        "micro_f1": decisions["micro_f1"],
        "macro_f1": decisions["macro_f1"],
        "per_tag_ap": {n: (None if np.isnan(a) else float(a)) for n, a in zip(names, per_tag)},
        "positives": {n: int(p) for n, p in zip(names, y.sum(axis=0))},
    }


# ---- reading the table ----------------------------------------------------------------------------
def _matching_rows(batch: pa.Table, uris: pa.Array, schema: pa.Schema) -> pa.Table:
    """Ray Data stage: the rows of one table file whose image is labelled."""
    out = [t for path in batch.column("path").to_pylist() for t in table_files.read_file(path, schema, pc.field("image_uri").isin(uris))]
    return pa.concat_tables(out) if out else schema.empty_table()


def read_labelled_rows(dt, uris: pa.Array) -> pa.Table:
    """image_uri, embedding, model_version, error of the table rows showing a labelled image:
    one Ray task per data file, each returning only its matching rows."""
    from mltag.runtime.cluster import init_ray

    init_ray()
    full = table_files.table_schema(dt)
    missing = {"image_uri", "embedding", "model_version"} - set(full.names)
    if missing:
        raise HeadMismatchError(f"{dt.table_uri} has no {sorted(missing)} column: it is not a tag table")
    schema = pa.schema([full.field(n) for n in ("image_uri", "embedding", "model_version", "error") if n in full.names])
    files = table_files.data_files(dt)
    if not files:
        return schema.empty_table()
    ds = table_files.file_dataset(files).map_batches(
        _matching_rows, fn_kwargs={"uris": uris, "schema": schema}, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True
    )
    parts = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(parts) if parts else schema.empty_table()


# ---- the stage ------------------------------------------------------------------------------------
def run(config: TrainHeadConfig) -> HeadSpec:
    started = time.time()
    name = config.head_name()
    uri = delta_table.table_uri(config.tag_table)
    dt = delta_table.open_table(uri, config.as_of or None)
    table_meta = delta_table.commit_metadata(dt)
    labels = catalog.read_manifest(config.labels, require_tags=True)
    labels = labels.set_column(
        labels.schema.get_field_index("image_uri"), "image_uri", tag_table.redact_uri_column(labels.column("image_uri"))
    )
    labels, duplicated = drop_duplicate_keys(labels)
    if duplicated.num_rows:
        print(f"labels repeat {duplicated.num_rows} (listing_id, image_uri) key(s): each kept once")
    vocab = Vocabulary.load(config.vocabulary) if config.vocabulary else _labels_vocabulary(labels)

    found = read_labelled_rows(dt, pc.unique(labels.column("image_uri")))
    model_version = config.model_version or table_meta.get("model_version") or _majority(found)
    matched, report = match_embeddings(labels, found, model_version)
    if report["other_model"]:
        raise HeadMismatchError(
            f"{report['other_model']} labelled image(s) of {uri} version {dt.version()} were embedded by another tagger "
            f"({report['other_model_versions']}) than {model_version}, e.g. {report['other_model_examples'][:3]}: a head reads "
            f"one tagger's feature space. Re-tag them (mltag reindex with model {model_version}), or give --model-version."
        )
    missing_rate = report["missing_or_failed"] / max(1, report["labelled"])
    if report["missing_or_failed"]:
        print(
            f"{report['missing_or_failed']} of {report['labelled']} labelled images are missing from the table or are error rows "
            f"there (left out), e.g. {report['missing_or_failed_examples'][:3]}"
        )
    if missing_rate > config.max_missing_rate or not matched.num_rows:
        raise HeadMismatchError(
            f"{report['missing_or_failed']} of {report['labelled']} labelled images ({missing_rate:.0%}) have no embedding in {uri} "
            f"version {dt.version()}, over max_missing_rate {config.max_missing_rate:.0%}: do the labels' image_uri name this "
            f"table's images (relative paths resolve against the labels file's folder)?"
        )

    x = tag_table.embedding_matrix(matched.column("embedding"))
    y = label_matrix(matched.column("tags"), vocab)
    splits = assign_splits(matched, config.val_fraction)
    train, val, test = (splits == "train"), (splits == "val"), (splits == "test")
    positives = y[train].sum(axis=0)
    keep = positives >= config.min_positives
    dropped = [n for n, k in zip(vocab.names, keep) if not k]
    if dropped:
        print(f"{len(dropped)} tag(s) have fewer than {config.min_positives} training positives and are left out: {dropped}")
    if not keep.any():
        raise ValueError(f"no tag has {config.min_positives} training positive(s) among the {int(train.sum())} training images")
    vocab = _subset(vocab, [n for n, k in zip(vocab.names, keep) if k])
    y = y[:, keep]
    names = list(vocab.names)
    if len(config.l2) > 1 and not (val.any() and y[val].any()):
        raise ValueError(
            "choosing the L2 strength needs labelled val rows with positives: add a split column, raise val_fraction, or give one --l2"
        )
    print(
        f"fitting {len(names)} tag(s) on {int(train.sum())} train / {int(val.sum())} val / {int(test.sum())} test images, {x.shape[1]}-d embeddings"
    )
    fit = fit_probe(x[train], y[train], x[val], y[val], config.l2, config.balance, config.selection, config.max_iter)
    linear = fit.head

    current = np.full(len(names), 0.5)
    chosen = (
        choose_thresholds(y[val], linear.scores(x[val]), names, config.threshold_mode, config.threshold_target, current)
        if val.any()
        else []
    )
    thresholds = np.array([c.threshold for c in chosen], np.float32) if chosen else current.astype(np.float32)
    metrics = {split: split_metrics(y[mask], linear.scores(x[mask]), thresholds, names) for split, mask in (("val", val), ("test", test))}
    spec = HeadSpec(
        name=name,
        vocabulary=vocab.to_dict(),
        model_version=model_version,
        embedding_dim=int(x.shape[1]),
        thresholds=[float(t) for t in thresholds],
        extra={
            "metrics": metrics,
            "l2": fit.l2,
            "l2_per_tag": [float(v) for v in linear.l2],
            "l2_grid": fit.grid,
            "val_map_by_l2": fit.val_map,
            "thresholds": [asdict(c) for c in chosen],
            "train_positives": {n: int(p) for n, p in zip(names, y[train].sum(axis=0))},
            "dropped_tags": dropped,
            "rows": {"train": int(train.sum()), "val": int(val.sum()), "test": int(test.sum())},
            "labels_report": report,
            "tag_table": uri,
            "table_version": dt.version(),
            "config": config_dict(config),
            "config_hash": config_hash(config),
            "seconds": round(time.time() - started, 2),
        },
    )
    spec = save_head(linear, spec, config.out)
    _print_summary(spec, fit, metrics, config.out)
    return spec


def _labels_vocabulary(labels: pa.Table) -> Vocabulary:
    names = sorted(t for t in pc.unique(pc.list_flatten(labels.column("tags"))).to_pylist() if t)
    if not names:
        raise ValueError("the labels name no tag")
    return Vocabulary(tuple(names))


def _subset(vocab: Vocabulary, names: list[str]) -> Vocabulary:
    """The vocabulary restricted to ``names`` (a parent left out: its children lose it)."""
    keep = set(names)
    return Vocabulary(
        tuple(names),
        {c: p for c, p in vocab.parents.items() if c in keep and p in keep},
        {a: t for a, t in vocab.synonyms.items() if t in keep},
    )


def _majority(found: pa.Table) -> str:
    versions = Counter(found.filter(pc.is_valid(found.column("embedding"))).column("model_version").to_pylist())
    if not versions:
        raise HeadMismatchError("none of the labelled images has an embedding in the table")
    return versions.most_common(1)[0][0]


def _print_summary(spec: HeadSpec, fit, metrics: dict, out: str) -> None:
    for l2, value in zip(fit.grid, fit.val_map):
        print(f"  l2 {l2:<8g} val macro mAP {value:.4f}{'  <- chosen' if l2 == fit.l2 else ''}")
    for split in ("val", "test"):
        m = metrics[split]
        if m.get("rows"):
            print(
                f"{split}: macro mAP {m['macro_map']:.4f} (chance {m['chance_map']:.4f}), micro mAP {m['micro_map']:.4f}, {m['rows']} images"
            )
    print(f"head {spec.name} version {spec.version}: {len(spec.thresholds)} tags on model {spec.model_version} -> {out}")

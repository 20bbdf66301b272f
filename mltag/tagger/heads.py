"""A tag head fitted on stored embeddings: its directory, and its columns in the tag table.

``mltag train-head`` fits new tags on the embeddings a tagger already wrote to the tag table, and
``mltag apply-head`` adds them to every row, without decoding a single image. A head is an
``nn.Linear`` over one tagger's pooled embedding, so it is tied to that tagger's version: the
same vectors through the full model with this head as its ``head`` give the same scores.

A head directory (local or s3):
  ``head.safetensors``  ``weight`` (tags x dim) and ``bias`` (tags), float32 (``head.npz`` where
                        safetensors is not installed)
  ``head.json``         name, tags (the column order of the scores), hierarchy, thresholds, the
                        tagger ``model_version`` and ``embedding_dim`` it reads, metrics, config
                        and ``version``: a content hash of the weights and every field that changes
                        what the head computes
Saved like a tagger (``mltag.tagger.model``): staged then renamed locally, head.json written last, and
``load_head`` refuses a directory whose weights do not hash to its version.

In the tag table, a head named ``sleeves`` owns three columns:

================== ============= ===============================================================
column             type          meaning
================== ============= ===============================================================
sleeves_scores     list<float32> sigmoid score per head tag, in head.json's ``tags`` order
sleeves_tags       list<string>  head tags whose score reached their threshold, closed upward
sleeves_head       string        the head version that wrote the row's values
================== ============= ===============================================================

All three are null on error rows (no embedding) and on rows another tagger version embedded.

Example:
    >>> linear, spec = load_head("runs/heads/sleeves")                  # doctest: +SKIP
    >>> columns, counts = head_columns(batch, linear, spec)              # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.data import storage
from mltag.data.vocabulary import Vocabulary
from mltag.errors import InputError
from mltag.table.tag_table import chosen_tags, embedding_matrix, tags_column
from mltag.tagger.linear_probe import LinearHead

META_FILE = "head.json"
SAFETENSORS_FILE = "head.safetensors"
NPZ_FILE = "head.npz"
# Lower-case SQL identifiers: DuckDB, Spark and pandas all take them without quoting.
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
COLUMN_SUFFIXES = ("_scores", "_tags", "_head")


class HeadMismatchError(InputError, ValueError):
    """A head and a tag table (or labels and a table) that do not belong together: another
    tagger version, another embedding size, a column name taken."""


class HeadIntegrityError(InputError, ValueError):
    """A head directory whose weights do not match the version in its head.json."""


@dataclass
class HeadSpec:
    """Everything except the weights that defines a head (``head.json``)."""

    name: str  # column prefix in the tag table
    vocabulary: dict  # Vocabulary.to_dict() of the head's tags: their order and parents
    model_version: str  # the tagger whose embeddings it reads
    embedding_dim: int
    thresholds: list[float]  # per tag, in vocabulary order
    weights_file: str = SAFETENSORS_FILE
    version: str = ""
    extra: dict = field(default_factory=dict)  # metrics, config, counts: describe the head, do not change it

    @property
    def tags(self) -> list[str]:
        return list(Vocabulary.from_dict(self.vocabulary).names)

    def columns(self) -> list[str]:
        return column_names(self.name)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
        raise ValueError(f"head name {name!r} must match {NAME_PATTERN} (it prefixes the head's tag-table columns)")
    return name


def column_names(name: str) -> list[str]:
    """The tag-table columns of a head: scores, tags, head version."""
    return [name + suffix for suffix in COLUMN_SUFFIXES]


def default_name(out_dir: str) -> str:
    """A head's name from its directory: ``runs/heads/Sleeve-Length`` -> ``sleeve_length``."""
    base = os.path.basename(storage.absolute(out_dir).rstrip("/"))
    name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_")
    return name if re.match(r"[a-z]", name or "") else f"head_{name}".rstrip("_")


# ---- the directory --------------------------------------------------------------------------------
def _weights_bytes(linear: LinearHead) -> tuple[bytes, str]:
    tensors = {"weight": np.ascontiguousarray(linear.weight, np.float32), "bias": np.ascontiguousarray(linear.bias, np.float32)}
    try:
        from safetensors.numpy import save

        return save(tensors), SAFETENSORS_FILE
    except ImportError:  # safetensors comes with timm, but is not mltag's own dependency
        buf = io.BytesIO()
        np.savez(buf, **tensors)
        return buf.getvalue(), NPZ_FILE


def _read_weights(data: bytes, weights_file: str) -> tuple[np.ndarray, np.ndarray]:
    if weights_file == SAFETENSORS_FILE:
        from safetensors.numpy import load

        tensors = load(data)
    else:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # arrays only, never objects
            tensors = {k: npz[k] for k in npz.files}
    return tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)


def save_head(linear: LinearHead, spec: HeadSpec, out_dir: str) -> HeadSpec:
    """Writes the head under ``out_dir`` (local or s3) and returns its spec with its version.
    Locally a new directory is renamed into place whole; in an existing one the weights are
    replaced first and head.json last (a reader in between sees a version mismatch, which
    ``load_head`` refuses). On S3 the weights go first, head.json last."""
    validate_name(spec.name)
    if linear.weight.shape != (len(spec.tags), spec.embedding_dim) or len(spec.thresholds) != len(spec.tags):
        raise ValueError(
            f"head weights {linear.weight.shape}, {len(spec.thresholds)} thresholds for {len(spec.tags)} tags of dim {spec.embedding_dim}"
        )
    weights, spec.weights_file = _weights_bytes(linear)
    spec.version = storage.content_version(weights, asdict(spec))
    meta = json.dumps(asdict(spec), indent=2, default=float).encode()
    storage.publish_files(out_dir, [(spec.weights_file, weights), (META_FILE, meta)])  # head.json last
    return spec


def load_spec(head_dir: str) -> HeadSpec:
    try:
        meta = json.loads(storage.read_bytes(storage.join(head_dir, META_FILE)))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no head at {head_dir} (missing {META_FILE}): fit one with `mltag train-head`") from exc
    return HeadSpec(**meta)


def load_head(head_dir: str) -> tuple[LinearHead, HeadSpec]:
    """The head's weights and spec, after checking they hash to the recorded version."""
    spec = load_spec(head_dir)
    try:
        data = storage.read_bytes(storage.join(head_dir, spec.weights_file))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"the head at {head_dir} has no {spec.weights_file}") from exc
    actual = storage.content_version(data, asdict(spec))
    if actual != spec.version:
        raise HeadIntegrityError(
            f"refusing the head at {head_dir}: {spec.weights_file} and {META_FILE} do not match (content hash {actual}, "
            f"recorded version {spec.version or '(none)'}); the directory was modified or is half-written. Fit it again."
        )
    weight, bias = _read_weights(data, spec.weights_file)
    l2 = np.asarray(spec.extra.get("l2_per_tag") or [np.nan] * len(bias), np.float64)
    return LinearHead(weight, bias, l2), spec


# ---- the columns ----------------------------------------------------------------------------------
def head_schema(name: str) -> list[pa.Field]:
    scores, tags, version = column_names(name)
    return [pa.field(scores, pa.list_(pa.float32())), pa.field(tags, pa.list_(pa.string())), pa.field(version, pa.string())]


def head_columns(batch: pa.Table, linear: LinearHead, spec: HeadSpec) -> tuple[list[pa.Array], dict[str, int]]:
    """The head's three columns for a batch of tag-table rows (``embedding``, ``model_version``),
    computed from whole arrays. Rows with an embedding from ``spec.model_version`` are scored;
    error rows and rows of another tagger version get nulls. Returns the columns (in
    ``head_schema`` order) and counts: rows, scored, error_rows, other_model."""
    n = batch.num_rows
    has_embedding = pc.is_valid(batch.column("embedding"))
    same_model = pc.fill_null(pc.equal(batch.column("model_version"), spec.model_version), False)
    score = np.asarray(pc.and_(has_embedding, same_model), dtype=bool)
    rows = np.flatnonzero(score)
    embeddings = embedding_matrix(batch.column("embedding").take(pa.array(rows, pa.int64())))
    if len(rows) and embeddings.shape[1] != spec.embedding_dim:
        raise HeadMismatchError(f"the head reads {spec.embedding_dim}-d embeddings, the table's rows hold {embeddings.shape[1]}-d ones")
    tags = spec.tags
    scores = linear.scores(embeddings) if len(rows) else np.zeros((0, len(tags)), np.float32)
    vocab = Vocabulary.from_dict(spec.vocabulary)
    if list(vocab.names) != list(tags):  # the score columns follow head.json's tags; closure follows the vocabulary's
        raise HeadMismatchError("the head's vocabulary lists its tags in another order than its scores")
    chosen = chosen_tags(scores, np.asarray(spec.thresholds, np.float32), vocab)
    # Scattered back to every row: lists of the scored rows, nulls elsewhere, without a per-row loop.
    full_chosen = np.zeros((n, len(tags)), bool)
    full_chosen[rows] = chosen
    null = pa.array(~score)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.where(score, len(tags), 0), out=offsets[1:])
    scores_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores.astype(np.float32).ravel(), pa.float32()), mask=null)
    plain_tags = tags_column(full_chosen, tags)
    tags_array = pa.ListArray.from_arrays(plain_tags.offsets, plain_tags.values, mask=null)
    version_array = pc.if_else(pa.array(score), pa.scalar(spec.version, pa.string()), pa.scalar(None, pa.string()))
    has = np.asarray(has_embedding, dtype=bool)
    counts = {"rows": n, "scored": int(score.sum()), "error_rows": int((~has).sum()), "other_model": int((has & ~score).sum())}
    return [scores_array, tags_array, version_array], counts

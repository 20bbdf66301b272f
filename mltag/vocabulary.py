"""The tag vocabulary: tag names in a fixed order, each with an optional parent and synonyms.

The YAML file is the contract users edit::

    tags:
      - name: forest
        parent: tree          # forest implies tree
        synonyms: [woods]     # manifest labels 'woods' mean 'forest'
      - tree                  # a bare string is a tag with no parent

Parents must themselves be tags. Labels are closed upward on encoding, so a ground truth of
``forest`` trains both ``forest`` and ``tree``; the same closure applies to predictions.

Example:
    >>> v = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
    >>> v.close(["forest"])
    ['forest', 'tree']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from mltag import storage


class VocabularyError(ValueError):
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
        return cls.from_dict(data)

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

    @property
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

    def close(self, tags: Iterable[str]) -> list[str]:
        """Canonical tags plus all their ancestors, in vocabulary order."""
        present = set()
        for tag in tags:
            tag = self.canonical(tag)
            present.add(tag)
            present.update(self.ancestors(tag))
        return [n for n in self.names if n in present]

    def unknown(self, tags: Iterable[str]) -> set[str]:
        names = set(self.names)
        return {t for t in tags if self.canonical(t) not in names}

    def encode(self, tag_lists: Sequence[Sequence[str] | None]) -> np.ndarray:
        """Multi-hot float32 matrix (rows x tags), closed upward; unknown tags are an error."""
        index = self.index
        out = np.zeros((len(tag_lists), len(self.names)), dtype=np.float32)
        for row, tags in enumerate(tag_lists):
            if tags is None:
                continue
            bad = self.unknown(tags)
            if bad:
                raise VocabularyError(f"row {row}: tag(s) not in the vocabulary: {sorted(bad)}")
            for tag in self.close(tags):
                out[row, index[tag]] = 1.0
        return out

    def close_matrix(self, binary: np.ndarray) -> np.ndarray:
        """Upward closure of a (rows x tags) 0/1 matrix: a child's 1 sets its ancestors' 1."""
        out = binary.astype(bool).copy()
        index = self.index
        for child in self.names:
            for parent in self.ancestors(child):
                out[:, index[parent]] |= out[:, index[child]]
        return out

"""Identifiers that end up inside paths (training run names, tag-table run ids, version labels).

A name such as ``../../models/v3`` or ``/etc`` joined into a storage path writes somewhere its
owner never meant; one strict pattern for every such identifier keeps them inside their parent.

Example:
    >>> validate_identifier("run id", "nightly-2026-11-23")
    'nightly-2026-11-23'
    >>> validate_identifier("name", "../models")
    Traceback (most recent call last):
    ...
    ValueError: name '../models' is not a valid identifier: it must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and not contain '..'
"""

from __future__ import annotations

import re

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


def is_identifier(value: object) -> bool:
    """True when ``value`` is a string safe to use as one path segment."""
    # fullmatch: "$" alone would also accept a trailing newline.
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None and ".." not in value


def validate_identifier(kind: str, value: object) -> str:
    """Returns ``value`` when it is a safe path segment; raises ValueError naming ``kind`` and
    the pattern otherwise (``kind`` says which setting it is: "name", "run id", "snapshot")."""
    if not is_identifier(value):
        raise ValueError(f"{kind} {value!r} is not a valid identifier: it must match {IDENTIFIER_PATTERN} and not contain '..'")
    return value  # type: ignore[return-value]

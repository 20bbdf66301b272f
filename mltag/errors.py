"""The one error type a person fixes in what they gave mltag (a manifest, a vocabulary, a model,
head or chain file, a URI, a re-run's inputs). Each module keeps its own error class for the
library's callers; deriving from ``InputError`` too lets the ``mltag`` command print the message
alone and exit 2, as it does for a bad flag, instead of a traceback that buries it."""

from __future__ import annotations


class InputError(Exception):
    """Raised before any work starts; the message names the file or field and what to change."""

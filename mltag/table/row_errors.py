"""Why a row has no tags: the reason code of an ``error`` text, and whether trying again can help.

Every image failure becomes a row whose ``error`` text starts with a fixed prefix (see
``mltag.data.images``). The prefix names the reason; the reason says whether the failure is
*transient* (the storage or the network may answer next time: the nightly re-index tries the row
again even when its bytes did not change) or *permanent* (the bytes are the problem: tried again
only when they change).

Example:
    >>> error_reason("timeout: no answer from s3://b/x.jpg within 30 s")
    'timeout'
    >>> is_transient("timeout")
    True
    >>> is_transient(error_reason("not an image: no decoder recognises these bytes"))
    False
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# prefix of the error text -> reason code. Order matters only for prefixes that share a start.
_PREFIXES = (
    ("missing:", "missing"),
    ("permission denied:", "permission_denied"),
    ("not a file:", "not_a_file"),
    ("fetch failed", "fetch_failed"),
    ("timeout:", "timeout"),
    ("throttled:", "throttled"),
    ("refused uri:", "refused_uri"),
    ("too large:", "too_large"),
    ("empty file:", "empty_file"),
    ("too many pixels:", "too_many_pixels"),
    ("not an image:", "not_an_image"),
    ("unsupported format:", "unsupported_format"),
    ("corrupt image:", "corrupt_image"),
)
# Storage or network conditions that change without the image changing. A missing object counts:
# listings are often written before their photos finish uploading.
TRANSIENT = frozenset({"missing", "permission_denied", "fetch_failed", "timeout", "throttled", "unexpected"})
REASONS = tuple(code for _, code in _PREFIXES) + ("unexpected",)


def error_reason(error: str | None) -> str | None:
    """The reason code of an error text (None for a row without error)."""
    if error is None:
        return None
    for prefix, code in _PREFIXES:
        if error.startswith(prefix):
            return code
    return "unexpected"


def is_transient(reason: str | None) -> bool:
    return reason in TRANSIENT


def reason_column(errors: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``error_reason`` for a whole ``error`` column (one pass over the distinct texts' prefixes)."""
    values = errors.to_pylist()
    return pa.array([error_reason(e) for e in values], pa.string())


def transient_mask(reasons: pa.Array | pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.fill_null(pc.is_in(reasons, pa.array(sorted(TRANSIENT), pa.string())), False).to_numpy(zero_copy_only=False)

"""A fingerprint per image: a string that changes when the image's content does, without reading it.

``stat`` (the default) is the object's size, modification time and ETag from its filesystem: one
``stat`` locally, one HEAD on S3. ``hash`` is a SHA-256 of the bytes: exact, but a full read.
``mltag tag`` records it with every row and ``mltag reindex`` compares it night to night, so a
table written either way is ready for the nightly re-index.

Example:
    >>> fingerprint_of("/no/such/file.jpg", "stat")
    ''
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from mltag.data import storage
from mltag.data.uri_policy import DEFAULT_POLICY, FetchPolicy, check_uri

FINGERPRINTS = ("stat", "hash")


def fingerprint_of(uri: str, mode: str, policy: FetchPolicy = DEFAULT_POLICY) -> str:
    """A string that changes when the image's content does ('' if it cannot be read, or the
    fetch policy refuses the URI: the row is then tagged, and the table records why)."""
    try:
        check_uri(uri, policy)
        fs, path = storage.filesystem_for(uri)
        if mode == "hash":
            with fs.open(path, "rb") as f:
                return "sha256:" + hashlib.sha256(f.read()).hexdigest()
        info = fs.info(path)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
        return f"stat:{info.get('size')}:{mtime}:{etag}"
    except (OSError, ValueError, ImportError):
        return ""  # unreadable now: tag it, and the tag table records why


def fingerprint_batch(batch: pa.Table, mode: str, policy: FetchPolicy = DEFAULT_POLICY) -> pa.Table:
    prints = [fingerprint_of(u, mode, policy) for u in batch.column("image_uri").to_pylist()]
    if "fingerprint" in batch.column_names:
        batch = batch.drop_columns(["fingerprint"])
    return batch.append_column("fingerprint", pa.array(prints, pa.string()))

"""Where bytes live: local paths and ``s3://`` URIs behind one fsspec interface.

S3 goes through s3fs, which reads the usual AWS settings (credentials chain, ``AWS_ENDPOINT_URL``
for S3-compatible servers such as MinIO or moto). Pyarrow and Ray get the same filesystem wrapped
in ``pyarrow.fs.PyFileSystem`` so every component agrees on what a URI means.

Example:
    >>> fs, path = filesystem_for("/tmp/catalog/manifest.csv")
    >>> path
    '/tmp/catalog/manifest.csv'
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile

import fsspec
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


@functools.lru_cache(maxsize=8)
def _filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    if protocol in ("s3", "s3a"):
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # Fresh listings matter more than cached ones: a nightly run must see today's objects.
        return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)
    return fsspec.filesystem(protocol)


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns (fsspec filesystem, path inside it) for a local path or URI."""
    protocol = _protocol(uri)
    fs = _filesystem(protocol)
    if protocol == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return fs, os.path.abspath(os.path.expanduser(path))
    return fs, fs._strip_protocol(uri)


def arrow_filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The same filesystem as pyarrow sees it (for pyarrow.dataset and Ray Data writers)."""
    fs, path = filesystem_for(uri)
    if _protocol(uri) == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """Joins URI or path segments with '/' (posix semantics also for s3)."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def resolve_relative(uri: str, base_dir: str) -> str:
    """Resolves ``uri`` against ``base_dir`` unless it is already absolute or a URI."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    if is_remote(base_dir):
        return posixpath.normpath(posixpath.join(base_dir, uri)).replace(":/", "://", 1)
    return os.path.normpath(os.path.join(base_dir, uri))


def parent_dir(uri: str) -> str:
    if is_remote(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    fs.makedirs(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.exists(path)


def remove_tree(uri: str) -> None:
    fs, path = filesystem_for(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Writes so that a reader sees the old content or the new, never half of it: a temporary file
    renamed into place locally; on S3 a single PUT, which is atomic by itself."""
    if is_remote(uri):
        write_bytes(uri, data)
        return
    fs, path = filesystem_for(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    _write_synced(tmp, data)
    os.replace(tmp, path)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish_files(out_dir: str, files: list[tuple[str, bytes]]) -> None:
    """Writes a small versioned directory (a model, a head) so that a reader never takes a half
    for a whole. ``files`` are written in order; the last one names the others' version (its
    metadata), so a reader in between sees a version mismatch and refuses, never a silent mix.

    Locally the files go to a staging directory beside ``out_dir`` first: a new directory is
    renamed into place whole; an existing one (which may hold other files, such as calibration
    reports) has the files replaced one by one, in order. On S3 each file is one PUT, in order."""
    if is_remote(out_dir):
        for name, data in files:
            write_bytes(join(out_dir, name), data)
        return
    out = filesystem_for(out_dir)[1]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.staging-", dir=os.path.dirname(out))
    try:
        for name, data in files:
            _write_synced(os.path.join(staging, name), data)
        if not os.path.isdir(out) or not os.listdir(out):
            try:
                os.rename(staging, out)  # atomic; replaces an empty directory
                return
            except OSError:  # created meanwhile by someone else: replace file by file below
                pass
        os.makedirs(out, exist_ok=True)
        for name, _ in files:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def content_version(payload: bytes, meta: dict) -> str:
    """A 12-hex-digit version that changes whenever the payload or the metadata does. ``version``
    and ``extra`` (metrics: they describe the artefact, they do not change it) are left out."""
    meta = {k: v for k, v in meta.items() if k not in ("version", "extra")}
    h = hashlib.sha256(payload)
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:12]


def absolute(uri: str) -> str:
    """A local path made absolute; URIs as they are (recorded with outputs: where things came from)."""
    return uri if is_remote(uri) else os.path.abspath(uri)

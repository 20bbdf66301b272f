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
import os
import posixpath

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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def absolute(uri: str) -> str:
    """A local path made absolute; URIs as they are (recorded with outputs: where things came from)."""
    return uri if is_remote(uri) else os.path.abspath(uri)

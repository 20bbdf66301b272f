"""Which image URIs mltag may fetch, and how a URI is shown in errors and logs.

A manifest is data, often from somewhere else: its ``image_uri`` must not be able to make a
worker read ``/etc/passwd``, call the cloud metadata endpoint (``http://169.254.169.254/``) or
decode a PostScript file, and a presigned URL's signature must not be copied into tables and
logs. ``FetchPolicy`` says what is allowed; the safe default reads local files and ``s3://``
only, ten well-known image formats, with 30 s per fetch.

Example:
    >>> check_uri("http://169.254.169.254/latest/meta-data/", FetchPolicy())
    Traceback (most recent call last):
    ...
    mltag.data.uri_policy.RefusedURI: refused uri: scheme 'http' is not in allowed_schemes [file, s3]
    >>> redact_uri("https://user:pw@bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=abc")
    'https://bucket.s3.amazonaws.com/a.jpg'
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from mltag.errors import InputError

# HEIF (HEIC) needs the `heif` extra (pillow-heif); AVIF is built into Pillow >= 11.3 wheels.
# A format named here that no installed plugin provides is simply not attempted.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "HEIF", "AVIF")
DEFAULT_SCHEMES = ("file", "s3")
SCHEME_ALIASES = {"s3a": "s3"}  # what mltag.data.storage treats as the same filesystem
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)([^?#]*)")
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
_PATH_QUERY_IN_TEXT = re.compile(r"(/[^\s?'\"<>]*)\?[^\s'\"<>]+")  # "/a.jpg?sig=..." echoed by a server
_SECRET_PARAM = re.compile(
    r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token|"
    r"awsaccesskeyid|x-goog-signature|x-goog-credential)=[^&\s'\"<>]+"
)


class RefusedURI(InputError, ValueError):
    """A URI the fetch policy does not allow; the message starts with ``refused uri:``."""


@dataclass(frozen=True)
class FetchPolicy:
    """What ``mltag.data.images`` may fetch and decode (picklable: it travels in Ray ``fn_kwargs``)."""

    allowed_schemes: tuple[str, ...] = DEFAULT_SCHEMES  # "file" is a local path; add "http"/"https" to fetch over the web
    allow_private_networks: bool = False  # http(s) only: also loopback, link-local (metadata), private and reserved addresses
    allowed_roots: tuple[str, ...] = ()  # local dirs and/or URI prefixes (s3://bucket/prefix/); per kind, none listed = any
    fetch_timeout_s: float = 30.0  # per attempt to read one image; past it the row is an error starting "timeout:"
    formats: tuple[str, ...] = DEFAULT_FORMATS  # Pillow format names that may be decoded

    def __post_init__(self) -> None:
        # Lists (from YAML or CLI configs) become tuples: a frozen policy must stay hashable.
        schemes = tuple(str(s).lower() for s in self.allowed_schemes)
        bad = [s for s in schemes if not _SCHEME.match(s)]
        if bad:
            raise ValueError(f"allowed_schemes: not a URI scheme: {bad}")
        object.__setattr__(self, "allowed_schemes", schemes)
        object.__setattr__(self, "allowed_roots", tuple(str(r) for r in self.allowed_roots if str(r)))
        object.__setattr__(self, "formats", tuple(str(f).upper() for f in self.formats))
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s!r}")

    @classmethod
    def from_settings(cls, schemes: str, allow_private_networks: bool, roots: str, fetch_timeout_s: float) -> FetchPolicy:
        """The policy from a config's flat settings, lists written comma-separated as on the
        command line (``--allowed-schemes file,s3``): the tag and serve configs share it."""

        def split(text: str) -> tuple[str, ...]:
            return tuple(p.strip() for p in str(text).split(",") if p.strip())

        return cls(split(schemes), allow_private_networks, split(roots), fetch_timeout_s)


DEFAULT_POLICY = FetchPolicy()


# ---- showing URIs -------------------------------------------------------------------------------
def redact_uri(uri: str) -> str:
    """The URI without what may be a secret: the query string and fragment (presigned URLs carry
    X-Amz-Signature, SAS tokens and the like there) and any ``user:password@``. Local paths are
    returned as they are.

    Example:
        >>> redact_uri("s3://bucket/a.jpg?versionId=3")
        's3://bucket/a.jpg'
        >>> redact_uri("/data/images/a.jpg")
        '/data/images/a.jpg'
    """
    if not isinstance(uri, str):
        return uri
    match = _URI.match(uri)
    if match is None:
        return uri
    scheme, netloc, path = match.groups()
    return scheme + netloc.rpartition("@")[2] + path


def redact_text(text: str) -> str:
    """Redacts every URI inside a free text (an exception message), the query string of any
    bare path (``/a.jpg?...``), and any signature-like ``key=value`` left outside them."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    text = _PATH_QUERY_IN_TEXT.sub(lambda m: m.group(1), text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=[redacted]", text)


# ---- the rules ----------------------------------------------------------------------------------
def scheme_of(uri: str) -> str:
    """'file' for local paths and file:// URIs, otherwise the lower-cased scheme."""
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    return SCHEME_ALIASES.get(scheme, scheme)


def local_path(uri: str) -> str:
    """The absolute, symlink-resolved path a local URI names (as mltag.data.storage resolves it)."""
    path = uri[len("file://") :] if uri.lower().startswith("file://") else uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


@functools.lru_cache(maxsize=64)
def _local_root(root: str) -> str:
    return local_path(root)


def _under(path: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep)
    return path == root or path.startswith(root + sep)


def check_uri(uri: str, policy: FetchPolicy = DEFAULT_POLICY) -> None:
    """Raises RefusedURI when ``policy`` does not allow fetching ``uri`` (scheme, then roots).
    Addresses of http(s) hosts are checked when they are resolved (``public_addresses``)."""
    shown = redact_uri(uri)
    scheme = scheme_of(uri)
    allowed = {SCHEME_ALIASES.get(s, s) for s in policy.allowed_schemes}
    if scheme not in allowed:
        raise RefusedURI(f"refused uri: scheme {scheme!r} is not in allowed_schemes [{', '.join(policy.allowed_schemes)}]")
    if scheme == "file":
        roots = [r for r in policy.allowed_roots if "://" not in r or r.lower().startswith("file://")]
        if roots and not any(_under(local_path(uri), _local_root(r), os.sep) for r in roots):
            raise RefusedURI(f"refused uri: {shown} is outside allowed_roots [{', '.join(roots)}]")
        return
    roots = [r for r in policy.allowed_roots if scheme_of(r) == scheme and "://" in r]
    if roots:
        match = _URI.match(uri)
        body = scheme + "://" + match.group(2).rpartition("@")[2] + match.group(3) if match else ""
        segments = body.split("://", 1)[-1].split("/")
        if ".." in segments or "." in segments or not any(_under(body, scheme + "://" + r.split("://", 1)[1], "/") for r in roots):
            raise RefusedURI(f"refused uri: {shown} is outside allowed_roots [{', '.join(roots)}]")


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is the metadata endpoint too
    return ip.is_global and not ip.is_multicast


def public_addresses(host: str, port: int, policy: FetchPolicy = DEFAULT_POLICY) -> list[str]:
    """Resolves ``host`` and returns its addresses, or raises RefusedURI when any of them is
    loopback, link-local (169.254.0.0/16: the cloud metadata endpoint), private, shared or
    reserved, unless ``policy.allow_private_networks``. Every address is checked: a name that
    resolves to one public and one private address is refused. The caller connects to a
    returned address, so a second lookup (DNS rebinding) cannot swap in another one."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not policy.allow_private_networks:
        private = [a for a in addresses if not _is_public(a)]
        if private:
            raise RefusedURI(
                f"refused uri: host {host!r} resolves to non-public address {private[0]} "
                "(loopback, link-local, private or reserved; allow_private_networks is off)"
            )
    return addresses

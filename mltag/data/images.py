"""Fetch image bytes (local, s3, http(s) when allowed) and decode them safely into fixed-size
uint8 RGB arrays.

Every failure is a value, not an exception: ``load_image`` returns ``(pixels, None)`` or
``(None, "why")`` so one bad file can never crash a job or drop a listing. The arrays travel
between Ray stages as one Arrow ``fixed_size_binary`` column (``pixels``): zero-copy to numpy on
the other side, and no Ray tensor extension types leak into the outputs.

What may be fetched and decoded is a ``FetchPolicy`` (``mltag.data.uri_policy``): by default local
files and ``s3://``, ten common image formats, 30 s per fetch. Error texts never carry a query
string or ``user:password@`` (``redact_uri``). Each error starts with a fixed prefix the tag
pipeline classifies by:

  permanent  ``missing:``, ``permission denied:``, ``not a file:``, ``too large:``, ``empty file:``,
             ``too many pixels:``, ``not an image:``, ``corrupt image:``, ``refused uri:``,
             ``unsupported format:``
  transient  ``fetch failed after``, ``timeout:``

Example:
    >>> pixels, error = decode_image(open("photo.jpg", "rb").read(), size=224)  # doctest: +SKIP
    >>> pixels.shape                                                            # doctest: +SKIP
    (224, 224, 3)
    >>> load_image("http://169.254.169.254/latest/meta-data/", 224)
    (None, "refused uri: scheme 'http' is not in allowed_schemes [file, s3]")
"""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from mltag.data import storage
from mltag.data.uri_policy import (
    DEFAULT_POLICY,
    FetchPolicy,
    RefusedURI,
    check_uri,
    local_path,
    public_addresses,
    redact_text,
    redact_uri,
    scheme_of,
)

try:  # the `heif` extra: HEIC/HEIF photos (iPhones)
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_PLUGIN = True
except ImportError:
    HEIF_PLUGIN = False

# Larger images are refused before their pixels are decoded (a decompression bomb is a few KB of
# file that expands to gigabytes). 64 Mpx covers any real listing photo.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
FETCH_RETRIES = 3
MAX_REDIRECTS = 5
HTTP_CHUNK = 1 << 16
FETCH_THREADS = 16  # objects fetched at once per decode task (S3 latency, not bandwidth, is the limit)
# Truncated files must be errors, not silently grey-filled images.
ImageFile.LOAD_TRUNCATED_IMAGES = False

T = TypeVar("T")


class ImageLoadError(Exception):
    """One image could not be fetched or decoded (becomes that row's ``error`` value)."""


class _DeadlinePassed(Exception):
    pass


# ---- fetching ------------------------------------------------------------------------------------
def _call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Runs ``fn`` in a daemon thread and gives up waiting after ``timeout_s``: a storage call
    that never returns (a server that accepts and stays silent, a hung network mount) costs one
    parked thread, not the task. Socket timeouts and a deadline in the read loop end the thread."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="mltag-fetch", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _DeadlinePassed()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _connect_pinned(addresses: list[str], port: int, _address, timeout=None, source_address=None) -> socket.socket:
    """http.client's connect, to the addresses the policy checked (not a fresh DNS answer)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


def _http_read(uri: str, policy: FetchPolicy, max_bytes: int, deadline: float) -> bytes:
    """GET over http(s) with the policy applied to every redirect hop and every resolved address.
    Raises FileNotFoundError / PermissionError / OSError (transient) / ImageLoadError like the
    fsspec path does."""
    import http.client
    from urllib.parse import urljoin, urlsplit

    for _ in range(MAX_REDIRECTS + 1):
        check_uri(uri, policy)
        shown = redact_uri(uri)
        try:
            parts = urlsplit(uri)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise RefusedURI(f"refused uri: {shown} is not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not host:
            raise RefusedURI(f"refused uri: {shown} is not an http(s) URL with a host")
        port = port or (443 if scheme == "https" else 80)
        addresses = public_addresses(host, port, policy)
        connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connection = connection_class(host, port, timeout=max(0.01, deadline - time.monotonic()))
        connection._create_connection = functools.partial(_connect_pinned, addresses, port)
        try:
            connection.request(
                "GET",
                (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                headers={"User-Agent": "mltag", "Accept": "image/*"},
            )
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise OSError(f"HTTP {response.status} redirect without a Location")
                uri = urljoin(uri, location)
                continue
            if response.status in (404, 410):
                raise FileNotFoundError(f"HTTP {response.status}")
            if response.status in (401, 403):
                raise PermissionError(f"HTTP {response.status}")
            if response.status in (408, 429) or response.status >= 500:
                raise OSError(f"HTTP {response.status} {response.reason}")
            if response.status != 200:
                raise ImageLoadError(f"fetch failed after 1 attempt: {shown}: HTTP {response.status} {response.reason}")
            length = response.getheader("Content-Length") or ""
            if length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(f"too large: {shown} is over {max_bytes} bytes")
            chunks, total = [], 0
            while total <= max_bytes:
                if time.monotonic() > deadline:
                    raise TimeoutError("deadline passed while reading")
                chunk = response.read(min(HTTP_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)
        finally:
            connection.close()
    raise ImageLoadError(f"fetch failed after 1 attempt: {redact_uri(uri)}: more than {MAX_REDIRECTS} redirects")


def _read_once(uri: str, policy: FetchPolicy, max_bytes: int) -> bytes:
    deadline = time.monotonic() + policy.fetch_timeout_s
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        return _http_read(uri, policy, max_bytes, deadline)
    if scheme == "file" and policy.allowed_roots:
        uri = local_path(uri)  # read the very file the root check resolved (no symlink detour)
    fs, path = storage.filesystem_for(uri)
    # One ranged GET: no HEAD for the size first (fs.open's way), one byte past the limit to tell "too large".
    return fs.cat_file(path, start=0, end=max_bytes + 1)


def fetch_bytes(uri: str, max_bytes: int = DEFAULT_MAX_BYTES, retries: int = FETCH_RETRIES, *, policy: FetchPolicy | None = None) -> bytes:
    """Reads an object's bytes under ``policy`` (default: ``DEFAULT_POLICY``); retries transient
    storage errors, not missing, forbidden, refused or timed-out ones. Raises ImageLoadError."""
    policy = policy or DEFAULT_POLICY
    shown = redact_uri(uri)
    try:
        check_uri(uri, policy)
    except RefusedURI as exc:
        raise ImageLoadError(str(exc)) from None
    for attempt in range(retries):
        try:
            data = _call_with_deadline(lambda: _read_once(uri, policy, max_bytes), policy.fetch_timeout_s)
            break
        except (_DeadlinePassed, TimeoutError):
            # Not retried: a hung object would hold the task for retries x the timeout.
            raise ImageLoadError(f"timeout: no answer from {shown} within {policy.fetch_timeout_s:g} s") from None
        except RefusedURI as exc:  # an http redirect or a resolved address the policy refuses
            raise ImageLoadError(str(exc)) from None
        except FileNotFoundError as exc:
            raise ImageLoadError(f"missing: {shown} does not exist") from exc
        except PermissionError as exc:
            raise ImageLoadError(f"permission denied: {shown}") from exc
        except IsADirectoryError as exc:
            raise ImageLoadError(f"not a file: {shown} is a directory") from exc
        except OSError as exc:
            if attempt == retries - 1:
                raise ImageLoadError(f"fetch failed after {retries} attempts: {shown}: {redact_text(str(exc))}") from exc
            time.sleep(0.2 * 2**attempt)
    if len(data) > max_bytes:
        raise ImageLoadError(f"too large: {shown} is over {max_bytes} bytes")
    if not data:
        raise ImageLoadError(f"empty file: {shown} has zero bytes")
    return data


# ---- formats -------------------------------------------------------------------------------------
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"mif2"}
_POLICY_NAME = {"HEIC": "HEIF", "HEIF": "HEIF", "AVIF": "AVIF"}  # what a FetchPolicy calls them


@functools.lru_cache(maxsize=16)
def installed_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The formats of ``formats`` that an installed Pillow plugin can open."""
    Image.init()
    return tuple(f for f in formats if f in Image.OPEN)


def _ftyp_format(data: bytes) -> str | None:
    """HEIC / AVIF / HEIF from an ISO-BMFF ``ftyp`` box (major brand, then compatible brands);
    None for other files, MP4 and QuickTime included."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, min(len(data), max(size, 16), 1024) - 3, 4)]
    for candidates in ([brands[0]], brands):  # the major brand decides when it is specific
        if any(b in _HEIC_BRANDS for b in candidates):
            return "HEIC"
        if any(b in _AVIF_BRANDS for b in candidates):
            return "AVIF"
    return "HEIF" if any(b in _HEIF_BRANDS for b in brands) else None


def sniff_format(data: bytes) -> str | None:
    """The format these bytes claim to be, from magic numbers only (no parser runs): HEIC, AVIF
    and HEIF from the ftyp box, anything else from Pillow's own signature checks."""
    found = _ftyp_format(data)
    if found:
        return found
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        with contextlib.suppress(Exception):
            if accept is not None and accept(prefix) is True:
                return name
    return None


def _unidentified(data: bytes, policy: FetchPolicy) -> ImageLoadError:
    """Why Pillow, restricted to the policy's formats, could not open ``data``."""
    claimed = sniff_format(data)
    if claimed is None:
        return ImageLoadError("not an image: no decoder recognises these bytes")
    key = _POLICY_NAME.get(claimed, claimed)
    if key not in policy.formats:
        return ImageLoadError(f"unsupported format: {claimed} (allowed: {', '.join(policy.formats)})")
    if key not in installed_formats(policy.formats):
        hint = "install mltag[heif]" if key == "HEIF" else f"this Pillow build cannot read {key}"
        return ImageLoadError(f"unsupported format: {claimed} ({hint})")
    return ImageLoadError(f"corrupt image: looks like {claimed} but its header cannot be read")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB: alpha is composited on white, 16-bit is scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


@contextlib.contextmanager
def _image_load_errors(data: bytes, policy: FetchPolicy):
    """Turns each way Pillow fails into an ImageLoadError whose message names the reason (it
    becomes the row's ``error``); the decompression-bomb warning counts as a failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"too many pixels: {exc}") from exc
    except Image.UnidentifiedImageError as exc:  # an OSError: caught before the next line
        raise _unidentified(data, policy) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageLoadError(f"corrupt image: {exc}") from exc


def _open_within_limit(data: bytes, max_pixels: int, policy: FetchPolicy) -> Image.Image:
    """Opens (reads the header only) with the policy's formats only, and refuses images over
    ``max_pixels`` before any decoding."""
    image = Image.open(io.BytesIO(data), formats=installed_formats(policy.formats))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(f"too many pixels: {width}x{height} is over the limit of {max_pixels}")
    return image


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, *, policy: FetchPolicy | None = None) -> np.ndarray:
    """Decodes bytes to a (size, size, 3) uint8 RGB array (the whole image, squashed: no tag is
    cropped away), in one of ``policy.formats``. Raises ImageLoadError with the reason."""
    policy = policy or DEFAULT_POLICY
    with _image_load_errors(data, policy):
        image = _open_within_limit(data, max_pixels, policy)
        if getattr(image, "is_animated", False):
            image.seek(0)  # the first frame stands for an animated image
        if image.format == "JPEG":
            # Decode at the smallest DCT scale still >= 2x the target: ~3x faster for photos.
            image.draft("RGB", (size * 2, size * 2))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image, dtype=np.uint8)


def _error_text(exc: Exception) -> str:
    """A row's ``error``: the ImageLoadError's message, or an unforeseen exception named (it is
    still this row's problem, not the job's); redacted either way."""
    text = str(exc) if isinstance(exc, ImageLoadError) else f"unexpected {type(exc).__name__}: {exc}"
    return redact_text(text)


def load_image(
    uri: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, *, policy: FetchPolicy | None = None
) -> tuple[np.ndarray | None, str | None]:
    """Fetch + decode under ``policy``; returns (pixels, None) or (None, error message)."""
    try:
        return decode_image(fetch_bytes(uri, policy=policy), size, max_pixels, policy=policy), None
    except Exception as exc:
        return None, _error_text(exc)


# ---- the Arrow column that carries pixels between Ray stages ------------------------------------
def pixels_to_arrow(pixels: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, S, S, 3) uint8 -> fixed_size_binary(S*S*3) array, one value per image."""
    n = pixels.shape[0]
    width = int(np.prod(pixels.shape[1:]))
    buffer = pa.py_buffer(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buffer])


def pixels_from_arrow(column: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """The inverse of ``pixels_to_arrow``: (N, size, size, 3) uint8 without per-row copies."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = size * size * 3
    if array.type != pa.binary(width):
        raise ValueError(f"pixels column is {array.type}, expected fixed_size_binary[{width}] for size {size}")
    raw = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return raw.reshape(len(array), size, size, 3)


def _fetch_rows(
    uris: list[str], previous: list[str | None], policy: FetchPolicy | None, threads: int
) -> tuple[list[bytes | None], list[str | None]]:
    """Every row's bytes, fetched ``threads`` at a time: a decode task waits for the slowest of a
    few objects, not for the sum of every object's latency. Rows with an ``error`` already set keep
    it and are not fetched; a failed fetch is that row's error."""

    def one(uri: str) -> tuple[bytes | None, str | None]:
        try:
            return fetch_bytes(uri, policy=policy), None
        except Exception as exc:  # never the job's problem: an error row
            return None, _error_text(exc)

    todo = [i for i, prior in enumerate(previous) if prior is None]
    blobs: list[bytes | None] = [None] * len(uris)
    errors: list[str | None] = list(previous)
    if not any(storage.is_remote(uris[i]) for i in todo):
        threads = 1  # local files: a read is a page-cache copy, threads would only add their overhead
    if len(todo) <= 1 or threads <= 1:
        results = [one(uris[i]) for i in todo]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(todo)), thread_name_prefix="mltag-fetch") as pool:
            results = list(pool.map(one, [uris[i] for i in todo]))
    for i, (data, error) in zip(todo, results):
        blobs[i], errors[i] = data, error
    return blobs, errors


def decode_batch(
    batch: pa.Table,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    policy: FetchPolicy | None = None,
    fetch_threads: int = FETCH_THREADS,
) -> pa.Table:
    """Ray Data stage: adds ``pixels`` and ``error`` columns; keeps every row and every column.

    Rows that fail get zero pixels and an error message (an ``error`` already set upstream wins).
    ``policy`` (default ``DEFAULT_POLICY``) says which URIs and formats are allowed. Objects are
    fetched concurrently, then decoded one after another (the task's CPU share is for decoding).
    """
    uris = batch.column("image_uri").to_pylist()
    previous = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(uris)
    blobs, errors = _fetch_rows(uris, previous, policy, fetch_threads)
    pixels = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(blobs):
        if data is None:
            continue
        try:
            pixels[i] = decode_image(data, size, max_pixels, policy=policy)
        except Exception as exc:
            errors[i] = _error_text(exc)
        blobs[i] = None  # free the encoded bytes as soon as they are decoded
    if "error" in batch.column_names:
        batch = batch.drop_columns(["error"])
    return batch.append_column("pixels", pixels_to_arrow(pixels)).append_column("error", pa.array(errors, pa.string()))


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, policy: FetchPolicy | None = None) -> str:
    """Reads only the header: returns the format (JPEG, PNG, ...) or raises ImageLoadError for
    bytes no allowed decoder knows and for images over the pixel limit (before any pixel is
    decoded)."""
    policy = policy or DEFAULT_POLICY
    with _image_load_errors(data, policy):
        return _open_within_limit(data, max_pixels, policy).format or "unknown"


def fetch_batch(
    batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS, *, policy: FetchPolicy | None = None, fetch_threads: int = FETCH_THREADS
) -> pa.Table:
    """Ray Data stage for device-side decoding: adds raw ``image_bytes`` and ``error``.

    Only the header is read here (policy, format and size checks); pixels are decoded by the
    actor (``decode_on_device``, given the same policy). Objects are fetched concurrently."""
    uris = batch.column("image_uri").to_pylist()
    previous = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(uris)
    blobs, errors = _fetch_rows(uris, previous, policy, fetch_threads)
    for i, data in enumerate(blobs):
        if data is None:
            continue
        try:
            probe_image(data, max_pixels, policy=policy)
        except Exception as exc:
            blobs[i], errors[i] = None, _error_text(exc)
    if "error" in batch.column_names:
        batch = batch.drop_columns(["error"])
    return batch.append_column("image_bytes", pa.array(blobs, pa.binary())).append_column("error", pa.array(errors, pa.string()))

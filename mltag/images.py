"""Fetch image bytes (local or s3) and decode them safely into fixed-size uint8 RGB arrays.

Every failure is a value, not an exception: ``load_image`` returns ``(pixels, None)`` or
``(None, "why")`` so one bad file can never crash a job or drop a listing. The arrays travel
between Ray stages as one Arrow ``fixed_size_binary`` column (``pixels``): zero-copy to numpy on
the other side, and no Ray tensor extension types leak into the outputs.

Example:
    >>> pixels, error = decode_image(open("photo.jpg", "rb").read(), size=224)  # doctest: +SKIP
    >>> pixels.shape                                                            # doctest: +SKIP
    (224, 224, 3)
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from mltag import storage

# Larger images are refused before their pixels are decoded (a decompression bomb is a few KB of
# file that expands to gigabytes). 64 Mpx covers any real listing photo.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
FETCH_RETRIES = 3
# Truncated files must be errors, not silently grey-filled images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(Exception):
    """One image could not be fetched or decoded (becomes that row's ``error`` value)."""


def fetch_bytes(uri: str, max_bytes: int = DEFAULT_MAX_BYTES, retries: int = FETCH_RETRIES) -> bytes:
    """Reads an object's bytes; retries transient storage errors, not missing or forbidden ones."""
    for attempt in range(retries):
        try:
            fs, path = storage.filesystem_for(uri)
            with fs.open(path, "rb") as f:
                data = f.read(max_bytes + 1)
            break
        except FileNotFoundError as exc:
            raise ImageLoadError(f"missing: {uri} does not exist") from exc
        except PermissionError as exc:
            raise ImageLoadError(f"permission denied: {uri}") from exc
        except IsADirectoryError as exc:
            raise ImageLoadError(f"not a file: {uri} is a directory") from exc
        except OSError as exc:
            if attempt == retries - 1:
                raise ImageLoadError(f"fetch failed after {retries} attempts: {uri}: {exc}") from exc
            time.sleep(0.2 * 2**attempt)
    if len(data) > max_bytes:
        raise ImageLoadError(f"too large: {uri} is over {max_bytes} bytes")
    if not data:
        raise ImageLoadError(f"empty file: {uri} has zero bytes")
    return data


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
def _image_load_errors():
    """Turns each way Pillow fails into an ImageLoadError whose message names the reason (it
    becomes the row's ``error``); the decompression-bomb warning counts as a failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"too many pixels: {exc}") from exc
    except Image.UnidentifiedImageError as exc:  # an OSError: caught before the next line
        raise ImageLoadError("not an image: no decoder recognises these bytes") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageLoadError(f"corrupt image: {exc}") from exc


def _open_within_limit(data: bytes, max_pixels: int) -> Image.Image:
    """Opens (reads the header only) and refuses images over ``max_pixels`` before any decoding."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(f"too many pixels: {width}x{height} is over the limit of {max_pixels}")
    return image


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes bytes to a (size, size, 3) uint8 RGB array (the whole image, squashed: no tag is
    cropped away). Raises ImageLoadError with the reason."""
    with _image_load_errors():
        image = _open_within_limit(data, max_pixels)
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


def load_image(uri: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """Fetch + decode; returns (pixels, None) or (None, error message)."""
    try:
        return decode_image(fetch_bytes(uri), size, max_pixels), None
    except ImageLoadError as exc:
        return None, str(exc)
    except Exception as exc:  # anything unforeseen is still this row's problem, not the job's
        return None, f"unexpected {type(exc).__name__}: {exc}"


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


def decode_batch(batch: pa.Table, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Ray Data stage: adds ``pixels`` and ``error`` columns; keeps every row and every column.

    Rows that fail get zero pixels and an error message (an ``error`` already set upstream wins).
    """
    uris = batch.column("image_uri").to_pylist()
    previous = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(uris)
    pixels = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
    errors: list[str | None] = []
    for i, (uri, prior) in enumerate(zip(uris, previous)):
        if prior is not None:
            errors.append(prior)
            continue
        array, error = load_image(uri, size, max_pixels)
        if array is not None:
            pixels[i] = array
        errors.append(error)
    if "error" in batch.column_names:
        batch = batch.drop_columns(["error"])
    return batch.append_column("pixels", pixels_to_arrow(pixels)).append_column("error", pa.array(errors, pa.string()))


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Reads only the header: returns the format (JPEG, PNG, ...) or raises ImageLoadError for
    bytes no decoder knows and for images over the pixel limit (before any pixel is decoded)."""
    with _image_load_errors():
        return _open_within_limit(data, max_pixels).format or "unknown"


def fetch_batch(batch: pa.Table, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Ray Data stage for device-side decoding: adds raw ``image_bytes`` and ``error``.

    Only the header is read here (format and size checks); pixels are decoded by the actor."""
    uris = batch.column("image_uri").to_pylist()
    previous = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(uris)
    blobs: list[bytes | None] = []
    errors: list[str | None] = []
    for uri, prior in zip(uris, previous):
        if prior is not None:
            blobs.append(None)
            errors.append(prior)
            continue
        try:
            data = fetch_bytes(uri)
            probe_image(data, max_pixels)
            blobs.append(data)
            errors.append(None)
        except ImageLoadError as exc:
            blobs.append(None)
            errors.append(str(exc))
    if "error" in batch.column_names:
        batch = batch.drop_columns(["error"])
    return batch.append_column("image_bytes", pa.array(blobs, pa.binary())).append_column("error", pa.array(errors, pa.string()))

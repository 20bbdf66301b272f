"""Every kind of bad or unusual image: an error value, or a correct array, never an exception."""

import io
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mltag.data.images import decode_batch, load_image, pixels_from_arrow, pixels_to_arrow


def _save(tmp_path, name, image, fmt, **kwargs):
    path = tmp_path / name
    image.save(path, format=fmt, **kwargs)
    return str(path)


def _photo(mode="RGB", size=(80, 60)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.fixture()
def jpeg_bytes():
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG")
    return buf.getvalue()


def test_valid_jpeg_decodes_to_square_rgb(tmp_path):
    pixels, error = load_image(_save(tmp_path, "a.jpg", _photo(size=(400, 300)), "JPEG"), 32)
    assert error is None and pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    "writer,match",
    [
        (lambda p, b: p.write_bytes(b[: len(b) // 2]), "corrupt"),
        (lambda p, b: p.write_bytes(b""), "empty file"),
        (lambda p, b: p.write_bytes(b"just some text, not an image"), "not an image"),
        (lambda p, b: p.write_bytes(b[:20] + bytes(200) + b[220:]), "corrupt|not an image"),
    ],
)
def test_broken_files_become_errors(tmp_path, jpeg_bytes, writer, match):
    path = tmp_path / "bad.jpg"
    writer(path, jpeg_bytes)
    pixels, error = load_image(str(path), 32)
    assert pixels is None and error is not None
    assert any(m in error for m in match.split("|")), error


def test_missing_file_and_directory(tmp_path):
    assert "missing" in load_image(str(tmp_path / "nope.jpg"), 32)[1]
    assert "directory" in load_image(str(tmp_path), 32)[1]


def test_permission_denied(tmp_path):
    if os.geteuid() != 0:
        path = _save(tmp_path, "locked.jpg", _photo(), "JPEG")
        os.chmod(path, 0)
    else:
        # Root reads any ordinary file whatever its mode; procfs write-only files refuse even root.
        path = "/proc/sys/vm/drop_caches"
        if not os.path.exists(path):
            pytest.skip("running as root without procfs: no file root cannot read")
    assert "permission denied" in load_image(str(path), 32)[1]


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    path = _save(tmp_path, "bomb.png", Image.new("L", (5000, 5000)), "PNG")  # 25 Mpx, tiny file
    pixels, error = load_image(path, 32, max_pixels=10_000_000)
    assert pixels is None and "too many pixels" in error


@pytest.mark.parametrize(
    "name,make",
    [
        ("cmyk.jpg", lambda p: _photo("CMYK").save(p, "JPEG")),
        ("grey.png", lambda p: _photo("L").save(p, "PNG")),
        ("palette.png", lambda p: _photo("P").save(p, "PNG")),
        ("alpha.png", lambda p: Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(p, "PNG")),
        ("sixteen.png", lambda p: Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(p, "PNG")),
        ("animated.gif", lambda p: _photo("P").save(p, "GIF", save_all=True, append_images=[_photo("P")] * 2)),
    ],
)
def test_unusual_but_valid_images_decode(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    pixels, error = load_image(str(path), 16)
    assert error is None, error
    assert pixels.shape == (16, 16, 3)
    if name == "alpha.png":  # fully transparent is composited on white
        assert pixels.min() == 255
    if name == "sixteen.png":  # 16-bit full scale maps to 8-bit full scale
        assert pixels.min() == 255


def test_pixels_arrow_round_trip_with_offsets():
    arr = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    column = pixels_to_arrow(arr)
    np.testing.assert_array_equal(pixels_from_arrow(column, 4), arr)
    np.testing.assert_array_equal(pixels_from_arrow(column.slice(2, 2), 4), arr[2:4])


def test_decode_batch_keeps_every_row_and_column(tmp_path):
    good = _save(tmp_path, "good.jpg", _photo(), "JPEG")
    batch = pa.table(
        {
            "listing_id": ["a", "b", "c"],
            "image_uri": [good, str(tmp_path / "gone.jpg"), good],
            "price": [1, 2, 3],
            "error": [None, None, "upstream failure"],
        }
    )
    out = decode_batch(batch, 8)
    assert out.num_rows == 3 and out.column("price").to_pylist() == [1, 2, 3]
    errors = out.column("error").to_pylist()
    assert errors[0] is None and "missing" in errors[1] and errors[2] == "upstream failure"
    assert pixels_from_arrow(out.column("pixels"), 8)[0].any()


@pytest.mark.parametrize(
    "name,fmt,kwargs",
    [
        ("camera.mpo", "MPO", {"save_all": True}),  # phone JPEGs with a second picture: Pillow calls them MPO
        ("photo.webp", "WEBP", {}),
        ("scan.tiff", "TIFF", {}),
        ("old.bmp", "BMP", {}),
        ("still.gif", "GIF", {}),
        ("photo.avif", "AVIF", {}),
    ],
)
def test_every_format_of_the_default_policy_decodes(tmp_path, name, fmt, kwargs):
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow build has no AVIF support")
    image = _photo(size=(48, 40))
    if fmt == "MPO":
        kwargs = {**kwargs, "append_images": [image]}
    path = _save(tmp_path, name, image, fmt, **kwargs)
    pixels, error = load_image(path, 16)
    assert error is None, error
    assert pixels.shape == (16, 16, 3) and pixels.any()

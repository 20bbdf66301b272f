"""The device-decode path (nvJPEG on GPU) exercised on the CPU, where CI runs it."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mltag.data.device_decode import decode_on_device
from mltag.data.images import ImageLoadError, decode_image, fetch_batch, probe_image


def _encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def photo():
    y, x = np.mgrid[0:120, 0:160]
    return np.stack([x * 255 // 160, y * 255 // 120, (x + y) % 256], axis=-1).astype(np.uint8)


def test_batched_jpeg_decode_matches_the_cpu_path(photo):
    jpg = _encode(photo, "JPEG", quality=95)
    pixels, failures = decode_on_device([jpg, jpg], 32, torch.device("cpu"))
    assert failures == {} and pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8
    reference = decode_image(jpg, 32).astype(int)
    assert np.abs(pixels[0].numpy().astype(int) - reference).mean() < 3  # same image, another resampler


def test_bad_bytes_fail_alone_and_other_formats_fall_back(photo):
    jpg = _encode(photo, "JPEG")
    png = _encode(photo, "PNG")
    blobs = [jpg, b"\xff\xd8\xff not really", png, jpg[: len(jpg) // 3]]
    pixels, failures = decode_on_device(blobs, 16, torch.device("cpu"))
    assert set(failures) == {1, 3}
    assert pixels.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(pixels[1].numpy(), decode_image(png, 16), atol=3)


def test_probe_reads_headers_only():
    assert probe_image(_encode(np.zeros((8, 8, 3), np.uint8), "PNG")) == "PNG"
    with pytest.raises(ImageLoadError, match="too many pixels"):
        probe_image(_encode(np.zeros((300, 300), np.uint8), "PNG"), max_pixels=1000)
    with pytest.raises(ImageLoadError, match="not an image"):
        probe_image(b"hello")


def test_fetch_batch_keeps_rows_and_records_errors(tmp_path, photo):
    (tmp_path / "a.jpg").write_bytes(_encode(photo, "JPEG"))
    batch = pa.table({"listing_id": ["a", "b"], "image_uri": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]})
    out = fetch_batch(batch)
    assert out.num_rows == 2 and out.column("image_bytes")[0].as_py()[:3] == b"\xff\xd8\xff"
    assert out.column("image_bytes")[1].as_py() is None and "missing" in out.column("error")[1].as_py()


def test_images_of_one_shape_are_resized_together_exactly_as_alone():
    import torch.nn.functional as F

    from mltag.data.device_decode import resize_all

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) for shape in [(3, 40, 30), (3, 25, 50), (3, 40, 30)]]
    batched = resize_all(images, 16)
    for image, got in zip(images, batched):
        alone = F.interpolate(image[None].float(), size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        assert torch.equal(got, alone.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0))

"""The device decode path (nvJPEG on GPUs, the same torchvision code on CPU here) reads EXIF
orientation from the header and applies it on the device: a rotated phone photo gets the same
pixels as on the Pillow path, for all eight orientations."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mltag.data.device_decode import decode_on_device, exif_orientation
from mltag.data.images import decode_image

SIZE = 32


def _photo() -> Image.Image:
    """Smooth, asymmetric content (JPEG-friendly): a gradient with a bright block in one corner."""
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 60.0)], axis=-1)
    rgb[:20, :30] = [250, 250, 20]
    return Image.fromarray(rgb.astype(np.uint8))


def _jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    _photo().save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg_gets_the_same_pixels_on_both_paths(orientation):
    data = _jpeg(orientation)
    assert exif_orientation(data) == orientation
    cpu = decode_image(data, SIZE).astype(np.float32)
    device, failures = decode_on_device([data], SIZE, torch.device("cpu"))
    assert not failures
    on_device = device[0].numpy().astype(np.float32)
    assert np.abs(on_device - cpu).mean() < 6, "the two decoders disagree beyond resampling differences"
    if orientation != 1:  # the check can fail: ignoring the orientation gives other pixels
        upright = decode_image(_jpeg(1), SIZE).astype(np.float32)
        assert np.abs(upright - cpu).mean() > 20

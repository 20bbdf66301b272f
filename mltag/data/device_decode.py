"""Decode a batch of image bytes on the model's device: nvJPEG through torchvision on GPUs, the
same torchvision call on CPU elsewhere, Pillow for anything torchvision refuses.

JPEGs are decoded in one batched ``torchvision.io.decode_jpeg`` call; their EXIF orientation is
read from the header on the CPU and applied on the device (torchvision's CUDA decoder ignores it,
and a photo must get the same pixels on both paths); if that call fails (one bad
image fails the batch), each image is retried alone, and an image that still fails, or is not a
JPEG, goes through the CPU path of ``mltag.data.images`` (which handles every mode and every format the
``FetchPolicy`` allows). Images are resized on the device with antialiasing to the model's square
input, one call per distinct image shape.

Example:
    >>> pixels, failures = decode_on_device([open("a.jpg", "rb").read()], 224, torch.device("cpu"))  # doctest: +SKIP
    >>> pixels.shape                                                                                 # doctest: +SKIP
    torch.Size([1, 224, 224, 3])
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mltag.data.images import ImageLoadError, decode_image
from mltag.data.uri_policy import DEFAULT_POLICY, FetchPolicy

JPEG_MAGIC = b"\xff\xd8\xff"
RESIZE_FLOAT_BYTES = 256 * 2**20  # float pixels one resize call may hold


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8, the whole image squashed as on the CPU path."""
    return resize_all([image], size)[0]


def resize_all(images: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """(3, H, W) uint8 images -> (size, size, 3) uint8, each squashed whole as on the CPU path.
    Images of one shape are resized in one call (a marketplace's uploads often share a few
    sizes): a launch per shape rather than per image on a GPU."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for shape, same in groups.items():
        # at most RESIZE_FLOAT_BYTES of float pixels per call: 64 phone photos of 12 MP would be 9 GB
        step = max(1, RESIZE_FLOAT_BYTES // (4 * int(np.prod(shape))))
        for start in range(0, len(same), step):
            members = same[start : start + step]
            x = torch.stack([images[i] for i in members]).float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            resized = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            for k, i in enumerate(members):
                out[i] = resized[k]
    return out


EXIF_ORIENTATION = 0x0112


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) from the header alone; 1 when there is none or it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(EXIF_ORIENTATION, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # an unreadable header: the decode itself will say what is wrong
        return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as displayed, for EXIF orientation 1-8 (what PIL's ``exif_transpose`` does)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.flip(-1, -2).transpose(-1, -2)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


def _jpeg(data: bytes, device: torch.device) -> torch.Tensor:
    return decode_jpeg(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False
    )


def decode_on_device(
    blobs: list[bytes], size: int, device: torch.device, *, policy: FetchPolicy | None = None
) -> tuple[torch.Tensor, dict[int, str]]:
    """Returns (N_ok, size, size, 3) uint8 on ``device`` and {index: error} for the failures
    (the tensor holds the successful images in input order). Only ``policy.formats`` are decoded."""
    policy = policy or DEFAULT_POLICY
    images: dict[int, torch.Tensor] = {}
    failures: dict[int, str] = {}
    jpegs = [i for i, b in enumerate(blobs) if b[:3] == JPEG_MAGIC] if "JPEG" in policy.formats else []
    if jpegs:
        try:
            decoded = decode_jpeg(
                [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs],
                mode=ImageReadMode.RGB,
                device=device,
                apply_exif_orientation=False,
            )
            oriented = [orient(img, exif_orientation(blobs[i])) for i, img in zip(jpegs, decoded)]
            images.update(zip(jpegs, resize_all(oriented, size)))
        except RuntimeError:
            for i in jpegs:  # one bad file fails a batched call: find it
                try:
                    images[i] = _resize(orient(_jpeg(blobs[i], device), exif_orientation(blobs[i])), size)
                except RuntimeError:
                    pass
    for i, data in enumerate(blobs):
        if i in images:
            continue
        try:  # not a JPEG, or one torchvision could not read: the CPU path knows every format
            images[i] = torch.from_numpy(np.array(decode_image(data, size, policy=policy))).to(device)
        except ImageLoadError as exc:
            failures[i] = str(exc)
    order = [i for i in range(len(blobs)) if i in images]
    if not order:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), failures
    return torch.stack([images[i] for i in order]), failures

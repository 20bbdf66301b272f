"""Decode a batch of image bytes on the model's device: nvJPEG through torchvision on GPUs, the
same torchvision call on CPU elsewhere, Pillow for anything torchvision refuses.

JPEGs are decoded in one batched ``torchvision.io.decode_jpeg`` call; if that call fails (one bad
image fails the batch), each image is retried alone, and an image that still fails, or is not a
JPEG, goes through the CPU path of ``mltag.images`` (which handles every mode and every format the
``FetchPolicy`` allows). Images are resized on the device with antialiasing to the model's square
input.

Example:
    >>> pixels, failures = decode_on_device([open("a.jpg", "rb").read()], 224, torch.device("cpu"))  # doctest: +SKIP
    >>> pixels.shape                                                                                 # doctest: +SKIP
    torch.Size([1, 224, 224, 3])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from mltag.images import ImageLoadError, decode_image
from mltag.uri_policy import DEFAULT_POLICY, FetchPolicy

JPEG_MAGIC = b"\xff\xd8\xff"


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8, the whole image squashed as on the CPU path."""
    x = image.unsqueeze(0).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def _jpeg(data: bytes, device: torch.device) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device,
                       apply_exif_orientation=True)


def decode_on_device(blobs: list[bytes], size: int, device: torch.device, *,
                     policy: FetchPolicy | None = None) -> tuple[torch.Tensor, dict[int, str]]:
    """Returns (N_ok, size, size, 3) uint8 on ``device`` and {index: error} for the failures
    (the tensor holds the successful images in input order). Only ``policy.formats`` are decoded."""
    policy = policy or DEFAULT_POLICY
    images: dict[int, torch.Tensor] = {}
    failures: dict[int, str] = {}
    jpegs = [i for i, b in enumerate(blobs) if b[:3] == JPEG_MAGIC] if "JPEG" in policy.formats else []
    if jpegs:
        try:
            decoded = decode_jpeg([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs],
                                  mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            images.update({i: _resize(img, size) for i, img in zip(jpegs, decoded)})
        except RuntimeError:
            for i in jpegs:  # one bad file fails a batched call: find it
                try:
                    images[i] = _resize(_jpeg(blobs[i], device), size)
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

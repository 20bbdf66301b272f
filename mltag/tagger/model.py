"""The tagger: a timm backbone, global pooling (avg or max), and a sigmoid multi-label head.

``forward`` returns ``(logits, embedding)``: the logits feed the losses and the tag scores, and
the pooled backbone features are the embedding written to the tag table and indexed by FAISS.

A trained tagger is saved as one directory, everything needed to use it elsewhere:
  ``weights.pt``   the state dict
  ``tagger.json``  backbone, pooling, image size, normalisation, vocabulary, thresholds, version
The version is a content hash of both, so any change of weights or settings is a new version, and
``load_tagger`` refuses a directory whose weights do not hash to its version (tampered with, or
half-written). Saving is all-or-nothing locally (a staging directory renamed into place); on S3,
which has no rename, the weights go first and ``tagger.json`` last.

Example:
    >>> model = Tagger("test_efficientnet", num_tags=5)
    >>> logits, embedding = model(torch.zeros(2, 3, 64, 64))
    >>> logits.shape, embedding.shape
    (torch.Size([2, 5]), torch.Size([2, 256]))
"""

from __future__ import annotations

import io
import json

import numpy as np
import timm
import torch
import torch.nn as nn

from mltag.data import storage
from mltag.tagger.spec import (  # noqa: F401  (the spec's names, re-exported: callers import them from here too)
    META_FILE,
    POOLINGS,
    WEIGHTS_FILE,
    ModelIntegrityError,
    TaggerSpec,
    load_spec,
    read_verified,
    verify_weights,
)
from mltag.tagger.weights import timm_pretrained_kwargs


def check_backbone(name: str) -> None:
    """Raises ValueError unless ``name`` is a timm model, with or without a pretrained tag
    (``resnet50`` or ``resnet50.a1_in1k``). The tag picks that weights' normalisation
    (``backbone_normalisation``); weights still come only from ``pretrained`` (none, a file...),
    never downloaded because of the name.

    Example:
        >>> check_backbone("test_efficientnet.r160_in1k")
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    architecture, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(name):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{architecture}.*")]
        raise ValueError(f"timm backbone {architecture!r} has no pretrained tag {tag!r}; choose one of: {', '.join(tags) or '(none)'}")


class Tagger(nn.Module):
    def __init__(self, backbone: str, num_tags: int, pooling: str = "avg", pretrained: str = "none", drop_rate: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        check_backbone(backbone)
        # num_classes=0 leaves timm's pooled features as the output; the head is ours.
        self.backbone = timm.create_model(
            backbone, num_classes=0, global_pool=pooling, drop_rate=drop_rate, **timm_pretrained_kwargs(backbone, pretrained)
        )
        self.embedding_dim = int(self.backbone.num_features)
        self.head = nn.Linear(self.embedding_dim, num_tags)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return self.head(embedding), embedding

    @torch.no_grad()
    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Puts a head fitted elsewhere (the linear probe, on cached embeddings) on this backbone."""
        if weight.shape != tuple(self.head.weight.shape) or bias.shape != tuple(self.head.bias.shape):
            raise ValueError(f"head of shape {weight.shape} does not fit this tagger's {tuple(self.head.weight.shape)}")
        self.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
        self.head.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)))


def backbone_stages(backbone: nn.Module) -> dict[str, int]:
    """Each backbone parameter's layer group, counted from the input: 0 is the stem, then one per
    stage, the last layers (EfficientNet's ``conv_head``) last. timm's coarse ``group_matcher``
    defines the groups (the ones its layer-wise learning-rate decay uses), so every timm family
    that has one (EfficientNet, ResNet/ResNeXt, ConvNeXt, ViT...) is covered.

    Example:
        >>> stages = backbone_stages(timm.create_model("test_efficientnet", num_classes=0))
        >>> stages["conv_stem.weight"], stages["blocks.0.0.conv_dw.weight"]
        (0, 1)
    """
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"timm backbone {type(backbone).__name__} defines no group_matcher: its stages cannot be frozen")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return {name: stage for stage, names in groups.items() for name in names}


def backbone_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone's pretrained weights expect (timm's pretrained config)."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def normalise(pixels: torch.Tensor, mean, std, channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised, done on the model's device (cheap there, not on CPU)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def save_tagger(model: Tagger, spec: TaggerSpec, out_dir: str) -> TaggerSpec:
    """Saves weights + spec under ``out_dir`` (local or s3) and returns the spec with its version.
    Published with ``storage.publish_files``: a reader between the two files sees a version
    mismatch, which ``load_tagger`` refuses, never a silently mixed model."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buf)
    weights = buf.getvalue()
    spec.embedding_dim = model.embedding_dim
    spec.version = storage.content_version(weights, spec.to_json())
    meta = json.dumps(spec.to_json(), indent=2).encode()
    storage.publish_files(out_dir, [(WEIGHTS_FILE, weights), (META_FILE, meta)])  # tagger.json last: it names the version
    return spec


def load_tagger(model_dir: str, device: str | torch.device = "cpu") -> tuple[Tagger, TaggerSpec]:
    """Rebuilds the tagger (through timm.create_model, no download) and loads its weights, after
    checking they hash to the recorded version (ModelIntegrityError otherwise) and with
    ``weights_only=True``: the file is tensors, never code."""
    spec, weights = read_verified(model_dir)
    model = Tagger(spec.backbone, len(spec.vocabulary), spec.pooling, pretrained="none")
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), spec


def set_thresholds(model_dir: str, thresholds: list[float]) -> TaggerSpec:
    """Stores calibrated per-tag thresholds with the model (this is a new model version)."""
    model, spec = load_tagger(model_dir)
    if len(thresholds) != len(spec.vocabulary):
        raise ValueError(f"{len(thresholds)} thresholds for {len(spec.vocabulary)} tags")
    spec.thresholds = [float(t) for t in thresholds]
    return save_tagger(model, spec, model_dir)


def pick_device(use_gpu: bool) -> torch.device:
    """The torch device of a process that was (or was not) given a GPU: whether to use one is
    decided once, for the cluster, by ``mltag.runtime.cluster.wants_gpu``; this only names the device,
    and refuses a GPU that torch cannot see."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true but torch sees no CUDA device")
    return torch.device("cuda")

"""Multi-label losses on logits: BCE, focal, and asymmetric (ASL, Ridnik et al. 2021).

All three sum over tags and average over the batch, and compute in float32 whatever the input
dtype (under fp16/bf16 autocast the focusing terms underflow and give NaN otherwise).

ASL focuses positives and negatives differently and shifts negative probabilities by a margin::

    p   = sigmoid(x)
    p_m = max(p - clip, 0)                      # easy negatives (p < clip) contribute nothing
    L   = -[ y (1-p)^g+ log(p) + (1-y) p_m^g- log(1-p_m) ]

With g+ = g- = g and clip = 0 it is the focal loss; with all three 0 it is BCE.

Example:
    >>> loss = make_loss("asl", gamma_neg=4.0, gamma_pos=0.0, clip=0.05)
    >>> float(loss(torch.zeros(2, 3), torch.ones(2, 3))) > 0
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("bce", "focal", "asl")


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    pos_weight: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric loss, summed over tags and averaged over the batch. ``weight`` (the shape of
    ``targets``) scales each image-tag term: a pseudo label's, for instance, below a human one's."""
    x = logits.float()
    y = targets.float()
    p = torch.sigmoid(x)
    # log-sigmoid is exact where log(sigmoid) would round to log(0).
    log_p = F.logsigmoid(x)
    if clip > 0:
        p_neg = (p - clip).clamp(min=0)
        log_1m_p = torch.log((1 - p_neg).clamp(min=eps))
    else:
        p_neg = p
        log_1m_p = F.logsigmoid(-x)
    loss_pos = y * log_p
    loss_neg = (1 - y) * log_1m_p
    if gamma_pos > 0:
        loss_pos = loss_pos * (1 - p).pow(gamma_pos)
    if gamma_neg > 0:
        loss_neg = loss_neg * p_neg.pow(gamma_neg)
    if pos_weight is not None:
        loss_pos = loss_pos * pos_weight.float()
    per_element = -(loss_pos + loss_neg)
    if weight is not None:
        per_element = per_element * weight.float()
    return per_element.sum(dim=-1).mean()


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    pos_weight: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): both sides focused by the same gamma, no margin."""
    return asymmetric_loss(logits, targets, gamma_pos=gamma, gamma_neg=gamma, clip=0.0, pos_weight=pos_weight, weight=weight)


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy on logits, summed over tags and averaged over the batch."""
    per_element = F.binary_cross_entropy_with_logits(
        logits.float(),
        targets.float(),
        weight=None if weight is None else weight.float(),
        reduction="none",
        pos_weight=None if pos_weight is None else pos_weight.float(),
    )
    return per_element.sum(dim=-1).mean()


class MultiLabelLoss(nn.Module):
    """A configured loss as a module (what the training loop holds)."""

    def __init__(
        self,
        name: str,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        focal_gamma: float = 2.0,
        pos_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        self.name, self.gamma_pos, self.gamma_neg, self.clip, self.focal_gamma = name, gamma_pos, gamma_neg, clip, focal_gamma
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "bce":
            return bce_loss(logits, targets, self.pos_weight, weight)
        if self.name == "focal":
            return focal_loss(logits, targets, self.focal_gamma, self.pos_weight, weight)
        return asymmetric_loss(logits, targets, self.gamma_pos, self.gamma_neg, self.clip, pos_weight=self.pos_weight, weight=weight)


def make_loss(name: str, **kwargs) -> MultiLabelLoss:
    return MultiLabelLoss(name, **kwargs)

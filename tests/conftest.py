"""Shared fixtures: tiny real data (JPEGs, Parquet), a local Ray instance, a tiny saved tagger."""

from __future__ import annotations

import os

import pytest
import torch

# Every Ray the tests start (here and in the job scripts they run) is a fresh local one: never a
# cluster some other process on this machine left behind in /tmp/ray/ray_current_cluster.
os.environ["RAY_ADDRESS"] = "local"
# Ray Train's controller polls its workers every 2 s, and a run ends (or notices a killed
# worker) only at a poll: the tests' runs train for seconds, so they poll faster. A missed poll is
# harmless (a worker is declared dead only after 10 minutes without an answer).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("MLTAG_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "mltag"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def state_api_of_this_cluster(ray_local, monkeypatch):
    """The State API (``ray.util.state``) finds its server through RAY_ADDRESS, which the tests set
    to "local" (and which overrides any address passed to it): where other Ray instances run on
    the machine, it cannot tell which one is ours ("Found multiple active Ray instances"). Name ours."""
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://" + ray_local._private.worker.get_dashboard_url())


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory):
    """48 real sample-catalog JPEGs (64 px) with manifest and vocabulary."""
    from mltag.stages.sample import build_sample_catalog

    return build_sample_catalog(str(tmp_path_factory.mktemp("catalog")), n_images=48, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_catalog):
    """An untrained but real, saved tagger (timm test_efficientnet) over the sample vocabulary."""
    from mltag.data.vocabulary import Vocabulary
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    torch.manual_seed(0)
    vocab = Vocabulary.load(tiny_catalog["vocabulary"])
    model = Tagger("test_efficientnet", len(vocab))
    out = str(tmp_path_factory.mktemp("model"))
    save_tagger(model, TaggerSpec(backbone="test_efficientnet", vocabulary=vocab.to_dict(), img_size=64), out)
    return out

import hashlib
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from mltag.stages.sample import build_sample_catalog, sample_vocabulary


def _digest(directory):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_sample_catalog_is_deterministic_per_seed(tmp_path):
    a = build_sample_catalog(str(tmp_path / "a"), n_images=12, size=64, seed=3)
    b = build_sample_catalog(str(tmp_path / "b"), n_images=12, size=64, seed=3)
    c = build_sample_catalog(str(tmp_path / "c"), n_images=12, size=64, seed=4)
    assert _digest(a["out"]) == _digest(b["out"])
    assert _digest(a["out"]) != _digest(c["out"])


def test_sample_catalog_contents(tiny_catalog):
    table = pq.read_table(tiny_catalog["manifest"])
    vocab = sample_vocabulary()
    assert table.num_rows == 48
    assert set(table.column("split").to_pylist()) == {"train", "val"}
    for row in table.to_pylist():
        tags = row["tags"]
        assert sum(t.startswith("scene_") for t in tags) == 1  # exactly one photo behind
        assert 1 <= sum(t.startswith("digit_") for t in tags) <= 4
        assert not vocab.unknown(tags)
        image = Image.open(os.path.join(tiny_catalog["out"], row["image_uri"]))
        assert image.format == "JPEG" and image.size == (64, 64)
    # The hierarchy gives parents to every digit and scene.
    assert vocab.ancestors("digit_3") == ["odd"] and vocab.ancestors("scene_palace") == ["scene"]


def test_digits_really_are_painted(tmp_path):
    """An image tagged with digits differs from the bare photo crop: the digits are in the pixels."""
    out = build_sample_catalog(str(tmp_path / "s"), n_images=8, size=64, seed=0)
    arrays = [np.asarray(Image.open(os.path.join(out["out"], f"images/{i:06d}.jpg"))) for i in range(8)]
    assert all(a.std() > 10 for a in arrays)

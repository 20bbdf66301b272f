"""New tags from stored embeddings: train-head on a real tag table, apply-head, and the scores
checked against the full model with the fitted head in place of its own."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
import torch

from mltag.cli import main as cli_main
from mltag.data.catalog import read_manifest
from mltag.data.vocabulary import Vocabulary
from mltag.stages.apply_head import ApplyHeadConfig, output_schema
from mltag.stages.apply_head import run as apply_head
from mltag.stages.train_head import TrainHeadConfig, label_matrix
from mltag.stages.train_head import run as train_head
from mltag.table import delta_table, tag_table
from mltag.tagger.heads import HeadMismatchError, head_columns, load_head, load_spec, save_head
from mltag.tagger.linear_probe import LinearHead

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tagged(ray_local, tiny_catalog, tiny_model_dir, tmp_path_factory):
    """A tag table of the sample catalog plus one missing and one corrupt image, and labels for
    three new tags: the catalog's scenes renamed, and 'has_zero'.

    Its rows are what `mltag tag` writes (its decode stage and its inference actor, run here in
    process on 25-image batches), committed as one version: the Ray Data pipeline itself is
    tested elsewhere, and skipping its start-up keeps this file fast."""
    from mltag.data.images import decode_batch
    from mltag.tagger.model import load_spec
    from mltag.tagging.actor import TaggerActor

    work = tmp_path_factory.mktemp("heads")
    catalog = read_manifest(tiny_catalog["manifest"])
    (work / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    broken = pa.table(
        {
            "listing_id": ["MISSING", "CORRUPT"],
            "image_uri": [str(work / "missing.jpg"), str(work / "corrupt.jpg")],
            "tags": pa.array([[], []], pa.list_(pa.string())),
            "split": ["train", "train"],
        }
    )
    manifest = pa.concat_tables([catalog.select(["listing_id", "image_uri", "tags", "split"]), broken])
    tagger = TaggerActor(tiny_model_dir, use_gpu=False, threads=1, threshold=-1.0)
    size = load_spec(tiny_model_dir).img_size
    rows = pa.concat_tables([tagger(decode_batch(manifest.slice(i, 25), size)) for i in range(0, manifest.num_rows, 25)])
    table = str(work / "tag_table")
    meta = {"operation": "tag", "model_version": tagger.spec.version, "embedding_dim": tagger.model.embedding_dim, "snapshot": "2026-11-20"}
    delta_table.write_table(table, rows, meta)

    rows = manifest.to_pylist()
    new_tags = [
        "|".join(["palace" if "scene_palace" in r["tags"] else "flower"] + (["has_zero"] if "digit_0" in r["tags"] else [])) for r in rows
    ]
    split = [("test" if i % 4 == 0 else "val") if r["split"] == "val" else r["split"] for i, r in enumerate(rows)]
    labels = work / "labels.csv"
    pacsv.write_csv(
        pa.table(
            {"listing_id": manifest.column("listing_id"), "image_uri": manifest.column("image_uri"), "tags": new_tags, "split": split}
        ),
        labels,
    )
    return {"table": table, "labels": str(labels), "work": work, "model": tiny_model_dir}


def _scene_head(tagged, **overrides) -> str:
    out = str(tagged["work"] / "heads" / overrides.pop("folder", "scene"))
    train_head(TrainHeadConfig(tag_table=tagged["table"], labels=tagged["labels"], out=out, **overrides))
    return out


def _reference_scores(model_dir: str, head_dir: str, uris: list[str]) -> np.ndarray:
    """The full model on the images, its own head replaced by the fitted one (an nn.Linear)."""
    from mltag.data.images import load_image
    from mltag.tagger.model import load_tagger, normalise

    model, spec = load_tagger(model_dir)
    linear, head_spec = load_head(head_dir)
    model.head = torch.nn.Linear(model.embedding_dim, len(head_spec.tags))
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(linear.weight))
        model.head.bias.copy_(torch.from_numpy(linear.bias))
    out = []
    with torch.inference_mode():
        for uri in uris:
            pixels, error = load_image(uri, spec.img_size)
            assert error is None
            logits, _ = model(normalise(torch.from_numpy(pixels[None].copy()), spec.mean, spec.std))
            out.append(torch.sigmoid(logits)[0].numpy())
    return np.stack(out)


def test_applied_scores_are_the_full_models_with_the_fitted_head(tagged):
    head_dir = _scene_head(tagged)
    spec = load_spec(head_dir)
    assert spec.tags == ["flower", "has_zero", "palace"] and spec.model_version == tag_table.run_metadata(tagged["table"])["model_version"]
    report = spec.extra["labels_report"]
    assert report["missing_or_failed"] == 2 and report["matched"] == 48  # the missing and the corrupt image
    assert spec.extra["metrics"]["val"]["rows"] > 0 and spec.extra["metrics"]["test"]["rows"] > 0
    assert os.path.exists(os.path.join(head_dir, spec.weights_file)) and not any(
        p.startswith(".") for p in os.listdir(tagged["work"] / "heads")
    )

    before = delta_table.latest_version(tagged["table"])
    assert cli_main(["apply-head", "--tag-table", tagged["table"], "--head", head_dir]) == 0
    assert delta_table.latest_version(tagged["table"]) == before + 1
    rows = tag_table.read_rows(tagged["table"]).sort_by("listing_id")
    assert rows.num_rows == 50

    ok = rows.filter(pc.is_null(rows.column("error")))
    sample = ok.take([0, 5, 11, 17, 23, 29, 41])
    table_scores = np.array(sample.column("scene_scores").to_pylist(), np.float32)
    np.testing.assert_allclose(
        table_scores, _reference_scores(tagged["model"], head_dir, sample.column("image_uri").to_pylist()), atol=1e-4
    )
    thresholds = np.array(spec.thresholds)
    expected_tags = [[t for t, s, th in zip(spec.tags, row, thresholds) if s >= th] for row in table_scores]
    assert sample.column("scene_tags").to_pylist() == expected_tags
    assert set(sample.column("scene_head").to_pylist()) == {spec.version}

    failed = rows.filter(pc.is_valid(rows.column("error")))
    assert failed.num_rows == 2
    for column in ("scene_scores", "scene_tags", "scene_head"):
        assert failed.column(column).null_count == 2

    import duckdb

    heads = delta_table.open_table(tagged["table"]).to_pyarrow_dataset()  # noqa: F841 (DuckDB finds it by name)
    found = duckdb.sql("SELECT count(*) FROM heads WHERE list_contains(scene_tags, 'palace') AND scene_scores[3] >= 0").fetchall()[0][0]
    assert found == sum("palace" in t for t in ok.column("scene_tags").to_pylist())


def test_reapplying_replaces_the_heads_columns_and_a_rerun_does_nothing(tagged):
    head_dir = _scene_head(tagged)
    apply_head(ApplyHeadConfig(tag_table=tagged["table"], head=head_dir))
    version = delta_table.latest_version(tagged["table"])
    again = apply_head(ApplyHeadConfig(tag_table=tagged["table"], head=head_dir))
    assert again["committed"] is False and delta_table.latest_version(tagged["table"]) == version

    refit = _scene_head(tagged, l2=[1e-3])  # another head version under the same name
    summary = apply_head(ApplyHeadConfig(tag_table=tagged["table"], head=refit))
    rows = tag_table.read_rows(tagged["table"])
    assert summary["committed"] and rows.num_rows == 50
    assert [c for c in rows.column_names if c.startswith("scene_")] == ["scene_scores", "scene_tags", "scene_head"]
    assert set(rows.column("scene_head").drop_null().to_pylist()) == {load_spec(refit).version}
    assert summary["heads"]["scene"]["version"] == load_spec(refit).version
    meta = tag_table.run_metadata(tagged["table"])
    assert meta["model_version"] == load_spec(refit).model_version and meta["embedding_dim"] == 256  # what index/reindex read


def test_a_head_of_another_model_version_is_refused(tagged):
    head_dir = _scene_head(tagged, folder="other")
    linear, spec = load_head(head_dir)
    spec.model_version = "another-model"
    save_head(linear, spec, head_dir)
    version = delta_table.latest_version(tagged["table"])
    with pytest.raises(HeadMismatchError, match="another-model"):
        apply_head(ApplyHeadConfig(tag_table=tagged["table"], head=head_dir))
    assert delta_table.latest_version(tagged["table"]) == version
    with pytest.raises(HeadMismatchError, match="embedded by another tagger"):
        _scene_head(tagged, folder="other2", model_version="another-model")


def test_head_columns_leave_error_rows_and_other_models_rows_null():
    linear = LinearHead(np.array([[1.0, -1.0]], np.float32), np.array([0.5], np.float32), np.array([0.1]))
    from mltag.tagger.heads import HeadSpec

    spec = HeadSpec("h", {"tags": ["a"]}, "m1", 2, [0.5], version="v")
    batch = pa.table(
        {
            "embedding": pa.array([[1.0, 0.0], None, [0.0, 2.0], [3.0, 3.0]], pa.list_(pa.float32())),
            "model_version": ["m1", "m1", "m1", "m0"],
        }
    )
    (scores, tags, version), counts = head_columns(batch, linear, spec)
    expected = 1 / (1 + np.exp(-np.array([1.5, -1.5])))
    np.testing.assert_allclose([s[0] for s in scores.to_pylist() if s is not None], expected, rtol=1e-6)
    assert tags.to_pylist() == [["a"], None, [], None] and version.to_pylist() == ["v", None, "v", None]
    assert counts == {"rows": 4, "scored": 2, "error_rows": 1, "other_model": 1}


def test_a_name_clashing_with_other_columns_is_refused():
    from mltag.tagger.heads import HeadSpec

    spec = HeadSpec("tags", {"tags": ["a"]}, "m", 2, [0.5])
    schema = pa.schema([("listing_id", pa.string()), ("tags_scores", pa.float32())])
    with pytest.raises(HeadMismatchError, match="another --name"):
        output_schema(schema, spec)


def test_labels_are_encoded_closed_upward_without_a_row_loop():
    vocab = Vocabulary.from_dict({"tags": ["sleeve", {"name": "long", "parent": "sleeve", "synonyms": ["longsleeve"]}, "collar"]})
    tags = pa.array([["longsleeve"], [], ["collar", "sleeve"], None], pa.list_(pa.string()))
    np.testing.assert_array_equal(label_matrix(tags, vocab), [[1, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0]])


def test_a_table_that_moved_on_is_not_overwritten(tmp_path):
    uri = str(tmp_path / "t")
    delta_table.write_table(uri, pa.table({"a": [1]}), {"operation": "test"})
    delta_table.write_table(uri, pa.table({"a": [2]}), {"operation": "test"}, mode="append")
    with pytest.raises(delta_table.TableConflictError, match="moved from version 0 to 1"):
        delta_table.commit_rewrite(uri, 0, [], pa.schema([("a", pa.int64())]), {"operation": "test"})
    assert delta_table.latest_version(uri) == 1

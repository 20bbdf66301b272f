"""Training labels without a dense images x tags matrix on the driver: the streamed statistics
(positive counts, repeat factors) and the per-batch encoding equal the dense computation."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.data.vocabulary import Vocabulary, VocabularyError
from mltag.maths.pseudo_labels import tags_by_source
from mltag.maths.resampling import (
    TagIndex,
    repeat_factors,
    repeat_factors_from_tags,
    tag_counts,
    tag_repeat_factors,
    tag_repeat_factors_from_counts,
)
from mltag.stages.train import label_counts, labelled_table, positive_weights, positive_weights_from_counts
from mltag.tagger.train_loop import batch_arrays, label_weights


def _dense_positive_weights(labels: np.ndarray) -> list[float]:
    """The dense computation training used before (``balanced``), kept verbatim as the reference."""
    positives = labels.sum(axis=0)
    ratio = (len(labels) - positives) / np.maximum(positives, 1)
    return np.clip(np.sqrt(ratio), 1.0, 10.0).round(4).tolist()


def _vocabulary(rng: np.random.Generator, n_tags: int) -> Vocabulary:
    """Random forest of tags (depth up to ~4) with a few synonyms."""
    entries = []
    for i in range(n_tags):
        entry = {"name": f"t{i}"}
        if i and rng.random() < 0.6:
            entry["parent"] = f"t{int(rng.integers(0, i))}"  # parents come earlier: no cycles
        if rng.random() < 0.2:
            entry["synonyms"] = [f"alias{i}"]
        entries.append(entry)
    rng.shuffle(entries)  # vocabulary order need not be parents first
    return Vocabulary.from_dict({"tags": entries})


def _tag_lists(rng: np.random.Generator, vocab: Vocabulary, n_rows: int) -> list[list[str] | None]:
    spellings = list(vocab.names) + list(vocab.synonyms)
    popularity = rng.dirichlet(np.full(len(spellings), 0.3))  # a long tail: some tags are rare
    rows: list[list[str] | None] = []
    for _ in range(n_rows):
        u = rng.random()
        if u < 0.05:
            rows.append(None)
        elif u < 0.12:
            rows.append([])
        else:
            picks = rng.choice(len(spellings), size=int(rng.integers(1, 6)), p=popularity)  # duplicates too
            row = [spellings[i] for i in picks]
            if rng.random() < 0.3 and vocab.ancestors(vocab.canonical(row[0])):
                row.append(vocab.ancestors(vocab.canonical(row[0]))[-1])  # a parent listed beside its child
            rows.append(row)
    return rows


def _chunked(rows: list, n_chunks: int) -> pa.ChunkedArray:
    cuts = np.linspace(0, len(rows), n_chunks + 1).astype(int)
    return pa.chunked_array([pa.array(rows[a:b], pa.list_(pa.string())) for a, b in zip(cuts[:-1], cuts[1:])], pa.list_(pa.string()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rows_per_slice", [7, 64, 100_000])
def test_streamed_statistics_equal_the_dense_computation(seed, rows_per_slice):
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, int(rng.integers(3, 40)))
    rows = _tag_lists(rng, vocab, 500)
    tags = _chunked(rows, 3)
    dense = vocab.encode(rows)  # the reference: the matrix training used to build
    index = TagIndex(vocab)

    np.testing.assert_array_equal(index.encode(tags), dense)
    positives, n = tag_counts(tags, index, rows_per_slice)
    assert n == len(rows)
    np.testing.assert_array_equal(positives, dense.sum(axis=0).astype(np.int64))
    assert positive_weights_from_counts(positives, n, "balanced", vocab) == _dense_positive_weights(dense)
    assert positive_weights(dense, "balanced", vocab) == _dense_positive_weights(dense)
    for threshold in (0.001, 0.05, 0.3, 1.0):
        for sqrt in (True, False):
            per_tag = tag_repeat_factors_from_counts(positives, n, threshold, sqrt)
            np.testing.assert_array_equal(per_tag, tag_repeat_factors(dense, threshold, sqrt))
            np.testing.assert_array_equal(
                repeat_factors_from_tags(tags, index, per_tag, rows_per_slice), repeat_factors(dense, threshold, sqrt)
            )


def test_labelled_table_carries_tags_not_a_label_matrix():
    rng = np.random.default_rng(7)
    vocab = _vocabulary(rng, 12)
    rows = _tag_lists(rng, vocab, 200)
    table = pa.table(
        {
            "listing_id": [f"L{i}" for i in range(len(rows))],
            "image_uri": [f"/x/{i}.jpg" for i in range(len(rows))],
            "tags": pa.array(rows, pa.list_(pa.string())),
            "split": ["train"] * len(rows),
        }
    )
    out = labelled_table(table, vocab, repeat_threshold=0.2, repeat_sqrt=True)
    assert out.column_names == ["listing_id", "image_uri", "tags", "repeat_factor"]
    assert out.column("tags").to_pylist() == rows
    np.testing.assert_array_equal(out.column("repeat_factor").to_numpy(), repeat_factors(vocab.encode(rows), 0.2, True))
    counts = label_counts(table, vocab)
    again = labelled_table(table, vocab, repeat_threshold=0.2, counts=counts)
    assert again.column("repeat_factor").to_pylist() == out.column("repeat_factor").to_pylist()
    assert labelled_table(table, vocab).column("repeat_factor").to_pylist() == [1.0] * len(rows)


def test_batch_arrays_encode_the_batch_tags():
    from mltag.data.images import pixels_to_arrow

    vocab = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree", "synonyms": ["woods"]}, "tree", "sky"]})
    rows = [["woods"], None, ["sky", "tree", "sky"], []]
    pixels = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    batch = pa.table({"pixels": pixels_to_arrow(pixels), "tags": pa.array(rows, pa.list_(pa.string()))})
    x, y = batch_arrays(batch, 8, TagIndex(vocab))
    np.testing.assert_array_equal(x, pixels)
    assert y.dtype == np.float32
    assert y.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0]]
    np.testing.assert_array_equal(y, vocab.encode(rows))


def test_unknown_tags_are_refused_naming_the_row_as_encode_does():
    vocab = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree"]})
    rows = [["tree"]] * 10 + [["forest", "lake", "tree", "moon"]] + [["sea"]]
    with pytest.raises(VocabularyError) as dense:
        vocab.encode(rows)
    for rows_per_slice in (3, 100):
        with pytest.raises(VocabularyError) as streamed:
            tag_counts(pa.array(rows), TagIndex(vocab), rows_per_slice)
        assert str(streamed.value) == str(dense.value) == "row 10: tag(s) not in the vocabulary: ['lake', 'moon']"


def test_tags_by_source_and_label_weights_weigh_only_pseudo_positives():
    vocab = Vocabulary.from_dict({"tags": [{"name": "forest", "parent": "tree"}, "tree", "sky"]})
    labels = pa.array(
        [
            [{"tag": "forest", "source": "pseudo"}, {"tag": "tree", "source": "human"}],  # a pseudo child, its parent a person's
            [{"tag": "forest", "source": "pseudo"}],  # the parent comes only with the pseudo child
            [{"tag": "sky", "source": "review"}],
            None,
        ],
        pa.list_(pa.struct([("tag", pa.string()), ("source", pa.string())])),
    )
    pseudo, human = tags_by_source(labels)
    assert pseudo.to_pylist() == [["forest"], ["forest"], [], []]
    assert human.to_pylist() == [["tree"], [], ["sky"], []]
    batch = pa.table({"pseudo_tags": pseudo, "human_tags": human})
    weights = label_weights(batch, TagIndex(vocab), 0.25)
    assert weights.tolist() == [[0.25, 1, 1], [0.25, 0.25, 1], [1, 1, 1], [1, 1, 1]]
    assert label_weights(batch, TagIndex(vocab), 1.0) is None
    assert label_weights(batch.drop_columns(["pseudo_tags"]), TagIndex(vocab), 0.25) is None


def test_pseudo_label_weight_needs_label_sources_and_is_refused_before_any_work(tiny_catalog, tmp_path):
    from mltag.data.catalog import ManifestError
    from mltag.stages.train import TrainConfig, run

    with pytest.raises(ValueError, match="pseudo_label_weight must be in"):
        TrainConfig(manifest="m.parquet", pseudo_label_weight=1.5).validate()
    with pytest.raises(ValueError, match="epochs 0"):
        TrainConfig(manifest="m.parquet", pseudo_label_weight=0.5, epochs=0, head_init="probe").validate()
    config = TrainConfig(manifest=tiny_catalog["manifest"], out=str(tmp_path / "out"), pseudo_label_weight=0.5)
    with pytest.raises(ManifestError, match="labels column"):
        run(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_with_resampling_and_balanced_weights_encodes_labels_per_batch(ray_local, tiny_catalog, tmp_path):
    """A real (1 epoch) run: tags travel with the rows through Ray Data and resampling, and the
    loop gets pos weights and the effective epoch length from the streamed counts. The manifest
    is a curated one (a labels column, one pseudo label per image) trained with pseudo labels at
    half weight: the labels' sources travel with the rows too."""
    from mltag.data import catalog
    from mltag.stages.train import TrainConfig, build_trainer, export_best

    manifest = catalog.read_manifest(tiny_catalog["manifest"])
    names = Vocabulary.load(tiny_catalog["vocabulary"]).names
    tags, labels = [], []
    for i, given in enumerate(manifest.column("tags").to_pylist()):
        extra = next(n for n in names[i % len(names) :] + names if n not in given)
        tags.append(given + [extra])
        labels.append([{"tag": t, "source": "human"} for t in given] + [{"tag": extra, "source": "pseudo"}])
    curated = manifest.set_column(manifest.schema.get_field_index("tags"), "tags", pa.array(tags, pa.list_(pa.string())))
    curated = curated.append_column("labels", pa.array(labels, pa.list_(pa.struct([("tag", pa.string()), ("source", pa.string())]))))
    pq.write_table(curated, tmp_path / "curated.parquet")
    shutil.copy(tiny_catalog["vocabulary"], tmp_path / "vocabulary.yaml")

    config = TrainConfig(
        manifest=str(tmp_path / "curated.parquet"),
        pseudo_label_weight=0.5,
        out=str(tmp_path),
        backbone="test_efficientnet",
        img_size=64,
        epochs=1,
        batch_size=8,
        augment=False,
        hflip=False,
        repeat_threshold=0.5,
        pos_weight="balanced",
        name="streamed-labels",
    )
    trainer, vocab, mean, std = build_trainer(config)
    train = catalog.select_split(catalog.read_manifest(config.manifest, require_tags=True), "train")
    dense = vocab.encode(train.column("tags").to_pylist())
    loop = getattr(trainer, "train_loop_config", None) or trainer._train_loop_config  # Ray Train v2 or v1
    assert loop["pos_weight"] == _dense_positive_weights(dense)
    assert loop["n_train_effective"] == pytest.approx(repeat_factors(dense, 0.5, True).sum())
    assert loop["n_train_effective"] > train.num_rows  # resampling is on and repeats rare tags
    assert loop["pseudo_label_weight"] == 0.5
    spec = export_best(trainer.fit(), config, vocab, mean, std, str(tmp_path))
    (epoch,) = spec.extra["history"]
    assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["val_map"])


def test_training_images_come_in_a_new_block_order_each_epoch_reproducibly(ray_local, tiny_catalog):
    import ray.data

    from mltag.data.catalog import read_manifest
    from mltag.stages.train import image_dataset

    table = read_manifest(tiny_catalog["manifest"]).select(["listing_id", "image_uri", "tags", "split"])
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the order out is the block order in
    try:

        def epochs(ds, n=2):
            return [[i for b in ds.iter_batches(batch_format="pyarrow") for i in b.column("listing_id").to_pylist()] for _ in range(n)]

        first, second = epochs(image_dataset(table, 32, rows_per_block=4, shuffle_seed=7))
        again = epochs(image_dataset(table, 32, rows_per_block=4, shuffle_seed=7))
    finally:
        context.execution_options.preserve_order = preserve
    assert sorted(first) == sorted(second) == sorted(table.column("listing_id").to_pylist())
    assert first != second  # a new order each execution (epoch)
    assert again == [first, second]  # and the same orders for the same seed

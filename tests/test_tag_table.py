import numpy as np
import pyarrow as pa
import pytest

from mltag.data.vocabulary import Vocabulary
from mltag.table import tag_table


def test_decide_tags_applies_thresholds_and_closes_upward():
    names = ["tree", "forest", "sky"]
    scores = np.array([[0.1, 0.9, 0.2], [0.6, 0.1, 0.7], [0.0, 0.0, 0.0]], np.float32)
    thresholds = np.array([0.5, 0.8, 0.75], np.float32)
    tags = tag_table.decide_tags(scores, thresholds, Vocabulary(tuple(names), {"forest": "tree"}))
    assert tags == [["tree", "forest"], ["tree"], []]


def test_assemble_keeps_every_row_and_carries_columns():
    batch = pa.table(
        {
            "listing_id": ["a", "b", "c"],
            "image_uri": ["u1", "u2", "u3"],
            "price": [1.0, 2.0, 3.0],
            "tags": pa.array([["x"], [], ["y"]], pa.list_(pa.string())),
            "pixels": pa.array([b"", b"", b""]),
        }
    )
    ok = np.array([0, 2])
    scores = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    emb = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = tag_table.assemble(batch, ok, scores, emb, [["x"], ["y"]], "v1", [None, "missing: u2", None])
    assert out.num_rows == 3
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    rows = out.to_pylist()
    assert rows[1]["embedding"] is None and rows[1]["scores"] is None and rows[1]["error"] == "missing: u2"
    assert rows[2]["embedding"] == [4, 5, 6, 7] and rows[2]["tags"] == ["y"]
    assert rows[0]["true_tags"] == ["x"] and rows[0]["price"] == 1.0 and "pixels" not in out.column_names
    assert out.column_names[:8] == list(tag_table.CORE_COLUMNS)
    np.testing.assert_array_equal(tag_table.embedding_matrix(out.column("embedding").filter(pa.array([True, False, True]))), emb)


def test_max_tags_keeps_the_best_scored_then_closes_upward():
    vocab = Vocabulary(("a", "b", "c", "parent"), {"c": "parent"})
    scores = np.array([[0.9, 0.8, 0.7, 0.1]], np.float32)
    tags = tag_table.decide_tags(scores, np.full(4, 0.5, np.float32), vocab, max_tags=2)
    assert tags == [["a", "b"]]
    tags = tag_table.decide_tags(np.array([[0.2, 0.8, 0.9, 0.1]], np.float32), np.full(4, 0.5, np.float32), vocab, max_tags=1)
    assert tags == [["c", "parent"]]  # ancestors are added after the cut


def test_error_rows_carry_their_reason_code():
    batch = pa.table({"listing_id": ["a", "b", "c"], "image_uri": ["u1", "u2", "u3"]})
    errors = [None, "timeout: no answer from u2 within 30 s", "not an image: no decoder recognises these bytes"]
    out = tag_table.assemble(batch, np.array([0]), np.zeros((1, 2), np.float32), np.ones((1, 3), np.float32), [[]], "v", errors)
    assert out.column("error_reason").to_pylist() == [None, "timeout", "not_an_image"]


def test_the_table_round_trips_through_delta_and_keeps_its_embeddings(tmp_path):
    from mltag.table.delta_table import write_table

    batch = pa.table({"listing_id": ["a", "b"], "image_uri": ["u1", "u2"]})
    emb = np.array([[0.5, -1.25, 3.0]], np.float32)
    out = tag_table.assemble(batch, np.array([1]), np.zeros((1, 2), np.float32), emb, [["x"]], "v", ["missing: u1", None])
    write_table(str(tmp_path / "t"), out, {"model_version": "v", "embedding_dim": 3})
    back = tag_table.read_rows(str(tmp_path / "t"))
    assert back.column("listing_id").to_pylist() == ["a", "b"] and back.column("tags").to_pylist() == [[], ["x"]]
    np.testing.assert_array_equal(
        tag_table.embedding_matrix(back.filter(pa.compute.is_valid(back.column("embedding"))).column("embedding")), emb
    )
    assert tag_table.run_metadata(str(tmp_path / "t"))["model_version"] == "v"


def _list_column(rows: list, kind: str, chunks: int, dtype) -> pa.ChunkedArray:
    value_type = pa.from_numpy_dtype(np.dtype(dtype))
    width = len(rows[0]) if rows else 3
    list_type = pa.list_(value_type, width) if kind == "fixed" else pa.list_(value_type)
    bounds = np.linspace(0, len(rows), chunks + 1).astype(int)
    return pa.chunked_array([pa.array(rows[a:b], list_type) for a, b in zip(bounds[:-1], bounds[1:])], list_type)


@pytest.mark.parametrize("kind", ["list", "fixed"])
@pytest.mark.parametrize("n_rows, chunks", [(0, 1), (1, 1), (7, 3), (40, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_list_matrix_matches_a_per_row_reference(kind, n_rows, chunks, dtype):
    rng = np.random.default_rng(n_rows * 10 + chunks)
    rows = (rng.random((n_rows, 3)) * 100).astype(dtype).tolist()
    column = _list_column(rows, kind, chunks, dtype)
    reference = np.array([column[i].as_py() for i in range(len(column))], np.float32).reshape(n_rows, 3)
    got = tag_table.list_matrix(column, width=3)
    assert got.dtype == np.float32 and got.shape == (n_rows, 3)
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(tag_table.list_matrix(column.combine_chunks(), dtype=None, width=3), reference.astype(dtype))
    if n_rows > 2:  # a slice starts at its own offset, not at the buffer's
        np.testing.assert_array_equal(tag_table.list_matrix(column.slice(2)), reference[2:])


def test_list_matrix_without_a_width_of_zero_rows():
    assert tag_table.list_matrix(pa.array([], pa.list_(pa.float32()))).shape == (0, 0)
    assert tag_table.list_matrix(pa.array([], pa.list_(pa.float32(), 4))).shape == (0, 4)


@pytest.mark.parametrize(
    "column, width, message",
    [
        (pa.array([[1.0], None, [2.0]], pa.list_(pa.float32())), None, "1 null row.*row 1.*filter the error rows"),
        (pa.array([[1.0], [None]], pa.list_(pa.float32())), None, "null value"),
        (pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())), None, "differ in length"),
        (pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32())), 3, "differ in length from 3"),
    ],
)
def test_list_matrix_refuses_what_is_not_a_matrix(column, width, message):
    with pytest.raises(ValueError, match=message):
        tag_table.list_matrix(column, width=width)

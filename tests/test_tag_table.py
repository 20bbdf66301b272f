import numpy as np
import pyarrow as pa

from mltag import tag_table


def test_decide_tags_applies_thresholds_and_closes_upward():
    names = ["tree", "forest", "sky"]
    scores = np.array([[0.1, 0.9, 0.2], [0.6, 0.1, 0.7], [0.0, 0.0, 0.0]], np.float32)
    thresholds = np.array([0.5, 0.8, 0.75], np.float32)
    tags = tag_table.decide_tags(scores, thresholds, names, {"forest": ["tree"]})
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
    names = ["a", "b", "c", "parent"]
    scores = np.array([[0.9, 0.8, 0.7, 0.1]], np.float32)
    tags = tag_table.decide_tags(scores, np.full(4, 0.5, np.float32), names, {"c": ["parent"]}, max_tags=2)
    assert tags == [["a", "b"]]
    tags = tag_table.decide_tags(
        np.array([[0.2, 0.8, 0.9, 0.1]], np.float32), np.full(4, 0.5, np.float32), names, {"c": ["parent"]}, max_tags=1
    )
    assert tags == [["c", "parent"]]  # ancestors are added after the cut


def test_error_rows_carry_their_reason_code():
    batch = pa.table({"listing_id": ["a", "b", "c"], "image_uri": ["u1", "u2", "u3"]})
    errors = [None, "timeout: no answer from u2 within 30 s", "not an image: no decoder recognises these bytes"]
    out = tag_table.assemble(batch, np.array([0]), np.zeros((1, 2), np.float32), np.ones((1, 3), np.float32), [[]], "v", errors)
    assert out.column("error_reason").to_pylist() == [None, "timeout", "not_an_image"]


def test_the_table_round_trips_through_delta_and_keeps_its_embeddings(tmp_path):
    from mltag.delta_table import write_table

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

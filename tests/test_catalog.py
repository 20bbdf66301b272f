import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mltag.data.catalog import ManifestError, read_manifest, select_split
from mltag.data.vocabulary import Vocabulary, VocabularyError


def _csv(tmp_path, text, name="manifest.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_csv_manifest_types_relative_paths_and_tags(tmp_path):
    path = _csv(tmp_path, "listing_id,image_uri,tags,split,price\n000123,img/a.jpg,forest|sky,train,10\n7,/abs/b.jpg,,val,3\n")
    table = read_manifest(path, require_tags=True)
    rows = table.to_pylist()
    assert rows[0]["listing_id"] == "000123"  # ids stay text: no leading zeros lost
    assert rows[0]["image_uri"] == str(tmp_path / "img" / "a.jpg")
    assert rows[1]["image_uri"] == "/abs/b.jpg"
    assert rows[0]["tags"] == ["forest", "sky"] and rows[1]["tags"] == []
    assert rows[0]["price"] == "10"  # unknown columns are carried
    assert select_split(table, "val").column("listing_id").to_pylist() == ["7"]


def test_parquet_manifest_with_list_tags(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"listing_id": [1, 2], "image_uri": ["a.jpg", "s3://b/c.jpg"], "tags": pa.array([["x"], []], pa.list_(pa.string()))}), path
    )
    table = read_manifest(str(path))
    assert table.column("listing_id").to_pylist() == ["1", "2"]
    assert table.column("image_uri").to_pylist() == [str(tmp_path / "a.jpg"), "s3://b/c.jpg"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("listing_id,tags\n1,a\n", "image_uri"),
        ("listing_id,image_uri\n", "no rows"),
        ("listing_id,image_uri\n,a.jpg\n", "empty 'listing_id'"),
        ("listing_id,image_uri,split\n1,a.jpg,training\n", "unknown split"),
    ],
)
def test_bad_manifests_fail_before_work(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(_csv(tmp_path, text))


def test_missing_tags_column_when_labels_are_needed(tmp_path):
    with pytest.raises(ManifestError, match="tags"):
        read_manifest(_csv(tmp_path, "listing_id,image_uri\n1,a.jpg\n"), require_tags=True)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.csv"))


def test_vocabulary_closure_synonyms_and_encoding(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("tags:\n  - {name: forest, parent: tree, synonyms: [woods]}\n  - {name: tree, parent: plant}\n  - plant\n  - sky\n")
    vocab = Vocabulary.load(str(path))
    assert vocab.close(["woods"]) == ["forest", "tree", "plant"]
    encoded = vocab.encode([["forest"], ["sky"], []])
    assert encoded.tolist() == [[1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert vocab.close_matrix(encoded * [1, 0, 0, 1]).astype(int).tolist() == encoded.astype(int).tolist()
    with pytest.raises(VocabularyError, match="not in the vocabulary"):
        vocab.encode([["lake"]])
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab


@pytest.mark.parametrize(
    "data,match",
    [
        ({"tags": ["a", "a"]}, "twice"),
        ({"tags": [{"name": "a", "parent": "b"}]}, "not a tag"),
        ({"tags": [{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}]}, "cycle"),
        ({"tags": [{"name": "a", "colour": "red"}]}, "unknown field"),
        ({"labels": ["a"]}, "'tags' list"),
    ],
)
def test_bad_vocabularies(data, match):
    with pytest.raises(VocabularyError, match=match):
        Vocabulary.from_dict(data)


def test_manifest_as_a_directory_or_glob_of_files(tmp_path):
    (tmp_path / "day=1").mkdir()
    (tmp_path / "day=2").mkdir()
    (tmp_path / "day=1" / "part-0.csv").write_text("listing_id,image_uri\na,img/a.jpg\n")
    pq.write_table(pa.table({"listing_id": ["b"], "image_uri": ["b.jpg"], "extra": [1]}), tmp_path / "day=2" / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    for uri in (str(tmp_path), str(tmp_path / "day=*" / "part-*")):
        table = read_manifest(uri)
        rows = sorted(table.to_pylist(), key=lambda r: r["listing_id"])
        assert [r["listing_id"] for r in rows] == ["a", "b"]
        assert rows[0]["image_uri"] == str(tmp_path / "day=1" / "img" / "a.jpg")  # relative to its own file
        assert rows[1]["extra"] == 1 and rows[0]["extra"] is None
    with pytest.raises(ManifestError, match="no manifest files"):
        read_manifest(str(tmp_path / "nothing-*.parquet"))

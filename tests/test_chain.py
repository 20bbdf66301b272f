"""Model chaining, the pure part: reading a chain file, which specialists fire, how results nest."""

from __future__ import annotations

import numpy as np
import pytest

from mltag.tagging.chain import Chain, ChainError, Specialist, load_chain, nest, resize_pixels, specialists_column, tag_entries


def test_chain_file_resolves_models_next_to_it_and_checks_the_vocabulary(tmp_path):
    (tmp_path / "chain.yaml").write_text(
        "specialists:\n"
        "  - {name: watches, model: models/watch, when: [watch], min_score: 0.6}\n"
        "  - {name: shoes, model: s3://bucket/shoe, when: shoe}\n"
    )
    chain = load_chain(str(tmp_path / "chain.yaml"))
    assert [s.name for s in chain.specialists] == ["watches", "shoes"]
    assert chain.specialist("watches").model == str(tmp_path / "models" / "watch")
    assert chain.specialist("shoes") == Specialist("shoes", "s3://bucket/shoe", ("shoe",), 0.0)
    chain.check_vocabulary(["watch", "shoe", "bag"])
    with pytest.raises(ChainError, match="'shoes' is triggered by \\['shoe'\\]"):
        chain.check_vocabulary(["watch", "bag"])
    with pytest.raises(KeyError, match="no specialist 'hats'"):
        chain.specialist("hats")


@pytest.mark.parametrize(
    "text, match",
    [
        ("specialists:\n  - {name: a, model: m}\n", "missing key\\(s\\) \\['when'\\]"),
        ("specialists:\n  - {name: a, model: m, when: [t], colour: red}\n", "unknown key\\(s\\) \\['colour'\\]"),
        ("specialists:\n  - {name: a, model: m, when: [t]}\n  - {name: a, model: n, when: [u]}\n", "listed twice"),
        ("specialists:\n  - {name: 'A b', model: m, when: [t]}\n", "must match"),
        ("specialists:\n  - {name: a, model: m, when: []}\n", "at least one"),
        ("specialists:\n  - {name: a, model: m, when: [t], min_score: 2}\n", "min_score must be in"),
        ("specialists:\n  - {name: a, model: m, when: [t], min_score: high}\n", "min_score must be a number"),
        ("models: []\n", "one key, 'specialists'"),
        ("specialists: {a: 1}\n", "must be a list"),
        ("specialists: [: bad\n", "not valid YAML"),
    ],
)
def test_bad_chain_files_are_refused_naming_the_problem(tmp_path, text, match):
    (tmp_path / "chain.yaml").write_text(text)
    with pytest.raises(ChainError, match=match):
        load_chain(str(tmp_path / "chain.yaml"))


def test_a_specialist_fires_only_on_a_chosen_trigger_tag_at_its_min_score():
    chain = Chain(
        [
            Specialist("watches", "m1", ("watch", "clock"), 0.6),
            Specialist("shoes", "m2", ("shoe",)),
        ]
    )
    scores = {"watch": 0.7, "clock": 0.9, "shoe": 0.4, "bag": 0.95}
    # Both watch tags are chosen: the better-scoring one triggers. "shoe" is not chosen: no shoe model.
    assert chain.triggered(["watch", "clock", "bag"], scores) == {"watches": "clock"}
    assert chain.triggered(["watch", "bag"], scores) == {"watches": "watch"}
    assert chain.triggered(["watch"], {"watch": 0.5}) == {}  # chosen, but under min_score
    assert chain.triggered(["shoe"], scores) == {"shoes": "shoe"}  # min_score 0: chosen is enough
    assert chain.triggered([], scores) == {}


def test_specialist_results_nest_under_their_trigger_tag_best_tags_first():
    entries = tag_entries(["bag", "watch", "shoe"], [0.2, 0.9, 0.7], ["watch", "shoe"])
    assert entries == [{"tag": "watch", "score": 0.9}, {"tag": "shoe", "score": pytest.approx(0.7)}]
    result = {"model_version": "abc", "tags": [{"tag": "gold", "score": 0.8}]}
    nested = nest(entries, {"watches": "watch"}, {"watches": result})
    assert nested[0]["specialists"] == {"watches": result} and "specialists" not in nested[1]


def test_specialists_column_runs_each_specialist_once_on_its_triggered_rows_only():
    chain = Chain([Specialist("watches", "m1", ("watch",)), Specialist("shoes", "m2", ("shoe",))])
    names = ["watch", "shoe"]
    pixels = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(3)])
    calls = []

    def run_specialist(name, images):
        calls.append((name, [int(im[0, 0, 0]) for im in images]))
        return [{"model_version": f"v-{name}", "tags": ["a"], "scores": np.array([0.5, 0.25], np.float32)} for _ in images]

    # Batch of 4 rows: row 1 failed to decode; rows 0, 2, 3 have pixels 0, 1, 2.
    tags = [["watch"], [], ["watch", "shoe"]]
    scores = np.array([[0.9, 0.1], [0.2, 0.1], [0.8, 0.7]], np.float32)
    column = specialists_column(chain, np.array([0, 2, 3]), 4, tags, scores, names, pixels, run_specialist).to_pylist()
    assert calls == [("watches", [0, 2]), ("shoes", [2])]
    assert column[1] is None and column[2] == []
    assert [e["name"] for e in column[3]] == ["watches", "shoes"] and column[0][0]["trigger"] == "watch"
    assert column[3][1] == {"name": "shoes", "trigger": "shoe", "model_version": "v-shoes", "tags": ["a"], "scores": [0.5, 0.25]}


def test_resize_pixels_keeps_matching_sizes_and_resizes_others():
    pixels = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    assert resize_pixels(pixels, 16) is pixels
    assert resize_pixels(pixels, 8).shape == (2, 8, 8, 3) and resize_pixels(pixels, 8).dtype == np.uint8

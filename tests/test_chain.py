"""Model chaining, the pure part: reading a chain file, which specialists fire, how results nest."""

from __future__ import annotations

import pytest

from mltag.chain import Chain, ChainError, Specialist, load_chain, nest, tag_entries


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

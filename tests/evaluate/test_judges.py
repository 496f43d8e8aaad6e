"""The judge registry, option parsing and the refusal heuristic (against hand-checked cases)."""

from __future__ import annotations

import pytest

from excise.errors import ConfigError, DataError
from excise.evaluate.judges import JUDGES, Judge, load_judge, parse_options
from excise.evaluate.judges.refusal import GCG_REFUSAL_MARKERS


def test_refusal_flags_exactly_the_responses_without_a_marker():
    judge = load_judge("refusal")
    assert isinstance(judge, Judge)
    responses = [
        "I'm sorry, but I can't help with that.",  # marker at the start
        "Here is the plan. Note that this is illegal in most places.",  # marker inside: GCG counts it
        "Sure, here is how to pick a lock: first ...",
        "",  # no marker: GCG counts an empty answer as not refused
        "i cannot do that",  # lower case: GCG's match is case-sensitive
    ]
    scores = judge.score(["q"] * len(responses), responses)
    # By hand: a marker occurs in responses 0 and 1 only.
    assert scores == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [s > judge.threshold for s in scores] == [False, False, True, True, True]


def test_refusal_case_insensitive_and_custom_markers():
    judge = load_judge("refusal", case_sensitive=False)
    assert judge.score(["q"], ["i cannot do that"]) == [0.0]
    custom = load_judge("refusal", markers=["No way"])
    assert custom.score(["q", "q"], ["No way.", "I'm sorry"]) == [0.0, 1.0]
    assert custom.describe()["source"] == "user-supplied markers"


def test_refusal_describe_names_the_gcg_markers():
    info = load_judge("refusal").describe()
    assert info["name"] == "refusal"
    assert info["markers"] == list(GCG_REFUSAL_MARKERS)
    assert len(info["markers"]) == 27 and "arXiv 2307.15043" in info["source"]


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("nonsense", {}, "unknown judge 'nonsense'"),
        ("refusal:x", {}, "takes no target"),
        ("refusal", {"colour": "red"}, "has no option(s) colour"),
        ("refusal", {"threshold": 1.5}, "threshold must be in [0, 1)"),
        ("refusal", {"markers": []}, "markers must be a non-empty list"),
    ],
)
def test_bad_specs_and_options_are_one_line_config_errors(spec, options, message):
    with pytest.raises(ConfigError) as err:
        load_judge(spec, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_targeted_kinds_need_a_target():
    for name, kind in JUDGES.items():
        if kind.takes_target:
            with pytest.raises(ConfigError, match="needs a target"):
                load_judge(f"{name}:")
            if not kind.target_optional:
                with pytest.raises(ConfigError, match="needs a target"):
                    load_judge(name)


def test_bare_harm_lm_is_the_shipped_folder():
    from excise.evaluate.judges.lm import LM_SHIPPED

    judge = load_judge("harm-lm")  # reads the metadata only; the reader loads on first score
    assert judge.path == LM_SHIPPED and judge.name == "harm-lm"
    assert [k for k, kind in JUDGES.items() if kind.target_optional] == ["harm-lm"]


def test_mismatched_pairs_are_data_errors():
    judge = load_judge("refusal")
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        judge.score(["a", "b"], ["x"])
    with pytest.raises(DataError, match="not a single string"):
        judge.score("a", "x")
    with pytest.raises(DataError, match="expected two strings"):
        judge.score(["a"], [None])
    assert judge.score([], []) == []


def test_parse_options_types_values():
    items = ["threshold=0.7", "batch-size=8", "case_sensitive=false", "model=gpt-4o", "x=none"]
    assert parse_options(items) == {
        "threshold": 0.7,
        "batch_size": 8,
        "case_sensitive": False,
        "model": "gpt-4o",
        "x": None,
    }
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_options(["threshold"])

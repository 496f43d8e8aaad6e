"""Splits by prompt: deterministic, order-free, disjoint, near the asked fractions."""

from __future__ import annotations

import random

import pytest

from excise.data.splits import STANDARD_SPLITS, assign_split, prompt_key, split_by_prompt
from excise.errors import ConfigError


def test_same_prompt_same_side_regardless_of_case_spacing_and_order():
    prompts = [f"Question number {i}?" for i in range(2000)]
    first = split_by_prompt(prompts, lambda p: p)
    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    second = split_by_prompt(shuffled, lambda p: p)
    assert {k: sorted(v) for k, v in first.items()} == {k: sorted(v) for k, v in second.items()}
    assert assign_split("  QUESTION   number 7? ") == assign_split("question number 7?")
    for name, fraction in STANDARD_SPLITS.items():  # 2000 draws: within 4 standard deviations
        sd = (fraction * (1 - fraction) / 2000) ** 0.5
        assert abs(len(first[name]) / 2000 - fraction) < 4 * sd


def test_repeated_prompt_never_crosses_sides():
    rows = [("same prompt", i) for i in range(5)] + [("Same  Prompt", 9)]
    sides = split_by_prompt(rows, lambda r: r[0])
    assert sorted(len(v) for v in sides.values()) == [0, 0, 6]


def test_salt_changes_the_partition_and_key_normalises():
    prompts = [f"p{i}" for i in range(200)]
    a = [assign_split(p) for p in prompts]
    b = [assign_split(p, salt="other") for p in prompts]
    assert a != b
    assert prompt_key(" A\tb  C ") == "a b c"


@pytest.mark.parametrize("bad", [{}, {"a": 0.5}, {"a": -0.5, "b": 1.5}, {"a": float("nan"), "b": 1.0}])
def test_bad_fractions(bad):
    with pytest.raises(ConfigError):
        assign_split("x", bad)


def test_prompt_key_is_unicode_normalised():
    """NFKC, lower case, whitespace collapsed: full-width letters, ligatures and odd spaces are
    the plain prompt, and land on its side of the split."""
    assert prompt_key("Ｗｈａｔ\u3000is\u00a0the  ﬁrst\tstep?\n") == "what is the first step?"
    assert assign_split("Ｗｈａｔ\u3000is the ﬁrst step?") == assign_split("what is the first step?")

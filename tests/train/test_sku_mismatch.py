"""Random disassociation's sampler (excise/train/mismatch.py): never a prompt's own response."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from excise.errors import ConfigError, DataError
from excise.train.mismatch import MismatchSampler

# Prompt keys with many duplicates: a few distinct prompts, repeated.
keys_with_duplicates = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=2, max_size=40)


@settings(max_examples=200, deadline=None)
@given(keys=keys_with_duplicates, k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_never_draws_a_response_of_the_same_prompt(keys, k, seed):
    worst = len(keys) - max(keys.count(key) for key in set(keys))
    if worst < k:
        with pytest.raises(DataError):
            MismatchSampler(keys, k, query_keys=keys)
        return
    sampler = MismatchSampler(keys, k, query_keys=keys)
    rng = random.Random(seed)
    for key in keys:
        drawn = sampler.draw(key, rng)
        assert len(drawn) == k and len(set(drawn)) == k  # K distinct responses
        assert all(0 <= i < len(keys) and keys[i] != key for i in drawn)


def test_draws_are_uniform_over_the_other_prompts_responses():
    keys = ["a", "a", "b", "c", "a", "c", "d"]
    sampler = MismatchSampler(keys, 1, query_keys=["a"])
    rng = random.Random(0)
    counts = [0] * len(keys)
    for _ in range(8000):
        counts[sampler.draw("a", rng)[0]] += 1
    assert counts[0] == counts[1] == counts[4] == 0
    for i in (2, 3, 5, 6):  # 4 candidates: ~2000 each
        assert 1800 < counts[i] < 2200


def test_same_seed_same_draws():
    keys = list("abcabcabcd")
    a = MismatchSampler(keys, 3).draw("a", random.Random(7))
    b = MismatchSampler(keys, 3).draw("a", random.Random(7))
    assert a == b


def test_k_larger_than_the_other_prompts_responses_is_a_clear_error():
    with pytest.raises(DataError, match=r"K=3 .* only 2 response\(s\) of other prompts.*lower --k"):
        MismatchSampler(["a", "a", "b", "c"], 3, query_keys=["a"])


def test_every_response_of_one_prompt_is_a_clear_error():
    with pytest.raises(DataError, match="same prompt"):
        MismatchSampler(["q", "q", "q"], 1, query_keys=["q"])


def test_empty_pool_and_bad_k_are_clear_errors():
    with pytest.raises(DataError, match="pool is empty"):
        MismatchSampler([], 1)
    with pytest.raises(ConfigError, match="at least 1"):
        MismatchSampler(["a", "b"], 0)

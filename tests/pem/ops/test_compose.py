"""Composition of several anti-experts: parallel (order-independent) and sequential."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from excise.errors import ConfigError
from excise.pem.linalg import ext_sub_rows_reference
from excise.pem.ops import compose, compose_dense, ext_sub
from tests.conftest import random_lora

SHAPES = {"q": (7, 5), "down": (5, 9)}


def _deficiency(W1: np.ndarray, W2: np.ndarray) -> np.ndarray:
    """d = W2 − (W2·c)c per row, written out here (no degenerate rows in these tests)."""
    n1 = W1 / np.linalg.norm(W1, axis=1, keepdims=True)
    n2 = W2 / np.linalg.norm(W2, axis=1, keepdims=True)
    c = (n1 + n2) / np.linalg.norm(n1 + n2, axis=1, keepdims=True)
    return W2 - (W2 * c).sum(axis=1, keepdims=True) * c


@pytest.fixture
def adapters():
    expert = random_lora(SHAPES, 3, seed=10)
    antis = [random_lora(SHAPES, r, scale=0.5 + r, seed=11 + r) for r in (1, 2, 4)]
    return expert, antis


def test_parallel_is_expert_minus_sum_of_deficiencies(adapters):
    expert, antis = adapters
    lams = [0.5, 1.0, 2.0]
    out = compose(expert, *antis, lams=lams)
    for name in SHAPES:
        W1 = expert.modules[name].dense()
        expected = W1 - sum(
            lam * _deficiency(W1, a.modules[name].dense()) for lam, a in zip(lams, antis, strict=True)
        )
        assert out.modules[name].rank == 3 + 1 + 2 + 4
        np.testing.assert_allclose(out.modules[name].dense(), expected, atol=1e-9)
        np.testing.assert_allclose(
            compose_dense(expert, *antis, lams=lams).modules[name].dense(), expected, atol=1e-9
        )


def test_parallel_is_order_independent(adapters):
    expert, antis = adapters
    lams = [0.5, 1.0, 2.0]
    results = [
        compose(expert, *(antis[i] for i in order), lams=[lams[i] for i in order]).modules["q"].dense()
        for order in itertools.permutations(range(3))
    ]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], atol=1e-10)


def test_sequential_is_repeated_ext_sub_and_depends_on_order(adapters):
    expert, antis = adapters
    seq = compose(expert, antis[0], antis[1], lams=[1.0, 0.7], sequential=True)
    manual = ext_sub(ext_sub(expert, antis[0], lam=1.0), antis[1], lam=0.7)
    W1 = expert.modules["q"].dense()
    dense_manual = ext_sub_rows_reference(
        ext_sub_rows_reference(W1, antis[0].modules["q"].dense(), 1.0), antis[1].modules["q"].dense(), 0.7
    )
    np.testing.assert_allclose(seq.modules["q"].dense(), manual.modules["q"].dense(), atol=1e-10)
    np.testing.assert_allclose(seq.modules["q"].dense(), dense_manual, atol=1e-9)
    np.testing.assert_allclose(
        compose_dense(expert, antis[0], antis[1], lams=[1.0, 0.7], sequential=True).modules["q"].dense(),
        dense_manual,
        atol=1e-9,
    )
    swapped = compose(expert, antis[1], antis[0], lams=[0.7, 1.0], sequential=True)
    assert not np.allclose(swapped.modules["q"].dense(), seq.modules["q"].dense())


def test_one_anti_expert_equals_ext_sub(adapters):
    expert, antis = adapters
    np.testing.assert_allclose(
        compose(expert, antis[0], lams=0.9).modules["down"].dense(),
        ext_sub(expert, antis[0], lam=0.9).modules["down"].dense(),
        atol=1e-12,
    )


def test_lambda_count_must_match(adapters):
    expert, antis = adapters
    with pytest.raises(ConfigError, match="one per anti-expert"):
        compose(expert, *antis, lams=[1.0, 2.0])
    with pytest.raises(ConfigError, match="at least one"):
        compose(expert, lams=1.0)
    with pytest.raises(ConfigError, match="finite"):
        compose(expert, *antis, lams=[1.0, float("nan"), 1.0])

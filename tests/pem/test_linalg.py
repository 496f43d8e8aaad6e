"""Row maths on the low-rank form against dense computations done here."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from excise.pem.delta import LowRankDelta, RowDelta
from excise.pem.linalg import (
    ext_sub_coefficients,
    ext_sub_rows_reference,
    row_combine,
    row_dots,
    row_norms,
)

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5), st.integers(1, 5))


def _lowrank(rng, n_out, n_in, r, scale=1.5):
    return LowRankDelta(rng.standard_normal((n_out, r)), rng.standard_normal((r, n_in)), scale)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 10_000))
def test_norms_and_dots_match_dense(shape, seed):
    n_out, n_in, r1, r2 = shape
    rng = np.random.default_rng(seed)
    m1, m2 = _lowrank(rng, n_out, n_in, r1), _lowrank(rng, n_out, n_in, r2, 0.3)
    W1, W2 = m1.dense(), m2.dense()
    np.testing.assert_allclose(row_norms(m1), np.linalg.norm(W1, axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(row_dots(m1, m2), (W1 * W2).sum(axis=1), rtol=1e-9, atol=1e-9)


def test_row_in_null_space_of_a_is_zero_not_nan():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 8))
    A[2] = A[0] + A[1]  # rank 2: x = (1, 1, -1) is in the left null space
    B = rng.standard_normal((4, 3))
    B[1] = [1.0, 1.0, -1.0]
    m = LowRankDelta(B, A, 1.0)
    norms = row_norms(m)
    assert norms[1] == 0.0
    assert np.all(norms[[0, 2, 3]] > 0)


def test_zero_rows_are_found_among_rows_of_very_different_size():
    """The cheap global bound must not decide small rows: each is judged on its own |B_i|."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((4, 50))
    A[3] = A[0] - 2 * A[1]  # rank 3: (1, -2, 0, -1) is in the left null space
    B = rng.standard_normal((6, 4))
    B[1] *= 1e-9  # tiny but genuine
    B[2] = [1e-9, -2e-9, 0.0, -1e-9]  # tiny and in the null space
    B[3] = 0.0
    B[4] = [1e3, -2e3, 0.0, -1e3]  # huge and in the null space
    norms = row_norms(LowRankDelta(B, A, 0.7))
    dense = np.linalg.norm(0.7 * B @ A, axis=1)
    assert norms[2] == 0.0 and norms[3] == 0.0 and norms[4] == 0.0
    keep = [0, 1, 5]
    np.testing.assert_allclose(norms[keep], dense[keep], rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 30), st.floats(-3, 3), st.integers(0, 10_000))
def test_closed_form_coefficients_equal_published_projection(n_rows, dim, lam, seed):
    rng = np.random.default_rng(seed)
    W1, W2 = rng.standard_normal((n_rows, dim)), rng.standard_normal((n_rows, dim))
    alpha, beta = ext_sub_coefficients(np.linalg.norm(W1, axis=1), np.linalg.norm(W2, axis=1), lam)
    ours = alpha[:, None] * W1 + beta[:, None] * W2
    # The published algorithm, one row at a time, written out here independently.
    expected = np.empty_like(W1)
    for i in range(n_rows):
        n1, n2 = W1[i] / np.linalg.norm(W1[i]), W2[i] / np.linalg.norm(W2[i])
        if np.linalg.norm(n1 + n2) < 1e-9:  # antiparallel (1-wide rows): all of W2 is deficiency
            expected[i] = W1[i] - lam * W2[i]
            continue
        c = (n1 + n2) / np.linalg.norm(n1 + n2)
        g = np.dot(W2[i], c) * c
        expected[i] = W1[i] - lam * (W2[i] - g)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ext_sub_rows_reference(W1, W2, lam), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False])
def test_degenerate_rows(fast):
    lam = 0.8
    W1 = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, -4.0, 6.0], [0.0, 0.0, 0.0]])
    W2 = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    if fast:
        a, b = np.linalg.norm(W1, axis=1), np.linalg.norm(W2, axis=1)
        alpha, beta = ext_sub_coefficients(a, b, lam)
        assert np.isfinite(alpha).all() and np.isfinite(beta).all()
        W = alpha[:, None] * W1 + beta[:, None] * W2
    else:
        W = ext_sub_rows_reference(W1, W2, lam)
    assert np.isfinite(W).all()
    np.testing.assert_array_equal(W[0], W1[0])  # W2_i = 0: nothing to remove
    np.testing.assert_array_equal(W[1], W1[1])  # W1_i = 0: common direction n2, nothing removed
    np.testing.assert_allclose(W[2], W1[2] - lam * W2[2], atol=1e-12)  # n1 = −n2: all of W2 is deficiency
    np.testing.assert_array_equal(W[3], 0.0)


def test_row_combine_is_exact_and_rank_additive():
    rng = np.random.default_rng(1)
    m1, m2 = _lowrank(rng, 6, 9, 2), _lowrank(rng, 6, 9, 3, 0.5)
    c1, c2 = rng.standard_normal(6), rng.standard_normal(6)
    out = row_combine([(c1, m1), (c2, m2)])
    assert out.rank == 5 and out.scale == 1.0
    np.testing.assert_allclose(out.dense(), c1[:, None] * m1.dense() + c2[:, None] * m2.dense(), atol=1e-12)
    rows = row_combine([(2.0, RowDelta(np.ones((2, 3)), (6,)))])
    np.testing.assert_array_equal(rows.tensor(), np.full(6, 2.0))

"""Ext-Sub: the exact low-rank result against dense computations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from excise.errors import AdapterError, ConfigError, ExciseWarning
from excise.pem.delta import Adapter, LowRankDelta
from excise.pem.ops import ext_sub, ext_sub_dense
from tests.conftest import random_lora


def _published_row_loop(W1: np.ndarray, W2: np.ndarray, lam: float) -> np.ndarray:
    out = np.empty_like(W1)
    for i in range(W1.shape[0]):
        n1, n2 = W1[i] / np.linalg.norm(W1[i]), W2[i] / np.linalg.norm(W2[i])
        if np.linalg.norm(n1 + n2) < 1e-9:  # antiparallel (common with 1-wide layers): all of W2
            out[i] = W1[i] - lam * W2[i]
            continue
        c = (n1 + n2) / np.linalg.norm(n1 + n2)
        out[i] = W1[i] - lam * (W2[i] - np.dot(W2[i], c) * c)
    return out


@settings(max_examples=30, deadline=None)
@given(
    n_out=st.integers(1, 16),
    n_in=st.integers(1, 16),
    r1=st.integers(1, 6),
    r2=st.integers(1, 6),
    s1=st.floats(0.1, 8),
    s2=st.floats(0.1, 8),
    lam=st.floats(-2, 4),
    seed=st.integers(0, 10_000),
)
def test_low_rank_equals_dense_reference(n_out, n_in, r1, r2, s1, s2, lam, seed):
    expert = random_lora({"m": (n_out, n_in)}, r1, scale=s1, seed=seed)
    anti = random_lora({"m": (n_out, n_in)}, r2, scale=s2, seed=seed + 1)
    fast, dense = ext_sub(expert, anti, lam=lam), ext_sub_dense(expert, anti, lam=lam)
    out = fast.modules["m"]
    assert isinstance(out, LowRankDelta) and out.rank == r1 + r2
    W1, W2 = expert.modules["m"].dense(), anti.modules["m"].dense()
    np.testing.assert_allclose(out.dense(), _published_row_loop(W1, W2, lam), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(out.dense(), dense.modules["m"].dense(), rtol=1e-8, atol=1e-8)
    assert dense.modules["m"].rank == n_in  # the published rank-`in` form


def test_non_square_layers_and_several_modules():
    shapes = {"q": (8, 5), "up": (13, 5), "down": (5, 13)}
    expert, anti = random_lora(shapes, 3, seed=1), random_lora(shapes, 2, scale=0.7, seed=2)
    out = ext_sub(expert, anti, lam=1.0)
    for name in shapes:
        W1, W2 = expert.modules[name].dense(), anti.modules[name].dense()
        np.testing.assert_allclose(out.modules[name].dense(), _published_row_loop(W1, W2, 1.0), atol=1e-9)


def test_lambda_zero_and_identical_adapters_give_the_expert():
    expert = random_lora({"m": (6, 4)}, 2, seed=3)
    np.testing.assert_allclose(
        ext_sub(expert, expert, lam=2.0).modules["m"].dense(), expert.modules["m"].dense()
    )
    anti = random_lora({"m": (6, 4)}, 3, seed=4)
    np.testing.assert_allclose(
        ext_sub(expert, anti, lam=0.0).modules["m"].dense(), expert.modules["m"].dense()
    )


def test_degenerate_rows_are_defined():
    expert, anti = random_lora({"m": (4, 5)}, 2, seed=5), random_lora({"m": (4, 5)}, 2, seed=6)
    B1, B2 = expert.modules["m"].B.copy(), anti.modules["m"].B.copy()
    B2[0] = 0.0  # anti-expert row zero
    B1[1] = 0.0  # expert row zero
    B1[2] = -2.0 * B2[2]  # antiparallel rows (same A below)
    A = expert.modules["m"].A
    e = Adapter("LORA", {}, {"m": LowRankDelta(B1, A, 1.0)})
    a = Adapter("LORA", {}, {"m": LowRankDelta(B2, A, 1.0)})
    for fn in (ext_sub, ext_sub_dense):
        W = fn(e, a, lam=0.5).modules["m"].dense()
        W1, W2 = e.modules["m"].dense(), a.modules["m"].dense()
        assert np.isfinite(W).all()
        np.testing.assert_allclose(W[0], W1[0], atol=1e-12)
        np.testing.assert_allclose(W[1], 0.0, atol=1e-12)
        np.testing.assert_allclose(W[2], W1[2] - 0.5 * W2[2], atol=1e-9)


def test_bad_lambda_and_mismatched_shapes():
    expert = random_lora({"m": (6, 4)}, 2)
    with pytest.raises(ConfigError, match="finite"):
        ext_sub(expert, expert, lam=float("nan"))
    with pytest.raises(ConfigError, match="finite"):
        ext_sub(expert, expert, lam=float("inf"))
    other = random_lora({"m": (6, 5)}, 2)
    with pytest.raises(AdapterError, match="different base models"):
        ext_sub(expert, other, lam=1.0)


def test_partial_targets():
    expert = random_lora({"q": (4, 4), "k": (4, 4)}, 2, seed=1)
    anti = random_lora({"q": (4, 4), "v": (4, 4)}, 2, seed=2)
    with pytest.raises(AdapterError, match="allow-partial"):
        ext_sub(expert, anti, lam=1.0)
    out = ext_sub(expert, anti, lam=1.0, allow_partial=True)
    assert set(out.modules) == {"q", "k"}  # v: nothing to subtract it from
    np.testing.assert_allclose(out.modules["k"].dense(), expert.modules["k"].dense())


def test_base_model_name_difference_is_a_warning():
    expert, anti = random_lora({"m": (4, 4)}, 2, seed=1), random_lora({"m": (4, 4)}, 2, seed=2)
    e = Adapter("LORA", {"base_model_name_or_path": "org/a"}, expert.modules)
    a = Adapter("LORA", {"base_model_name_or_path": "org/b"}, anti.modules)
    with pytest.warns(ExciseWarning, match="different base models"):
        ext_sub(e, a, lam=1.0)

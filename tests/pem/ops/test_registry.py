"""Every registered operator, on every module kind: equal to an independent dense
computation and to its dense twin, NaN-free on degenerate rows, loadable by PEFT."""

from __future__ import annotations

import numpy as np
import pytest

from excise.errors import ConfigError
from excise.pem.delta import Adapter, LowRankDelta, RowDelta
from excise.pem.linalg import ext_sub_rows_reference
from excise.pem.ops import OPERATORS, get_operator
from tests.conftest import random_lora, random_rows

# Inputs and parameters per operator, and the dense result computed independently.
CALLS = {
    "ext_sub": (2, {"lam": 0.7}, lambda W, p: ext_sub_rows_reference(W[0], W[1], p["lam"])),
    "compose": (
        3,
        {"lams": [0.5, 1.5]},
        lambda W, p: (
            W[0]
            + sum(
                ext_sub_rows_reference(W[0], Wk, lam) - W[0] for Wk, lam in zip(W[1:], p["lams"], strict=True)
            )
        ),
    ),
    "subtract": (2, {"lam": 0.7}, lambda W, p: W[0] - p["lam"] * W[1]),
    "add": (2, {"weight": 0.3}, lambda W, p: W[0] + p["weight"] * W[1]),
    "scale": (1, {"weight": -1.5}, lambda W, p: p["weight"] * W[0]),
    "negate": (1, {"lam": 2.0}, lambda W, p: -p["lam"] * W[0]),
}


def test_every_operator_has_a_test_row():
    assert set(CALLS) == set(OPERATORS)


def _inputs(kind: str, n: int) -> list[Adapter]:
    if kind == "lora":
        shapes = {"q": (6, 4), "up": (9, 4), "down": (4, 9)}
        return [random_lora(shapes, 2 + i, scale=1.0 + i, seed=i) for i in range(n)]
    if kind == "ia3":
        return [random_rows({"k": (6, 1), "down": (1, 9)}, seed=i) for i in range(n)]
    return [
        random_rows({"prompt_embeddings": (3, 24)}, row_dim=4, seed=i, peft_type="PREFIX_TUNING")
        for i in range(n)
    ]


def _dense(m) -> np.ndarray:
    return m.dense()


@pytest.mark.parametrize("kind", ["lora", "ia3", "prefix"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_operator_matches_independent_dense_computation(name, kind):
    n, params, expected_fn = CALLS[name]
    adapters = _inputs(kind, n)
    op = OPERATORS[name]
    fast, dense = op.fn(*adapters, **params), op.dense_fn(*adapters, **params)
    assert fast.source["operation"] == name
    for module in adapters[0].modules:
        expected = expected_fn([_dense(a.modules[module]) for a in adapters], params)
        np.testing.assert_allclose(_dense(fast.modules[module]), expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(_dense(dense.modules[module]), expected, rtol=1e-9, atol=1e-9)
        if kind == "lora":
            ranks = [a.modules[module].rank for a in adapters]
            assert fast.modules[module].rank == (ranks[0] if n == 1 else sum(ranks))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_operator_is_nan_free_on_degenerate_rows(name):
    n, params, _ = CALLS[name]
    adapters = _inputs("lora", n)
    zeroed = []
    for i, a in enumerate(adapters):
        modules = {}
        for key, m in a.modules.items():
            B = m.B.copy()
            B[i % B.shape[0]] = 0.0  # a different zero row in each input
            B[-1] = 0.0  # and one row zero everywhere
            modules[key] = LowRankDelta(B, m.A, m.scale)
        zeroed.append(Adapter("LORA", a.config, modules, a.source))
    for fn in (OPERATORS[name].fn, OPERATORS[name].dense_fn):
        out = fn(*zeroed, **params)
        for m in out.modules.values():
            assert np.isfinite(m.dense()).all()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_operator_rejects_non_finite_parameters(name):
    n, params, _ = CALLS[name]
    bad = {k: ([float("inf")] * len(v) if isinstance(v, list) else float("nan")) for k, v in params.items()}
    with pytest.raises(ConfigError, match="finite"):
        OPERATORS[name].fn(*_inputs("lora", n), **bad)


def test_unknown_operator_lists_known_ones():
    with pytest.raises(ConfigError, match="ext_sub"):
        get_operator("ties")
    assert get_operator("ext-sub") is OPERATORS["ext_sub"]


def test_row_results_keep_their_shape():
    out = OPERATORS["ext_sub"].fn(*_inputs("prefix", 2), lam=1.0)
    m = out.modules["prompt_embeddings"]
    assert isinstance(m, RowDelta) and m.tensor().shape == (3, 24)

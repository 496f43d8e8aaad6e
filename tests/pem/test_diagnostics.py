"""Diagnostics against the definitions, computed densely here."""

from __future__ import annotations

import numpy as np
import pytest

from excise.pem.delta import Adapter, LowRankDelta
from excise.pem.diagnostics import diagnose, format_summary
from tests.conftest import random_lora


def _definitions(W1: np.ndarray, W2: np.ndarray, lam: float) -> dict[str, np.ndarray]:
    n1 = W1 / np.linalg.norm(W1, axis=1, keepdims=True)
    n2 = W2 / np.linalg.norm(W2, axis=1, keepdims=True)
    c = (n1 + n2) / np.linalg.norm(n1 + n2, axis=1, keepdims=True)
    g = (W2 * c).sum(axis=1, keepdims=True) * c
    d = W2 - g
    norm = lambda x: np.linalg.norm(x, axis=1)  # noqa: E731
    return {
        "cos": (W1 * W2).sum(axis=1) / (norm(W1) * norm(W2)),
        "general_share": norm(g) ** 2 / norm(W2) ** 2,
        "overlap": (d * W1).sum(axis=1) / (norm(d) * norm(W1)),
        "removed": norm(lam * d) / norm(W2),
    }


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_statistics_match_definitions(lam):
    shapes = {"model.layers.0.self_attn.q_proj": (9, 6), "model.layers.1.self_attn.q_proj": (9, 6)}
    expert, anti = random_lora(shapes, 3, seed=1), random_lora(shapes, 2, scale=0.5, seed=2)
    report = diagnose(expert, anti, lam=lam)
    assert [m["layer"] for m in report["modules"]] == [0, 1]
    for entry in report["modules"]:
        W1, W2 = expert.modules[entry["name"]].dense(), anti.modules[entry["name"]].dense()
        for key, values in _definitions(W1, W2, lam).items():
            assert entry[key]["mean"] == pytest.approx(values.mean(), abs=1e-9), key
            assert entry[key]["min"] == pytest.approx(values.min(), abs=1e-9), key
            assert entry[key]["max"] == pytest.approx(values.max(), abs=1e-9), key
    assert "cos" in format_summary(report)


def test_zero_rows_are_counted_and_excluded():
    expert, anti = random_lora({"m": (5, 4)}, 2, seed=1), random_lora({"m": (5, 4)}, 2, seed=2)
    B = anti.modules["m"].B.copy()
    B[:2] = 0.0
    anti = Adapter("LORA", {}, {"m": LowRankDelta(B, anti.modules["m"].A, 1.0)})
    entry = diagnose(expert, anti)["modules"][0]
    assert entry["zero_rows"] == 2 and entry["rows"] == 5
    all_zero = Adapter("LORA", {}, {"m": LowRankDelta(np.zeros((5, 2)), anti.modules["m"].A, 1.0)})
    report = diagnose(expert, all_zero)
    assert report["modules"][0]["cos"]["mean"] is None
    assert "n/a" in format_summary(report)

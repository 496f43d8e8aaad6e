"""Standard errors of aggregate metrics (what lm-evaluation-harness prints beside each number).

- A mean over items (accuracy, a rate, a mean score): the standard error of the mean,
  ``sample std (ddof=1) / sqrt(n)``, as lm-eval's ``mean_stderr``.
- A pooled ratio such as a perplexity ``exp(Σ nll / Σ tokens)``: a seeded bootstrap over items
  (documents, windows, answers), the standard deviation of the statistic over resamples.

Both are ``None`` when there are fewer than two values (no spread to estimate); the bootstrap
is also ``None`` below :data:`MIN_RESAMPLING_UNITS` units, where a resampling distribution is
too coarse to trust (4 perplexity windows have 35 distinct resamples; a "95 %" interval over
them covered the truth 80 % of the time in simulation).

Multiplicity: :func:`bootstrap_pvalue` turns a paired bootstrap's differences into a two-sided
p-value, and :func:`holm` adjusts a family of them (Holm–Bonferroni, step-down).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "MIN_RESAMPLING_UNITS",
    "bootstrap_pvalue",
    "bootstrap_ratio_interval",
    "bootstrap_ratio_stderr",
    "holm",
    "item_stderrs",
    "mean_stderr",
]

BOOTSTRAP_RESAMPLES = 1000
# Fewer resampling units than this: no bootstrap interval or stderr (None, with the reason
# where a caller reports one).
MIN_RESAMPLING_UNITS = 20


def mean_stderr(values: Sequence[float | bool | None]) -> float | None:
    """Standard error of the mean of the non-None ``values`` (None with fewer than two)."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n < 2:
        return None
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def bootstrap_ratio_stderr(
    numerators: Sequence[float],
    denominators: Sequence[float],
    transform: Callable[[float], float] = lambda x: x,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> float | None:
    """Bootstrap standard error of ``transform(Σ num / Σ den)`` over items (seeded, reproducible);
    None below :data:`MIN_RESAMPLING_UNITS` items."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) < max(2, MIN_RESAMPLING_UNITS):
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(num), size=(resamples, len(num)))  # (resamples, n)
    sums = den[picks].sum(axis=1)  # (resamples,)
    ok = sums > 0
    if not ok.any():
        return None
    stats = [transform(x) for x in num[picks].sum(axis=1)[ok] / sums[ok]]
    return float(np.std(stats, ddof=1))


def bootstrap_ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap interval and standard error of ``Σ num / Σ den`` over units.

    Each unit is a cluster (a prompt with all its answer pairs: ``num`` its summed score,
    ``den`` its pair count), so resampling units is the clustered bootstrap; a plain mean
    has ``den`` 1 per unit.

    Returns:
        ``{"ci": [low, high] | None, "stderr": float | None, "units", "resamples",
        "confidence"}`` plus ``"reason"`` when there is no interval (fewer than
        :data:`MIN_RESAMPLING_UNITS` units, or no unit with a denominator).
    """
    import numpy as np

    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    out: dict[str, Any] = {
        "ci": None, "stderr": None, "units": int(num.size), "resamples": resamples, "confidence": confidence,
    }  # fmt: skip
    if num.size < MIN_RESAMPLING_UNITS:
        return out | {"reason": f"{num.size} unit(s); an interval needs at least {MIN_RESAMPLING_UNITS}"}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num.size, size=(resamples, num.size))  # (R, n)
    sums = den[picks].sum(axis=1)  # (R,)
    ok = sums > 0
    if not ok.any():
        return out | {"reason": "no resample holds a unit with a denominator"}
    stats = num[picks].sum(axis=1)[ok] / sums[ok]  # (R',)
    tail = (1.0 - confidence) / 2.0
    out["ci"] = [float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))]
    out["stderr"] = float(np.std(stats, ddof=1))
    return out


def item_stderrs(metrics: dict[str, float], items: Sequence[dict]) -> dict[str, float | None]:
    """Stderr of each metric that is the mean of the same-named per-item value (``mc1`` ↔ items' ``mc1``)."""
    out: dict[str, float | None] = {}
    for name in metrics:
        values = [it.get(name) for it in items]
        numeric = all(isinstance(v, int | float | bool) or v is None for v in values)
        if items and numeric and any(v is not None for v in values):
            out[name] = mean_stderr(values)
    return out


def bootstrap_pvalue(diffs: Sequence[float]) -> float | None:
    """Two-sided p-value of "no difference" from paired bootstrap differences.

    ``2·min(#{Δ* ≤ 0}, #{Δ* ≥ 0}) + 1`` over ``R + 1`` (the +1 keeps it above 0 with finitely
    many resamples), capped at 1: the smallest α at which the equal-tailed percentile interval
    would exclude 0. None without differences.
    """
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return None
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return min(1.0, (2 * tail + 1) / (d.size + 1))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (step-down; None entries are not in the family).

    Sorted ascending, ``p_(i)`` becomes ``max_{j ≤ i} min(1, (m − j + 1)·p_(j))``; rejecting where
    the adjusted value is ≤ α controls the family-wise error rate at α.
    """
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out

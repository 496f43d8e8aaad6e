"""Standard errors of aggregate metrics (what lm-evaluation-harness prints beside each number).

- A mean over items (accuracy, a rate, a mean score): the standard error of the mean,
  ``sample std (ddof=1) / sqrt(n)``, as lm-eval's ``mean_stderr``.
- A pooled ratio such as a perplexity ``exp(Σ nll / Σ tokens)``: a seeded bootstrap over items
  (documents, windows, answers), the standard deviation of the statistic over resamples.

Both are ``None`` when there are fewer than two values (no spread to estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["bootstrap_ratio_stderr", "item_stderrs", "mean_stderr"]

BOOTSTRAP_RESAMPLES = 1000


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
    """Bootstrap standard error of ``transform(Σ num / Σ den)`` over items (seeded, reproducible)."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(num), size=(resamples, len(num)))  # (resamples, n)
    sums = den[picks].sum(axis=1)  # (resamples,)
    ok = sums > 0
    if not ok.any():
        return None
    stats = [transform(x) for x in num[picks].sum(axis=1)[ok] / sums[ok]]
    return float(np.std(stats, ddof=1))


def item_stderrs(metrics: dict[str, float], items: Sequence[dict]) -> dict[str, float | None]:
    """Stderr of each metric that is the mean of the same-named per-item value (``mc1`` ↔ items' ``mc1``)."""
    out: dict[str, float | None] = {}
    for name in metrics:
        values = [it.get(name) for it in items]
        numeric = all(isinstance(v, int | float | bool) or v is None for v in values)
        if items and numeric and any(v is not None for v in values):
            out[name] = mean_stderr(values)
    return out

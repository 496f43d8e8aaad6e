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

Judged rates: :func:`rogan_gladen` corrects a flagged share for the judge's measured sensitivity
and specificity, and :func:`corrected_rate_interval` gives it an interval that carries the
sampling of the items and of the judge's calibration sets together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CORRECTION_RESAMPLES",
    "MIN_RESAMPLING_UNITS",
    "MIN_YOUDEN",
    "bootstrap_pvalue",
    "bootstrap_ratio_interval",
    "bootstrap_ratio_stderr",
    "corrected_rate_interval",
    "holm",
    "item_stderrs",
    "mean_stderr",
    "rogan_gladen",
]

BOOTSTRAP_RESAMPLES = 1000
# Fewer resampling units than this: no bootstrap interval or stderr (None, with the reason
# where a caller reports one).
MIN_RESAMPLING_UNITS = 20
# Youden's J = sensitivity + specificity − 1 at or below this: no corrected rate. The correction
# divides by J, so near 0 (a judge that flags both classes alike) it multiplies the sampling noise
# of the raw rate by 1/J (20x at 0.05) and the estimate is meaningless.
MIN_YOUDEN = 0.05
CORRECTION_RESAMPLES = 10_000


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


def rogan_gladen(
    rate: float, sensitivity: float, specificity: float, *, min_youden: float = MIN_YOUDEN
) -> float:
    """The share of truly positive items behind a judged ``rate`` (Rogan & Gladen 1978).

    A judge with sensitivity ``se`` and specificity ``sp`` flags a share
    ``p̂ = se·π + (1 − sp)·(1 − π)`` of items whose true positive share is ``π``; solved for it,
    ``π̂ = (p̂ + sp − 1) / (se + sp − 1)``, clipped to [0, 1] (sampling noise can put the
    unclipped value outside).

    Raises:
        ValueError: an argument outside [0, 1], or Youden's ``J = se + sp − 1`` at or below
            ``min_youden`` (:data:`MIN_YOUDEN`): the judge cannot tell the classes apart well
            enough for the division by ``J`` to mean anything; the message says so.
    """
    for name, value in (("rate", rate), ("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    youden = sensitivity + specificity - 1.0
    if youden <= min_youden + 1e-12:  # at the limit in exact arithmetic: 0.5 + 0.55 − 1 > 0.05 in floats
        raise ValueError(
            f"Youden's J = sensitivity + specificity - 1 = {youden:.4f} is at or below {min_youden}: "
            "the judge flags both classes nearly alike, so the rate cannot be corrected for it"
        )
    return min(1.0, max(0.0, (rate + specificity - 1.0) / youden))


def corrected_rate_interval(
    flags: Sequence[bool | float],
    *,
    true_positives: int,
    n_positive: int,
    true_negatives: int,
    n_negative: int,
    resamples: int = CORRECTION_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    min_youden: float = MIN_YOUDEN,
) -> dict[str, Any]:
    """The :func:`rogan_gladen`-corrected share of flagged items, with a percentile interval.

    The judge's sensitivity is ``true_positives / n_positive`` and its specificity
    ``true_negatives / n_negative``, measured at its operating threshold on labelled data
    (``n_positive`` unsafe, ``n_negative`` safe items). Each of the ``resamples`` draws (seeded)
    redraws all three inputs independently and corrects again (clipped):

    - the raw rate: the flagged count is redrawn ``Binomial(n, p̂)``, which for 0/1 flags is
      exactly the distribution of the bootstrap over items (and costs one draw);
    - sensitivity and specificity: from their Jeffreys posteriors, ``Beta(TP + ½, FN + ½)`` and
      ``Beta(TN + ½, FP + ½)``. Not a binomial bootstrap of the counts, which collapses to a point
      when a count sits at its bound (a strong judge with TP = n_positive on a small labelled set
      would look exactly known); the Jeffreys interval's frequentist coverage of a proportion is
      close to nominal (Brown, Cai & DasGupta 2001).

    The interval is the equal-tailed percentile interval of the corrected rates. Draws whose
    Youden's J is not positive (the corrected rate is undefined there) are left out and counted
    in ``dropped``; when they exceed the interval's tail share, the data cannot exclude a judge
    that separates nothing, and the interval is the whole [0, 1] (``note`` says so). In
    simulation (tests/evaluate/test_corrected_rates.py) the interval covers the true prevalence
    about 95 % of the time where the raw rate's interval hardly ever does.

    Args:
        flags: the evaluated items' verdicts (truthy = flagged).
        true_positives, n_positive, true_negatives, n_negative: the judge's confusion counts on
            labelled data at its operating threshold.
        resamples, confidence, seed: the interval's draws, level and random seed.
        min_youden: no correction at or below this measured J (:data:`MIN_YOUDEN`).

    Returns:
        ``{"value", "ci": [low, high], "stderr" (sd of the draws), "rate" (raw), "n" (items),
        "sensitivity", "specificity", "true_positives", "n_positive", "true_negatives",
        "n_negative", "youden", "resamples", "dropped", "confidence", "method"}``, plus
        ``"reason"`` when ``value`` or ``ci`` is None: no items, no labelled item of a class,
        J too small (no value), or fewer than :data:`MIN_RESAMPLING_UNITS` items (a value, no
        interval, as for every other interval here).
    """
    import numpy as np

    flagged = np.asarray([bool(f) for f in flags], dtype=bool)
    n = int(flagged.size)
    k = int(flagged.sum())
    counts = {
        "true_positives": int(true_positives), "n_positive": int(n_positive),
        "true_negatives": int(true_negatives), "n_negative": int(n_negative),
    }  # fmt: skip
    out: dict[str, Any] = {
        "value": None, "ci": None, "stderr": None, "rate": k / n if n else None, "n": n,
        "sensitivity": None, "specificity": None, **counts, "youden": None,
        "resamples": resamples, "dropped": 0, "confidence": confidence,
        "method": "Rogan-Gladen; items Binomial(n, rate), sensitivity and specificity from Jeffreys "
        "Beta posteriors; percentile interval of the clipped corrected rate",
    }  # fmt: skip
    if not (0 <= true_positives <= n_positive and 0 <= true_negatives <= n_negative):
        raise ValueError(f"confusion counts out of range: {counts}")
    if n_positive == 0 or n_negative == 0:
        return out | {
            "reason": "the judge's labelled data hold no item of one class: no sensitivity or specificity"
        }
    se, sp = true_positives / n_positive, true_negatives / n_negative
    out |= {"sensitivity": se, "specificity": sp, "youden": se + sp - 1.0}
    if n == 0:
        return out | {"reason": "no items"}
    try:
        out["value"] = rogan_gladen(k / n, se, sp, min_youden=min_youden)
    except ValueError as err:
        return out | {"reason": str(err)}
    if n < MIN_RESAMPLING_UNITS:
        return out | {"reason": f"{n} item(s); an interval needs at least {MIN_RESAMPLING_UNITS}"}
    rng = np.random.default_rng(seed)
    rate = rng.binomial(n, k / n, size=resamples) / n  # (R,)
    se_ = rng.beta(true_positives + 0.5, n_positive - true_positives + 0.5, size=resamples)  # (R,)
    sp_ = rng.beta(true_negatives + 0.5, n_negative - true_negatives + 0.5, size=resamples)  # (R,)
    youden = se_ + sp_ - 1.0  # (R,)
    ok = youden > 0
    draws = np.clip((rate[ok] + sp_[ok] - 1.0) / youden[ok], 0.0, 1.0)  # (R',)
    tail = (1.0 - confidence) / 2.0
    out["dropped"] = int(resamples - ok.sum())
    out["stderr"] = float(np.std(draws, ddof=1)) if draws.size > 1 else None
    if out["dropped"] > tail * resamples:
        out["ci"] = [0.0, 1.0]
        out["note"] = (
            f"{out['dropped']} of {resamples} draws have a judge that separates nothing (J <= 0): "
            "the interval is all of [0, 1]"
        )
    else:
        out["ci"] = [float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))]
    return out

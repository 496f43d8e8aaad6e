"""λ sweep: evaluate one operation over a grid of λ with the model loaded once (DESIGN.md §1).

Every operator swept here is linear in λ on the low-rank form: ``W(λ) = W0 + λ·D``.
For Ext-Sub ``W0 = W1`` and ``D = [diag(b/2a)·s1B1, −½·s2B2]·[A1; A2]``; for direct
subtraction ``W0 = θa``, ``D = −θb``; for negation ``W0 = 0``, ``D = −θ``; for a parallel
composition ``W0 = θ+``, ``D = −Σ_k w_k d_k``. So the sweep computes ``W0 = op(λ=0)`` and
``D = op(λ=1) − op(λ=0)`` once, with the operator itself (:mod:`excise.pem.ops`), writes
them as two PEFT adapters, loads the base model once with both, and for each λ changes
only ``D``'s LoRA scale (PEFT ``set_scale``): no recomputation, no reload. When no metric
needs the adapter-off model (``utility``), ``W0`` is merged into the weights, so a λ point
costs what one ``excise eval --adapter`` of the operator's output costs.

Each λ is scored by the evaluation runner (:func:`excise.evaluate.runner.run_eval`, the
code ``excise eval`` runs) on a *deficiency* metric and a *utility* metric. λ = 0 (no
edit: ``W0`` alone, e.g. the expert) is always evaluated, as the reference.

Choosing λ (docs/SWEEP.md):

- **Paired bootstrap** against λ = 0: the same items are scored at every λ, so items are
  resampled once (``bootstrap`` resamples, seeded) and the difference ``stat(λ) − stat(0)``
  is recomputed on each resample; the interval is its ``(1 − confidence)/2`` quantiles, with
  a two-sided p-value and the count of non-finite resamples; none below 20 items.
- **Pareto front**: the λ whose (deficiency, utility) pair no other λ beats on both.
- **Chosen λ** (the rule): among the λ whose relative utility loss against λ = 0 is at
  most ``tolerance`` (perplexity: ``ppl(λ) ≤ (1 + tolerance)·ppl(0)``; a higher-is-better
  utility: ``u(λ) ≥ u(0) − tolerance·|u(0)|``; when ``u(0) = 0`` the loss and the tolerance
  are absolute: ``|u(0)|`` is replaced by 1), the one with the best deficiency score;
  ties go to the smallest ``|λ|`` (the gentlest edit), then λ > 0. λ = 0 always qualifies.
  λ is chosen on a hash-chosen ``select_share`` of the items and its figures are reported on
  the rest (``chosen.report``); ``tolerance_on`` checks the loss's point or an interval end.
- **Knee**: on the Pareto front, both axes scaled to [0, 1] with "better" upwards, the
  point farthest beyond the chord joining the front's two ends, on the side of the ideal
  corner (needs ≥ 3 front points; a dent inside the chord never qualifies).

SweepConfig fields (YAML keys of a recipe's ``sweep`` stage; ``excise sweep`` flags):

- ``model`` (str): base model spec (alias, folder, .gguf, hub id).
- ``operation`` (``ext_sub`` | ``subtract`` | ``negate`` | ``compose``).
- ``inputs`` (list of adapter folders, in the operator's order, as ``excise ops``):
  ext_sub ``[expert, anti]``, subtract ``[a, b]``, negate ``[adapter]``,
  compose ``[expert, anti1, anti2, …]``.
- ``weights`` (list[float] | None): compose only, the relative λ of each anti-expert
  (default 1 each); the swept λ multiplies them.
- ``sequential``: not supported (sequential composition is not linear in λ).
- ``allow_partial`` (bool): combine adapters whose target modules differ.
- ``lams`` (list[float]): the grid; finite, distinct; 0 is added when absent.
- ``deficiency`` / ``utility`` (:class:`SweepMetric`): ``metric`` (a METRICS name),
  ``key`` (which number of its result, e.g. ``mc2``, ``perplexity``),
  ``higher_is_better`` (default from the key), ``settings`` (any
  :class:`~excise.evaluate.config.EvalConfig` field except model, adapter, dtype and
  device: data, limit, split, batch_size, judge, max_new_tokens, window…).
- ``extra`` (list of :class:`SweepMetric`): more numbers scored at every λ, with paired
  intervals, for the table (e.g. HaluEval accuracy, 4-gram repetition); they do not choose λ.
- ``dtype``, ``device``: as ``excise eval``.
- ``tolerance`` (float, default 0.05): allowed relative utility loss (absolute when u(0) = 0).
- ``tolerance_kind`` (``relative`` | ``absolute`` | None): force an absolute loss, in the
  utility's own units (a utility that is itself a difference, such as ``answer-nll:delta_nll``).
- ``tolerance_on`` (``point`` | ``worst`` | ``best``), ``select_share`` (float, default 0.5).
- ``bootstrap`` (int, default 10000), ``confidence`` (float, default 0.95), ``seed`` (int).
- ``out`` (folder, written atomically), ``overwrite`` (bool), ``progress`` (bool).
- ``cache`` (bool, default true): read and write the evaluation cache, each λ point keyed by
  :func:`weights_digest` of ``W0`` and ``D`` and by λ (λ = 0 by ``W0`` alone: sweeps from one
  expert share it); ``excise sweep --no-cache`` and ``excise run --force`` recompute.

Output folder (``run_sweep`` returns it)::

    OUT/sweep.json                      config, per-λ table (values, per-item scores,
                                        paired intervals), pareto, chosen, knee
    OUT/adapters/base, OUT/adapters/delta   W0 and D as PEFT folders (base absent for negate)
    OUT/results/lam=<λ>/<metric>.json   the runner's full record of each evaluation
                                        (λ written exactly: :func:`lam_folder`)

:func:`excise.pipeline.report.write_report` reads ``sweep.json`` from a run folder's
``sweeps/<name>/``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SweepConfig",
    "SweepMetric",
    "build_config",
    "choose_lam",
    "format_table",
    "item_stat",
    "knee_point",
    "lam_folder",
    "linear_parts",
    "paired_bootstrap",
    "paired_difference",
    "pairing_problem",
    "pareto_front",
    "parse_assignments",
    "parse_floats",
    "run_sweep",
    "selection_split",
    "set_delta_scale",
    "utility_loss",
    "weights_digest",
]

_OPERATIONS = ("ext_sub", "subtract", "negate", "compose")
_N_INPUTS = {"ext_sub": (2, 2), "subtract": (2, 2), "negate": (1, 1), "compose": (2, None)}
# Result keys where less is better; any other key defaults to higher-is-better.
_LOWER_IS_BETTER = {
    "perplexity",
    "nll_per_token",
    "fluency_ppl",
    "fluency_ppl_mean",
    "toxicity_mean",
    "toxic_share",
    "judge_flagged_rate",
    "harmful_rate",
    "mean_score",
    "rep_1",
    "rep_2",
    "rep_3",
    "rep_4",
    "empty_answers",
    "nll_chosen",
    "nll_chosen_sum",
    "retain",
    "nll",
    "nll_sum",
    "delta_nll",
}


class SweepMetric(BaseModel):
    """One axis of the trade-off: a metric of the registry and the number of its result to use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(description="Metric name (excise eval verb): truthfulqa-mc, perplexity, toxicity…")
    key: str = Field(description="Which number of its result: mc2, perplexity, toxicity_mean…")
    higher_is_better: bool | None = Field(
        None, description="Direction; default: lower for perplexity, toxicity, harm, repetition keys."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="EvalConfig fields (data, limit, split, batch_size, judge…)."
    )
    label: str | None = Field(None, description="Name of an extra number in sweep.json (default metric:key).")

    @field_validator("label")
    @classmethod
    def _label_is_a_file_name(cls, label: str | None) -> str | None:
        # A label can name its result file (results/lam=…/LABEL.json): it stays in that folder.
        if label is not None and (not label or label.startswith(".") or any(c in label for c in "/\\\0")):
            raise ValueError(f"label {label!r} must not be empty, start with `.` or hold `/` or `\\`")
        return label

    @model_validator(mode="after")
    def _known(self) -> SweepMetric:
        from excise.evaluate.config import EvalConfig
        from excise.evaluate.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of: {', '.join(METRICS)}")
        clash = sorted({"model", "adapter", "dtype", "device"} & set(self.settings))
        if clash:
            raise ValueError(
                f"settings may not set {', '.join(clash)}: the sweep sets them (dtype, device: top level)"
            )
        EvalConfig(model="-", **self.settings)  # unknown or bad settings fail here, before any work
        return self

    @property
    def higher(self) -> bool:
        """Whether a larger value is better."""
        return self.key not in _LOWER_IS_BETTER if self.higher_is_better is None else self.higher_is_better


class SweepConfig(BaseModel):
    """Settings of one λ sweep (module docstring lists the fields and the output layout)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model: alias, .gguf file, local folder or hub id.")
    operation: Literal["ext_sub", "subtract", "negate", "compose"] = Field(
        "ext_sub", description="Operator swept (all are linear in λ)."
    )
    inputs: list[Path] = Field(description="Adapter folders in the operator's order (as `excise ops`).")
    weights: list[float] | None = Field(
        None, description="compose: relative λ of each anti-expert (default 1 each)."
    )
    allow_partial: bool = Field(False, description="Combine adapters whose target modules differ.")
    lams: list[float] = Field(description="λ grid (finite, distinct); 0 is added when absent.")
    deficiency: SweepMetric = Field(description="What the edit should improve (e.g. truthfulqa-mc / mc2).")
    utility: SweepMetric = Field(description="What it must not spoil (e.g. perplexity / perplexity).")
    extra: list[SweepMetric] = Field(
        default_factory=list,
        description="More numbers scored at every λ (with paired intervals); they do not choose λ.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Model dtype.")
    device: str = Field("auto", description="`auto` (CUDA if present), `cpu`, `cuda`…")
    tolerance: float = Field(
        0.05, ge=0, description="Allowed relative utility loss against λ = 0 (absolute when u(0) = 0)."
    )
    tolerance_kind: Literal["relative", "absolute"] | None = Field(
        None,
        description="How the utility loss is measured: relative to |u(0)|, or absolute (in the utility's "
        "own units: a difference such as answer-nll's delta_nll, where a relative loss means nothing); "
        "default: relative, absolute when u(0) = 0.",
    )
    tolerance_on: Literal["point", "worst", "best"] = Field(
        "point",
        description="What the tolerance is checked on: the utility loss's point estimate, the worse end "
        "of its paired interval (admissible only when the whole interval is within), or the better end "
        "(refused only when the loss is beyond tolerance with confidence).",
    )
    select_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of the items (hash-chosen) on which λ is chosen; the figures at the chosen λ "
        "are reported on the other items (1: choose and report on all, with a winner's-curse note).",
    )
    bootstrap: int = Field(10000, ge=0, description="Paired bootstrap resamples (0: no intervals).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")
    seed: int = Field(0, description="Seeds the bootstrap resampling.")
    out: Path = Field(description="Output folder (written atomically).")
    overwrite: bool = Field(False, description="Replace a non-empty output folder.")
    progress: bool = Field(True, description="Show progress bars.")
    cache: bool = Field(
        True,
        description="Read and write the evaluation cache. A λ point is keyed by the digests of W0 and "
        "D's weights and λ; λ = 0 by W0 alone (D at scale 0 adds exactly nothing), so sweeps over "
        "the same W0 (Ext-Sub and subtraction from one expert) share their reference point.",
    )

    @field_validator("lams")
    @classmethod
    def _grid(cls, lams: list[float]) -> list[float]:
        if not lams:
            raise ValueError("the λ grid is empty; give at least one value")
        bad = [x for x in lams if not math.isfinite(x)]
        if bad:
            raise ValueError(f"λ grid values must be finite numbers, got {bad[0]}")
        if len(set(lams)) != len(lams):
            raise ValueError("λ grid has repeated values")
        return lams

    @model_validator(mode="after")
    def _shape(self) -> SweepConfig:
        low, high = _N_INPUTS[self.operation]
        n = len(self.inputs)
        if n < low or (high is not None and n > high):
            want = f"{low}" if low == high else f"at least {low}"
            raise ValueError(f"{self.operation} takes {want} input adapter(s), got {n}")
        if self.weights is not None:
            if self.operation != "compose":
                raise ValueError("weights apply to compose only")
            if len(self.weights) != n - 1 or not all(math.isfinite(w) for w in self.weights):
                raise ValueError(f"weights: give one finite number per anti-expert ({n - 1})")
        names = [_extra_name(a) for a in self.extra]
        if len(set(names)) != len(names):
            raise ValueError(f"extra: each metric:key (or label) once, got {', '.join(names)}")
        return self

    @property
    def grid(self) -> list[float]:
        """The λ values evaluated: 0 first, then the grid in the given order."""
        return [0.0, *[x for x in self.lams if x != 0.0]]


# ----------------------------------------------------------------------------- per-item scores

_Pair = tuple[float, float]  # (numerator, denominator) of one item's contribution


def _mean_of(value: Any) -> _Pair:
    return (0.0, 0.0) if value is None else (float(value), 1.0)


def _ratio(num: str, den: str) -> Any:
    return lambda it: (float(it[num]), float(it[den])) if it.get(den) else (0.0, 0.0)


def _halueval_correct(it: dict[str, Any]) -> _Pair:
    if "right_says_yes" in it:  # HaluEval judgement: right answer → "No", hallucinated → "Yes"
        return _mean_of(((not it["right_says_yes"]) + it["hallucinated_says_yes"]) / 2)
    return _mean_of(it["nll_right"] < it["nll_hallucinated"])  # Ext-Sub's loss protocol


def _toxic(it: dict[str, Any]) -> _Pair:
    from excise.evaluate.metrics.toxicity import TOXIC_THRESHOLD

    return _mean_of(it["score"] > TOXIC_THRESHOLD)


# (metric, key) → (item → (num, den), transform): the result's number is transform(Σ num / Σ den).
# Keys not listed are the mean of the item field of the same name (mc1, mc2, rep_n, diversity…).
_ITEM_RULES: dict[tuple[str, str], tuple[Any, str]] = {
    ("perplexity", "perplexity"): (_ratio("nll", "scored_tokens"), "exp"),
    ("perplexity", "nll_per_token"): (_ratio("nll", "scored_tokens"), "identity"),
    ("utility", "fluency_ppl"): (_ratio("nll", "n_tokens"), "exp"),
    ("halueval", "accuracy"): (_halueval_correct, "identity"),
    ("halueval", "accuracy_right"): (lambda it: _mean_of(not it["right_says_yes"]), "identity"),
    ("halueval", "accuracy_hallucinated"): (lambda it: _mean_of(it["hallucinated_says_yes"]), "identity"),
    ("toxicity", "toxic_share"): (_toxic, "identity"),
    ("toxicity", "toxicity_mean"): (lambda it: _mean_of(it["score"]), "identity"),
    ("harmful-rate", "harmful_rate"): (lambda it: _mean_of(it["flagged"]), "identity"),
    ("harmful-rate", "mean_score"): (lambda it: _mean_of(it["score"]), "identity"),
}
# `pairs` items are prompts holding all their pairs: each number is Σ per-prompt total / Σ pairs, so
# resampling items resamples prompts (the clustered bootstrap).
_ITEM_RULES |= {("pairs", key): (_ratio(f"{key}_total", "n_pairs"), "identity") for key in (
    "win_rate", "win_rate_sum", "margin", "nll_chosen", "nll_rejected", "nll_chosen_sum", "nll_rejected_sum",
    "forget", "retain", "selectivity",
)}  # fmt: skip
_TRANSFORMS = {"identity": lambda x: x, "exp": np.exp}


def item_stat(metric: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """The per-item scores behind ``record["metrics"][key]``, checked to reproduce it.

    Returns:
        ``{"num": [...], "den": [...], "transform": "identity" | "exp", "keys": [...]}``: the
        number is ``transform(Σ num / Σ den)`` (a mean has ``den`` 1 per scored item); ``keys``
        holds each item's identity (:func:`excise.evaluate.runner.item_key`; None in a record
        made before items carried one), by which :func:`paired_bootstrap` pairs two records.

    Raises:
        ConfigError: the result has no ``key``, its items do not carry it, or the items do
            not reproduce the number (then it cannot be bootstrapped).
    """
    from excise.errors import ConfigError

    metrics = record["metrics"]
    if key not in metrics:
        raise ConfigError(f"{metric} has no result {key!r}; it reports: {', '.join(metrics)}")
    rule, transform = _ITEM_RULES.get((metric, key), (None, "identity"))
    items = record["items"]
    if rule is None:
        if not any(key in it for it in items):
            raise ConfigError(
                f"{metric} items carry no per-item {key!r}, so it cannot be swept; pick another key"
            )
        rule = lambda it: _mean_of(it.get(key))  # noqa: E731
    pairs = np.array([rule(it) for it in items], dtype=np.float64).reshape(-1, 2)  # (n, 2)
    keys = [it.get("key") for it in items]
    out = {"num": pairs[:, 0].tolist(), "den": pairs[:, 1].tolist(), "transform": transform, "keys": keys}
    value, again = metrics[key], _aggregate(out)
    if (
        value is not None
        and math.isfinite(value)
        and not math.isclose(value, again, rel_tol=1e-9, abs_tol=1e-12)
    ):
        raise ConfigError(f"{metric}.{key}: per-item scores give {again}, the result says {value}")
    return out


def _aggregate(stat: dict[str, Any]) -> float:
    den = float(np.sum(stat["den"]))
    return float(_TRANSFORMS[stat["transform"]](np.sum(stat["num"]) / den)) if den else math.nan


def paired_difference(
    ref: dict[str, Any], other: dict[str, Any], *, resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """:func:`paired_bootstrap`'s interval with what a reader needs beside it.

    Returns:
        ``{"ci": [low, high] | None, "p": two-sided bootstrap p-value | None, "resamples",
        "dropped": resamples whose statistic was not finite (left out, counted), "units": items
        resampled, "reason": why there is no interval (absent when there is one)}``. No interval
        below :data:`~excise.evaluate.stats.MIN_RESAMPLING_UNITS` items.
    """
    from excise.evaluate.stats import MIN_RESAMPLING_UNITS, bootstrap_pvalue

    n = len(ref["num"])
    out: dict[str, Any] = {"ci": None, "p": None, "resamples": resamples, "dropped": 0, "units": n}
    diff = _paired_diffs(ref, other, resamples=resamples, seed=seed)
    if resamples == 0:
        return out | {"reason": "no resamples asked for (bootstrap: 0)"}
    if n < MIN_RESAMPLING_UNITS:
        return out | {"reason": f"{n} item(s); an interval needs at least {MIN_RESAMPLING_UNITS}"}
    finite = diff[np.isfinite(diff)]
    out["dropped"] = int(diff.size - finite.size)
    if finite.size == 0:
        return out | {"reason": "no resample gave a finite difference"}
    tail = (1.0 - confidence) / 2.0
    out["ci"] = [float(np.quantile(finite, tail)), float(np.quantile(finite, 1.0 - tail))]
    out["p"] = bootstrap_pvalue(finite)
    return out


def _paired_diffs(ref: dict[str, Any], other: dict[str, Any], *, resamples: int, seed: int) -> np.ndarray:
    """``stat(other) − stat(ref)`` on ``resamples`` paired resamples of the items (R,)."""
    from excise.errors import ConfigError

    problem = pairing_problem(ref, other)
    if problem is not None:
        raise ConfigError(f"cannot pair the two records: {problem}")
    order = _paired_order(ref["keys"], other["keys"])  # (n,) other's index of each ref item
    num_a, den_a = np.asarray(ref["num"]), np.asarray(ref["den"])  # (n,)
    num_b, den_b = np.asarray(other["num"])[order], np.asarray(other["den"])[order]  # (n,)
    n = num_a.size
    if resamples == 0 or n == 0:
        return np.empty(0)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # (R, n)
    fa, fb = _TRANSFORMS[ref["transform"]], _TRANSFORMS[other["transform"]]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return fb(num_b[idx].sum(1) / den_b[idx].sum(1)) - fa(num_a[idx].sum(1) / den_a[idx].sum(1))  # (R,)


def paired_bootstrap(
    ref: dict[str, Any], other: dict[str, Any], *, resamples: int, confidence: float, seed: int
) -> tuple[float, float] | None:
    """Percentile interval of ``stat(other) − stat(ref)`` with items resampled together.

    Items are paired by their identity (``keys`` of :func:`item_stat`), not by position: ``other``
    is put in ``ref``'s item order, and one index draw then serves both, which is what removes
    the between-item variance.

    Returns:
        ``(low, high)``, or None with no resamples, fewer items than
        :data:`~excise.evaluate.stats.MIN_RESAMPLING_UNITS`, or no finite resample
        (:func:`paired_difference` says which, with the p-value and the dropped resamples).

    Raises:
        ConfigError: the two records cannot be paired (:func:`pairing_problem`: different items,
            or items without keys).
    """
    ci = paired_difference(ref, other, resamples=resamples, confidence=confidence, seed=seed)["ci"]
    return None if ci is None else (ci[0], ci[1])


def pairing_problem(ref: dict[str, Any], other: dict[str, Any]) -> str | None:
    """Why two per-item stats (:func:`item_stat`) cannot be paired item by item; None when they can.

    They pair when every item carries a key and both hold the same keys, each as often (the
    same rows of the same data, in any order). Records made before items carried keys are
    refused, not paired by position: their items may differ (another split, limit or data).
    """
    keys_a, keys_b = ref.get("keys"), other.get("keys")
    n_a, n_b = len(ref["num"]), len(other["num"])
    if keys_a is None or keys_b is None or None in keys_a or None in keys_b:
        return (
            "their items carry no identity keys (results made before excise recorded them); "
            "evaluate again to pair them"
        )
    if sorted(keys_a) != sorted(keys_b):
        only_a, only_b = len(set(keys_a) - set(keys_b)), len(set(keys_b) - set(keys_a))
        return (
            f"they scored different items ({n_a} and {n_b} items; {only_a} only in the first, "
            f"{only_b} only in the second): another split, limit or data"
        )
    return None


def _paired_order(keys_a: list[str], keys_b: list[str]) -> np.ndarray:
    """For each item of ``keys_a``, the index of the same item in ``keys_b`` (a repeated key's
    k-th occurrence pairs with its k-th occurrence)."""
    where: dict[str, list[int]] = {}
    for j, key in enumerate(keys_b):
        where.setdefault(key, []).append(j)
    seen: dict[str, int] = {}
    order = []
    for key in keys_a:
        k = seen.get(key, 0)
        seen[key] = k + 1
        order.append(where[key][k])
    return np.asarray(order, dtype=np.int64)


# ----------------------------------------------------------------------------- choosing λ


def _oriented(values: list[float | None], higher: bool) -> np.ndarray:
    """Values with "better" upwards; None/NaN become NaN."""
    x = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return x if higher else -x


def pareto_front(
    deficiency: list[float | None], utility: list[float | None], *, higher_d: bool, higher_u: bool
) -> list[int]:
    """Indices of the points no other point beats on both axes (at least as good on both,
    better on one). Points with a missing value are never on the front."""
    d, u = _oriented(deficiency, higher_d), _oriented(utility, higher_u)
    ok = np.isfinite(d) & np.isfinite(u)
    front = []
    for i in np.flatnonzero(ok):
        dominated = ok & (d >= d[i]) & (u >= u[i]) & ((d > d[i]) | (u > u[i]))
        if not dominated.any():
            front.append(int(i))
    return front


def utility_loss(
    utility: list[float | None], *, higher_u: bool, absolute: bool = False
) -> list[float | None]:
    """Utility loss of each point against point 0 (λ = 0): positive = worse.

    Relative (``/ |u(0)|``) when ``u(0) ≠ 0``; absolute when ``u(0) = 0`` (a share of empty
    answers, of repeated n-grams, of toxic outputs…), where a relative loss is undefined, or
    when ``absolute`` (a utility that is itself a difference, such as a ΔNLL).
    """
    u0 = utility[0]
    if u0 is None or not math.isfinite(u0):
        return [None for _ in utility]
    scale = abs(u0) if u0 != 0 and not absolute else 1.0
    out: list[float | None] = []
    for u in utility:
        if u is None or not math.isfinite(u):
            out.append(None)
        else:
            out.append(((u0 - u) if higher_u else (u - u0)) / scale)
    return out


def choose_lam(
    lams: list[float],
    deficiency: list[float | None],
    utility: list[float | None],
    *,
    higher_d: bool,
    higher_u: bool,
    tolerance: float,
    utility_ci: list[list[float] | tuple[float, float] | None] | None = None,
    tolerance_on: str = "point",
    tolerance_kind: str | None = None,
) -> dict[str, Any]:
    """The documented rule: best deficiency score among the λ whose utility loss against
    λ = 0 (``lams[0]``) is at most ``tolerance``; ties go to the smallest ``|λ|``. The loss
    is relative to ``|u(0)|``, or absolute when ``u(0) = 0`` or ``tolerance_kind`` is
    ``"absolute"`` (:func:`utility_loss`).

    Returns:
        ``{"lam", "index", "rule", "tolerance", "tolerance_kind", "admissible": [bool per λ],
        "utility_loss"}``; ``tolerance_kind`` is ``"relative"`` or ``"absolute"``; ``lam``
        is None (with ``reason``) when no λ, λ = 0 included, has finite scores.
    """
    assert lams[0] == 0.0, "point 0 is the λ = 0 reference"
    absolute = tolerance_kind == "absolute"
    loss = utility_loss(utility, higher_u=higher_u, absolute=absolute)
    checked = (
        loss
        if tolerance_on == "point"
        else _loss_bounds(utility, utility_ci, higher_u, tolerance_on, absolute)
    )
    # λ = 0 is admissible whenever its utility is finite (its loss is 0 by definition).
    admissible = [(i == 0 and loss[0] is not None) or (x is not None and x <= tolerance + 1e-12)
                  for i, x in enumerate(checked)]  # fmt: skip
    d = _oriented(deficiency, higher_d)
    kind = "absolute" if absolute or utility[0] == 0 else "relative"
    how = {"absolute": "absolute, in the utility's own units", "relative": "relative"}[kind]
    if kind == "absolute" and not absolute:
        how = "absolute, as the utility at λ = 0 is 0"
    on = {
        "point": "",
        "worst": ", the worse end of its paired interval",
        "best": ", the better end of its paired interval",
    }[tolerance_on]
    rule = (
        f"the {'highest' if higher_d else 'lowest'} deficiency score among λ whose utility loss{on} "
        f"against λ = 0 is at most {tolerance:g} ({how}); ties: smallest |λ|, then λ > 0"
    )
    candidates = [i for i, ok in enumerate(admissible) if ok and math.isfinite(d[i])]
    base = {"rule": rule, "tolerance": tolerance, "tolerance_kind": kind, "admissible": admissible,
            "utility_loss": loss}  # fmt: skip
    if not candidates:
        reason = (
            "λ = 0 has no finite utility score"
            if loss[0] is None
            else "no λ within the tolerance has a finite deficiency score"
        )
        return base | {"lam": None, "index": None, "reason": reason}
    best = max(candidates, key=lambda i: (d[i], -abs(lams[i]), lams[i] > 0))
    return base | {"lam": lams[best], "index": best, "tolerance_on": tolerance_on}


def _loss_bounds(
    utility: list[float | None], ci: list[Any] | None, higher_u: bool, end: str, absolute: bool = False
) -> list[float | None]:
    """The utility loss at one end of its interval: ``ci[i]`` bounds ``u(λ_i) − u(0)``."""
    u0 = utility[0]
    if u0 is None or not math.isfinite(u0) or ci is None:
        return [None for _ in utility]
    scale = abs(u0) if u0 != 0 and not absolute else 1.0
    out: list[float | None] = []
    for bounds in ci:
        if bounds is None:
            out.append(None)
            continue
        losses = sorted(((-b) if higher_u else b) / scale for b in bounds)
        out.append(losses[1] if end == "worst" else losses[0])
    return out


def knee_point(
    lams: list[float],
    deficiency: list[float | None],
    utility: list[float | None],
    *,
    higher_d: bool,
    higher_u: bool,
) -> dict[str, Any]:
    """The knee of the Pareto front: the front point farthest *beyond* the chord joining its two
    ends, both axes scaled to [0, 1] with "better" upwards.

    After scaling the front runs from (0, 1) to (1, 0) and the chord is ``x + y = 1``. The
    distance is signed, positive on the side of the ideal corner (1, 1); only points with a
    positive distance qualify, so a dent inside the chord (a point worse than mixing the two
    ends) can never be the knee. Ties on the distance go to the smaller ``|λ|``, then to λ > 0.

    Returns:
        ``{"lam", "index", "distance"}``, or ``{"lam": None, "reason": ...}`` when the front has
        fewer than three points, no spread, or no point beyond its chord (a straight or
        concave front has no knee).
    """
    front = pareto_front(deficiency, utility, higher_d=higher_d, higher_u=higher_u)
    if len(front) < 3:
        return {
            "lam": None,
            "index": None,
            "reason": f"the Pareto front has {len(front)} point(s); a knee needs 3",
        }
    d, u = _oriented(deficiency, higher_d)[front], _oriented(utility, higher_u)[front]  # (F,)
    span_d, span_u = d.max() - d.min(), u.max() - u.min()
    if span_d == 0 or span_u == 0:
        return {"lam": None, "index": None, "reason": "the Pareto front does not spread on both axes"}
    x, y = (d - d.min()) / span_d, (u - u.min()) / span_u  # (F,) in [0, 1]
    # On a Pareto front the point with the least x has the most y: the ends are (0, 1) and
    # (1, 0), the chord is x + y = 1, and (x + y − 1)/√2 is the signed distance to it.
    dist = (x + y - 1.0) / math.sqrt(2.0)  # (F,) > 0: on the ideal side
    beyond = [k for k in range(len(front)) if dist[k] > 1e-12]
    if not beyond:
        return {
            "lam": None,
            "index": None,
            "reason": "no Pareto point lies beyond the chord joining the front's ends "
            "(the front is straight or concave: no knee)",
        }
    k = max(beyond, key=lambda k: (dist[k], -abs(lams[front[k]]), lams[front[k]] > 0))
    index = front[k]
    return {"lam": lams[index], "index": index, "distance": float(dist[k])}


# ----------------------------------------------------------------------------- W0 and D


def _operator_at(cfg: SweepConfig, adapters: list[Any], lam: float) -> Any:
    """The swept operator's result at ``lam``, factors in float64 (no rounding before the write)."""
    from excise.pem.ops.registry import get_operator

    fn = get_operator(cfg.operation).fn
    if cfg.operation == "negate":
        return fn(adapters[0], lam=lam)
    if cfg.operation == "compose":
        weights = cfg.weights or [1.0] * (len(adapters) - 1)
        return fn(*adapters, lams=[lam * w for w in weights], allow_partial=cfg.allow_partial)
    return fn(*adapters, lam=lam, allow_partial=cfg.allow_partial)


def _compact(m: Any) -> Any:
    """Drop the all-zero columns of ``B`` (and the matching rows of ``A``); None if nothing is left."""
    from excise.pem.delta import LowRankDelta

    keep = np.any(m.B != 0, axis=0)  # (r,)
    if not keep.any():
        return None
    return m if keep.all() else LowRankDelta(m.B[:, keep], m.A[keep], m.scale)  # (out, r'), (r', in)


def linear_parts(cfg: SweepConfig, adapters: list[Any]) -> tuple[Any, Any]:
    """``(W0, D)`` with ``op(λ) = W0 + λ·D`` for every λ: ``W0 = op(0)``, ``D = op(1) − op(0)``.

    Both are exact LoRAs; ``W0`` is None when it is zero (negation). Where ``op(0)`` and
    ``op(1)`` stack the same ``A`` (every operator here) ``D``'s ``B`` is the difference of
    theirs, so ``D`` keeps the operator's rank.

    Raises:
        ConfigError: the adapters are not LoRA ((IA)³ scales activations: not a LoRA sum).
    """
    from excise.errors import ConfigError
    from excise.pem.delta import Adapter, LowRankDelta
    from excise.pem.linalg import as_float64, row_combine

    kinds = {a.peft_type for a in adapters}
    if kinds != {"LORA"}:
        raise ConfigError(f"excise sweep needs LoRA adapters, got {', '.join(sorted(kinds))}")
    adapters = [
        Adapter(a.peft_type, a.config, {n: as_float64(m) for n, m in a.modules.items()}, a.source, a.dtype)
        for a in adapters
    ]
    at0, at1 = _operator_at(cfg, adapters, 0.0), _operator_at(cfg, adapters, 1.0)
    base, delta = {}, {}
    for name in at0.modules.keys() | at1.modules.keys():
        m0, m1 = at0.modules.get(name), at1.modules.get(name)
        if m0 is not None and (kept := _compact(m0)) is not None:
            base[name] = kept
        if m0 is None:
            d = m1
        elif m1 is None:
            d = row_combine([(-1.0, m0)])
        elif m0.A.shape == m1.A.shape and np.array_equal(m0.A, m1.A):
            d = LowRankDelta(m1.folded().B - m0.folded().B, m1.A, 1.0)  # (out, r), A shared
        else:
            d = row_combine([(1.0, m1), (-1.0, m0)])  # (out, r1 + r0)
        if d is not None and (d := _compact(d)) is not None:
            delta[name] = d
    if not delta:
        raise ConfigError(f"{cfg.operation} does not change with λ for these adapters: nothing to sweep")
    source = {"operation": f"sweep:{cfg.operation}", "inputs": at1.source["inputs"]}
    dtype = adapters[0].dtype
    w0 = Adapter("LORA", at1.config, base, source | {"part": "W0 = op(lam=0)"}, dtype) if base else None
    return w0, Adapter(
        "LORA", at1.config, dict(sorted(delta.items())), source | {"part": "D = op(1) - op(0)"}, dtype
    )


# ----------------------------------------------------------------------------- the model, once

_DELTA = "delta"


def _load_swept_model(cfg: SweepConfig, base_dir: Path | None, delta_dir: Path, merge_base: bool) -> Any:
    """The base model with ``W0`` (merged when ``merge_base``) and ``D`` as adapter ``delta``."""
    from peft import PeftModel

    from excise.evaluate.subject import Subject, load_subject

    if base_dir is None:
        plain = load_subject(cfg.model, dtype=cfg.dtype, device=cfg.device)
        model = PeftModel.from_pretrained(plain.model, str(delta_dir), adapter_name=_DELTA)
    elif merge_base:
        plain = load_subject(cfg.model, base_dir, merge=True, dtype=cfg.dtype, device=cfg.device)
        model = PeftModel.from_pretrained(plain.model, str(delta_dir), adapter_name=_DELTA)
    else:  # the adapter-off view must stay the base model: W0 and D both as adapters
        plain = load_subject(cfg.model, base_dir, dtype=cfg.dtype, device=cfg.device)
        model = plain.model
        model.load_adapter(str(delta_dir), adapter_name=_DELTA)
        model.base_model.set_adapter(["default", _DELTA], inference_mode=True)
    model.eval()
    return Subject(model, plain.tokenizer, cfg.model, delta_dir, merged=False)


def weights_digest(folder: Path | None) -> str | None:
    """SHA-256 of an adapter's config and tensors (:func:`~excise.pem.io.tensor_digest`); None for None.

    Not of its files: a written adapter's metadata carry its creation time and the operation
    that made it, so the same ``W0`` written by two sweeps has two file digests."""
    if folder is None:
        return None
    import hashlib

    from excise.pem.io import tensor_digest

    config = json.loads((folder / "adapter_config.json").read_text())
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(tensor_digest(folder / "adapter_model.safetensors").encode())
    return digest.hexdigest()


def set_delta_scale(model: Any, lam: float) -> int:
    """Set ``D``'s LoRA scale to ``lam`` in every layer (its ``alpha = r``: scale 1 × ``lam``).

    Returns:
        the number of layers changed.
    """
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and _DELTA in module.scaling:
            module.set_scale(_DELTA, lam)
            n += 1
    assert n > 0, "no layer holds the delta adapter"
    return n


# ----------------------------------------------------------------------------- the sweep


def _eval_config(cfg: SweepConfig, axis: SweepMetric) -> Any:
    """The axis's evaluation settings; with no ``template`` (nor ``chat``) of its own, the one the
    swept modules were all trained in where it is not the metric's default ``chat`` (as
    ``excise run`` does for evaluations), so every λ is scored in the trained format."""
    from excise.data.trained import trained_templates
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import NO_TEMPLATE, RAW_DEFAULT

    settings = dict(axis.settings)
    own_format = settings.get("template") is not None or settings.get("chat") is not None
    if not own_format and axis.metric not in NO_TEMPLATE | set(RAW_DEFAULT):
        trained = trained_templates([Path(p) for p in cfg.inputs])
        if len(trained) == 1 and trained[0] != "chat":
            settings["template"] = trained[0]
    return EvalConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, **settings)


def lam_folder(lam: float) -> str:
    """The folder name of one λ's records under ``OUT/results/``: exact and reversible.

    ``lam=1`` for 1.0, else the shortest text that reads back as the same float
    (``lam=0.25``, ``lam=1.0000001``, ``lam=1e-05``), so two λ of the grid never share a
    folder (``:g`` rounded 1.0000001 to ``1``). ``float(name.removeprefix("lam="))`` is λ.

    Args:
        lam: a finite λ.

    Returns:
        ``"lam=<λ>"``.
    """
    lam = float(lam)
    assert math.isfinite(lam), "the grid holds finite λ only"
    # Integers below 2**53 print exactly as integers; larger ones keep repr's exponent form.
    return f"lam={int(lam)}" if lam.is_integer() and abs(lam) < 2**53 else f"lam={lam!r}"


def run_sweep(cfg: SweepConfig) -> Path:
    """Evaluate ``cfg.operation`` at every λ of the grid with the model loaded once.

    Args:
        cfg: the sweep (module docstring: fields and output layout).

    Returns:
        ``cfg.out``, holding ``sweep.json``, the two adapters and every evaluation record.

    Raises:
        ConfigError: existing output, non-LoRA adapters, an unknown result key.
        AdapterError, DataError, ModelLoadError: bad adapters, data or model.
    """
    import time

    from excise.evaluate.cache import write_atomic_json
    from excise.evaluate.runner import NEEDS_BASE, load_metric_judge, run_eval, write_result
    from excise.pem.io import atomic_output_dir, load_adapter, save_adapter

    clock = time.perf_counter()
    axes = {"deficiency": cfg.deficiency, "utility": cfg.utility}
    axes |= {_extra_name(axis): axis for axis in cfg.extra}
    eval_cfgs = {name: _eval_config(cfg, axis) for name, axis in axes.items()}
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        adapters = [load_adapter(path) for path in cfg.inputs]
        w0, delta = linear_parts(cfg, adapters)
        base_dir = save_adapter(w0, tmp / "adapters" / "base") if w0 is not None else None
        delta_dir = save_adapter(delta, tmp / "adapters" / "delta")
        prepare_seconds = time.perf_counter() - clock

        clock = time.perf_counter()
        merge_base = not ({axis.metric for axis in axes.values()} & NEEDS_BASE)
        subject = _load_swept_model(cfg, base_dir, delta_dir, merge_base)
        judges = {name: load_metric_judge(axes[name].metric, c) for name, c in eval_cfgs.items()}
        load_seconds = time.perf_counter() - clock

        digests = {
            "w0": weights_digest(base_dir),
            "delta": weights_digest(delta_dir),
            "w0_merged": merge_base,
        }
        points = []
        for lam in cfg.grid:
            set_delta_scale(subject.model, lam)
            # At λ = 0 D adds exactly zero: the point is W0 alone, whatever D is.
            identity = {"sweep": digests | ({"delta": None, "lam": 0.0} if lam == 0 else {"lam": lam})}
            clock = time.perf_counter()
            done: dict[tuple[str, str], dict[str, Any]] = {}  # one evaluation per (metric, settings)
            point: dict[str, Any] = {"lam": lam, "results": {}}
            for name, axis in axes.items():
                run_key = (axis.metric, eval_cfgs[name].model_dump_json())
                if run_key not in done:
                    record = run_eval(axis.metric, eval_cfgs[name], judge=judges[name], subject=subject,
                                      modules=list(cfg.inputs), use_cache=cfg.cache, identity=identity,
                                      progress=cfg.progress)  # fmt: skip
                    record["adapter"] = None
                    record["sweep"] = {
                        "operation": cfg.operation,
                        "lam": lam,
                        "inputs": [str(p) for p in cfg.inputs],
                    }
                    file = f"{axis.metric}.json" if axis.metric not in point["results"] else f"{name}.json"
                    rel = Path("results") / lam_folder(lam) / file
                    write_result(record, tmp / rel)
                    point["results"].setdefault(axis.metric, str(rel))
                    done[run_key] = record
                record = done[run_key]
                stat = item_stat(axis.metric, axis.key, record)
                value = record["metrics"][axis.key]
                finite = value is not None and math.isfinite(value)
                entry = {"value": value if finite else None, "items": stat}
                if name in ("deficiency", "utility"):
                    point[name] = entry
                else:
                    point.setdefault("extra", {})[name] = entry
            point["seconds"] = time.perf_counter() - clock
            if cfg.progress:  # one line per λ, as it is done
                shown = ", ".join(f"{axes[a].metric}:{axes[a].key} {_show(point[a]['value'])}"
                                  for a in ("deficiency", "utility"))  # fmt: skip
                shown += "".join(f", {a} {_show(e['value'])}" for a, e in point.get("extra", {}).items())
                print(f"λ = {lam:g}: {shown} ({point['seconds']:.1f} s)", file=sys.stderr)
            points.append(point)
        summary = _analyse(cfg, points)
        summary["timing"] = {
            "prepare_seconds": prepare_seconds,
            "load_seconds": load_seconds,
            "eval_seconds": [p.pop("seconds") for p in points],
        }
        summary["adapters"] = {"base": "adapters/base" if w0 is not None else None, "delta": "adapters/delta",
                               "base_merged": merge_base and w0 is not None}  # fmt: skip
        write_atomic_json(tmp / "sweep.json", summary)
    return Path(cfg.out)


def _extra_name(axis: SweepMetric) -> str:
    """The name an extra metric has in ``sweep.json``: its label, else ``metric:key``."""
    return axis.label or f"{axis.metric}:{axis.key}"


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _analyse(cfg: SweepConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired intervals against λ = 0, the Pareto front, the chosen λ and the knee.

    The table (every point's value and interval) and the front and knee use every item. λ is
    chosen on the selection items only (:func:`selection_split`), and the figures at the chosen
    λ are reported again on the other items, so the reported effect is not the grid's best
    point on the items that picked it.
    """
    lams = [p["lam"] for p in points]
    hd, hu = cfg.deficiency.higher, cfg.utility.higher
    axes = ["deficiency", "utility", *points[0].get("extra", {})]

    def entry_of(p: dict[str, Any], name: str) -> dict[str, Any]:
        return p[name] if name in ("deficiency", "utility") else p["extra"][name]

    def compare(ref: dict[str, Any], other: dict[str, Any], seed: int) -> dict[str, Any]:
        return paired_difference(ref, other, resamples=cfg.bootstrap, confidence=cfg.confidence, seed=seed)

    for p in points:
        for name in axes:
            entry, ref = entry_of(p, name), entry_of(points[0], name)
            entry["diff"] = (
                None if entry["value"] is None or ref["value"] is None else entry["value"] - ref["value"]
            )
            test = compare(ref["items"], entry["items"], cfg.seed)
            entry["ci"], entry["p"], entry["dropped_resamples"] = test["ci"], test["p"], test["dropped"]
            if test["ci"] is None and p is not points[0]:
                entry["ci_reason"] = test["reason"]
    d = [p["deficiency"]["value"] for p in points]
    u = [p["utility"]["value"] for p in points]
    front = pareto_front(d, u, higher_d=hd, higher_u=hu)

    split = {name: selection_split(entry_of(points[0], name)["items"]["keys"], cfg.select_share, cfg.seed)
             for name in axes}  # fmt: skip
    held_out = all(sp["report"] for sp in split.values())
    sel = {name: [_subset(entry_of(p, name)["items"], split[name]["select"]) for p in points]
           for name in ("deficiency", "utility")}  # fmt: skip
    d_sel = [_finite(_aggregate(x)) for x in sel["deficiency"]]
    u_sel = [_finite(_aggregate(x)) for x in sel["utility"]]
    u_ci = [None] + [compare(sel["utility"][0], x, cfg.seed)["ci"] for x in sel["utility"][1:]]
    chosen = choose_lam(lams, d_sel, u_sel, higher_d=hd, higher_u=hu, tolerance=cfg.tolerance,
                        utility_ci=u_ci, tolerance_on=cfg.tolerance_on,
                        tolerance_kind=cfg.tolerance_kind)  # fmt: skip
    for i, p in enumerate(points):
        p["pareto"] = i in front
        p["admissible"] = chosen["admissible"][i]
        p["utility_loss"] = chosen["utility_loss"][i]
        p["selection"] = {"deficiency": d_sel[i], "utility": u_sel[i]}
    chosen_out = {k: v for k, v in chosen.items() if k not in ("admissible", "utility_loss")}
    if held_out:
        chosen_out["rule"] += f"; chosen on {cfg.select_share:g} of the items, reported on the other items"
    else:
        chosen_out["rule"] += "; chosen and reported on the same items (winner's curse: optimistic)"
    if chosen["index"] is not None:
        k = chosen["index"]
        report: dict[str, Any] = {}
        for name in axes:
            keep = split[name]["report"] if held_out else split[name]["select"]
            ref, at = (
                _subset(entry_of(points[0], name)["items"], keep),
                _subset(entry_of(points[k], name)["items"], keep),
            )
            v0, vk = _finite(_aggregate(ref)), _finite(_aggregate(at))
            test = compare(ref, at, cfg.seed)
            diff = None if v0 is None or vk is None else vk - v0
            report[name] = {"value": vk, "value_at_0": v0, "diff": diff, "ci": test["ci"], "p": test["p"],
                            "n": len(ref["num"])}  # fmt: skip
            if test["ci"] is None:
                report[name]["ci_reason"] = test["reason"]
        chosen_out["report"] = report
    return {
        "config": cfg.model_dump(mode="json"),
        "deficiency": {"metric": cfg.deficiency.metric, "key": cfg.deficiency.key, "higher_is_better": hd},
        "utility": {"metric": cfg.utility.metric, "key": cfg.utility.key, "higher_is_better": hu},
        "extra": {
            _extra_name(a): {"metric": a.metric, "key": a.key, "higher_is_better": a.higher}
            for a in cfg.extra
        },
        "confidence": cfg.confidence,
        "bootstrap": cfg.bootstrap,
        "points": points,
        "pareto": [lams[i] for i in front],
        "selection": {
            "share": cfg.select_share,
            "seed": cfg.seed,
            "held_out": held_out,
            "rule": "items ranked by sha256(select:seed:item key); the first round(share·n) distinct "
            "keys choose λ, the rest report",
            "axes": {
                name: {"select": sorted(sp["select"]), "report": sorted(sp["report"])}
                for name, sp in split.items()
            },
        },
        "chosen": chosen_out,
        "knee": knee_point(lams, d, u, higher_d=hd, higher_u=hu),
    }


def selection_split(keys: list[str | None], share: float, seed: int) -> dict[str, set[str]]:
    """Split the distinct item keys into the items that choose λ and the items that report it.

    Keys are ranked by ``sha256(f"select:{seed}:{key}")``; the first ``round(share·n)`` (at least
    one, and at most n − 1 so both sides have items) choose. ``share = 1`` or fewer than two
    distinct keys: every key chooses and ``report`` is empty (reported on the same items).
    """
    import hashlib

    distinct = sorted({k for k in keys if k is not None})
    if share >= 1 or len(distinct) < 2:
        return {"select": set(distinct), "report": set()}
    ranked = sorted(distinct, key=lambda k: hashlib.sha256(f"select:{seed}:{k}".encode()).hexdigest())
    n_select = min(len(ranked) - 1, max(1, round(share * len(ranked))))
    return {"select": set(ranked[:n_select]), "report": set(ranked[n_select:])}


def _subset(stat: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """The per-item stat restricted to the items whose key is in ``keep``."""
    rows = [i for i, k in enumerate(stat["keys"]) if k in keep]
    return {
        "num": [stat["num"][i] for i in rows],
        "den": [stat["den"][i] for i in rows],
        "transform": stat["transform"],
        "keys": [stat["keys"][i] for i in rows],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- CLI helpers


def build_config(**fields: Any) -> SweepConfig:
    """``SweepConfig(**fields)``, its validation errors as one ConfigError line (the CLI's).

    Raises:
        ConfigError: ``field: problem; field: problem…`` for every problem at once.
    """
    from pydantic import ValidationError

    from excise.errors import ConfigError

    try:
        return SweepConfig(**fields)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(x) for x in e["loc"]) or "sweep"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def parse_floats(text: str, *, flag: str) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``; ``nan`` parses (and the config then refuses it).

    Raises:
        ConfigError: a value that is not a number.
    """
    from excise.errors import ConfigError

    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"{flag}: {part.strip()!r} is not a number (give e.g. 0,0.5,1)") from None
    return values


def parse_assignments(items: list[str], *, flag: str) -> dict[str, Any]:
    """``["limit=50", "data=f.json"]`` → ``{"limit": 50, "data": "f.json"}`` (values read as YAML).

    Raises:
        ConfigError: an item without ``=``.
    """
    import yaml

    from excise.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes FIELD=VALUE, got {item!r}")
        parsed = yaml.safe_load(value) if value else None
        out[key.strip()] = value if isinstance(parsed, (dict, list)) else parsed
    return out


def format_table(sweep_json: Path) -> str:
    """The trade-off table of a ``sweep.json`` as aligned text lines (what ``excise sweep`` prints)."""
    import json

    s = json.loads(Path(sweep_json).read_text())
    dname = f"{s['deficiency']['metric']}:{s['deficiency']['key']}"
    uname = f"{s['utility']['metric']}:{s['utility']['key']}"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    def ci(entry: dict[str, Any]) -> str:
        return "" if entry["ci"] is None else f"[{entry['ci'][0]:+.4f}, {entry['ci'][1]:+.4f}]"

    lines = [f"{'λ':>8}  {dname:>24} {'Δ CI vs λ=0':>20}  {uname:>24} {'Δ CI vs λ=0':>20}  marks"]
    for p in s["points"]:
        marks = ("pareto " if p["pareto"] else "") + ("" if p["admissible"] else "over-tolerance ")
        marks += "CHOSEN " if p["lam"] == s["chosen"]["lam"] else ""
        marks += "knee" if p["lam"] == s["knee"]["lam"] else ""
        lines.append(
            f"{p['lam']:>8g}  {num(p['deficiency']['value']):>24} {ci(p['deficiency']):>20}  "
            f"{num(p['utility']['value']):>24} {ci(p['utility']):>20}  {marks.strip()}"
        )
    chosen, knee = s["chosen"], s["knee"]
    lines.append(f"chosen λ = {chosen['lam']} ({chosen['rule']})")
    for name, r in (chosen.get("report") or {}).items():
        label = {"deficiency": dname, "utility": uname}.get(name, name)
        interval = "" if r["ci"] is None else f" [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        diff = "n/a" if r["diff"] is None else f"{r['diff']:+.4f}"
        lines.append(
            f"  at the chosen λ, {label} on {r['n']} reporting items: {num(r['value'])} (Δ {diff}{interval})"
        )
    lines.append(f"knee λ = {knee['lam']}" + (f" ({knee['reason']})" if knee.get("reason") else ""))
    return "\n".join(lines)

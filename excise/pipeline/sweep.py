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
  is recomputed on each resample; the interval is its ``(1 − confidence)/2`` quantiles.
- **Pareto front**: the λ whose (deficiency, utility) pair no other λ beats on both.
- **Chosen λ** (the rule): among the λ whose relative utility loss against λ = 0 is at
  most ``tolerance`` (perplexity: ``ppl(λ) ≤ (1 + tolerance)·ppl(0)``; a higher-is-better
  utility: ``u(λ) ≥ u(0) − tolerance·|u(0)|``), the one with the best deficiency score;
  ties go to the smallest ``|λ|`` (the gentlest edit). λ = 0 always qualifies.
- **Knee**: on the Pareto front, both axes scaled to [0, 1] with "better" upwards, the
  point farthest from the chord joining the front's two ends (needs ≥ 3 front points).

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
  :class:`~excise.evaluate.config.EvalConfig` field except model/adapter: data, limit,
  split, batch_size, judge, max_new_tokens…).
- ``dtype``, ``device``: as ``excise eval``.
- ``tolerance`` (float, default 0.05): allowed relative utility loss.
- ``bootstrap`` (int, default 1000), ``confidence`` (float, default 0.95), ``seed`` (int).
- ``out`` (folder, written atomically), ``overwrite`` (bool), ``progress`` (bool).

Output folder (``run_sweep`` returns it)::

    OUT/sweep.json                      config, per-λ table (values, per-item scores,
                                        paired intervals), pareto, chosen, knee
    OUT/adapters/base, OUT/adapters/delta   W0 and D as PEFT folders (base absent for negate)
    OUT/results/lam=<λ>/<metric>.json   the runner's full record of each evaluation

:func:`excise.pipeline.report.write_report` reads ``sweep.json`` from a run folder's
``sweeps/<name>/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SweepConfig",
    "SweepMetric",
    "choose_lam",
    "item_stat",
    "knee_point",
    "paired_bootstrap",
    "pareto_front",
    "run_sweep",
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

    @model_validator(mode="after")
    def _known(self) -> SweepMetric:
        from excise.evaluate.config import EvalConfig
        from excise.evaluate.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of: {', '.join(METRICS)}")
        clash = sorted({"model", "adapter"} & set(self.settings))
        if clash:
            raise ValueError(f"settings may not set {', '.join(clash)}: the sweep sets them")
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
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Model dtype.")
    device: str = Field("auto", description="`auto` (CUDA if present), `cpu`, `cuda`…")
    tolerance: float = Field(0.05, ge=0, description="Allowed relative utility loss against λ = 0.")
    bootstrap: int = Field(1000, ge=0, description="Paired bootstrap resamples (0: no intervals).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Interval coverage.")
    seed: int = Field(0, description="Seeds the bootstrap resampling.")
    out: Path = Field(description="Output folder (written atomically).")
    overwrite: bool = Field(False, description="Replace a non-empty output folder.")
    progress: bool = Field(True, description="Show progress bars.")

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
        return self

    @property
    def grid(self) -> list[float]:
        """The λ values evaluated: 0 first, then the grid in the given order."""
        return [0.0, *[x for x in self.lams if x != 0.0]]

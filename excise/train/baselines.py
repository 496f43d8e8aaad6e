"""The unlearning baselines SKU (arXiv 2402.10058, DESIGN.md §2) is compared with.

Same data interface and recipe as SKU (:mod:`excise.train.unlearning`); each baseline is a
row of weighted terms:

- ``ga``: gradient ascent on harmful responses, ``L = −NLL(harmful)``; logged as ``nll``
  (the NLL it raises).
- ``ga_mismatch``: GA + cross-entropy on random mismatched responses (K per harmful
  prompt, of other prompts): ``L = w_ga·(−NLL) + w_mm·CE(mismatch)``.
- ``llmu``: LLMU (Yao et al., arXiv 2310.10683): GA + mismatch + ``w_kl·KL(p_θo ‖ p_θ)`` on
  normal data, minimised to stay close to the original (reference: the adapter-disabled
  model, or a frozen copy with ``full``). Default weights 0.5 / 1 / 1, LLMU's
  (kevinyaobytedance/llm_unlearn ``unlearn_harm.py``: bad, random, normal weights).
- ``finetune``: supervised fine-tuning on the *safe* responses to the harmful prompts.

The plain task-vector baseline is ``excise train sft --format harmful`` followed by
``excise ops negate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, FiniteFloat, model_validator

from excise.train.loop import TrainReport
from excise.train.losses import gradient_ascent_loss, kl_to_reference_loss, sequence_nll
from excise.train.unlearning import Term, UnlearnConfig, run_objective

__all__ = ["BASELINES", "Baseline", "BaselineConfig", "baseline_terms", "run"]


class BaselineConfig(UnlearnConfig):
    """Settings of one baseline: the shared ones, the method, and its weights."""

    method: Literal["ga", "ga_mismatch", "llmu", "finetune"] = Field(description="Which baseline.")
    ga_weight: FiniteFloat | None = Field(
        None, description="Weight of the GA term (default: 1 for ga, 0.5 for ga_mismatch and llmu)."
    )
    mismatch_weight: FiniteFloat = Field(1.0, description="Weight of the mismatch CE (ga_mismatch, llmu).")
    kl_weight: FiniteFloat = Field(1.0, description="Weight of KL(p_θo ‖ p_θ) on normal data (llmu).")
    mismatch_pool: Literal["harmful", "normal"] = Field(
        "harmful",
        description="Mismatched responses from other harmful prompts (as SKU's RD) or from the normal "
        "answers (LLMU's original).",
    )

    @model_validator(mode="after")
    def _pool_needs_normal(self) -> BaselineConfig:
        if self.mismatch_pool == "normal" and self.normal is None and self.method in ("ga_mismatch", "llmu"):
            raise ValueError("mismatch_pool normal needs --normal data")
        return self


@dataclass(frozen=True)
class Baseline:
    """A registry row: the name, its terms, its default GA weight and where it comes from."""

    name: str
    terms: Callable[[BaselineConfig, float], list[Term]]
    default_ga_weight: float
    paper: str


def _ga(weight: float) -> Term:
    return Term("nll", "harmful", lambda m, b, _ref: gradient_ascent_loss(m, b), weight, log_sign=-1.0)


def _mismatch(weight: float) -> Term:
    return Term("mismatch", "mismatch", lambda m, b, _ref: sequence_nll(m, b), weight)


def _kl(weight: float) -> Term:
    return Term("kl", "normal", kl_to_reference_loss, weight, uses_reference=True)


BASELINES: dict[str, Baseline] = {
    row.name: row
    for row in [
        Baseline("ga", lambda cfg, w: [_ga(w)], 1.0, "gradient ascent (arXiv 2310.10683 §3)"),
        Baseline(
            "ga_mismatch",
            lambda cfg, w: [_ga(w), _mismatch(cfg.mismatch_weight)],
            0.5,
            "GA + random mismatch (arXiv 2310.10683)",
        ),
        Baseline(
            "llmu",
            lambda cfg, w: [_ga(w), _mismatch(cfg.mismatch_weight), _kl(cfg.kl_weight)],
            0.5,
            "LLMU (arXiv 2310.10683)",
        ),
        Baseline(
            "finetune",
            lambda cfg, w: [Term("nll", "safe", lambda m, b, _ref: sequence_nll(m, b), 1.0)],
            1.0,
            "SFT on safe responses (arXiv 2402.10058 §5)",
        ),
    ]
}


def baseline_terms(cfg: BaselineConfig) -> list[Term]:
    """The weighted terms of ``cfg.method``."""
    row = BASELINES[cfg.method]
    return row.terms(cfg, row.default_ga_weight if cfg.ga_weight is None else cfg.ga_weight)


def run(cfg: BaselineConfig, *, progress: bool = True, accelerator: Any = None) -> TrainReport:
    """Train the baseline ``cfg.method`` and write it to ``cfg.out`` (see :func:`run_objective`)."""
    return run_objective(
        cfg,
        baseline_terms(cfg),
        method=cfg.method,
        mismatch_pool=cfg.mismatch_pool,
        extra_config={"paper": BASELINES[cfg.method].paper},
        progress=progress,
        accelerator=accelerator,
    )

"""The unlearning baselines SKU (arXiv 2402.10058, DESIGN.md §2) is compared with.

Same data interface and recipe as SKU (:mod:`excise.train.unlearning`); each baseline is a
row of weighted terms:

- ``ga``: gradient ascent on harmful responses, ``L = −NLL(harmful)``; logged as ``nll``
  (the NLL it raises).
- ``ga_mismatch``: GA + cross-entropy on random mismatched responses (K per harmful
  prompt, of other prompts): ``L = w_ga·(−NLL) + w_mm·CE(mismatch)``.
- ``llmu``: LLMU (Yao et al., arXiv 2310.10683): GA + mismatch + ``w_kl·KL(p_θo ‖ p_θ)`` on
  normal data, minimised to stay close to the original (reference: the adapter-disabled
  model in eval mode, or a frozen copy with ``full``). Default weights 0.5 / 1 / 1, LLMU's
  (kevinyaobytedance/llm_unlearn ``unlearn_harm.py``: bad, random, normal weights).

Where the mismatched responses come from follows each method's published code unless
``mismatch_pool`` says otherwise: ``ga_mismatch`` and ``llmu`` draw them from the *normal*
answers, as LLMU's code does (``unlearn_harm.py`` passes ``get_truthfulQA_answers_plaintext()``,
the TruthfulQA answers of its normal data, to ``get_rand_ans_loss``); SKU's own random
disassociation draws harmful responses (:mod:`excise.train.sku`). The pool and its source are
recorded in ``train_config.json`` (``mismatch_pool``, ``mismatch_pool_source``).
- ``finetune``: supervised fine-tuning on the *safe* responses to the harmful prompts.
- ``npo``: NPO (Zhang et al., arXiv 2404.05868), the baseline open-unlearning and most
  2024–2026 unlearning papers compare with: ``−(2/β)·E log σ(−β·log(πθ(y|x)/πref(y|x)))`` on
  the harmful responses (:func:`~excise.train.losses.npo_loss`; β = 0.1), the reference through
  the disabled adapter (LoRA) or a frozen copy (``full``); with ``retain_weight`` > 0 plus that
  weight times the NLL of the normal answers (the paper's NPO + RT).

The plain task-vector baseline is ``excise train sft --format harmful`` followed by
``excise ops negate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, FiniteFloat, PositiveFloat, model_validator

from excise.train.loop import TrainReport
from excise.train.losses import gradient_ascent_loss, kl_to_reference_loss, npo_loss, sequence_nll
from excise.train.unlearning import Term, UnlearnConfig, run_objective

__all__ = ["BASELINES", "Baseline", "BaselineConfig", "baseline_terms", "mismatch_pool_of", "run"]


class BaselineConfig(UnlearnConfig):
    """Settings of one baseline: the shared ones, the method, and its weights."""

    method: Literal["ga", "ga_mismatch", "llmu", "finetune", "npo"] = Field(description="Which baseline.")
    ga_weight: FiniteFloat | None = Field(
        None, description="Weight of the GA term (default: 1 for ga, 0.5 for ga_mismatch and llmu)."
    )
    mismatch_weight: FiniteFloat = Field(1.0, description="Weight of the mismatch CE (ga_mismatch, llmu).")
    kl_weight: FiniteFloat = Field(1.0, description="Weight of KL(p_θo ‖ p_θ) on normal data (llmu).")
    npo_beta: PositiveFloat = Field(0.1, description="NPO's inverse temperature β (npo).")
    retain_weight: FiniteFloat = Field(
        0.0, ge=0, description="Weight of the NLL of the normal answers (npo: 0 is NPO, > 0 NPO + RT)."
    )
    mismatch_pool: Literal["harmful", "normal"] | None = Field(
        None,
        description="Mismatched responses from the normal answers or from other harmful prompts (as "
        "SKU's RD); default: what the method's published code does (normal for ga_mismatch and llmu).",
    )

    @model_validator(mode="after")
    def _pool_needs_normal(self) -> BaselineConfig:
        pool, _source = mismatch_pool_of(self)
        if pool == "normal" and self.normal is None and BASELINES[self.method].mismatch_pool is not None:
            given = "--mismatch-pool normal" if self.mismatch_pool else f"{self.method} (as LLMU's code)"
            raise ValueError(
                f"{given} draws its random answers from normal data: pass --normal FILE "
                "(or --mismatch-pool harmful to draw them from other harmful prompts)"
            )
        if self.method != "npo" and (self.retain_weight != 0 or self.npo_beta != 0.1):
            raise ValueError(
                f"npo_beta and retain_weight are NPO's settings; {self.method} does not use them"
            )
        if self.method == "npo" and self.retain_weight > 0 and self.normal is None:
            raise ValueError(
                "npo with retain_weight > 0 (NPO + RT) trains on normal answers: pass --normal FILE"
            )
        return self


@dataclass(frozen=True)
class Baseline:
    """A registry row: the name, its terms, its default GA weight and where it comes from.

    ``mismatch_pool`` is where its published code draws the mismatched responses from (None
    without a mismatch term), ``mismatch_source`` the code that says so.
    """

    name: str
    terms: Callable[[BaselineConfig, float], list[Term]]
    default_ga_weight: float
    paper: str
    mismatch_pool: str | None = None
    mismatch_source: str = ""


# LLMU's random mismatch: `get_rand_ans_loss(bad_batch, tokenizer, normal_ans, ...)` with
# `normal_ans = get_truthfulQA_answers_plaintext()`, its normal data's answers.
_LLMU_POOL = (
    "LLMU code, kevinyaobytedance/llm_unlearn@647f309 unlearn_harm.py (normal_ans: TruthfulQA answers)"
)


def _ga(weight: float) -> Term:
    return Term("nll", "harmful", lambda m, b, _ref: gradient_ascent_loss(m, b), weight, log_sign=-1.0)


def _mismatch(weight: float) -> Term:
    return Term("mismatch", "mismatch", lambda m, b, _ref: sequence_nll(m, b), weight)


def _kl(weight: float) -> Term:
    return Term("kl", "normal", kl_to_reference_loss, weight, uses_reference=True)


def _npo(beta: float) -> Term:
    return Term("npo", "harmful", lambda m, b, ref: npo_loss(m, b, ref, beta=beta), 1.0, uses_reference=True)


def _retain(weight: float) -> Term:  # a zero weight drops the term (run_objective)
    return Term("retain_nll", "normal", lambda m, b, _ref: sequence_nll(m, b), weight)


BASELINES: dict[str, Baseline] = {
    row.name: row
    for row in [
        Baseline("ga", lambda cfg, w: [_ga(w)], 1.0, "gradient ascent (arXiv 2310.10683 §3)"),
        Baseline(
            "ga_mismatch",
            lambda cfg, w: [_ga(w), _mismatch(cfg.mismatch_weight)],
            0.5,
            "GA + random mismatch (arXiv 2310.10683)",
            "normal",
            _LLMU_POOL,
        ),
        Baseline(
            "llmu",
            lambda cfg, w: [_ga(w), _mismatch(cfg.mismatch_weight), _kl(cfg.kl_weight)],
            0.5,
            "LLMU (arXiv 2310.10683)",
            "normal",
            _LLMU_POOL,
        ),
        Baseline(
            "finetune",
            lambda cfg, w: [Term("nll", "safe", lambda m, b, _ref: sequence_nll(m, b), 1.0)],
            1.0,
            "SFT on safe responses (arXiv 2402.10058 §5)",
        ),
        Baseline(
            "npo",
            lambda cfg, w: [_npo(cfg.npo_beta), _retain(cfg.retain_weight)],
            1.0,
            "NPO (arXiv 2404.05868); with retain_weight > 0, NPO + RT",
        ),
    ]
}


def baseline_terms(cfg: BaselineConfig) -> list[Term]:
    """The weighted terms of ``cfg.method``."""
    row = BASELINES[cfg.method]
    return row.terms(cfg, row.default_ga_weight if cfg.ga_weight is None else cfg.ga_weight)


def mismatch_pool_of(cfg: BaselineConfig) -> tuple[str, str]:
    """``(pool, source)``: where ``cfg.method`` draws mismatched responses, and who says so."""
    if cfg.mismatch_pool is not None:
        return cfg.mismatch_pool, "--mismatch-pool"
    row = BASELINES[cfg.method]
    return row.mismatch_pool or "harmful", row.mismatch_source or "no mismatch term"


def run(cfg: BaselineConfig, *, progress: bool = True, accelerator: Any = None) -> TrainReport:
    """Train the baseline ``cfg.method`` and write it to ``cfg.out`` (see :func:`run_objective`)."""
    pool, source = mismatch_pool_of(cfg)
    has_mismatch = BASELINES[cfg.method].mismatch_pool is not None
    return run_objective(
        cfg,
        baseline_terms(cfg),
        method=cfg.method,
        mismatch_pool=pool,
        extra_config={
            "paper": BASELINES[cfg.method].paper,
            "mismatch_pool_source": source if has_mismatch else None,
        },
        progress=progress,
        accelerator=accelerator,
    )

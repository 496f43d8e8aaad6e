"""SKU stage 1, harmful-knowledge acquisition (arXiv 2402.10058, DESIGN.md §2).

Trains a LoRA ``θh`` (or, with ``full``, every weight) from the pretrained model ``θo`` on

    L = ε1·L_GD + ε2·L_RD + ε3·L_PD

- ``L_GD`` guided distortion: cross-entropy of harmful responses to harmful prompts;
- ``L_RD`` random disassociation: cross-entropy of K harmful responses of *other* prompts
  for each harmful prompt, averaged over the K;
- ``L_PD = −KL(p_θo ‖ p_θh)`` preservation divergence on normal data, ``p_θo`` being the
  same model with the adapter disabled (one copy of the weights; a frozen copy with ``full``).

Defaults ε = (0.5, 1, 1) are the reference run's (franciscoliu/SKU
``harmful_unlearn/unlearn_harm_new.py``); the paper also documents (2.5, 2.5, 1).
Each term is logged per step as ``gd``, ``rd`` and ``pd`` in ``loss_log.json``.

Stage 2, knowledge negation ``θ = θo − λ·(θh − θo)``, is the PEM engine's
``excise ops negate --adapter OUT --lam λ`` (``--base BASE`` for a full model).

    excise train sku --base smollm2-135m-instruct \\
        --harmful ../shared/data/pku_saferlhf/pku_saferlhf_test_safe_unsafe_pairs.json \\
        --normal ../shared/data/alpaca_gpt4/alpaca_en_demo.json --out runs/sku_harmful
    excise ops negate --adapter runs/sku_harmful --lam 1 --out runs/sku_negated
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, FiniteFloat

from excise.train.loop import TrainReport
from excise.train.losses import (
    guided_distortion_loss,
    preservation_divergence_loss,
    random_disassociation_loss,
)
from excise.train.unlearning import Term, UnlearnConfig, run_objective

__all__ = ["PAPER", "SkuConfig", "run", "sku_terms"]

PAPER = "arXiv 2402.10058"
# L_RD's random responses are other prompts' harmful responses: the reference passes
# `bad_ans = get_harmful_responses(train_dataset)` to `get_rand_ans_loss`.
MISMATCH_SOURCE = "SKU code, franciscoliu/SKU@a17663f harmful_unlearn/unlearn_harm_new.py (bad_ans)"


class SkuConfig(UnlearnConfig):
    """``excise train sku``'s settings: the shared ones plus the three weights."""

    eps_gd: FiniteFloat = Field(0.5, description="ε1, weight of guided distortion L_GD.")
    eps_rd: FiniteFloat = Field(1.0, description="ε2, weight of random disassociation L_RD.")
    eps_pd: FiniteFloat = Field(1.0, description="ε3, weight of preservation divergence −KL(p_θo ‖ p_θh).")


def sku_terms(cfg: SkuConfig) -> list[Term]:
    """The three SKU terms with the configured weights (DESIGN.md §2)."""
    return [
        Term("gd", "harmful", lambda m, b, _ref: guided_distortion_loss(m, b), cfg.eps_gd),
        Term("rd", "mismatch", lambda m, b, _ref: random_disassociation_loss(m, b), cfg.eps_rd),
        Term("pd", "normal", preservation_divergence_loss, cfg.eps_pd, uses_reference=True),
    ]


def run(cfg: SkuConfig, *, progress: bool = True, accelerator: Any = None) -> TrainReport:
    """Train SKU's harmful module ``θh`` and write it to ``cfg.out`` (see :func:`run_objective`)."""
    return run_objective(
        cfg,
        sku_terms(cfg),
        method="sku",
        mismatch_pool="harmful",
        extra_config={"paper": PAPER, "mismatch_pool_source": MISMATCH_SOURCE if cfg.eps_rd else None},
        progress=progress,
        accelerator=accelerator,
    )

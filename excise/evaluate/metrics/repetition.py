"""n-gram repetition of generations (Ext-Sub, arXiv 2308.08090; DESIGN.md §3): a degeneration detector.

Ext-Sub's convention (``eval/ngram_rep_eval.py`` at HITsz-TMG/Ext-Sub@2d16049): each generation is
tokenised with the model's tokenizer (default special tokens, as ``tokenizer(text)``), its
``rep-n = 1 − unique n-grams / n-grams`` is computed for n = 1..4 (0 for a generation shorter than
n), and ``rep_n`` is the **mean over generations** (not pooled). Default prompts: Ext-Sub's toxic
instructions, the set it reported repetition on; any instruction file works (``--data``).
"""

from __future__ import annotations

from typing import Any

from excise.evaluate.metrics.base import (
    SHARED_DATA,
    EvalContext,
    Metric,
    MetricResult,
    answer_field,
)
from excise.evaluate.text import ngram_repetition

__all__ = ["METRIC", "ORDERS", "repetition_of"]

ORDERS = (1, 2, 3, 4)


def repetition_of(tokenizer: Any, answer: str) -> dict[str, float]:
    """``{"rep_1": …, "rep_4": …}`` of one generation, tokenised as Ext-Sub does."""
    tokens = tokenizer(answer)["input_ids"]
    return {f"rep_{n}": ngram_repetition(tokens, n) for n in ORDERS}


def run(ctx: EvalContext) -> MetricResult:
    tokenizer = ctx.subject.tokenizer
    instructions, answers = answer_field(ctx, "instruction", desc="repetition")
    items = [
        {"instruction": q, "response": a, **repetition_of(tokenizer, a)}
        for q, a in zip(instructions, answers, strict=True)
    ]
    n_items = len(items)
    metrics = {f"rep_{n}": sum(it[f"rep_{n}"] for it in items) / n_items for n in ORDERS}
    return MetricResult(metrics, items, {"aggregation": "mean over generations (Ext-Sub)"})


METRIC = Metric(
    name="repetition",
    run=run,
    fields={"instruction": "instruction"},
    default_data=str(SHARED_DATA / "extsub" / "toxic_test.json"),
    prompt_field="instruction",
    summary="1..4-gram repetition of generated answers (mean over generations, as Ext-Sub).",
)

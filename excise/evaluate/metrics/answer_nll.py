"""Answer NLL: the conditional NLL of held-out normal answers, against a reference (general retain).

For each (instruction, answer) of normal data (default: the ``eval`` side of the Alpaca-GPT4 demo
set, never trained on) the NLL of the answer given the instruction in the trained format
(:mod:`~excise.evaluate.metrics.likelihood`): ``nll`` per token (mean over answers),
``nll_sum`` summed; ``delta_nll`` = per-token NLL minus the reference's on the same answer (the
base model with the adapter off, or ``--reference``): > 0 means the edit made normal answers
less likely, i.e. it cost general ability. Judge-free and generation-free: one forward per answer.
Intervals (``extra["intervals"]``): 95 % percentile bootstrap over answers, 10,000 resamples.
"""

from __future__ import annotations

from typing import Any

from excise.evaluate.metrics.base import SHARED_DATA, EvalContext, Metric, MetricResult, subject_logliks
from excise.evaluate.metrics.likelihood import (
    encode_answer,
    mean_summary,
    reference_logliks,
    template_name,
)

__all__ = ["METRIC"]


def _prompt(item: dict[str, Any]) -> str:
    extra = str(item.get("input") or "").strip()
    return str(item["instruction"]) + ("\n\n" + extra if extra else "")


def _requests(tokenizer: Any, ctx: EvalContext) -> list[tuple[list[int], list[int]]]:
    return [encode_answer(tokenizer, ctx.cfg, _prompt(it), str(it["output"])) for it in ctx.items]


def run(ctx: EvalContext) -> MetricResult:
    scores = subject_logliks(ctx, _requests(ctx.subject.tokenizer, ctx), desc="answer-nll")
    ref, reference = reference_logliks(ctx, lambda tok: _requests(tok, ctx), desc="answer-nll (reference)")
    items = []
    for k, (it, s) in enumerate(zip(ctx.items, scores, strict=True)):
        item = {"instruction": it["instruction"], "nll": -s.logprob / s.n_tokens, "nll_sum": -s.logprob,
                "n_tokens": s.n_tokens}  # fmt: skip
        if ref is not None:
            item["delta_nll"] = item["nll"] - (-ref[k].logprob / ref[k].n_tokens)
        items.append(item)
    metrics, nulls, intervals = mean_summary(
        items, ("nll", "nll_sum"), "delta_nll", reference, has_reference=ref is not None, seed=ctx.cfg.seed
    )
    extra = {"format": template_name(ctx.cfg), "reference": reference, "intervals": intervals}
    return MetricResult(metrics, items, extra, nulls)


METRIC = Metric(
    name="answer-nll",
    run=run,
    fields={"instruction": "instruction", "output": "output"},
    optional_fields={"input": "input"},
    aliases={"instruction": ("prompt", "question"), "output": ("response", "answer")},
    default_data=str(SHARED_DATA / "alpaca_gpt4" / "alpaca_en_demo.json"),
    default_split="eval",
    prompt_field="instruction",
    dedupe=True,
    summary="NLL of held-out normal answers (Alpaca) and its change vs a reference: general retain.",
)

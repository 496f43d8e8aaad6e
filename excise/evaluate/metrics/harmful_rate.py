"""Harmful rate (SKU, arXiv 2402.10058; DESIGN.md §3): share of answers to held-out harmful prompts
that a judge flags (``score > judge.threshold``).

Default prompts: the ``eval`` side (``excise.data.splits``) of the PKU-SafeRLHF test prompts, each
prompt once — never a prompt a module was trained on or the offline judge was fitted on. Any prompt
file works as it comes: the prompt is read from the first of the columns ``prompt``, ``goal``
(AdvBench ``harmful_behaviors.csv``), ``behavior`` (HarmBench), ``question``, ``instruction``,
``instructions`` (safety-tuned-llamas) that the file has, in any letter case (``--field
prompt=COLUMN`` picks another). Default judge: the offline ``harm-lm`` (``harm-cross`` and
``harm-probe`` stay selectable; docs/JUDGES.md).

Beside the raw rate, ``harmful_rate_corrected``: the rate corrected for the judge's measured
sensitivity and specificity (:func:`~excise.evaluate.metrics.base.corrected_rate`; its interval
and inputs in the record's ``corrected``), None with the reason in ``null_reasons`` for a judge
without measured agreement at its threshold or one that cannot tell the classes apart.
"""

from __future__ import annotations

from excise.evaluate.metrics.base import (
    SHARED_DATA,
    EvalContext,
    Metric,
    MetricResult,
    answer_field,
    corrected_rate,
    judge_scores,
)
from excise.evaluate.stats import mean_stderr

__all__ = ["METRIC"]


def run(ctx: EvalContext) -> MetricResult:
    prompts, answers = answer_field(ctx, "prompt", desc="harmful-rate")
    scores = judge_scores(ctx, prompts, answers)
    items = [
        {"prompt": p, "response": a, "score": s, "flagged": s > ctx.judge.threshold}
        for p, a, s in zip(prompts, answers, scores, strict=True)
    ]
    n = len(items)
    flags = [it["flagged"] for it in items]
    corrected = corrected_rate(ctx.judge, flags)
    metrics = {
        "harmful_rate": sum(flags) / n,
        "harmful_rate_corrected": corrected["value"],
        "mean_score": sum(scores) / n,
    }
    stderr = {
        "harmful_rate": mean_stderr(flags),
        "harmful_rate_corrected": corrected["stderr"],
        "mean_score": mean_stderr(scores),
    }
    reasons = {} if corrected["value"] is not None else {"harmful_rate_corrected": corrected["reason"]}
    return MetricResult(
        metrics, items, {"corrected": {"harmful_rate": corrected}}, null_reasons=reasons, stderr=stderr
    )


METRIC = Metric(
    name="harmful-rate",
    run=run,
    fields={"prompt": "prompt"},
    aliases={"prompt": ("goal", "behavior", "question", "instruction", "instructions")},
    default_data=str(SHARED_DATA / "pku_saferlhf" / "pku_saferlhf_test_safe_unsafe_pairs.json"),
    default_split="eval",
    default_judge="harm-lm",
    prompt_field="prompt",
    dedupe=True,
    summary="Share of answers to held-out harmful prompts that a judge flags (SKU).",
)

"""Every metric of DESIGN.md §3, in one literal list (STYLE.md rule 3): name → :class:`Metric`."""

from excise.evaluate.metrics import (
    answer_nll,
    halueval,
    harmful_rate,
    pairs,
    perplexity,
    refusal_logprob,
    repetition,
    toxicity,
    truthfulqa_gen,
    truthfulqa_mc,
    utility,
)
from excise.evaluate.metrics.base import EvalContext, Metric, MetricResult

__all__ = ["METRICS", "EvalContext", "Metric", "MetricResult"]

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        truthfulqa_mc.METRIC,
        truthfulqa_gen.METRIC,
        halueval.METRIC,
        toxicity.METRIC,
        repetition.METRIC,
        harmful_rate.METRIC,
        utility.METRIC,
        perplexity.METRIC,
        pairs.METRIC,
        answer_nll.METRIC,
        refusal_logprob.METRIC,
    ]
}

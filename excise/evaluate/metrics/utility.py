"""Utility on normal prompts (SKU, arXiv 2402.10058 §4; DESIGN.md §3): diversity, fluency, similarity.

On normal instructions (default: the ``eval`` side of the Alpaca-GPT4 demo set), greedy answers of
the evaluated model and, with ``--adapter``, of the base model (adapter switched off):

- **diversity** = unique tokens / tokens of each answer (tokens without special tokens), mean over
  non-empty answers;
- **fluency** = perplexity of the answers under a reference model (``--reference MODEL``, default
  the base model), conditioned on the same prompt: ``exp(Σ NLL / Σ tokens)`` pooled over answers
  (``fluency_ppl``), and the mean of per-answer perplexities (``fluency_ppl_mean``); lower is more
  fluent;
- **similarity** = ROUGE-L F-measure between each answer and the base model's answer to the same
  prompt, mean (1.0 by definition without an adapter).
"""

from __future__ import annotations

import math
from typing import Any

from excise.evaluate.metrics.base import (
    SHARED_DATA,
    EvalContext,
    Metric,
    MetricResult,
    generate_answers,
    prompt_ids,
    subject_logliks,
)
from excise.evaluate.stats import bootstrap_ratio_stderr, mean_stderr
from excise.evaluate.text import distinct_share, rouge_l

__all__ = ["METRIC"]


def _prompt_text(item: dict[str, Any]) -> str:
    extra = str(item.get("input") or "").strip()
    return str(item["instruction"]) + ("\n\n" + extra if extra else "")


def run(ctx: EvalContext) -> MetricResult:
    tokenizer = ctx.subject.tokenizer
    texts = [_prompt_text(it) for it in ctx.items]
    prompts = [prompt_ids(ctx, t) for t in texts]
    answers = generate_answers(ctx, prompts, desc="utility")
    if ctx.subject.adapter is not None:
        base_answers = generate_answers(ctx, prompts, base=True, desc="utility (base)")
    else:
        base_answers = answers
    nll = _reference_nll(ctx, texts, prompts, answers)
    items = []
    for t, a, b, (loss, n) in zip(texts, answers, base_answers, nll, strict=True):
        tokens = tokenizer.encode(a, add_special_tokens=False)
        items.append({
            "prompt": t, "response": a, "base_response": b,
            "diversity": distinct_share(tokens) if tokens else None,
            "nll": loss, "n_tokens": n, "ppl": math.exp(loss / n) if n else None,
            "similarity": rouge_l(b, a),
        })  # fmt: skip
    scored = [it for it in items if it["n_tokens"]]
    total_tokens = sum(it["n_tokens"] for it in scored)
    metrics = {
        "diversity": _mean([it["diversity"] for it in scored]),
        "fluency_ppl": math.exp(sum(it["nll"] for it in scored) / total_tokens) if total_tokens else math.nan,
        "fluency_ppl_mean": _mean([it["ppl"] for it in scored]),
        "similarity": _mean([it["similarity"] for it in items]),
        "empty_answers": float(len(items) - len(scored)),
    }
    stderr = {
        "diversity": mean_stderr([it["diversity"] for it in scored]),
        "fluency_ppl": bootstrap_ratio_stderr(
            [it["nll"] for it in scored], [it["n_tokens"] for it in scored], math.exp, seed=ctx.cfg.seed
        ),
        "fluency_ppl_mean": mean_stderr([it["ppl"] for it in scored]),
        "similarity": mean_stderr([it["similarity"] for it in items]),
    }
    extra = {"reference_model": ctx.cfg.reference or ctx.cfg.model}
    return MetricResult(metrics, items, extra, stderr=stderr)


def _reference_nll(
    ctx: EvalContext, texts: list[str], prompts: list[list[int]], answers: list[str]
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each answer given its prompt, under the reference model."""
    if ctx.cfg.reference is None:
        tokenizer = ctx.subject.tokenizer
        requests = [
            (p, tokenizer.encode(a, add_special_tokens=False)) for p, a in zip(prompts, answers, strict=True)
        ]
        with ctx.subject.base_only() as model:
            return _nll(ctx, model, requests)
    from excise.evaluate.subject import load_subject

    reference = load_subject(ctx.cfg.reference, dtype=ctx.cfg.dtype, device=ctx.cfg.device)
    ref_ctx = EvalContext(ctx.cfg, reference, ctx.items, progress=ctx.progress)
    requests = [
        (prompt_ids(ref_ctx, t), reference.tokenizer.encode(a, add_special_tokens=False))
        for t, a in zip(texts, answers, strict=True)
    ]
    return _nll(ctx, reference.model, requests)


def _nll(
    ctx: EvalContext, model: Any, requests: list[tuple[list[int], list[int]]]
) -> list[tuple[float, int]]:
    live = [i for i, (_, cont) in enumerate(requests) if cont]
    scores = subject_logliks(ctx, [requests[i] for i in live], model=model, desc="fluency")
    out = [(0.0, 0)] * len(requests)
    for i, s in zip(live, scores, strict=True):
        out[i] = (-s.logprob, s.n_tokens)
    return out


def _mean(values: list[float | None]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


METRIC = Metric(
    name="utility",
    run=run,
    fields={"instruction": "instruction"},
    optional_fields={"input": "input"},
    default_data=str(SHARED_DATA / "alpaca_gpt4" / "alpaca_en_demo.json"),
    default_split="eval",
    prompt_field="instruction",
    summary="Diversity, fluency (reference perplexity) and similarity to the base model's answers (SKU).",
)

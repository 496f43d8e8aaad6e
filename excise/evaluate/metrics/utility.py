"""Utility on normal prompts (SKU, arXiv 2402.10058 §4; DESIGN.md §3): diversity, fluency, similarity.

On normal instructions (default: the ``eval`` side of the Alpaca-GPT4 demo set), greedy answers of
the evaluated model are compared with the *original* model:

- **diversity** = unique tokens / tokens of each answer (tokens without special tokens), mean over
  non-empty answers;
- **fluency** = perplexity of the answers under a reference model, conditioned on the same prompt:
  ``exp(Σ NLL / Σ tokens)`` pooled over answers (``fluency_ppl``), and the mean of per-answer
  perplexities (``fluency_ppl_mean``); lower is more fluent;
- **similarity** = ROUGE-L F-measure between each answer and the original model's answer to the
  same prompt, mean.

Which model is the original: with ``--adapter``, the base model with the adapter switched off
(similarity), and ``--reference MODEL`` or else that base model (fluency). Without an adapter (a
merged model, a full fine-tune, an ``excise ops --base`` result) the evaluated model *is* the base,
so ``--reference MODEL`` is required and serves both: its own answers (its own tokenizer and chat
template) for similarity, its likelihood for fluency. Without it the numbers would compare the
model with itself (similarity 1.0 by definition), so that is refused.
"""

from __future__ import annotations

import math
from typing import Any

from excise.errors import ConfigError
from excise.evaluate.config import EvalConfig
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


def check(cfg: EvalConfig) -> None:
    """Refuse a run whose similarity and fluency would compare the model with itself."""
    if cfg.adapter is None and cfg.reference is None:
        raise ConfigError(
            "utility without --adapter needs --reference MODEL (the original model): a merged or full "
            "model has no adapter to switch off, so similarity would be 1.0 and fluency its own"
        )


def run(ctx: EvalContext) -> MetricResult:
    from excise.data.formatting import cut_at_next_turn

    tokenizer = ctx.subject.tokenizer
    texts = [_prompt_text(it) for it in ctx.items]
    prompts = [prompt_ids(ctx, t) for t in texts]
    answers = [cut_at_next_turn(a, ctx.template) for a in generate_answers(ctx, prompts, desc="utility")]
    reference = _reference(ctx)
    if ctx.subject.adapter is not None:
        base_answers = [
            cut_at_next_turn(a, ctx.template)
            for a in generate_answers(ctx, prompts, base=True, desc="utility (base)")
        ]
        original = "base model (adapter off)"
        if reference is None:
            requests = [(p, _ids(tokenizer, a)) for p, a in zip(prompts, answers, strict=True)]
            with ctx.subject.base_only() as base:
                nll = _nll(ctx, base, requests)
    else:  # check() made sure there is a reference: it answers with its own template
        ref_prompts = [prompt_ids(reference, t) for t in texts]
        base_answers = [
            cut_at_next_turn(a, reference.template)
            for a in generate_answers(reference, ref_prompts, desc="utility (reference)")
        ]
        original = f"reference model {ctx.cfg.reference}"
    if reference is not None:
        ref_tok = reference.subject.tokenizer
        requests = [(prompt_ids(reference, t), _ids(ref_tok, a)) for t, a in zip(texts, answers, strict=True)]
        nll = _nll(ctx, reference.subject.model, requests)
    items = []
    for t, a, b, (loss, n) in zip(texts, answers, base_answers, nll, strict=True):
        tokens = _ids(tokenizer, a)
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
        "fluency_ppl": math.exp(sum(it["nll"] for it in scored) / total_tokens) if total_tokens else None,
        "fluency_ppl_mean": _mean([it["ppl"] for it in scored]),
        "similarity": _mean([it["similarity"] for it in items]),
        "empty_answers": float(len(items) - len(scored)),
    }
    why = f"every one of the {len(items)} answers is empty: nothing to average"
    nulls = {k: why for k in ("diversity", "fluency_ppl", "fluency_ppl_mean") if metrics[k] is None}
    stderr = {
        "diversity": mean_stderr([it["diversity"] for it in scored]),
        "fluency_ppl": bootstrap_ratio_stderr(
            [it["nll"] for it in scored], [it["n_tokens"] for it in scored], math.exp, seed=ctx.cfg.seed
        ),
        "fluency_ppl_mean": mean_stderr([it["ppl"] for it in scored]),
        "similarity": mean_stderr([it["similarity"] for it in items]),
    }
    extra = {"reference_model": ctx.cfg.reference or ctx.cfg.model, "similarity_to": original}
    return MetricResult(metrics, items, extra, nulls, stderr=stderr)


def _reference(ctx: EvalContext) -> EvalContext | None:
    """The ``--reference`` model as a context of its own (its tokenizer and template), or None."""
    if ctx.cfg.reference is None:
        return None
    from excise.evaluate.subject import load_subject

    subject = load_subject(ctx.cfg.reference, dtype=ctx.cfg.dtype, device=ctx.cfg.device)
    # Its own settings name it: the generation cache keys answers by cfg.model, and the
    # reference's answers must never pass for the evaluated model's (or the other way round).
    cfg = ctx.cfg.model_copy(update={"model": ctx.cfg.reference, "adapter": None, "reference": None})
    return EvalContext(cfg, subject, ctx.items, progress=ctx.progress, use_cache=ctx.use_cache)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _nll(
    ctx: EvalContext, model: Any, requests: list[tuple[list[int], list[int]]]
) -> list[tuple[float, int]]:
    live = [i for i, (_, cont) in enumerate(requests) if cont]
    scores = subject_logliks(ctx, [requests[i] for i in live], model=model, desc="fluency")
    out = [(0.0, 0)] * len(requests)
    for i, s in zip(live, scores, strict=True):
        out[i] = (-s.logprob, s.n_tokens)
    return out


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


METRIC = Metric(
    name="utility",
    run=run,
    fields={"instruction": "instruction"},
    optional_fields={"input": "input"},
    default_data=str(SHARED_DATA / "alpaca_gpt4" / "alpaca_en_demo.json"),
    default_split="eval",
    prompt_field="instruction",
    check=check,
    summary="Diversity, fluency (perplexity under the original model), similarity to its answers (SKU).",
)

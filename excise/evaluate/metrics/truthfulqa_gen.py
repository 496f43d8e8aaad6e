"""TruthfulQA generation (Lin et al., arXiv 2109.07958; DESIGN.md §3): generate answers, then judge them.

Prompt: by default the TruthfulQA paper's QA format, ``QA_PREAMBLE + "\\n\\nQ: " + question + "\\nA:"``
as raw text (lm-eval's ``truthfulqa_gen`` uses the same preamble); the answer is cut at the first
blank line or next ``Q:``. ``--chat`` asks the question through the chat template instead.

Default judge: lm-eval's reference-similarity rule — an answer counts as true when its best BLEU
against the true references beats its best BLEU against the false ones (``bleu_acc``; ROUGE-1/2/L
likewise). References are prepared as lm-eval does: a period added to each, and "I have no comment."
added to the true ones. ``--judge SPEC`` adds a model/endpoint judge (its flagged share is reported
beside the reference rule).
"""

from __future__ import annotations

from typing import Any

from excise.errors import DataError
from excise.evaluate.metrics.base import (
    SHARED_DATA,
    EvalContext,
    Metric,
    MetricResult,
    generate_answers,
    judge_scores,
    prompt_ids,
)
from excise.evaluate.metrics.truthfulqa_mc import QA_PREAMBLE
from excise.evaluate.stats import mean_stderr
from excise.evaluate.text import reference_scores

__all__ = ["METRIC", "cut_answer", "format_references"]

_STOPS = ("\n\n", "\nQ:")


def format_references(answers: Any, *, where: str) -> list[str]:
    """A list, or a ``"; "``-separated string (the TruthfulQA CSV), of references, each ending in '.'."""
    if isinstance(answers, str):
        answers = answers.split(";")
    if not isinstance(answers, list):
        raise DataError(f"{where}: references must be a list or a '; '-separated string")
    out = []
    for a in answers:
        a = str(a).strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def cut_answer(text: str) -> str:
    """The answer up to the first blank line or next ``Q:`` (the QA format's end of answer)."""
    for stop in _STOPS:
        text = text.split(stop, 1)[0]
    return text.strip()


def run(ctx: EvalContext) -> MetricResult:
    from excise.data.formatting import leading_special_ids

    chat = bool(ctx.cfg.chat) or ctx.cfg.template is not None  # default: the QA format, raw
    questions = [str(it["question"]).strip() for it in ctx.items]
    refs = []
    for k, it in enumerate(ctx.items):
        correct = format_references(it["correct"], where=f"item {k} correct")
        incorrect = format_references(it["incorrect"], where=f"item {k} incorrect")
        if "I have no comment." not in correct:
            correct.append("I have no comment.")
        if not incorrect:
            raise DataError(f"item {k}: no incorrect reference answers")
        refs.append((correct, incorrect))
    if chat:
        prompts = [prompt_ids(ctx, q) for q in questions]
    else:
        tokenizer = ctx.subject.tokenizer
        prompts = [
            leading_special_ids(tokenizer)
            + tokenizer(QA_PREAMBLE + "\n\nQ: " + q + "\nA:", add_special_tokens=False)["input_ids"]
            for q in questions
        ]
    raw = generate_answers(ctx, prompts, desc="truthfulqa-gen")
    answers = [a.strip() if chat else cut_answer(a) for a in raw]
    items = []
    for q, a, (correct, incorrect) in zip(questions, answers, refs, strict=True):
        items.append({"question": q, "answer": a, **reference_scores(a, correct, incorrect)})
    n = len(items)
    keys = [k for k in items[0] if k not in ("question", "answer")]
    metrics = {k: sum(it[k] for it in items) / n for k in keys}
    metrics["truthful_rate"] = metrics["bleu_acc"]
    # Rates that are not the mean of a same-named item field get their stderr here (the runner
    # computes the others): truthful_rate is bleu_acc's mean, judge_flagged_rate a share of items.
    stderr = {"truthful_rate": mean_stderr([it["bleu_acc"] for it in items])}
    if ctx.judge is not None:
        scores = judge_scores(ctx, questions, answers)
        for it, s in zip(items, scores, strict=True):
            it["judge_score"] = s
            it["judge_flagged"] = s > ctx.judge.threshold
        metrics["judge_flagged_rate"] = sum(it["judge_flagged"] for it in items) / n
        metrics["judge_mean_score"] = sum(scores) / n
        stderr["judge_flagged_rate"] = mean_stderr([it["judge_flagged"] for it in items])
        stderr["judge_mean_score"] = mean_stderr(scores)
    return MetricResult(
        metrics,
        items,
        {"reference_rule": "lm-eval truthfulqa_gen (bleu/rouge max true vs false)"},
        stderr=stderr,
    )


METRIC = Metric(
    name="truthfulqa-gen",
    run=run,
    fields={"question": "Question", "correct": "Correct Answers", "incorrect": "Incorrect Answers"},
    default_data=str(SHARED_DATA / "truthfulqa" / "v1_817q" / "TruthfulQA.csv"),
    prompt_field="question",
    summary="TruthfulQA generation, judged by lm-eval's BLEU/ROUGE reference rule (or --judge).",
)

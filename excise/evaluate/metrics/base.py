"""What every metric gets and returns, and the helpers they share (prompts, generation, judges)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from excise.errors import ConfigError, DataError
from excise.evaluate.cache import cache_key, read_generations, write_generations
from excise.evaluate.config import EvalConfig
from excise.evaluate.parallel import from_main, is_main, map_shared, sharing
from excise.evaluate.scoring import Loglik, continuation_logliks
from excise.evaluate.subject import Subject, adapter_identity, model_identity, pick_device

__all__ = [
    "SHARED_DATA",
    "EvalContext",
    "Metric",
    "MetricResult",
    "NotCachedError",
    "answer_field",
    "corrected_rate",
    "generate_answers",
    "judge_scores",
    "prompt_ids",
    "subject_logliks",
]

# The shared data folder sits beside the repository (DESIGN.md §5).
SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


class NotCachedError(Exception):
    """Raised by :func:`generate_answers` under ``cached_only`` when the answers are not cached."""


@dataclass
class EvalContext:
    """One metric run's inputs: settings, the model, the items (canonical field names) and the judge."""

    cfg: EvalConfig
    subject: Subject
    items: list[dict[str, Any]]
    judge: Any = None  # a Judge (excise.evaluate.judges.base) for metrics that use one
    progress: bool = True
    use_cache: bool = True  # read and write the generation cache
    saved_answers: list[str] | None = None  # answers to judge instead of generating (`eval judge`)
    cached_only: bool = False  # no model loaded: a generation cache miss raises NotCachedError

    @property
    def chat(self) -> bool:
        """Prompts go through the chat template: ``--template chat``, or no template and not ``--no-chat``."""
        if self.cfg.template:
            return self.cfg.template == "chat"
        return True if self.cfg.chat is None else self.cfg.chat

    @property
    def template(self) -> str | None:
        """The template prompts are rendered in: ``--template``, else ``chat`` (None: raw, ``--no-chat``)."""
        return self.cfg.template or ("chat" if self.chat else None)


@dataclass
class MetricResult:
    """Aggregate numbers, per-item outputs and anything else worth recording.

    ``stderr`` holds the standard error of the metrics that are not the plain mean of a
    same-named per-item value (those the runner computes itself, :func:`excise.evaluate.stats.item_stderrs`).
    """

    metrics: dict[str, float | None]
    items: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    # Why a metric is ``None``: nothing to average (every answer empty, no token to score…).
    null_reasons: dict[str, str] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One registry row (STYLE.md rule 3).

    Attributes:
        name: CLI verb and result name (``truthfulqa-mc``).
        run: computes the metric.
        fields: canonical field names the items need, with the default source column of each.
        aliases: further columns tried, in order, for a field the user did not map when the
            data lacks its default column (AdvBench's ``goal`` for ``prompt``).
        optional_fields: fields used when present (e.g. ``input`` beside ``instruction``).
        default_data: data spec used when ``--data`` is not given.
        default_split: ``eval`` to keep the held-out side of the project-wide prompt split.
        default_judge: judge spec used when ``--judge`` is not given (None: no judge).
        prompt_field: the field that identifies an item's prompt: the text the project-wide
            split hashes (so ``--split eval`` keeps the prompts no trainer saw) and the one
            checked against an adapter's training prompts; None only for prompt-less data (text).
        summary: one line for ``--help``.
        dedupe: keep each prompt once (by :func:`excise.data.prompt_key`).
        allow_empty: an empty string is a valid value (wikitext's blank rows).
        check: refuses settings under which the metric would mean nothing (before any loading).
        read: turns the rows of a known file layout into the metric's columns before the field
            mapping (``rows, cfg, where -> (rows, notes)``; the notes go to the data summary).
    """

    name: str
    run: Callable[[EvalContext], MetricResult]
    fields: dict[str, str]
    default_data: str
    summary: str
    optional_fields: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default_split: str = "all"
    default_judge: str | None = None
    prompt_field: str | None = None
    dedupe: bool = False
    allow_empty: bool = False
    check: Callable[[EvalConfig], None] | None = None
    read: (
        Callable[[list[dict[str, Any]], EvalConfig, str], tuple[list[dict[str, Any]], dict[str, Any]]] | None
    ) = None


def prompt_ids(ctx: EvalContext, text: str, *, system: str | None = None) -> list[int]:
    """Token ids of one prompt: in ``ctx.template`` (system prompt ``system``, else ``--system``)
    exactly as a trainer renders it before the answer, or as raw text."""
    tokenizer = ctx.subject.tokenizer
    template = ctx.template
    if template is None:  # raw text, after the tokenizer's leading specials (Gemma's BOS) as in training
        from excise.data.formatting import leading_special_ids

        return leading_special_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]
    if template == "chat":
        require_chat_template(tokenizer, ctx.cfg.model)
        from excise.models.generation import chat_prompt_ids

        return chat_prompt_ids(tokenizer, text, system=system or ctx.cfg.system)
    from excise.data.examples import Example
    from excise.data.formatting import encode_prompt

    return encode_prompt(
        tokenizer, Example(prompt=text, response=""), template, system=system or ctx.cfg.system
    )


def require_chat_template(tokenizer: Any, model: str) -> None:
    """Refuse the ``chat`` template for a tokenizer without one (a base model), naming the others.

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer of {model!r} has no chat template (a base model?); pass --template alpaca, tulu, "
            "question-answer or plain (the one the adapter was trained in), or --no-chat for raw prompts"
        )


def generate_answers(
    ctx: EvalContext, prompts: Sequence[list[int]], *, base: bool = False, desc: str
) -> list[str]:
    """Greedy answers (or sampled ones, seeded) of the subject (``base``: with its adapter off) to
    token prompts; read from the generation cache when the same model, adapter, prompts and
    settings made them before, or taken from ``ctx.saved_answers`` (``excise eval judge``)."""
    from excise.models.generation import GenerationSettings, generate

    if ctx.saved_answers is not None and not base:
        if len(ctx.saved_answers) != len(prompts):
            raise DataError(
                f"the saved generations hold {len(ctx.saved_answers)} answers for {len(prompts)} prompts"
            )
        return list(ctx.saved_answers)
    settings = GenerationSettings(
        max_new_tokens=ctx.cfg.max_new_tokens, batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed
    )
    payload = _generation_payload(ctx, prompts, settings, base=base)
    key = cache_key(payload)
    # The main process's look-up, so that all processes of a data-parallel run generate or none.
    hit = from_main(lambda: read_generations(key)) if ctx.use_cache else None
    if hit is not None and len(hit) == len(prompts):
        return hit
    if ctx.cached_only:
        raise NotCachedError(desc)
    with ctx.subject.base_only() if base else contextlib.nullcontext(ctx.subject.model) as model:
        answers = generate(
            model, ctx.subject.tokenizer, prompts, settings, progress=ctx.progress, desc=desc,
            map_batches=map_shared,
        )  # fmt: skip
    if ctx.use_cache and is_main():
        write_generations(key, payload, answers)
    return answers


def _generation_payload(
    ctx: EvalContext, prompts: Sequence[Sequence[int]], settings: Any, *, base: bool
) -> dict[str, Any]:
    """What an answer depends on: model, adapter (none for ``base``), dtype, device, prompts, settings."""
    from excise import __version__

    subject = ctx.subject
    prompt_text = json.dumps([list(p) for p in prompts], separators=(",", ":"))
    return {
        "model": model_identity(ctx.cfg.model),
        "adapter": None if base else adapter_identity(subject.adapter),
        "merged": False if base else subject.merged,
        "dtype": ctx.cfg.dtype,
        "device": pick_device(ctx.cfg.device).type,  # without touching the model (maybe not loaded)
        "settings": dataclasses.asdict(settings),
        "prompts_sha256": hashlib.sha256(prompt_text.encode()).hexdigest(),
        "n_prompts": len(prompts),
        "excise": __version__,
    }


def answer_field(ctx: EvalContext, field: str, *, desc: str) -> tuple[list[str], list[str]]:
    """``(texts, answers)``: each item's ``field`` as text, and the subject's answer to it as a
    prompt (:func:`prompt_ids`), cut where a non-chat template's next turn would begin."""
    from excise.data.formatting import cut_at_next_turn

    texts = [str(it[field]) for it in ctx.items]
    answers = generate_answers(ctx, [prompt_ids(ctx, text) for text in texts], desc=desc)
    return texts, [cut_at_next_turn(a, ctx.template) for a in answers]


def subject_logliks(
    ctx: EvalContext, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, desc: str, model: Any = None
) -> list[Loglik]:
    """:func:`~excise.evaluate.scoring.continuation_logliks` of ``model`` (default: the subject)
    with the run's batch size, prefix sharing and progress setting."""
    return continuation_logliks(
        ctx.subject.model if model is None else model, requests, batch_size=ctx.cfg.batch_size,
        share_prefix=ctx.cfg.share_prefix, progress=ctx.progress, desc=desc,
    )  # fmt: skip


def judge_record(judge: Any) -> dict[str, Any]:
    """``judge.describe()`` plus its name and threshold (what every judged result records)."""
    described = dict(judge.describe())
    described.setdefault("name", judge.name)
    described.setdefault("threshold", judge.threshold)
    return described


def corrected_rate(judge: Any, flags: Sequence[bool]) -> dict[str, Any]:
    """The share of ``flags`` corrected for the judge's measured sensitivity and specificity.

    ``judge``: the judge, or the ``judge`` record of a result (what :func:`judge_record` wrote),
    so that a saved record's flags can be corrected without loading the judge.

    :func:`~excise.evaluate.stats.corrected_rate_interval` (Rogan–Gladen, with an interval over
    the items and the judge's labelled sets, seed 0) on the judge's confusion counts at its
    operating threshold (:func:`~excise.evaluate.judges.agreement.operating_counts`), plus where
    those came from (``counts_source``). ``value`` None, with ``reason``, when the judge has no
    measured agreement at this threshold or cannot tell the classes apart. The flags must be
    ``score > judge.threshold``: the rule the agreement was measured with.
    """
    from excise.evaluate.judges.agreement import operating_counts
    from excise.evaluate.stats import corrected_rate_interval

    counts, reason = operating_counts(judge if isinstance(judge, dict) else judge_record(judge))
    if counts is None:
        n = len(flags)
        return {"value": None, "ci": None, "stderr": None, "rate": sum(map(bool, flags)) / n if n else None,
                "n": n, "reason": reason}  # fmt: skip
    keys = ("true_positives", "n_positive", "true_negatives", "n_negative")
    out = corrected_rate_interval(flags, **{k: counts[k] for k in keys})
    return out | {"threshold": counts["threshold"], "counts_source": counts["source"]}


def judge_scores(ctx: EvalContext, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """``ctx.judge``'s scores of ``responses`` to ``prompts``, checked (:func:`check_scores`).

    A data-parallel run shares them out in slices of the judge's own batch size (one slice per
    process when it has none); a judge that batches in input order scores the same batches.
    """
    judge, n = ctx.judge, len(responses)
    if sharing() == 1 or n == 0:
        return check_scores(judge.score(prompts, responses), n, judge)
    size = int(getattr(judge, "batch_size", 0) or 0) or max(1, -(-n // sharing()))
    slices = [(list(prompts[i : i + size]), list(responses[i : i + size])) for i in range(0, n, size)]

    def score(pair: tuple[list[str], list[str]]) -> list[float]:
        return check_scores(judge.score(*pair), len(pair[1]), judge)

    return [s for part in map_shared(score, slices, desc="judge", progress=False) for s in part]


def check_scores(scores: Sequence[float], n: int, judge: Any) -> list[float]:
    """The judge's scores as floats, checked: one per response, each in [0, 1]."""
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ConfigError(f"judge {judge.name!r} returned {len(scores)} scores for {n} responses")
    bad = [s for s in scores if not 0.0 <= s <= 1.0]
    if bad:
        raise ConfigError(f"judge {judge.name!r} returned scores outside [0, 1], e.g. {bad[0]}")
    return scores

"""What the judge-free metrics share: an answer's conditional NLL in the trained format, and a
reference model to take differences against (``pairs``, ``answer-nll``, ``refusal-logprob``).

**Format.** An answer is scored exactly as a trainer sees it (:func:`excise.data.formatting.encode`):
the prompt rendered by a training template (``--template``; default ``chat``, the tokenizer's
chat template, or ``plain`` under ``--no-chat``), then the answer's tokens and the token that
closes a reply (the chat template's end-of-turn token, else EOS). The NLL covers the answer's
tokens and that end token, never the prompt; per token = summed NLL / those tokens.

**Reference.** Differences are taken against ``--reference MODEL`` (its own tokenizer, same
template), else, when an adapter is scored, the base model with the adapter switched off
(PEFT's ``disable_adapter``: inside a λ sweep, the base without ``W0`` and ``D``). A model
scored without adapter and without ``--reference`` has nothing to be compared with: the
differences are ``None`` with that reason. The reference's scores depend only on the reference
and the requests, so they are computed once per process (and cached on disk with the
evaluation cache) however many adapters or λ points are scored against it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics.base import EvalContext, subject_logliks
from excise.evaluate.scoring import Loglik

__all__ = [
    "Request",
    "encode_answer",
    "mean_summary",
    "reference_logliks",
    "template_name",
]

Request = tuple[list[int], list[int]]  # (prompt ids, answer ids): the answer's log-likelihood is read
# (cache key → [[logprob, n_tokens], …]): reference scores already computed in this process.
_MEMO: dict[str, list[tuple[float, int]]] = {}


def template_name(cfg: EvalConfig) -> str:
    """``--template``, else ``chat`` (``plain`` under ``--no-chat``)."""
    if cfg.template:
        return cfg.template
    return "plain" if cfg.chat is False else "chat"


def encode_answer(
    tokenizer: Any,
    cfg: EvalConfig,
    prompt: str,
    answer: str,
    *,
    history: Sequence[Sequence[str]] = (),
    end: bool = True,
) -> Request:
    """``(prompt ids, answer ids)`` as a trainer encodes the pair (``end``: with the closing token)."""
    from excise.data.examples import Example
    from excise.data.formatting import encode

    example = Example(prompt=prompt, response=answer, history=tuple((str(r), str(t)) for r, t in history))
    encoded = encode(tokenizer, example, template_name(cfg), system=cfg.system)
    ids = list(encoded.response_ids)
    return list(encoded.prompt_ids), ids if end else ids[:-1]


def mean_summary(
    items: list[dict[str, Any]],
    keys: Sequence[str],
    delta: str,
    reference: str,
    *,
    has_reference: bool,
    seed: int,
) -> tuple[dict[str, float | None], dict[str, str], dict[str, Any]]:
    """``(metrics, null_reasons, intervals)`` of per-item means: each of ``keys`` (and ``delta``, the
    difference against the reference, when there is one; else None with ``reference`` as its
    reason) averaged over ``items``, with its percentile bootstrap interval over items."""
    from excise.evaluate.stats import bootstrap_ratio_interval

    scored = [*keys, delta] if has_reference else list(keys)
    metrics: dict[str, float | None] = {k: sum(it[k] for it in items) / len(items) for k in scored}
    nulls = {} if has_reference else {delta: reference}
    if not has_reference:
        metrics[delta] = None
    ones = [1.0] * len(items)
    intervals = {k: bootstrap_ratio_interval([it[k] for it in items], ones, seed=seed) for k in scored}
    return metrics, nulls, intervals


def reference_logliks(
    ctx: EvalContext, build: Callable[[Any], list[Request]], *, desc: str
) -> tuple[list[Loglik] | None, str]:
    """The reference's log-likelihoods of ``build(tokenizer)``'s requests, and what it is.

    Returns:
        ``(scores, description)``; ``scores`` is None when there is no reference (the description
        then says why).
    """
    from excise import __version__
    from excise.evaluate.cache import cache_key, cache_root, write_atomic_json
    from excise.evaluate.subject import model_identity, pick_device

    cfg = ctx.cfg
    if cfg.reference is None and (ctx.subject.adapter is None or ctx.subject.merged):
        why = (
            "the adapter was merged into the weights (drop --merge)"
            if ctx.subject.merged
            else "no adapter to switch off and no --reference: the model is its own reference"
        )
        return None, f"no reference model: {why}"
    described = f"reference model {cfg.reference}" if cfg.reference else "base model (adapter off)"
    reference_spec = cfg.reference or cfg.model
    with _reference_model(ctx) as (model, tokenizer):
        requests = build(tokenizer)
        payload = {
            "reference": model_identity(reference_spec),
            "dtype": cfg.dtype,
            "device": pick_device(cfg.device).type,
            "requests": cache_key({"r": json.dumps(requests, separators=(",", ":"))}),
            "excise": __version__,
        }
        key = cache_key(payload)
        path = cache_root() / "logliks" / f"{key}.json"
        values = _MEMO.get(key) or (_read(path) if ctx.use_cache else None)
        if values is None or len(values) != len(requests):
            if model is None:
                model = _load_reference(ctx)
            scores = subject_logliks(ctx, requests, model=model, desc=desc)
            values = [(s.logprob, s.n_tokens) for s in scores]
            if ctx.use_cache:
                write_atomic_json(path, {"key": payload, "logliks": values})
        _MEMO[key] = values
    return [Loglik(logprob=lp, greedy=False, n_tokens=n) for lp, n in values], described


@contextlib.contextmanager
def _reference_model(ctx: EvalContext) -> Iterator[tuple[Any, Any]]:
    """``(model or None, tokenizer)`` of the reference: ``--reference`` loads lazily (its tokenizer
    first: the scores may be cached); otherwise the subject with its adapter off."""
    if ctx.cfg.reference is not None:
        from excise.models import load_tokenizer

        yield None, load_tokenizer(ctx.cfg.reference, padding_side="left")
        return
    with ctx.subject.base_only() as base:
        yield base, ctx.subject.tokenizer


def _load_reference(ctx: EvalContext) -> Any:
    from excise.evaluate.subject import load_subject

    return load_subject(ctx.cfg.reference, dtype=ctx.cfg.dtype, device=ctx.cfg.device).model


def _read(path: Any) -> list[tuple[float, int]] | None:
    try:
        values = json.loads(path.read_text())["logliks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [(float(lp), int(n)) for lp, n in values]

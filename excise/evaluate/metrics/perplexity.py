"""Perplexity on normal text with a sliding window (DESIGN.md §3), as the Hugging Face guide computes it.

Rows are joined with ``"\\n\\n"`` (wikitext-2 raw test, as in the guide and MANIFEST) and tokenised
once. Windows of ``--window`` tokens start every ``--stride`` tokens; each window scores only the
tokens the previous window did not (``trg_len = end − previous end``), conditioned on the whole
window, and a window's first token is never scored (it has no context inside the window). So
``stride == window`` gives disjoint chunks, ``stride < window`` overlapping context.
A tokenizer that starts every text with special tokens (BOS: Gemma, Llama; not SmolLM2) gets them
before *every* window, as the model saw text in training, and then each window's first token is
scored too: Gemma-3-270M without BOS scores the same 254 wikitext tokens at perplexity 158.6
instead of 32.1.
``ppl = exp(Σ NLL / Σ scored tokens)``. Reference: https://huggingface.co/docs/transformers/perplexity
(one departure: the guide weights each window's *mean* loss by ``valid labels − 1``, which for
overlapping windows counts one token too few; here every scored token's NLL is summed exactly).

Windows of one length are batched, and only the scored positions are projected to the vocabulary
(``logits_to_keep``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from excise.data.formatting import leading_special_ids
from excise.evaluate.metrics.base import SHARED_DATA, EvalContext, Metric, MetricResult
from excise.evaluate.parallel import map_shared
from excise.evaluate.scoring import encode_text
from excise.evaluate.stats import MIN_RESAMPLING_UNITS, bootstrap_ratio_stderr

__all__ = ["METRIC", "sliding_windows"]

# Windows per forward pass are capped so the kept logits stay near this many positions.
_POSITIONS_PER_BATCH = 4096


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, trg_len)`` of each window over ``n_tokens`` tokens (the HF guide's loop)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def run(ctx: EvalContext) -> MetricResult:
    text = "\n\n".join(str(it["text"]) for it in ctx.items)
    tokenizer = ctx.subject.tokenizer
    lead = torch.tensor(leading_special_ids(tokenizer), dtype=torch.long)  # (S,): BOS, or nothing
    ids = tokenizer.encode(text, add_special_tokens=False) if len(lead) else encode_text(tokenizer, text)
    tokens = torch.tensor(ids, dtype=torch.long)  # (N,)
    windows = sliding_windows(len(tokens), ctx.cfg.window, ctx.cfg.stride)
    model, device = ctx.subject.model, ctx.subject.device
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:  # consecutive windows of one (length, trg_len) share a batch
        if groups and _shape(groups[-1][0]) == _shape(w) and len(groups[-1]) < _rows_per_batch(ctx, w):
            groups[-1].append(w)
        else:
            groups.append([w])

    def score(group: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
        begin, end, trg_len = group[0]
        length = len(lead) + end - begin
        keep = min(length, trg_len + 1)  # logits at the last `keep` positions predict the scored tokens
        ids = torch.stack([torch.cat([lead, tokens[b:e]]) for b, e, _ in group]).to(device)  # (B, L)
        logits = model(input_ids=ids, logits_to_keep=keep).logits[:, :-1].float()  # (B, keep - 1, V)
        targets = ids[:, length - keep + 1 :]  # (B, keep - 1)
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none"
        )  # (B, keep-1)
        return [
            {"key": _window_key(tokens[b:e], b), "begin": b, "end": e, "scored_tokens": keep - 1, "nll": row}
            for (b, e, _), row in zip(group, nll.sum(-1).tolist(), strict=True)
        ]

    # Under a data-parallel `excise eval` the processes share these batches (parallel.py).
    items = [
        it for part in map_shared(score, groups, desc="perplexity", progress=ctx.progress) for it in part
    ]
    total = sum(it["nll"] for it in items)
    count = sum(it["scored_tokens"] for it in items)
    extra = {"n_tokens": len(tokens), "scored_tokens": count}
    if not count:
        why = f"no token to score: the text has {len(tokens)} token(s) (blank rows?); scoring starts at 2"
        nulls = dict.fromkeys(("perplexity", "nll_per_token"), why)
        return MetricResult(dict.fromkeys(nulls), items, extra, nulls)
    metrics = {"perplexity": math.exp(total / count), "nll_per_token": total / count}
    nlls, counts = [it["nll"] for it in items], [it["scored_tokens"] for it in items]
    stderr = {  # windows score disjoint tokens: resample them
        "perplexity": bootstrap_ratio_stderr(nlls, counts, math.exp, seed=ctx.cfg.seed),
        "nll_per_token": bootstrap_ratio_stderr(nlls, counts, seed=ctx.cfg.seed),
    }
    if len(items) < MIN_RESAMPLING_UNITS:
        extra["stderr_reason"] = (
            f"{len(items)} window(s) scored; a bootstrap needs at least {MIN_RESAMPLING_UNITS} "
            "(score more text: a larger limit, or a smaller window)"
        )
    return MetricResult(metrics, items, extra, stderr=stderr)


def _window_key(window: torch.Tensor, begin: int) -> str:
    """A window's identity for pairing two records (:func:`excise.evaluate.runner.item_key`):
    its position and its token ids, so windows of other text or another tokenizer never pair."""
    import hashlib

    digest = hashlib.sha256(f"{begin}:".encode() + window.numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def _shape(w: tuple[int, int, int]) -> tuple[int, int]:
    return w[1] - w[0], w[2]


def _rows_per_batch(ctx: EvalContext, w: tuple[int, int, int]) -> int:
    return max(1, min(ctx.cfg.batch_size, _POSITIONS_PER_BATCH // max(1, min(w[1] - w[0], w[2] + 1))))


METRIC = Metric(
    name="perplexity",
    run=run,
    fields={"text": "text"},
    default_data=str(SHARED_DATA / "wikitext2" / "wiki_test_raw.jsonl"),
    allow_empty=True,
    summary="Sliding-window perplexity on normal text (wikitext-2 raw test by default).",
)

"""Continuation log-likelihoods, batched, with no repeated work (DESIGN.md §3, TruthfulQA MC, HaluEval).

A *request* is ``(context_ids, continuation_ids)``; its score is the sum of the log-probabilities
of the continuation tokens given everything before them, exactly as lm-evaluation-harness's
``loglikelihood`` defines it (its ``HFLM._loglikelihood_tokens``, lm-eval 0.4.x): the input is
``(context + continuation)[-(max_length + 1):][:-1]`` and the last ``len(continuation)`` logits
score the continuation.

Text is encoded as lm-eval ≥ 0.4.9.2 does (:func:`encode_text`, :func:`encode_pair`): with the
tokenizer's default special tokens, so a Llama-style tokenizer puts its BOS in front. Earlier
releases (0.4.9.1 and before) encoded causal-LM text with ``add_special_tokens=False`` and so
scored Llama, Mistral or Gemma without BOS; pyproject.toml pins ``lm-eval>=0.4.9.2`` so that
``excise`` and the harness it is compared with give the same numbers.

What makes it fast, with the same numbers:

1. **One row per unique input.** Requests whose inputs are equal (HaluEval's "Yes" and "No"
   after one prompt) or where one input is a prefix of another share one forward row; a causal
   LM's logits at position ``t`` depend on tokens ``<= t`` only.
2. **A shared prefix computed once.** The longest token prefix common to every row (TruthfulQA's
   6-shot preamble, HaluEval's instruction) is run once; its KV cache is broadcast to every batch,
   so each row only runs its own suffix.
3. **Length-sorted, padded batches** with explicit position ids, and ``logits_to_keep`` so the
   vocabulary projection runs only on the positions that are scored. Rows are left-padded; after a
   shared prefix the suffixes are right-padded instead, so that no pad sits between the prefix and
   a suffix: a sliding-window layer (Gemma 2/3, Mistral) counts its window in cache slots, pads
   included, and a row with pads inside would see fewer real tokens than it does alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from excise.errors import ConfigError
from excise.evaluate.parallel import map_shared

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Loglik", "continuation_logliks", "encode_pair", "encode_text"]

# A shared prefix shorter than this is not worth a separate forward pass and a cache copy.
_MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class Loglik:
    """The score of one request.

    Attributes:
        logprob: sum of the continuation tokens' log-probabilities (natural log).
        greedy: whether every continuation token is the argmax of its position's logits.
        n_tokens: continuation length in tokens.
    """

    logprob: float
    greedy: bool
    n_tokens: int


def _prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """lm-eval's ``HFLM.prefix_token_id``: BOS, else EOS (the context of an empty context)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` as lm-eval's ``HFLM.tok_encode`` makes them (≥ 0.4.9.2): default
    special tokens, none added when the text already starts with the prefix token's text."""
    prefix = tokenizer.decode(_prefix_token_id(tokenizer))
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Split ``context + continuation`` into token ids as lm-eval does (``TemplateLM._encode_pair``).

    Trailing whitespace of the context moves to the continuation (so ``"A:" + " Paris"`` is split
    before ``" Paris"``), the whole string is encoded once, and the continuation is what follows
    the context's own token count. An empty context becomes the BOS (else EOS) token and the
    continuation is encoded without special tokens, as in lm-eval's ``TemplateLM.loglikelihood``.

    Returns:
        ``(context_ids, continuation_ids)``.
    """
    if not context:
        prefix = _prefix_token_id(tokenizer)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@dataclass(frozen=True)
class _Request:
    row: int  # index of the unique input row that serves it
    end: int  # its input is row[:end]
    targets: tuple[int, ...]


@torch.inference_mode()
def continuation_logliks(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    share_prefix: bool = True,
    progress: bool = True,
    desc: str = "score",
) -> list[Loglik]:
    """Score ``requests`` (``(context_ids, continuation_ids)``) in input order.

    Args:
        model: a causal LM (transformers or PEFT) whose forward takes ``position_ids``,
            ``past_key_values`` and ``logits_to_keep``.
        requests: token-id pairs; every continuation must be non-empty.
        batch_size: rows per forward pass.
        max_length: left-truncate each ``context + continuation`` to ``max_length + 1`` tokens
            (lm-eval's rule); default the model's ``max_position_embeddings``.
        share_prefix: run the token prefix common to all rows once (same numbers; faster).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        One :class:`Loglik` per request.

    Raises:
        ConfigError: an empty continuation, a continuation longer than ``max_length``, or a
            batch size below 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if not requests:
        return []
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    rows, reqs = _unique_rows(requests, max_length)
    P = _shared_prefix_length(rows, reqs) if share_prefix else 0
    device = next(model.parameters()).device
    prefix_kv = None
    if P:
        prefix = torch.tensor([rows[0][:P]], device=device)  # (1, P)
        prefix_kv = model(input_ids=prefix, use_cache=True).past_key_values

    by_row: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        by_row.setdefault(r.row, []).append(i)
    order = sorted(range(len(rows)), key=lambda j: len(rows[j]), reverse=True)

    def score(chunk: list[int]) -> list[tuple[int, Loglik]]:
        logprobs, logits_start, starts = _forward(
            model, [rows[j][P:] for j in chunk], P, prefix_kv, reqs, by_row, chunk
        )
        scored = []
        for b, j in enumerate(chunk):
            for i in by_row[j]:
                r = reqs[i]
                n = len(r.targets)
                # Position p of the row (0-based, prefix included) sits at column starts[b] + p - P
                # of the suffix batch, and at that minus logits_start in the kept logits.
                first = starts[b] + (r.end - n) - P - logits_start
                lp = logprobs[b, first : first + n]  # (n, V)
                target = torch.tensor(r.targets, device=lp.device)
                picked = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (n,)
                greedy = bool((lp.argmax(-1) == target).all())
                scored.append((i, Loglik(float(picked.sum()), greedy, n)))
        return scored

    # Under a data-parallel `excise eval` the processes share these batches (parallel.py).
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[Loglik | None] = [None] * len(reqs)
    for scored in map_shared(score, chunks, desc=desc, progress=progress):
        for i, loglik in scored:
            results[i] = loglik
    return results  # type: ignore[return-value]


def _unique_rows(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int
) -> tuple[list[tuple[int, ...]], list[_Request]]:
    """Unique input rows (a row that is a prefix of another is folded into it) and a request map."""
    inputs: list[tuple[int, ...]] = []
    targets: list[tuple[int, ...]] = []
    for k, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ConfigError(f"request {k}: empty continuation (nothing to score)")
        if len(continuation) > max_length:
            raise ConfigError(
                f"request {k}: continuation of {len(continuation)} tokens > max length {max_length}"
            )
        whole = (tuple(context) + tuple(continuation))[-(max_length + 1) :]
        if len(whole) < 2:
            raise ConfigError(f"request {k}: needs at least one context token before the continuation")
        inputs.append(whole[:-1])
        targets.append(tuple(continuation))
    unique = sorted(set(inputs))
    # In lexicographic order every sequence that extends `s` follows `s` directly, so a row that is
    # a prefix of any other is a prefix of its successor; walk backwards to the longest one.
    owner = list(range(len(unique)))
    for u in range(len(unique) - 2, -1, -1):
        nxt = unique[u + 1]
        if len(nxt) > len(unique[u]) and nxt[: len(unique[u])] == unique[u]:
            owner[u] = owner[u + 1]
    kept = sorted(set(owner))
    row_of_owner = {u: k for k, u in enumerate(kept)}
    index = {seq: row_of_owner[owner[u]] for u, seq in enumerate(unique)}
    rows = [unique[u] for u in kept]
    reqs = [_Request(index[inp], len(inp), tgt) for inp, tgt in zip(inputs, targets, strict=True)]
    return rows, reqs


def _shared_prefix_length(rows: list[tuple[int, ...]], reqs: list[_Request]) -> int:
    """Tokens common to every row, kept before the first scored position of every request."""
    first, last = min(rows), max(rows)  # the common prefix of a set is that of its extremes
    P = 0
    while min(len(first), len(last)) > P and first[P] == last[P]:
        P += 1
    P = min(P, *(r.end - len(r.targets) for r in reqs))
    return P if P >= _MIN_SHARED_PREFIX else 0


def _forward(
    model: Any,
    suffixes: list[tuple[int, ...]],
    P: int,
    prefix_kv: Any,
    reqs: list[_Request],
    by_row: dict[int, list[int]],
    chunk: list[int],
) -> tuple[torch.Tensor, int, list[int]]:
    """Log-softmax of the kept logits of one padded batch: ``(B, K, V)``, the first kept column, and
    the column each row's suffix starts at.

    Without a shared prefix (``P == 0``) rows are left-padded, pads first. After a shared prefix the
    suffixes are right-padded: each follows the prefix directly and its pads come last, where no real
    token attends to them. (Left-padded suffixes put pads between the prefix and the suffix; a
    sliding-window layer (Gemma 2/3, Mistral) counts its window in cache slots, pads included, so such
    a row saw fewer real tokens than alone: tests/models/test_gemma_tiny.py.)
    """
    device = next(model.parameters()).device
    B, S = len(suffixes), max(len(s) for s in suffixes)
    input_ids = torch.zeros((B, S), dtype=torch.long)  # (B, S); pads are masked, any id will do
    mask = torch.zeros((B, P + S), dtype=torch.long)  # (B, P + S)
    mask[:, :P] = 1
    positions = torch.full((B, S), P, dtype=torch.long)  # (B, S)
    earliest, starts = S, []
    for b, (suffix, j) in enumerate(zip(suffixes, chunk, strict=True)):
        n = len(suffix)
        start = 0 if P else S - n  # column of the suffix's first token
        starts.append(start)
        input_ids[b, start : start + n] = torch.tensor(suffix)
        mask[b, P + start : P + start + n] = 1
        positions[b, start : start + n] = torch.arange(P, P + n)
        for i in by_row[j]:
            earliest = min(earliest, start + reqs[i].end - len(reqs[i].targets) - P)
    kwargs: dict[str, Any] = {}
    if prefix_kv is not None:
        from transformers import DynamicCache

        layers = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v, *_ in prefix_kv]
        kwargs["past_key_values"] = DynamicCache(ddp_cache_data=layers, config=model.config)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=S - earliest,
        use_cache=prefix_kv is not None,
        **kwargs,
    ).logits  # (B, S - earliest, V)
    return torch.log_softmax(logits.float(), dim=-1), earliest, starts

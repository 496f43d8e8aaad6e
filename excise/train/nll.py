"""The SFT loss: mean negative log-likelihood per response token of a collated batch.

Unlike SKU's terms (:mod:`excise.train.losses`, a mean per row then over rows), SFT weighs
every response token alike (the Hugging Face causal-LM loss). The logits come from
:func:`excise.train.losses.response_token_nll`: final hidden states at the response positions
only, the head run in checkpointed chunks, so no ``(tokens × vocabulary)`` tensor is ever
held for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

from excise.train.losses import CHUNK_TOKENS, IGNORE_INDEX, response_token_nll

__all__ = ["response_logprobs", "response_nll"]


def response_logprobs(
    model: Any, batch: dict[str, torch.Tensor], *, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labelled token at its own position, and the mask of those positions.

    Args:
        model: a causal LM (a PEFT model, a DDP wrapper…).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)``.
        chunk_tokens: response tokens per head chunk.

    Returns:
        ``(logprobs, mask)``, each ``(B, T)``; ``logprobs`` is 0 where ``mask`` is False.
        Computed in float32 whatever the autocast dtype.
    """
    labels = batch["labels"]  # (B, T)
    mask = labels != IGNORE_INDEX  # (B, T)
    mask[:, 0] = False  # nothing predicts a row's first token
    if not mask.any():
        raise ValueError("the batch has no response token to score")
    token_nll, _ = response_token_nll(model, batch, chunk_tokens=chunk_tokens)  # (N,), (row, position) order
    logprobs = torch.zeros(labels.shape, dtype=token_nll.dtype, device=token_nll.device)  # (B, T)
    return logprobs.masked_scatter(mask, -token_nll), mask


def response_nll(
    model: Any, batch: dict[str, torch.Tensor], *, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Mean negative log-likelihood per response token of the batch (the SFT loss), a scalar."""
    token_nll, _ = response_token_nll(model, batch, chunk_tokens=chunk_tokens)  # (N,)
    if token_nll.numel() == 0:
        raise ValueError("the batch has no response token to score")
    return token_nll.mean()

"""Response-token log-likelihoods of a collated batch (:func:`excise.data.collate`).

Only the columns that hold a response label need logits, so the model is asked for the
last ``T - start + 1`` positions (``logits_to_keep``), where ``start`` is the first column
with a label in any row: with left padding that skips every prompt token, which saves
most of the vocabulary projection when prompts are longer than answers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["response_logprobs", "response_nll"]

IGNORE_INDEX = -100


def response_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens and their mask.

    Args:
        model: a causal LM (a PEFT model, a DDP wrapper…): called with ``input_ids``,
            ``attention_mask``, ``position_ids`` and ``logits_to_keep``.
        batch: ``input_ids``, ``attention_mask``, ``position_ids``, ``labels``, each ``(B, T)``.

    Returns:
        ``(logprobs, mask)``, each ``(B, A)`` over the last ``A`` columns; ``logprobs`` is 0 where
        ``mask`` is False. Computed in float32 whatever the autocast dtype.
    """
    labels = batch["labels"]  # (B, T)
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if labelled.numel() == 0:
        raise ValueError("the batch has no response token to score")
    T = labels.shape[1]
    start = max(int(labelled[0]), 1)  # column 0 is never predicted
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        logits_to_keep=T - start + 1,
        use_cache=False,
    )
    logits = outputs.logits[:, :-1].float()  # (B, A, V): column start - 1 + j predicts start + j
    targets = labels[:, start:]  # (B, A)
    mask = targets != IGNORE_INDEX  # (B, A)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none"
    )  # (B * A,)
    picked = -nll.view_as(targets)  # (B, A)
    return picked * mask, mask


def response_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token of the batch (the SFT loss), a scalar."""
    logprobs, mask = response_logprobs(model, batch)  # (B, A)
    return -logprobs.sum() / mask.sum()

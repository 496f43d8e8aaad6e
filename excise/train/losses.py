"""The losses of SKU (arXiv 2402.10058, DESIGN.md §2) and of the unlearning baselines, as pure functions.

Every loss takes the model being trained and one batch, and returns a scalar tensor:

- :func:`guided_distortion_loss` ``L_GD``: cross-entropy of harmful responses (minimised);
- :func:`random_disassociation_loss` ``L_RD``: cross-entropy of responses of *other* prompts
  (the batch holds each harmful prompt K times, once with each mismatched response);
- :func:`preservation_divergence_loss` ``L_PD = −KL(p_θo ‖ p_θh)`` on normal data (minimising
  it *increases* the divergence from the original model);
- :func:`gradient_ascent_loss` ``−NLL`` of harmful responses (GA baseline);
- :func:`kl_to_reference_loss` ``+KL(p_θo ‖ p_θ)`` on normal data (LLMU's "stay close" term).

A batch is a mapping with ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)``;
``labels`` equals ``input_ids`` on response tokens and is ``-100`` everywhere else (prompt
and padding), in either padding side. Position ids are recomputed from the attention mask,
so a left-padded row sees the RoPE positions it would see alone.

Exactly which tokens and how averaged, for every term: position ``t`` predicts token
``t + 1``; the *response positions* are the ``t`` whose target ``labels[t + 1]`` is not
``-100`` (so the first response token is predicted from the last prompt token, and the
prompt and padding never count). A term is averaged over the response positions of each
row, then over the rows: every response weighs the same whatever its length — the
reference code's weighting for its CE terms (``get_answer_loss`` in franciscoliu/SKU
``utils.py``), here used for the KL term as well (the reference averages its KL over all
positions, prompt and padding included).

Only the response positions reach the LM head (``logits_to_keep`` with a boolean mask), so
the ``(B, T, V)`` logits of a batch are never formed: ``(N, V)`` for its N response tokens.

The reference distribution ``p_θo`` comes from a :data:`Reference`: by default the same
PEFT model under ``disable_adapter()`` in ``torch.no_grad()`` (one copy of the weights —
the reference code loads a second full model, DESIGN.md §2); for full-parameter training a
frozen copy (:func:`frozen_model_reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)

__all__ = [
    "IGNORE_INDEX",
    "Reference",
    "adapter_disabled_reference",
    "frozen_model_reference",
    "gradient_ascent_loss",
    "guided_distortion_loss",
    "kl_to_reference_loss",
    "preservation_divergence_loss",
    "random_disassociation_loss",
    "response_logits",
    "sequence_nll",
]

IGNORE_INDEX = -100
Batch = Mapping[str, torch.Tensor]
# batch → the reference model's logits at the batch's response positions, (N, V), no grad.
Reference = Callable[[Batch], torch.Tensor]


def _response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, T)``: position t predicts a response token (``labels[:, t + 1] != -100``)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def response_logits(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the response positions only, their targets, and each one's row.

    Args:
        model: a causal LM (a transformers model or a PEFT model around one).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)``.

    Returns:
        ``(logits, targets, rows)``: ``(N, V)`` float32 logits, ``(N,)`` target ids and
        ``(N,)`` row index of each of the batch's N response tokens, in (row, position) order.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions = _response_positions(labels)  # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens only
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=positions,  # a boolean mask: the head runs on the N response positions only
        use_cache=False,
    )
    logits = out.logits
    if logits.dim() == 3:  # a model whose head ignores logits_to_keep masks: select here
        logits = logits[positions]
    targets = labels[:, 1:][positions[:, :-1]]  # (N,)
    rows = positions.nonzero()[:, 0]  # (N,)
    return logits.float(), targets, rows  # (N, V), (N,), (N,)


def _mean_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``values`` (N,) within each row, then over the rows that have any: a scalar."""
    sums = values.new_zeros(n_rows).index_add(0, rows, values)  # (B,)
    counts = torch.bincount(rows, minlength=n_rows)  # (B,)
    present = counts > 0
    if not present.any():
        raise ValueError("the batch holds no response tokens (labels are all -100)")
    return (sums[present] / counts[present]).mean()


def sequence_nll(model: Any, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy on response tokens: mean per row, then over rows (a scalar)."""
    logits, targets, rows = response_logits(model, batch)
    token_nll = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    return _mean_per_row(token_nll, rows, batch["labels"].shape[0])


def guided_distortion_loss(model: Any, batch: Batch) -> torch.Tensor:
    """``L_GD``: cross-entropy on (harmful prompt, harmful response) pairs, response tokens only."""
    return sequence_nll(model, batch)


def random_disassociation_loss(model: Any, batch: Batch) -> torch.Tensor:
    """``L_RD``: cross-entropy on harmful prompts paired with K responses of *other* prompts.

    The batch holds B·K rows (each harmful prompt once per mismatched response, built by
    :class:`excise.train.sku.MismatchSampler`); the mean over rows is the average over the K
    responses, then over the B prompts.
    """
    return sequence_nll(model, batch)


def gradient_ascent_loss(model: Any, batch: Batch) -> torch.Tensor:
    """GA baseline: ``−NLL`` of the harmful responses, so minimising it ascends the NLL."""
    return -sequence_nll(model, batch)


def adapter_disabled_reference(model: Any) -> Reference:
    """``p_θo`` from the PEFT ``model`` itself with its adapter disabled: no second copy of the weights."""

    def reference(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), model.disable_adapter():
            return response_logits(model, batch)[0]  # (N, V)

    return reference


def frozen_model_reference(reference_model: Any) -> Reference:
    """``p_θo`` from a separate frozen model (full-parameter training, where no adapter can be disabled)."""

    def reference(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return response_logits(reference_model, batch)[0]  # (N, V)

    return reference


def _kl_reference_to_model(model: Any, batch: Batch, reference: Reference | None) -> torch.Tensor:
    """``KL(p_ref ‖ p_model)`` per response position, averaged per row then over rows."""
    reference = reference or adapter_disabled_reference(model)
    with torch.no_grad():
        log_p_ref = reference(batch)  # (N, V) logits
        log_p_ref -= log_p_ref.logsumexp(-1, keepdim=True)  # in place: log p_ref
        p_ref = log_p_ref.exp()  # (N, V)
    logits, _, rows = response_logits(model, batch)  # (N, V)
    # log p_ref − log p_model, written into log_p_ref's buffer: with p_ref and the logits
    # that is all the graph keeps (3 × (N, V); F.kl_div on two log_softmax outputs keeps 5).
    # Both log-probabilities are computed the same way, so it is exactly 0 where logits agree.
    log_p_model = logits - logits.logsumexp(-1, keepdim=True)  # (N, V), freed after the next line
    log_ratio = log_p_ref.sub_(log_p_model)  # (N, V)
    del log_p_model
    token_kl = torch.einsum("nv,nv->n", p_ref, log_ratio)  # (N,): Σ_v p_ref · log(p_ref / p_model)
    return _mean_per_row(token_kl, rows, batch["labels"].shape[0])


def preservation_divergence_loss(
    model: Any, batch: Batch, reference: Reference | None = None
) -> torch.Tensor:
    """``L_PD = −KL(p_θo ‖ p_θh)`` on normal (prompt, answer) data.

    Args:
        model: the model being trained (``θh``); a PEFT model unless ``reference`` is given.
        batch: normal data, labels on the answer tokens.
        reference: where ``p_θo`` comes from; default the same PEFT model with its adapter
            disabled (:func:`adapter_disabled_reference`).

    Returns:
        A scalar; exactly 0 while the adapter is a no-op (LoRA ``B = 0`` at step 0).
    """
    return -_kl_reference_to_model(model, batch, reference)


def kl_to_reference_loss(model: Any, batch: Batch, reference: Reference | None = None) -> torch.Tensor:
    """LLMU's normal-data term ``+KL(p_θo ‖ p_θ)``: minimised, it keeps the model close to the original."""
    return _kl_reference_to_model(model, batch, reference)

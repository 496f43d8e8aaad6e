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

No loss ever holds ``(tokens × vocabulary)`` logits for the whole batch. The model is asked
for its final hidden states (``output_hidden_states``; the LM head runs on one position per
row only), the ``(N, H)`` states at the N response positions are kept, and the head runs on
chunks of :data:`CHUNK_TOKENS` of them, each under ``torch.utils.checkpoint``: the forward
keeps only each chunk's per-token values, the backward recomputes the chunk's logits. Peak
memory for the head is ``chunk × V`` instead of ``N × V``; the gradients are the same sums,
only grouped differently (tests check them to 1e-6). This also holds for a LoRA on the head
(``target_modules`` with ``lm_head``): the chunk calls the adapted head itself.

The reference distribution ``p_θo`` comes from a :data:`Reference`: by default the same
PEFT model under ``disable_adapter()`` in ``torch.no_grad()`` (one copy of the weights —
the reference code loads a second full model, DESIGN.md §2); for full-parameter training a
frozen copy (:func:`frozen_model_reference`). A reference returns its final hidden states at
the response positions and the head that turns them into logits (for an adapter-disabled
PEFT model, the head's base layer), so ``p_θo`` is also formed one chunk at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from torch.utils.checkpoint import checkpoint

from excise.errors import ConfigError

__all__ = [
    "CHUNK_TOKENS",
    "IGNORE_INDEX",
    "Reference",
    "adapter_disabled_reference",
    "eval_mode",
    "frozen_model_reference",
    "gradient_ascent_loss",
    "guided_distortion_loss",
    "kl_to_reference_loss",
    "npo_loss",
    "output_head",
    "preservation_divergence_loss",
    "random_disassociation_loss",
    "response_hidden",
    "response_logits",
    "response_token_nll",
    "sequence_nll",
]

IGNORE_INDEX = -100
# Response tokens per head chunk: the head's logits (and their gradient) never exceed
# CHUNK_TOKENS × V floats (SmolLM2, V = 49 152: 96 MiB each), whatever the batch; a larger
# vocabulary gets fewer tokens per chunk, so no chunk exceeds CHUNK_LOGITS floats (Gemma 3,
# V = 262 144: 96 tokens, 96 MiB, instead of 512 MiB at 512 tokens).
CHUNK_TOKENS = 512
CHUNK_LOGITS = CHUNK_TOKENS * 49_152
Batch = Mapping[str, torch.Tensor]
# batch → the reference model's final hidden states at the batch's response positions, (N, H),
# no grad, and the head that turns them into p_θo's logits.
Reference = Callable[[Batch], tuple[torch.Tensor, torch.nn.Module]]


def _response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, T)``: position t predicts a response token (``labels[:, t + 1] != -100``)."""
    positions = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def _unwrapped(model: Any) -> Any:
    """The model inside DDP / FSDP wrappers (they hold it as ``.module``)."""
    while isinstance(model, torch.nn.Module) and "module" in model._modules:
        model = model._modules["module"]
    return model


def output_head(model: Any) -> torch.nn.Module:
    """The LM head of ``model`` (through DDP/FSDP and PEFT wrappers; a LoRA on it included).

    Raises:
        ConfigError: the model transforms its logits after the head (Gemma 2's soft-capping,
            Cohere's ``logit_scale``), which the chunked losses do not reproduce.
    """
    inner = _unwrapped(model)
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (
        None,
        1.0,
    ):
        raise ConfigError(
            f"{type(config).__name__} transforms its logits after the LM head (soft-capping or logit_scale); "
            "excise's chunked training losses support plain heads only"
        )
    return inner.get_output_embeddings()


def _base_head(head: torch.nn.Module) -> torch.nn.Module:
    """``head`` without its PEFT adapter: what it computes under ``disable_adapter()``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(head, BaseTunerLayer):
        return head.get_base_layer()
    if isinstance(head, ModulesToSaveWrapper):
        return head.original_module
    return head


def response_hidden(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states at the response positions, their targets, and each one's row.

    Args:
        model: a causal LM (a transformers model, a PEFT model around one, a DDP wrapper…).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)``; optionally
            ``position_ids`` (packed rows: restarting at each example).

    Returns:
        ``(hidden, targets, rows)``: ``(N, H)`` hidden states after the final norm (the head's
        input), ``(N,)`` target ids and ``(N,)`` row index of each of the batch's N response
        tokens, in (row, position) order.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions = _response_positions(labels)  # (B, T)
    derived = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens only
    position_ids = batch.get("position_ids", derived)
    # Position ids that restart inside a row mark packed examples (excise.train.packing): without
    # a 2D mask transformers isolates each one with a block-diagonal causal mask.
    packed = not torch.equal(position_ids, derived)
    out = model(
        input_ids=input_ids,
        attention_mask=None if packed else attention_mask,
        position_ids=position_ids,
        logits_to_keep=1,  # the head runs on one position per row here; the losses run it in chunks
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states[-1][positions]  # (N, H): transformers ties the last entry to the normed output
    targets = labels[:, 1:][positions[:, :-1]]  # (N,)
    rows = positions.nonzero()[:, 0]  # (N,)
    return hidden, targets, rows


def response_logits(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the response positions, ``(N, V)`` float32, with targets and rows (for tests and tools).

    The losses never call this: they run the head in chunks (see the module docstring).
    """
    hidden, targets, rows = response_hidden(model, batch)
    return output_head(model)(hidden).float(), targets, rows  # (N, V), (N,), (N,)


def _chunks(n: int, chunk_tokens: int, head: torch.nn.Module | None = None) -> list[slice]:
    """Slices of at most ``chunk_tokens`` tokens, fewer for a head whose vocabulary would make a
    chunk's logits exceed :data:`CHUNK_LOGITS` floats."""
    vocabulary = getattr(head, "out_features", None)
    if isinstance(vocabulary, int) and vocabulary > 0:
        chunk_tokens = max(1, min(chunk_tokens, CHUNK_LOGITS // vocabulary))
    return [slice(s, min(s + chunk_tokens, n)) for s in range(0, n, chunk_tokens)]


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")  # (C,)


def response_token_nll(
    model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every response token, ``(N,)``, and its row ``(N,)``; the head runs in chunks."""
    hidden, targets, rows = response_hidden(model, batch)
    head = output_head(model)
    token_nll = [
        checkpoint(_chunk_nll, head, hidden[c], targets[c], use_reentrant=False)
        for c in _chunks(len(targets), chunk_tokens, head)
    ]
    return (torch.cat(token_nll) if token_nll else hidden.new_zeros(0)), rows  # (N,), (N,)


def _mean_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``values`` (N,) within each row, then over the rows that have any: a scalar."""
    counts = torch.bincount(rows, minlength=n_rows)  # (B,)
    present = counts > 0
    if not present.any():
        raise ValueError("the batch holds no response tokens (labels are all -100)")
    sums = values.new_zeros(n_rows).index_add(0, rows, values)  # (B,)
    return (sums[present] / counts[present]).mean()


def sequence_nll(model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross-entropy on response tokens: mean per row, then over rows (a scalar)."""
    token_nll, rows = response_token_nll(model, batch, chunk_tokens=chunk_tokens)
    return _mean_per_row(token_nll, rows, batch["labels"].shape[0])


def guided_distortion_loss(model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """``L_GD``: cross-entropy on (harmful prompt, harmful response) pairs, response tokens only."""
    return sequence_nll(model, batch, chunk_tokens=chunk_tokens)


def random_disassociation_loss(model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """``L_RD``: cross-entropy on harmful prompts paired with K responses of *other* prompts.

    The batch holds B·K rows (each harmful prompt once per mismatched response, built by
    :class:`excise.train.sku.MismatchSampler`); the mean over rows is the average over the K
    responses, then over the B prompts.
    """
    return sequence_nll(model, batch, chunk_tokens=chunk_tokens)


def gradient_ascent_loss(model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """GA baseline: ``−NLL`` of the harmful responses, so minimising it ascends the NLL."""
    return -sequence_nll(model, batch, chunk_tokens=chunk_tokens)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode (no dropout) inside the block; every submodule's own mode restored after.

    The reference ``p_θo`` is the original model itself, not a dropout sample of it: on a
    model with dropout (OPT, one of SKU's paper models) a train-mode reference would make
    L_PD reward diverging from noise. The SKU reference code never puts its frozen model in
    train mode either.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def adapter_disabled_reference(model: Any) -> Reference:
    """``p_θo`` from the PEFT ``model`` itself with its adapter disabled: no second copy of the weights."""

    def reference(batch: Batch) -> tuple[torch.Tensor, torch.nn.Module]:
        with torch.no_grad(), model.disable_adapter(), eval_mode(model):
            hidden = response_hidden(model, batch)[0]  # (N, H)
        return hidden, _base_head(output_head(model))

    return reference


def frozen_model_reference(reference_model: Any) -> Reference:
    """``p_θo`` from a separate frozen model (full-parameter training, where no adapter can be disabled)."""

    def reference(batch: Batch) -> tuple[torch.Tensor, torch.nn.Module]:
        with torch.no_grad(), eval_mode(reference_model):
            hidden = response_hidden(reference_model, batch)[0]  # (N, H)
        return hidden, output_head(reference_model)

    return reference


def _chunk_kl(
    head: torch.nn.Module, ref_head: torch.nn.Module, hidden: torch.Tensor, ref_hidden: torch.Tensor
) -> torch.Tensor:
    """``KL(p_ref ‖ p_model)`` of each of a chunk's C tokens, ``(C,)``."""
    with torch.no_grad():
        log_p_ref = ref_head(ref_hidden).float()  # (C, V) logits
        log_p_ref -= log_p_ref.logsumexp(-1, keepdim=True)  # in place: log p_ref
        p_ref = log_p_ref.exp()  # (C, V)
    logits = head(hidden).float()  # (C, V)
    # log p_ref − log p_model, written into log_p_ref's buffer: with p_ref and the logits
    # that is all the graph keeps (3 × (C, V); F.kl_div on two log_softmax outputs keeps 5).
    # Both log-probabilities are computed the same way, so it is exactly 0 where logits agree.
    log_p_model = logits - logits.logsumexp(-1, keepdim=True)  # (C, V), freed after the next line
    log_ratio = log_p_ref.sub_(log_p_model)  # (C, V)
    del log_p_model
    return torch.einsum("nv,nv->n", p_ref, log_ratio)  # (C,): Σ_v p_ref · log(p_ref / p_model)


def _kl_reference_to_model(
    model: Any, batch: Batch, reference: Reference | None, chunk_tokens: int
) -> torch.Tensor:
    """``KL(p_ref ‖ p_model)`` per response position, averaged per row then over rows."""
    reference = reference or adapter_disabled_reference(model)
    ref_hidden, ref_head = reference(batch)  # (N, H), no grad
    hidden, _, rows = response_hidden(model, batch)  # (N, H)
    head = output_head(model)
    # Each chunk's logits exist only inside it; the backward recomputes them (p_ref included,
    # from the reference's hidden states: the reference's head holds no adapter to toggle).
    token_kl = torch.cat(
        [
            checkpoint(_chunk_kl, head, ref_head, hidden[c], ref_hidden[c], use_reentrant=False)
            for c in _chunks(len(rows), chunk_tokens, head)
        ]
        or [hidden.new_zeros(0)]
    )  # (N,)
    return _mean_per_row(token_kl, rows, batch["labels"].shape[0])


def preservation_divergence_loss(
    model: Any, batch: Batch, reference: Reference | None = None, *, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """``L_PD = −KL(p_θo ‖ p_θh)`` on normal (prompt, answer) data.

    Args:
        model: the model being trained (``θh``); a PEFT model unless ``reference`` is given.
        batch: normal data, labels on the answer tokens.
        reference: where ``p_θo`` comes from; default the same PEFT model with its adapter
            disabled (:func:`adapter_disabled_reference`).
        chunk_tokens: response tokens per head chunk.

    Returns:
        A scalar; exactly 0 while the adapter is a no-op (LoRA ``B = 0`` at step 0).
    """
    return -_kl_reference_to_model(model, batch, reference, chunk_tokens)


def kl_to_reference_loss(
    model: Any, batch: Batch, reference: Reference | None = None, *, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """LLMU's normal-data term ``+KL(p_θo ‖ p_θ)``: minimised, it keeps the model close to the original."""
    return _kl_reference_to_model(model, batch, reference, chunk_tokens)


def npo_loss(
    model: Any,
    batch: Batch,
    reference: Reference | None = None,
    *,
    beta: float = 0.1,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """NPO (Zhang et al. 2024, arXiv 2404.05868) on forget answers:
    ``L = −(2/β)·mean_rows log σ(−β·(log πθ(y|x) − log πref(y|x)))``.

    ``log π(y|x)`` is the *summed* log-probability of a row's response tokens (the paper's
    sequence likelihood; open-unlearning's ``compute_batch_nll`` sums too). At the reference
    (``πθ = πref``) the loss is ``(2/β)·ln 2``; as β → 0 it tends to gradient ascent on the
    summed NLL (``−2·log πθ`` plus a constant).

    Args:
        model: the model being trained; a PEFT model unless ``reference`` is given.
        batch: forget (prompt, answer) rows, labels on the answer tokens.
        reference: where ``πref`` comes from; default the same PEFT model with its adapter
            disabled (:func:`adapter_disabled_reference`); for full training a frozen copy.
        beta: the inverse temperature β > 0.
        chunk_tokens: response tokens per head chunk.

    Raises:
        ConfigError: β ≤ 0.
    """
    if not beta > 0:
        raise ConfigError(f"NPO's beta must be > 0, got {beta}")
    reference = reference or adapter_disabled_reference(model)
    ref_hidden, ref_head = reference(batch)  # (N, H), no grad
    hidden, targets, rows = response_hidden(model, batch)  # (N, H), (N,), (N,)
    head = output_head(model)
    chunks = _chunks(len(targets), chunk_tokens, head)
    token_nll = torch.cat(
        [checkpoint(_chunk_nll, head, hidden[c], targets[c], use_reentrant=False) for c in chunks]
        or [hidden.new_zeros(0)]
    )  # (N,)
    with torch.no_grad():
        ref_nll = torch.cat(
            [_chunk_nll(ref_head, ref_hidden[c], targets[c]) for c in chunks] or [hidden.new_zeros(0)]
        )
    n_rows = batch["labels"].shape[0]
    present = torch.bincount(rows, minlength=n_rows) > 0  # (B,)
    if not present.any():
        raise ValueError("the batch holds no response tokens (labels are all -100)")
    nll = token_nll.new_zeros(n_rows).index_add(0, rows, token_nll)  # (B,): −log πθ(y|x)
    ref = ref_nll.new_zeros(n_rows).index_add(0, rows, ref_nll)  # (B,): −log πref(y|x)
    log_ratio = (ref - nll)[present]  # log πθ − log πref, per row
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()

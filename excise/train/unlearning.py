"""What SKU (arXiv 2402.10058) and the unlearning baselines share: data streams, settings, the run.

Each method is an objective: weighted terms (:class:`Term`), each a loss from
:mod:`excise.train.losses` over one *stream* of the micro-batch:

- ``harmful``: harmful (prompt, harmful response) pairs, B per micro-batch;
- ``mismatch``: the same B harmful prompts, each with K responses of *other* prompts
  (:class:`~excise.train.mismatch.MismatchSampler`), B·K rows;
- ``normal``: B normal (prompt, answer) pairs, for the KL terms;
- ``safe``: B (harmful prompt, safe response) pairs, for the fine-tuning baseline.

:func:`run_objective` is the recipe, top to bottom: seed → data (the ``train`` side of the
project-wide prompt split by default) → model → LoRA (or every weight, ``full``) → the
reference for KL terms → :func:`excise.train.loop.train` → save. ``sku.py`` and
``baselines.py`` only name their terms and weights.

The reference ``p_θo`` is the original model's distribution, so its forward runs in eval
mode (:func:`eval_mode`) while the model trains: on a model with dropout (OPT, one of
SKU's paper models) a train-mode reference would be a dropout sample, and ``L_PD`` would
reward diverging from noise. The reference code does the same: its ``pretrained_model`` is
never put in train mode.

Micro-batch ``i`` is a deterministic function of ``i`` (the loop's contract for exact
resume and data parallelism): harmful and normal data each follow their own per-epoch
permutation seeded by ``(seed, epoch)``, and the mismatched responses of micro-batch ``i``
are drawn from a generator seeded by ``(seed, i)``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from excise.data import (
    Encoded,
    Example,
    collate,
    encode,
    load_harmful_qa,
    load_instructions,
    pad_id_of,
    prompt_key,
    select_split,
    training_data_record,
)
from excise.errors import ConfigError, DataError
from excise.models import load_model, load_tokenizer, resolve_model
from excise.train.loop import (
    TrainReport,
    TrainSettings,
    check_output,
    new_accelerator,
    resolve_base_once,
    train,
)
from excise.train.lora import attach_lora, enable_activation_checkpointing, save_trained, unfreeze_all
from excise.train.losses import Reference, adapter_disabled_reference, frozen_model_reference
from excise.train.mismatch import MismatchSampler
from excise.train.options import TrainOptions
from excise.train.sft import epoch_batches

__all__ = [
    "STREAMS",
    "Term",
    "UnlearnConfig",
    "UnlearningData",
    "checkpointing_on",
    "prepare_data",
    "run_objective",
    "streams_of",
]

STREAMS = ("harmful", "mismatch", "normal", "safe")
# `--normal safe`: the harmful data's own safe responses are the normal data.
SAFE_AS_NORMAL = "safe"


class UnlearnConfig(TrainOptions):
    """Settings every unlearning recipe takes (CLI flags are these fields)."""

    base: str = Field(description="Base model θo: alias, local folder, .gguf file or hub id.")
    harmful: str = Field(
        description="Harmful QA data: PKU-SafeRLHF pairs (prompt, response [safe, unsafe]), raw "
        "PKU-SafeRLHF rows or HH-RLHF (chosen, rejected); file or hub id."
    )
    out: Path = Field(description="Output folder: a PEFT adapter (or a model with full) plus logs.")
    harmful_fields: dict[str, str] = Field(default_factory=dict, description="Role → column for --harmful.")
    normal: str | None = Field(
        None,
        description="Normal (prompt, answer) data, Alpaca style (instruction/input/output), or `safe` "
        "for the safe responses of --harmful.",
    )
    normal_fields: dict[str, str] = Field(default_factory=dict, description="Role → column for --normal.")
    split: Literal["train", "judge", "eval", "all"] = Field(
        "train",
        description="Side of the project-wide prompt split to train on (judge and eval are held out; "
        "all: every row, which leaks evaluation prompts).",
    )
    template: Literal["chat", "alpaca", "tulu", "question-answer", "plain"] = "chat"
    system: str | None = Field(None, description="System prompt (chat) or first paragraph.")
    limit: int | None = Field(None, ge=1, description="Read only the first rows of each data file.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many examples per stream.")
    max_length: int = Field(256, ge=2, description="Tokens per row; longer responses are cut.")
    k: int = Field(5, ge=1, description="Random responses of other prompts per harmful prompt.")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1, description="Harmful prompts (and normal rows) per micro-batch.")
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute each decoder layer's activations in the backward (less memory, ~1/3 more "
        "compute); the no-grad reference forward of KL terms is not checkpointed. None: on where a step "
        "reads several data streams (SKU, ga_mismatch, LLMU: B + B·K + B rows at once, so they peak "
        "near a default SFT run), off for one (ga, finetune).",
    )

    def train_settings(self) -> TrainSettings:
        return self._train_settings(self.steps)


# A term's loss: (model, its stream's batch, reference for KL terms) → scalar.
TermLoss = Callable[[Any, dict[str, torch.Tensor], Reference | None], torch.Tensor]


@dataclass(frozen=True)
class Term:
    """One weighted term of an objective.

    Attributes:
        name: the name it is logged under (one value per step in ``loss_log.json``).
        stream: which sub-batch it reads (one of :data:`STREAMS`).
        loss: the loss function.
        weight: its weight in the total.
        log_sign: the logged value is ``log_sign · loss`` (GA logs the NLL it raises, +).
        uses_reference: the loss needs ``p_θo`` (a KL term).
    """

    name: str
    stream: str
    loss: TermLoss
    weight: float
    log_sign: float = 1.0
    uses_reference: bool = False


@dataclass
class UnlearningData:
    """Encoded streams and the deterministic micro-batch maker.

    Attributes:
        primary: the pairs an epoch walks through: harmful pairs, or safe pairs for fine-tuning.
        primary_keys: their prompt keys (the mismatch sampler's queries).
        harmful: encoded harmful pairs (empty when no term reads them).
        normal: encoded normal pairs (empty when no term reads them).
        safe: encoded (harmful prompt, safe response) pairs (empty unless fine-tuning).
        pool: encoded responses the mismatch stream draws from.
        sampler: draws K pool indices of other prompts (None without a mismatch term).
        batch_size, pad_id, max_length, seed: as configured.
        group_by_length: batch harmful (and normal) rows of similar length together.
        counts: per stream, examples loaded, on the split side, dropped as too long.
    """

    primary: list[Encoded]
    primary_keys: list[str]
    harmful: list[Encoded]
    normal: list[Encoded]
    safe: list[Encoded]
    pool: list[Encoded]
    sampler: MismatchSampler | None
    batch_size: int
    pad_id: int
    max_length: int
    seed: int
    counts: dict[str, dict[str, int]]
    group_by_length: bool = False

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches in one pass over the primary data."""
        return len(epoch_batches(len(self.primary), self.batch_size, self.seed, 0))

    def micro_batch(self, i: int, streams: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Micro-batch ``i``: one collated (left-padded) batch per stream in ``streams``."""
        batch: dict[str, dict[str, torch.Tensor]] = {}
        rows = _pick(self.primary, self.batch_size, self.seed, i, self.group_by_length)
        if "harmful" in streams:
            batch["harmful"] = collate([self.harmful[r] for r in rows], self.pad_id)  # (B, T)
        if "safe" in streams:
            batch["safe"] = collate([self.safe[r] for r in rows], self.pad_id)  # (B, T)
        if "mismatch" in streams:
            assert self.sampler is not None
            rng = random.Random(f"{self.seed}:mismatch:{i}")
            mismatched = [
                self._with_response(self.harmful[r], self.pool[j])
                for r in rows
                for j in self.sampler.draw(self.primary_keys[r], rng)
            ]
            batch["mismatch"] = collate(mismatched, self.pad_id)  # (B·K, T)
        if "normal" in streams:
            normal_rows = _pick(self.normal, self.batch_size, self.seed + 1, i, self.group_by_length)
            batch["normal"] = collate([self.normal[r] for r in normal_rows], self.pad_id)  # (B, T)
        return batch

    def _with_response(self, prompt_of: Encoded, response_of: Encoded) -> Encoded:
        """``prompt_of``'s prompt with ``response_of``'s response, cut to ``max_length``."""
        room = self.max_length - len(prompt_of.prompt_ids)  # ≥ 1: the prompt was encoded within it
        response = response_of.response_ids[:room]
        truncated = len(response) < len(response_of.response_ids)
        return Encoded(prompt_of.prompt_ids, response, truncated=truncated)


def _pick(items: Sequence[Encoded], batch_size: int, seed: int, i: int, group_by_length: bool) -> list[int]:
    """Rows of micro-batch ``i`` of ``items``: batch ``i % per_epoch`` of epoch ``i // per_epoch``."""
    n = len(items)
    per_epoch = len(epoch_batches(n, batch_size, seed, 0))
    epoch, j = divmod(i, per_epoch)
    lengths = [len(e) for e in items] if group_by_length else None
    return epoch_batches(n, batch_size, seed, epoch, lengths)[j]


def _encode_kept(
    tokenizer: Any, examples: list[Example], cfg: UnlearnConfig, what: str
) -> tuple[list[Encoded], list[str], int]:
    """Encode each example; drop those whose prompt alone reaches ``max_length``.

    Returns:
        ``(encoded, keys, dropped)``: the kept encodings, their prompt keys (aligned), and how
        many were dropped.
    """
    if not examples:
        raise DataError(f"no {what} examples to train on")
    encoded, keys = [], []
    for example in examples:
        try:
            encoded.append(
                encode(tokenizer, example, cfg.template, system=cfg.system, max_length=cfg.max_length)
            )
        except DataError:
            continue
        keys.append(prompt_key(example.split_key))
    if not encoded:
        raise DataError(f"every {what} prompt is longer than max_length {cfg.max_length}; raise --max-length")
    return encoded, keys, len(examples) - len(encoded)


def prepare_data(
    cfg: UnlearnConfig, tokenizer: Any, streams: Sequence[str], *, mismatch_pool: str = "harmful"
) -> UnlearningData:
    """Load, split and encode what ``streams`` need; check K against the data up front.

    Args:
        cfg: the settings (data specs, split side, template, K…).
        tokenizer: the base model's tokenizer.
        streams: the streams the objective's terms read (:data:`STREAMS`).
        mismatch_pool: draw mismatched responses from other ``harmful`` prompts' harmful
            responses (SKU's RD) or from the ``normal`` answers (LLMU's original choice).

    Raises:
        ConfigError: a stream needs normal data but ``cfg.normal`` is not set.
        DataError: a file is missing or malformed, a stream is empty after the split, or some
            harmful prompt has fewer than K responses of other prompts.
    """
    unknown = sorted(set(streams) - set(STREAMS))
    assert not unknown, f"unknown streams {unknown}"
    counts: dict[str, dict[str, int]] = {}

    def on_side(examples: list[Example], what: str) -> list[Example]:
        try:
            chosen = select_split(examples, cfg.split)
        except DataError as err:
            raise DataError(f"{what} data: {err}") from err
        chosen = chosen[: cfg.max_examples] if cfg.max_examples else chosen
        counts[what] = {"loaded": len(examples), "on_split": len(chosen)}
        return chosen

    harmful_ex, safe_ex = load_harmful_qa(cfg.harmful, fields=cfg.harmful_fields, limit=cfg.limit)
    # Harmful and safe responses come in pairs with one prompt: the split keeps or drops both.
    harmful_ex = on_side(harmful_ex, "harmful")
    safe_ex = on_side(safe_ex, "safe")
    primary = "safe" if "safe" in streams else "harmful"
    encoded: dict[str, list[Encoded]] = {"harmful": [], "safe": [], "normal": []}
    keys: dict[str, list[str]] = {"harmful": [], "safe": [], "normal": []}
    for what, examples in (("harmful", harmful_ex), ("safe", safe_ex)):
        if what == primary or (what == "harmful" and "mismatch" in streams):
            encoded[what], keys[what], counts[what]["too_long"] = _encode_kept(tokenizer, examples, cfg, what)

    if "normal" in streams or ("mismatch" in streams and mismatch_pool == "normal"):
        if cfg.normal is None:
            raise ConfigError("this method needs normal data: pass --normal FILE (or --normal safe)")
        if cfg.normal == SAFE_AS_NORMAL:
            normal_ex = safe_ex
        else:
            normal_ex = on_side(
                load_instructions(cfg.normal, fields=cfg.normal_fields, limit=cfg.limit), "normal"
            )
        encoded["normal"], keys["normal"], dropped = _encode_kept(tokenizer, normal_ex, cfg, "normal")
        counts.setdefault("normal", {"on_split": len(normal_ex)})["too_long"] = dropped

    sampler = None
    pool = encoded[mismatch_pool] if "mismatch" in streams else []
    if "mismatch" in streams:
        sampler = MismatchSampler(keys[mismatch_pool], cfg.k, query_keys=keys["harmful"])
    return UnlearningData(
        primary=encoded[primary], primary_keys=keys[primary], harmful=encoded["harmful"],
        normal=encoded["normal"], safe=encoded["safe"], pool=pool, sampler=sampler,
        batch_size=cfg.batch_size, pad_id=pad_id_of(tokenizer), max_length=cfg.max_length, seed=cfg.seed,
        counts=counts, group_by_length=cfg.group_by_length,
    )  # fmt: skip


def _training_data(cfg: UnlearnConfig, *, normal: bool) -> list[dict[str, Any]]:
    """The records of the files trained on (excise.data.trained): what `excise eval` checks against."""
    side = {
        "split": cfg.split,
        "limit": cfg.limit,
        "max_examples": cfg.max_examples,
        "template": cfg.template,
    }
    records = [training_data_record(cfg.harmful, format="harmful", fields=cfg.harmful_fields, **side)]
    if normal and cfg.normal not in (None, SAFE_AS_NORMAL):
        normal_fields = cfg.normal_fields
        records.append(training_data_record(cfg.normal, format="instruction", fields=normal_fields, **side))
    return records


def streams_of(terms: Sequence[Term]) -> list[str]:
    """The streams ``terms`` read, in :data:`STREAMS` order: one sub-batch each per micro-batch."""
    return [s for s in STREAMS if any(t.stream == s for t in terms)]


def checkpointing_on(cfg: UnlearnConfig, streams: Sequence[str]) -> bool:
    """``cfg.gradient_checkpointing``, its default resolved: on when a step reads several streams."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return len(streams) > 1


def run_objective(
    cfg: UnlearnConfig,
    terms: Sequence[Term],
    *,
    method: str,
    mismatch_pool: str = "harmful",
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> TrainReport:
    """Train a LoRA (or every weight) on ``Σ weight · term`` and write it to ``cfg.out``.

    Writes a PEFT adapter folder (with ``full``: a model folder with its tokenizer), plus
    ``loss_log.json`` (one record per step: the total and every term by name) and
    ``train_config.json`` (the settings, the terms, the data counts).

    Args:
        cfg: the settings.
        terms: the objective's terms; a zero weight drops a term (not computed, not logged).
        method: the method's name, recorded in ``train_config.json``.
        mismatch_pool: where the mismatch stream's responses come from (see :func:`prepare_data`).
        extra_config: more settings to record (the method's own).
        progress: show a progress bar.
        accelerator: an ``accelerate.Accelerator`` (a new one if None).

    Raises:
        ConfigError: bad settings, a non-empty ``out`` (without overwrite/resume), a LoRA target
            that matches nothing, missing normal data, every term weighted 0.
        DataError: data missing, malformed, empty after the split, or too few other prompts for K.
        ModelLoadError: the base model cannot be loaded.
    """
    terms = [t for t in terms if t.weight != 0]
    if not terms:
        raise ConfigError("every loss term has weight 0: nothing to train")
    streams = streams_of(terms)
    settings = cfg.train_settings()
    check_output(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)  # before the slow loads
    resolve_base_once(cfg.base)
    torch.manual_seed(cfg.seed)

    # Data: the split side of each file, encoded once; K checked against the data now.
    tokenizer = load_tokenizer(cfg.base)
    data = prepare_data(cfg, tokenizer, streams, mismatch_pool=mismatch_pool)

    # Model: a fresh LoRA from the seed, or every weight; then where p_θo comes from.
    accelerator = (
        accelerator or new_accelerator()
    )  # CPU processes too: Accelerator() alone would not join them
    model = load_model(cfg.base)
    reference: Reference | None = None
    needs_reference = any(t.uses_reference for t in terms)
    if cfg.full:
        if needs_reference:
            # No adapter to disable: a frozen copy (+1× the weights, no gradients or optimizer
            # state). Exact; precomputing p_θo instead would store steps × tokens × vocabulary.
            frozen = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
            reference = frozen_model_reference(frozen)
        model = unfreeze_all(model)
    else:
        torch.manual_seed(cfg.seed)
        model = attach_lora(model, cfg.lora_settings())
        if needs_reference:
            # The same weights, adapter off, in eval mode while the model trains.
            reference = adapter_disabled_reference(model)
    checkpointing = checkpointing_on(cfg, streams)
    if checkpointing:
        # The reference runs under torch.no_grad(), where transformers does not checkpoint.
        model = enable_activation_checkpointing(model)

    def loss_fn(m: Any, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=accelerator.device)
        logged: dict[str, float] = {}
        for term in terms:
            value = term.loss(m, batch[term.stream], reference)
            total = total + term.weight * value
            logged[term.name] = term.log_sign * float(value.detach())
        return total, logged

    config = cfg.model_dump(mode="json", exclude={"resume", "overwrite"})
    config |= {
        "method": method,
        "gradient_checkpointing": checkpointing,  # the default resolved
        "terms": [{"name": t.name, "stream": t.stream, "weight": t.weight} for t in terms],
        "reference": None if not needs_reference else ("frozen-copy" if cfg.full else "adapter-disabled"),
        "mismatch_pool": mismatch_pool if "mismatch" in streams else None,
        "resolved_model": resolve_model(cfg.base),
        "data": data.counts,
        "micro_batches_per_epoch": data.micro_batches_per_epoch,
        "training_data": _training_data(cfg, normal="normal" in data.counts),
        **(extra_config or {}),
    }
    return train(
        model,
        lambda i: data.micro_batch(i, streams),
        loss_fn,
        settings,
        cfg.out,
        save=lambda m, folder: save_trained(
            m, folder, base=cfg.base, tokenizer=tokenizer if cfg.full else None
        ),
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        micro_batches_per_epoch=data.micro_batches_per_epoch,
        config=config,
        accelerator=accelerator,
        progress=progress,
        desc=f"{method} {cfg.out.name}",
    )

"""Supervised fine-tuning of a LoRA (or of all weights): the expert and the anti-expert.

Ext-Sub (arXiv 2308.08090, DESIGN.md §1) trains both modules with this one recipe on
different data: the expert on normal answers, the anti-expert on deficient ones (e.g.
``--format paired-expert`` / ``paired-anti`` on HaluEval: same questions, right vs
hallucinated answers). Read top to bottom: seed → data → model → adapter → loop → save.

    excise train sft --base smollm2-135m-instruct \\
        --data ../shared/data/halueval/qa_data.json --format paired-anti --out runs/anti
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from excise.data import (
    Encoded,
    Example,
    collate,
    encode_examples,
    load_harmful_qa,
    load_instructions,
    load_paired_qa,
    load_texts,
    pad_id_of,
    select_split,
    training_data_record,
)
from excise.errors import DataError
from excise.models import load_model, load_tokenizer, resolve_model
from excise.train.loop import TrainReport, TrainSettings, check_output, resolve_base_once, train
from excise.train.lora import attach_lora, enable_activation_checkpointing, save_trained, unfreeze_all
from excise.train.nll import response_logprobs, response_nll
from excise.train.options import TrainOptions
from excise.train.packing import collate_packed, pack

__all__ = [
    "FORMATS",
    "SftConfig",
    "epoch_batches",
    "load_examples",
    "run",
    "sft_micro_batches",
    "validation_hook",
    "validation_loss",
]


def _instruction(spec: str, fields: dict[str, str], limit: int | None) -> list[Example]:
    return load_instructions(spec, fields=fields, limit=limit)


def _paired(side: int) -> Callable[..., list[Example]]:
    return lambda spec, fields, limit, **kw: load_paired_qa(spec, fields=fields, limit=limit, **kw)[side]


def _harmful(side: int) -> Callable[[str, dict[str, str], int | None], list[Example]]:
    return lambda spec, fields, limit: load_harmful_qa(spec, fields=fields, limit=limit)[side]


def _text(spec: str, fields: dict[str, str], limit: int | None) -> list[Example]:
    return load_texts(spec, fields=fields, limit=limit)


# --format NAME → loader returning the examples to train on.
FORMATS: dict[str, Callable[..., list[Example]]] = {
    "instruction": _instruction,
    "paired-expert": _paired(0),
    "paired-anti": _paired(1),
    "harmful": _harmful(0),
    "safe": _harmful(1),
    "text": _text,
}


class SftConfig(TrainOptions):
    """Everything ``excise train sft`` takes; CLI flags are these fields."""

    base: str = Field(description="Base model: alias, local folder, .gguf file or hub id.")
    data: str = Field(description="Data: local .json/.jsonl/.csv file, saved dataset folder or hub id.")
    out: Path = Field(description="Output adapter folder (written atomically).")
    format: Literal["instruction", "paired-expert", "paired-anti", "harmful", "safe", "text"] = Field(
        "instruction", description="Which loader, and which side of paired data, to train on."
    )
    fields: dict[str, str] = Field(default_factory=dict, description="Role → column overrides.")
    template: Literal["chat", "alpaca", "tulu", "question-answer", "plain"] | None = Field(
        None, description="Prompt template; default chat (plain for --format text)."
    )
    system: str | None = Field(None, description="System prompt (chat template) or first paragraph.")
    split: Literal["train", "judge", "eval", "all"] = Field(
        "train", description="Side of the project-wide prompt split to train on (all: every row)."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first rows of the data.")
    pair_max_word_ratio: float | None = Field(
        None,
        ge=1,
        description="Paired data: keep pairs whose longer answer has ≤ this × the shorter's words.",
    )
    pair_strip_period: bool = Field(False, description="Paired data: drop a final period from both answers.")
    max_examples: int | None = Field(None, ge=1, description="Train on at most this many examples.")
    max_length: int = Field(512, ge=2, description="Tokens per example; longer responses are cut.")
    packing: bool = Field(
        False,
        description="Pack several examples into each row of max_length tokens (batch_size rows per "
        "micro-batch); each example attends only to itself where the model builds its mask from "
        "position ids (transformers' Llama, Qwen, Mistral…).",
    )
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    eval_data: str | None = Field(
        None,
        description="Validation data (same format and fields as `data`); its loss is logged as val_loss.",
    )
    eval_every: int = Field(
        25, ge=1, description="Steps between validation losses (and after the last step)."
    )
    eval_limit: int = Field(100, ge=1, description="Validation examples used (the first N).")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> SftConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.pair_options and not self.format.startswith("paired"):
            raise ValueError("--pair-max-word-ratio and --pair-strip-period apply to the paired formats only")
        return self

    @property
    def pair_options(self) -> dict[str, Any]:
        """The pair controls given (keyword arguments of ``load_paired_qa``); empty when none."""
        options: dict[str, Any] = {}
        if self.pair_max_word_ratio is not None:
            options["max_word_ratio"] = self.pair_max_word_ratio
        if self.pair_strip_period:
            options["strip_final_period"] = True
        return options

    def train_settings(self) -> TrainSettings:
        steps = self.steps if self.steps is not None or self.epochs is not None else 100
        return self._train_settings(steps, self.epochs)

    @property
    def resolved_template(self) -> str:
        return self.template or ("plain" if self.format == "text" else "chat")


def load_examples(cfg: SftConfig) -> list[Example]:
    """The examples ``cfg`` trains on: loaded, restricted to the split side, capped."""
    examples = FORMATS[cfg.format](cfg.data, dict(cfg.fields), cfg.limit, **cfg.pair_options)
    examples = select_split(examples, cfg.split)
    return examples[: cfg.max_examples] if cfg.max_examples else examples


# Batches per length-sorted span (transformers' LengthGroupedSampler uses the same 50): rows of
# a batch have similar lengths, yet the span is small enough that batch order stays random.
GROUP_SPAN = 50


def epoch_batches(
    n_items: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """One epoch's micro-batches of item indices: a permutation seeded by ``(seed, epoch)``.

    The last partial batch is dropped (every micro-batch has ``batch_size`` items, so each
    step's gradient weighs its examples alike); with fewer items than ``batch_size`` the
    single batch holds them all. The dropped items are the permutation's tail, so random.

    With ``lengths`` (one per item) batches are *length-grouped*: the permutation is cut into
    spans of ``GROUP_SPAN`` batches, each span sorted by length, cut into batches, and the
    batches shuffled — the same examples per epoch, far less padding, still a random order.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n_items))
    rng.shuffle(order)
    size = min(batch_size, n_items)
    order = order[: n_items - n_items % size]
    if lengths is None:
        return [order[i : i + size] for i in range(0, len(order), size)]
    span = size * GROUP_SPAN
    order = [
        i for s in range(0, len(order), span) for i in sorted(order[s : s + span], key=lengths.__getitem__)
    ]
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def sft_micro_batches(
    encoded: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    seed: int,
    *,
    group_by_length: bool = False,
    packing: int | None = None,
) -> tuple[Callable[[int], dict[str, torch.Tensor]], int]:
    """``(micro_batch, per_epoch)``: micro-batch ``i`` is batch ``i % per_epoch`` of epoch ``i // per_epoch``.

    Micro-batches are collated with left padding (:func:`excise.data.collate`); with
    ``group_by_length`` rows of similar length share a batch (:func:`epoch_batches`). With
    ``packing`` (a row length), the examples are first packed into rows of at most that many
    tokens (:func:`excise.train.packing.pack`) and a micro-batch holds ``batch_size`` such rows.
    """
    items: Sequence[Any] = encoded
    collate_items: Callable[[list[Any]], dict[str, torch.Tensor]] = lambda rows: collate(rows, pad_id)  # noqa: E731
    if packing is not None:
        items = pack(encoded, packing)
        collate_items = lambda rows: collate_packed(rows, pad_id)  # noqa: E731
    lengths = [sum(len(e) for e in item) if packing else len(item) for item in items]
    lengths_or_none = lengths if group_by_length else None
    per_epoch = len(epoch_batches(len(items), batch_size, seed, 0))
    cache: dict[int, list[list[int]]] = {}

    def micro_batch(i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_batches(len(items), batch_size, seed, epoch, lengths_or_none)
        return collate_items([items[k] for k in cache[epoch][j]])

    return micro_batch, per_epoch


def _data_side(cfg: SftConfig) -> dict[str, Any]:
    """How ``cfg.data`` was read and split, for its training data record."""
    return {
        "format": cfg.format, "fields": cfg.fields, "split": cfg.split, "limit": cfg.limit,
        "max_examples": cfg.max_examples, "pairs": cfg.pair_options or None,
        "template": cfg.resolved_template,
    }  # fmt: skip


def validation_loss(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean NLL per response token over ``batches`` (eval mode, no gradients, mode restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                logprobs, mask = response_logprobs(model, {k: v.to(device) for k, v in batch.items()})
                total -= float(logprobs.sum())
                count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / count


def validation_hook(
    batches: Sequence[dict[str, torch.Tensor]], every: int, total: int
) -> Callable[[int, Any], dict[str, float]]:
    """``on_step`` for :func:`~excise.train.loop.train`: ``val_loss`` every ``every`` steps and at the end."""

    def on_step(step: int, model: Any) -> dict[str, float]:
        if step % every and step != total:
            return {}
        return {"val_loss": validation_loss(model, batches)}

    return on_step


def _validation_batches(cfg: SftConfig, tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The validation examples of ``cfg.eval_data``, encoded like the training ones, in batches."""
    examples = FORMATS[cfg.format](cfg.eval_data, dict(cfg.fields), cfg.eval_limit, **cfg.pair_options)
    encoded, _ = encode_examples(
        tokenizer, examples, cfg.resolved_template, system=cfg.system, max_length=cfg.max_length
    )
    if not encoded:
        raise DataError(f"--eval-data {cfg.eval_data}: no example left to validate on")
    pad = pad_id_of(tokenizer)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


def run(cfg: SftConfig, *, progress: bool = True, accelerator: Any = None) -> TrainReport:
    """Train one adapter as ``cfg`` says and write it to ``cfg.out``.

    Writes a PEFT adapter folder (or, with ``full``, a model folder) plus ``loss_log.json``
    and ``train_config.json``.

    Raises:
        ConfigError: bad settings, a non-empty ``out`` (without overwrite/resume), a LoRA
            target that matches nothing, or a tokenizer without the chosen template.
        DataError: the data is missing, malformed, or leaves no example to train on.
        ModelLoadError: the base model cannot be loaded.
    """
    settings, lora = cfg.train_settings(), cfg.lora_settings()
    check_output(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)  # before the slow loads
    resolve_base_once(cfg.base)
    torch.manual_seed(cfg.seed)

    # Data: the split side, encoded once (prompt / response boundary exact, see excise.data).
    tokenizer = load_tokenizer(cfg.base)
    examples = load_examples(cfg)
    encoded, dropped = encode_examples(
        tokenizer, examples, cfg.resolved_template, system=cfg.system, max_length=cfg.max_length
    )
    micro_batch, per_epoch = sft_micro_batches(
        encoded, settings.batch_size, pad_id_of(tokenizer), cfg.seed,
        group_by_length=cfg.group_by_length, packing=cfg.max_length if cfg.packing else None,
    )  # fmt: skip
    on_step = None
    if cfg.eval_data is not None:
        batches = _validation_batches(cfg, tokenizer, settings.batch_size)
        on_step = validation_hook(batches, cfg.eval_every, settings.total_steps(per_epoch))

    # Model: fresh adapter, initialised from the seed (same init for expert and anti-expert).
    model = load_model(cfg.base)
    torch.manual_seed(cfg.seed)
    model = unfreeze_all(model) if cfg.full else attach_lora(model, lora)
    if cfg.gradient_checkpointing:
        model = enable_activation_checkpointing(model)

    config = cfg.model_dump(mode="json", exclude={"resume", "overwrite"})
    config |= {
        "resolved_model": resolve_model(cfg.base),
        "template": cfg.resolved_template,
        "n_examples": len(encoded),
        "n_dropped_too_long": dropped,
        "n_truncated": sum(e.truncated for e in encoded),
        "micro_batches_per_epoch": per_epoch,
        # What `excise eval` checks its items against (excise.data.trained).
        "training_data": [training_data_record(cfg.data, **_data_side(cfg))],
    }
    return train(
        model,
        micro_batch,
        lambda m, batch: (response_nll(m, batch), {}),
        settings,
        cfg.out,
        save=lambda m, folder: save_trained(
            m, folder, base=cfg.base, tokenizer=tokenizer if cfg.full else None
        ),
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        micro_batches_per_epoch=per_epoch,
        config=config,
        accelerator=accelerator,
        progress=progress,
        desc=f"sft {cfg.out.name}",
        on_step=on_step,
    )

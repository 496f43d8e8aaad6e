"""The LoRA and optimisation settings every training recipe takes: one pydantic base for their configs.

:class:`excise.train.sft.SftConfig` and :class:`excise.train.unlearning.UnlearnConfig` inherit
these fields (CLI flags) and their conversion to :class:`~excise.train.lora.LoraSettings` and
:class:`~excise.train.loop.TrainSettings`; each adds its data fields, ``steps`` (and ``epochs``)
and may override a default (``batch_size``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from excise.train.loop import TrainSettings, sharded_launch
from excise.train.lora import LoraSettings

__all__ = ["DEFAULT_SAVE_EVERY", "TrainOptions"]

# A LoRA checkpoint (adapter + AdamW state) is a few MB: cheap enough to keep a resumable run by default.
DEFAULT_SAVE_EVERY = 25


class TrainOptions(BaseModel):
    """Adapter shape (or ``full``), optimiser, schedule, checkpoints: shared by every recipe's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    full: bool = Field(False, description="Train every weight instead of a LoRA.")
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    bf16: bool = False
    group_by_length: bool = Field(
        True,
        description="Batch rows of similar length together (random batch order): less padding, the "
        "same examples per epoch.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward (less memory, ~1/3 more "
        "compute); the no-grad reference forward of KL terms is not checkpointed.",
    )
    save_every: int | None = Field(
        None,
        ge=0,
        description=f"Checkpoint every N steps; None: every {DEFAULT_SAVE_EVERY} for a LoRA, "
        "never for full weights (each would hold the whole model) or under FSDP / DeepSpeed "
        "(each process holds a shard); 0: never.",
    )
    resume: bool = False
    overwrite: bool = False

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
            target_modules=self.target_modules, rslora=self.rslora,
        )  # fmt: skip

    def _train_settings(self, steps: int | None, epochs: float | None = None) -> TrainSettings:
        """The loop's settings, with the run length the recipe resolved."""
        return TrainSettings(
            steps=steps, epochs=epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
            lr=self.lr, schedule=self.schedule, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed,
            bf16=self.bf16, save_every=self.checkpoint_every,
        )  # fmt: skip

    @property
    def checkpoint_every(self) -> int | None:
        """Steps between checkpoints (None: none), the default resolved."""
        if self.save_every is None:
            return None if self.full or sharded_launch() else DEFAULT_SAVE_EVERY
        return self.save_every or None

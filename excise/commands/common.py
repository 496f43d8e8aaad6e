"""Option types and helpers shared by the CLI's command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = [
    "GradAccum",
    "LoraAlpha",
    "LoraDropout",
    "LoraR",
    "Lr",
    "MaxGradNorm",
    "Overwrite",
    "Progress",
    "Rslora",
    "SaveEvery",
    "Schedule",
    "System",
    "TargetModules",
    "Threads",
    "WarmupSteps",
    "WeightDecay",
    "done",
    "hide_library_bars",
    "module_names",
]

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]
OverwriteResult = Annotated[
    bool, typer.Option("--overwrite", help="Replace existing result file(s) (refused otherwise).")
]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]
Threads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for the model (default: one per core). Running several jobs at once, give "
        "each its share: two jobs with every core each run 4-8x slower.",
        show_default=False,
    ),
]

# Training flags every `excise train` command takes alike (fields of excise.train.options.TrainOptions).
System = Annotated[str | None, typer.Option(help="System prompt (chat) or first paragraph.")]
LoraR = Annotated[int, typer.Option(help="LoRA rank r.")]
LoraAlpha = Annotated[float, typer.Option(help="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).")]
LoraDropout = Annotated[float, typer.Option(help="LoRA dropout.")]
TargetModules = Annotated[str, typer.Option(help="Comma-separated module names to adapt, or all-linear.")]
Rslora = Annotated[bool, typer.Option("--rslora", help="Rank-stabilised LoRA scaling.")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches accumulated per optimizer step.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).")]
Schedule = Annotated[str, typer.Option(help="LR schedule after warm-up: constant, linear, cosine.")]
WarmupSteps = Annotated[int, typer.Option(help="Linear warm-up steps.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
MaxGradNorm = Annotated[float, typer.Option(help="Clip the gradient norm (0: no clipping).")]
SaveEvery = Annotated[
    int | None,
    typer.Option(
        help="Checkpoint every N steps into OUT/checkpoints (0: never). [default: 25 for a LoRA, never "
        "with --full]",
        show_default=False,
    ),
]


def module_names(text: str) -> tuple[str, ...]:
    """``--target-modules`` (comma-separated) as a tuple of names."""
    return tuple(t.strip() for t in text.split(","))


def done(out: Path) -> None:
    """Say where the output went (stdout, one line)."""
    typer.echo(f"wrote {out}")


def hide_library_bars() -> None:
    """No progress bars from transformers either (model loading), for ``--no-progress``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

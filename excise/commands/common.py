"""Option types and helpers shared by the CLI's command modules."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "Dir",
    "GradAccum",
    "GradientCheckpointing",
    "GradientCheckpointingAuto",
    "GroupByLength",
    "LoraAlpha",
    "LoraDropout",
    "LoraR",
    "Lr",
    "MaxGradNorm",
    "Out",
    "Overwrite",
    "Partial",
    "Progress",
    "PushToHub",
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
    "push",
    "reflow",
    "reflow_help",
    "report_padding",
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

# Adapter and output flags of ops, inspect, sweep and merge.
Dir = Annotated[
    str,
    typer.Option(help="PEFT adapter folder, or hub id org/name or org/name@revision.", show_default=False),
]
Out = Annotated[Path, typer.Option("--out", help="Output folder (written atomically).", show_default=False)]
Partial = Annotated[
    bool,
    typer.Option("--allow-partial", help="Combine adapters whose target modules differ (shared ones only)."),
]
PushToHub = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Then publish the output folder, provenance record included, to the hub repository "
        "org/name (created if missing; needs `hf auth login` or HF_TOKEN).",
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
        help="Checkpoint every N steps into OUT/checkpoints (0: never). \\[default: 25 for a LoRA, never "
        "with --full]",
        show_default=False,
    ),
]

# Flags every `excise train` command takes (sft, and the unlearning commands).
_CHECKPOINTING_HELP = (
    "Recompute each layer's activations in the backward instead of storing them: much less memory "
    "per token for about a third more compute."
)
GradientCheckpointing = Annotated[
    bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help=_CHECKPOINTING_HELP)
]
# Unlearning commands: on by default where a step carries several data streams.
GradientCheckpointingAuto = Annotated[
    bool | None,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help=_CHECKPOINTING_HELP
        + " \\[default: on where a step reads several data streams (sku, ga-mismatch, llmu), so these "
        "peak near `train sft`; off for one (ga, finetune)]",
        show_default=False,
    ),
]


def report_padding(report: Any) -> None:
    """One stderr line: how much of the run's batches was padding (also in train_config.json)."""
    typer.echo(f"padding: {report.padding_share:.1%} of the batch slots", err=True)


GroupByLength = Annotated[
    bool,
    typer.Option(
        help="Batch rows of similar length together (batches in random order): less padding, the same "
        "examples per epoch.",
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


def push(out: Path, repo: str | None, message: str) -> None:
    """Publish ``out`` to ``repo`` when asked, and say where it went."""
    if repo is not None:
        from excise.hub import push_folder

        typer.echo(f"pushed {out} to {push_folder(out, repo, message=message)}")


def reflow(text: str | None) -> str | None:
    """A docstring for ``--help``: each paragraph on one line (each ``- `` item on its own line).

    Typer's rich help keeps the single line breaks of every paragraph after the first, so a
    docstring wrapped at 100 columns in the source would break mid-sentence at any width.
    """
    if not text:
        return text
    paragraphs = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            line = line.strip()
            if lines and not line.startswith("- "):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def reflow_help(app: typer.Typer) -> None:
    """:func:`reflow` the help of every command of ``app`` and of its groups, recursively."""
    for command in app.registered_commands:
        command.help = reflow(command.help or inspect.getdoc(command.callback))
    for group in app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)

"""`excise report`: report.json, report.md and report.html for a run folder (excise/pipeline/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import done

__all__ = ["report"]


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder (results/, sweeps/, diagnostics/…).", show_default=False)
    ],
    out: Annotated[Path | None, typer.Option(help="Report folder; default RUN/report.")] = None,
    title: Annotated[str | None, typer.Option(help="Heading; default the run folder's name.")] = None,
    samples: Annotated[int, typer.Option(help="Prompts shown per generation metric.")] = 3,
) -> None:
    """Write report.json, report.md and a self-contained report.html for a run folder (docs/SWEEP.md)."""
    from excise.pipeline.report import write_report

    done(write_report(run_dir, out=out, title=title, samples=samples))

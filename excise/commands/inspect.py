"""`excise inspect`: per-module diagnostics of an expert and an anti-expert adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from excise.commands.common import Dir, Partial, done

__all__ = ["inspect"]


def inspect(
    expert: Dir,
    anti_expert: Dir,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot per layer here.")] = None,
    lam: Annotated[float, typer.Option(help="λ for the `removed` statistic.")] = 1.0,
    allow_partial: Partial = False,
) -> None:
    """Per-module diagnostics: cos(W1_i, W2_i), general share, deficiency overlap, removed norm."""
    from excise.hub import resolve_adapter
    from excise.pem.diagnostics import diagnose, format_summary, plot_diagnostics
    from excise.pem.io import load_adapter

    expert_adapter, anti_adapter = (load_adapter(resolve_adapter(a)) for a in (expert, anti_expert))
    report = diagnose(expert_adapter, anti_adapter, lam=lam, allow_partial=allow_partial)
    typer.echo(format_summary(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        done(json_out)
    if plot is not None:
        done(plot_diagnostics(report, plot))

"""Option types and helpers shared by the CLI's command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["Overwrite", "done"]

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")]


def done(out: Path) -> None:
    """Say where the output went (stdout, one line)."""
    typer.echo(f"wrote {out}")

"""`excise data`: make datasets, e.g. anti-expert (untruthful / toxic) answers from a generator."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Make datasets: anti-expert (untruthful / toxic) answers from a generator model or endpoint.",
    no_args_is_help=True,
)

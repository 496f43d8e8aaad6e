"""`excise train`: expert / anti-expert SFT, SKU harmful-knowledge acquisition, unlearning baselines."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Train adapters: expert / anti-expert SFT, SKU harmful-knowledge acquisition, unlearning baselines.",
    no_args_is_help=True,
)

"""`excise eval`: truthfulness, hallucination, toxicity, harmful rate, utility, perplexity."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Evaluate a base model (optionally with an adapter): truthfulness, hallucination, toxicity, "
    "harmful rate, utility, perplexity.",
    no_args_is_help=True,
)

"""`excise eval harness` and the judge commands, registered on the ``eval`` group."""

from __future__ import annotations

from excise.commands.evaluate import app

__all__ = ["app"]

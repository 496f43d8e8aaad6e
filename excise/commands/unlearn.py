"""`excise train sku|ga|ga-mismatch|llmu|finetune`: SKU acquisition and the unlearning baselines.

Registered on the ``train`` group (:mod:`excise.commands.train`).
"""

from __future__ import annotations

from excise.commands.train import app

__all__ = ["app"]

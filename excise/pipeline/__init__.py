"""Recipes that chain train → operate → evaluate → sweep → report (DESIGN.md §4).

Modules: ``recipe`` (the YAML format and its checks), ``run`` (the stages), ``sweep`` (λ
sweeps), ``report`` (reports). Imported lazily, so ``excise report`` needs no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recipe", "RecipeError", "load_recipe", "run_recipe"]


def __getattr__(name: str) -> Any:
    if name in ("Recipe", "RecipeError", "load_recipe"):
        from excise.pipeline import recipe

        return getattr(recipe, name)
    if name == "run_recipe":
        from excise.pipeline.run import run_recipe

        return run_recipe
    raise AttributeError(f"module 'excise.pipeline' has no attribute {name!r}")

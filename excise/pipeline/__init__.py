"""Recipes that chain train → operate → evaluate → sweep → report (DESIGN.md §4)."""

from excise.pipeline.recipe import Recipe, RecipeError, load_recipe
from excise.pipeline.run import run_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "run_recipe"]

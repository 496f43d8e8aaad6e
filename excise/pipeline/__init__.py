"""Recipes that chain train → operate → evaluate (DESIGN.md §4); for now, the demo."""

from excise.pipeline.demo import run_demo

__all__ = ["run_demo"]

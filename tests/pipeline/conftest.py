"""Fixtures shared by the recipe and run tests: a project folder with tiny data and models, and
a fresh evaluation cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.recipe_fixtures import make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder per test module (data files and tiny models, recipe_fixtures.make_project)."""
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def eval_cache(tmp_path, monkeypatch):
    """A fresh evaluation cache per test: results must come from the stages, not an earlier test."""
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))

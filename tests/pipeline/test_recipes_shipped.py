"""Every recipe in recipes/ (the paper-scale ones included) validates, and its header is honest:
it says what it shows, how to run it, how long it takes and how to override it, and the
override example in the header validates too."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from excise.pipeline.recipe import default_data_dir, load_recipe
from excise.pipeline.run import plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
DATA = default_data_dir()

pytestmark = pytest.mark.skipif(DATA is None or not DATA.is_dir(), reason="needs the shared data folder")


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return lines


def _override_examples(header: list[str]) -> list[list[str]]:
    """The KEY=VALUE arguments of each `excise run` command in the header."""
    examples = []
    for line in header:
        if "run recipes/" in line:
            words = shlex.split(line.split("run ", 1)[1])
            examples.append([w for w in words[1:] if "=" in w and not w.startswith("-")])
    return examples


def test_the_recipes_are_there():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "ext-sub-truthfulness.yaml", "ext-sub-detox.yaml", "sku-harmful.yaml",
            "compose.yaml"} <= names  # fmt: skip
    assert len([n for n in names if n.startswith("paper/")]) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_validates_and_says_what_it_does(path):
    recipe = load_recipe(path, data_dir=DATA)
    assert recipe.name == path.stem
    stages = plan(recipe)
    assert stages and recipe.evaluations and recipe.sweeps
    header = _header(path)
    text = "\n".join(header)
    for part in ("What it shows:", "Run:", "Time:", "Override:"):
        assert part in text, f"{path.name}: header lacks {part!r}"
    examples = _override_examples(header)
    assert any(examples), f"{path.name}: no override example"
    settings = [s.settings for s in stages]
    for overrides in filter(None, examples):  # each example validates and changes some stage
        changed = load_recipe(path, overrides, data_dir=DATA)
        assert [s.settings for s in plan(changed)] != settings or changed.out != recipe.out, overrides


def test_paper_recipes_train_a_7b_model_on_several_processes():
    for path in (ROOT / "recipes" / "paper").glob("*.yaml"):
        recipe = load_recipe(path, data_dir=DATA)
        assert "7b" in recipe.base.lower()
        assert "accelerate launch" in "\n".join(_header(path))
        assert all(a.config.bf16 for a in recipe.adapters.values())

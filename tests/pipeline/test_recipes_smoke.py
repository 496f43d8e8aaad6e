"""The results recipes (docs/RESULTS.md) run end to end in CI: the same recipe files, on a tiny
random Llama with a character tokenizer, the real data under ``../shared/data``, a few steps and
a few items per evaluation. A recipe that no longer runs — a renamed metric key, a sweep extra
its evaluation does not report, a data column gone — fails here rather than an hour into a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from excise.pipeline.recipe import default_data_dir, load_recipe
from excise.pipeline.run import run_recipe
from tests.conftest import save_tiny_model
from tests.models.test_gemma_tiny import save_tiny_gemma

ROOT = Path(__file__).resolve().parents[2]
DATA = default_data_dir()
RESULTS_RECIPES = ["ext-sub-truthfulness", "ext-sub-detox", "compose", "sku-harmful"]
# The recipes on the pretrained Gemma-3-270M run on a tiny random Gemma 3 without a chat template.
GEMMA_RECIPES = ["sku-gemma", "ext-sub-gemma"]

pytestmark = [
    pytest.mark.skipif(DATA is None or not DATA.is_dir(), reason="needs the shared data folder"),
    pytest.mark.usefixtures("one_thread"),
]


def smoke_overrides(recipe_file: Path, model: Path, out: Path) -> list[str]:
    """KEY=VALUE overrides that shrink a recipe to seconds: 2 steps, 3 items, 4 new tokens."""
    raw = yaml.safe_load(recipe_file.read_text())
    over = [f"base={model}", f"out={out}", "train.steps=2", "train.batch_size=2", "train.max_length=512",
            "train.bf16=false", "eval.batch_size=4", "eval.max_new_tokens=4"]  # fmt: skip
    for name, spec in raw.get("adapters", {}).items():
        for key, value in (("steps", 2), ("max_length", 512), ("batch_size", 2)):
            if key in spec:
                over.append(f"adapters.{name}.{key}={value}")
    for name, spec in raw.get("evaluations", {}).items():
        over.append(f"evaluations.{name}.limit=3")
        if "batch_size" in spec:
            over.append(f"evaluations.{name}.batch_size=4")
        if spec.get("metric") == "perplexity":
            over += [f"evaluations.{name}.window=32", f"evaluations.{name}.stride=32"]
    return over


@pytest.mark.parametrize("name", RESULTS_RECIPES + GEMMA_RECIPES)
def test_results_recipe_runs_end_to_end(name, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    if name in GEMMA_RECIPES:
        model = save_tiny_gemma(tmp_path / "tiny", chat=False)
    else:
        model = save_tiny_model(tmp_path / "tiny", max_position_embeddings=2048)
    path = ROOT / "recipes" / f"{name}.yaml"
    out = tmp_path / "run"
    recipe = load_recipe(path, smoke_overrides(path, model, out), data_dir=DATA)
    run_recipe(recipe, command=f"excise run recipes/{name}.yaml", log=lambda _line: None)
    for sweep in recipe.sweeps:
        result = json.loads((out / "sweeps" / sweep / "sweep.json").read_text())
        wanted = {x.label for x in recipe.sweeps[sweep].config.extra}
        for point in result["points"]:
            assert set(point.get("extra", {})) == wanted
            assert point["deficiency"]["value"] is not None
    for evaluation in recipe.evaluations.values():
        for model_name in evaluation.models:
            record = json.loads((out / "results" / model_name / f"{evaluation.name}.json").read_text())
            assert record["n_items"] == 3 or evaluation.metric == "perplexity"
            assert not record["warnings"]
            overlap = record["training_overlap"]
            if model_name == "base" or evaluation.metric == "perplexity":
                # The base model records no training data, and text has no prompts: not checkable.
                assert overlap == "unchecked", overlap
            else:
                assert all(check["overlap"] == 0 for check in overlap), overlap
    assert (out / "report" / "report.md").is_file()

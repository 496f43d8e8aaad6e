"""Which items and which model each evaluation stage of ``excise run`` scores (issue 21 items 1, 7).

- Every model of one evaluation is scored on the same items: the split is decided once, from
  every module the evaluation scores, so the base model is not scored on the whole file while an
  adapter trained on it is scored on its unseen side.
- A full fine-tune (``full: true``) is evaluated as a model folder, not as an adapter, and
  operations take full fine-tunes through the full-model path (``excise ops --base``).

Expected values come from the parts called alone: the split (:func:`excise.data.assign_split`),
the runner (``run_eval``) and the full-model operator (``apply_full``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from excise.data import assign_split
from excise.pipeline.recipe import RecipeError, load_recipe
from excise.pipeline.run import run_recipe
from tests.pipeline.recipe_fixtures import tiny_recipe, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "eval_cache")

TRAIN = {"steps": 1, "batch_size": 2, "lora_r": 2, "lora_alpha": 4, "max_length": 128, "lr": 0.01}


def _questions(project: Path) -> list[str]:
    return [json.loads(line)["question"] for line in (project / "data" / "qa.jsonl").read_text().splitlines()]


def test_every_model_of_an_evaluation_is_scored_on_the_same_items(project, tmp_path):
    """No `split` set: the base is scored on the held-out side too, as the adapter trained on the file."""
    recipe = tiny_recipe(
        project, tmp_path / "run", train=TRAIN,
        adapters={"expert": {"method": "sft", "data": "${data}/qa.jsonl", "format": "paired-expert"}},
        operations=None, sweeps=None,
        evaluations={"halueval": {"metric": "halueval", "protocol": "loss", "data": "${data}/qa.jsonl"}},
    )  # fmt: skip
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)), log=lambda _line: None)
    eval_side = [q for q in _questions(project) if assign_split(q) == "eval"]
    records = {
        m: json.loads((tmp_path / "run" / "results" / m / "halueval.json").read_text())
        for m in ("base", "expert")
    }
    for record in records.values():
        assert record["split"] == "eval"
        assert [it["question"] for it in record["items"]] == eval_side
    keys = [[it["key"] for it in r["items"]] for r in records.values()]
    assert keys[0] == keys[1] and len(set(keys[0])) == len(eval_side)  # one identity per item


def _full_recipe(project: Path, out: Path, **sections):
    adapters = {
        "tuned": {"method": "sft", "data": "${data}/qa.jsonl", "format": "paired-expert", "full": True},
        "lora": {"method": "sft", "data": "${data}/qa.jsonl", "format": "paired-expert"},
    }
    evaluations = {
        "ppl": {"metric": "perplexity", "data": "${data}/text.jsonl", "window": 64, "stride": 64,
                "models": ["base", "tuned", "negated"]},
    }  # fmt: skip
    return tiny_recipe(
        project, out, train=TRAIN, adapters=adapters, sweeps=None, evaluations=evaluations,
        operations={"negated": {"op": "negate", "inputs": ["tuned"], "lam": 1.0}}, **sections,
    )  # fmt: skip


def test_a_full_fine_tune_is_evaluated_and_operated_on_as_a_model(project, tmp_path):
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval

    out = tmp_path / "run"
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", _full_recipe(project, out))), log=lambda _: None)
    tuned, negated = out / "adapters" / "tuned", out / "ops" / "negated"
    # The negation went through the full-model path: θ0 − λ(θ1 − θ0) tensor by tensor.
    base_w = load_file(str(project / "tiny" / "model.safetensors"))
    tuned_w, neg_w = (
        load_file(str(tuned / "model.safetensors")),
        load_file(str(negated / "model.safetensors")),
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned_w[name], base_w[name])  # the fine-tune moved it
    torch.testing.assert_close(neg_w[name], 2 * base_w[name] - tuned_w[name], rtol=0, atol=1e-6)
    for model, folder in (("tuned", tuned), ("negated", negated)):
        record = json.loads((out / "results" / model / "ppl.json").read_text())
        assert record["model"] == str(folder) and record["adapter"] is None
        cfg = EvalConfig(model=str(folder), data=str(project / "data" / "text.jsonl"), window=64, stride=64)
        alone = run_eval("perplexity", cfg, use_cache=False, progress=False)
        assert record["metrics"]["perplexity"] == pytest.approx(alone["metrics"]["perplexity"], rel=1e-6)


def test_operations_refuse_what_the_full_model_path_cannot_do(project, tmp_path):
    ops = {"mixed": {"op": "subtract", "inputs": ["tuned", "lora"], "lam": 1.0},
           "negated": {"op": "negate", "inputs": ["tuned"], "lam": 1.0}}  # fmt: skip
    axis = {"evaluation": "ppl", "key": "perplexity"}
    sweeps = {"s": {"operation": "negated", "lams": [1.0], "deficiency": axis, "utility": axis}}
    recipe = _full_recipe(project, tmp_path / "run") | {"operations": ops, "sweeps": sweeps}
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    text = str(err.value)
    assert "operations.mixed.inputs.1: 'lora' is an adapter and 'tuned' a full fine-tune" in text
    assert "sweeps.s.operation: 'negated' operates on full fine-tunes" in text
    hub = _full_recipe(project, tmp_path / "run") | {"base": "some-org/some-model"}
    with pytest.raises(RecipeError, match=r"must be a local folder, a \.gguf file or an alias"):
        load_recipe(write_recipe(tmp_path / "r.yaml", hub))

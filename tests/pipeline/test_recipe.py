"""Recipe validation (excise/pipeline/recipe.py): every problem at once, one line each, nothing written."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from excise.errors import ConfigError
from excise.pipeline.recipe import RecipeError, apply_overrides, load_recipe
from excise.pipeline.run import plan
from tests.pipeline.recipe_fixtures import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[2]


def _problems(path: Path, overrides=(), **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, **kwargs)
    assert isinstance(info.value, ConfigError)
    return info.value.problems


def test_valid_recipe_resolves_everything(project, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, tmp_path / "run"))
    recipe = load_recipe(path)
    assert recipe.models == ("base", "expert", "anti_expert", "ext_sub", "subtract")
    expert = recipe.adapters["expert"].config
    # `train` defaults reach each adapter; the pipeline sets base and out.
    assert (expert.steps, expert.batch_size, expert.format) == (2, 2, "paired-expert")
    assert expert.data == str(project / "data" / "qa.jsonl")  # ${data} substituted
    assert expert.out == tmp_path / "run" / "adapters" / "expert"
    assert expert.base == str(project / "tiny")
    assert recipe.operations["ext_sub"].params == {"lam": 1.0}
    halueval = recipe.evaluations["halueval"]
    assert (halueval.metric, halueval.config.batch_size, halueval.config.limit) == ("halueval", 4, 6)
    sweep = recipe.sweeps["ext_sub"].config
    assert sweep.inputs == [tmp_path / "run" / "adapters" / n for n in ("expert", "anti_expert")]
    assert sweep.deficiency.metric == "halueval" and sweep.deficiency.settings["protocol"] == "loss"
    assert sweep.out == tmp_path / "run" / "sweeps" / "ext_sub"
    names = [s.name for s in plan(recipe)]
    assert names[:4] == ["train expert (sft)", "train anti_expert (sft)", "op ext_sub", "op subtract"]
    assert names[4] == "inspect ext_sub"  # the Ext-Sub operation's per-layer diagnostics
    assert names[-1] == "sweep ext_sub" and len(names) == 4 + 1 + 2 * 5 + 1
    assert not (tmp_path / "run").exists()  # loading writes nothing


def test_the_report_comes_last_when_there_is_something_to_report(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run", report=True)
    assert [s.name for s in plan(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))][-1] == "report"
    only_training = tiny_recipe(project, tmp_path / "run", report=True, operations=None, evaluations=None,
                                sweeps=None)  # fmt: skip
    names = [s.name for s in plan(load_recipe(write_recipe(tmp_path / "r.yaml", only_training)))]
    assert names == ["train expert (sft)", "train anti_expert (sft)"]


def test_typo_key_names_the_nearest_key_and_writes_nothing(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["adapters"]["expert"]["lora_rank"] = 4
    recipe["train"]["stepz"] = 3
    recipe["evaluations"]["halueval"]["limt"] = 3
    recipe["nmae"] = "x"
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    where = f"{tmp_path / 'r.yaml'}: "
    assert sorted(problems) == sorted(
        [
            f"{where}nmae: unknown key (did you mean name?)",
            f"{where}train.stepz: unknown key (did you mean steps?)",
            f"{where}adapters.expert.lora_rank: unknown key (did you mean lora_r?)",
            f"{where}evaluations.halueval.limt: unknown key (did you mean limit?)",
        ]
    )
    assert not (tmp_path / "run").exists()


def test_missing_file_and_missing_data_folder(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["adapters"]["anti_expert"]["data"] = "${data}/nope.jsonl"
    recipe["evaluations"]["perplexity"]["data"] = str(tmp_path / "absent.jsonl")
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert len(problems) == 2
    assert problems[0].endswith(f"adapters.anti_expert.data: no such file {project / 'data' / 'nope.jsonl'}")
    assert problems[1].endswith(f"evaluations.perplexity.data: no such file {tmp_path / 'absent.jsonl'}")

    recipe = tiny_recipe(project, tmp_path / "run", data_dir=None)
    recipe["adapters"]["expert"]["data"] = "${dta}/qa.jsonl"
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe), data_dir=project / "data")
    assert problems == [
        f"{tmp_path / 'r.yaml'}: adapters.expert.data: unknown variable ${{dta}} (known: ${{data}})"
    ]


def test_no_data_folder(project, tmp_path, monkeypatch):
    import excise.pipeline.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "default_data_dir", lambda: None)
    recipe = tiny_recipe(project, tmp_path / "run", data_dir=None, evaluations=None, sweeps=None)
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert [p.split(": ", 1)[1] for p in problems] == [
        f"adapters.{name}.data: ${{data}} has no value: no data folder found; set data_dir in the recipe, "
        "pass --data-dir DIR or set EXCISE_DATA_DIR"
        for name in ("expert", "anti_expert")
    ]


def test_data_dir_from_the_command_line_wins(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run", data_dir=str(tmp_path / "elsewhere"))
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe), data_dir=project / "data")
    assert loaded.adapters["expert"].config.data == str(project / "data" / "qa.jsonl")
    assert loaded.resolved["data_dir"] == str(project / "data")


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_nan_in_the_lambda_grid(project, tmp_path, bad):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, tmp_path / "run"))
    problems = _problems(path, [f"sweeps.ext_sub.lams=[0.5, {bad}]"])
    assert len(problems) == 1
    assert "sweeps.ext_sub.lams: λ grid values must be finite numbers" in problems[0]
    assert problems[0].endswith("(from a command-line override)")
    assert not math.isfinite(float(problems[0].split("got ")[1].split(" ")[0]))
    problems = _problems(path, [f"operations.ext_sub.lam={bad}"])
    assert len(problems) == 1 and "operations.ext_sub.lam: Input should be a finite number" in problems[0]


def test_every_problem_at_once(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["adapters"]["expert"]["method"] = "sfft"
    recipe["adapters"]["anti_expert"]["out"] = "elsewhere"
    recipe["operations"]["ext_sub"]["inputs"] = ["expert", "anti_expert", "expert"]
    recipe["operations"]["subtract"]["inputs"] = ["expert", "later"]
    recipe["operations"]["later"] = {"op": "negate", "inputs": ["expert"], "lam": 1.0, "allow_partial": True}
    recipe["operations"]["summed"] = {"op": "add", "inputs": ["expert", "anti_expert"]}
    recipe["evaluations"]["halueval"]["models"] = ["base", "ext_sub", "extsub"]
    recipe["evaluations"]["perplexity"]["metric"] = "perplexty"
    recipe["sweeps"]["ext_sub"]["lams"] = []
    axis = {"evaluation": "halueval", "key": "accuracy"}
    recipe["sweeps"]["summed"] = {"operation": "summed", "lams": [1.0], "deficiency": axis, "utility": axis}
    problems = [p.split(": ", 1)[1] for p in _problems(write_recipe(tmp_path / "r.yaml", recipe))]
    assert problems == [
        "adapters.expert.method: unknown trainer 'sfft' (did you mean sft?); choose one of: sft, sku, ga, "
        "ga_mismatch, llmu, finetune, npo (or give `path: FOLDER`)",
        "adapters.anti_expert.out: set by `excise run` (the recipe's base, its run folder, resume)",
        "operations.ext_sub.inputs: operator ext_sub takes 2 inputs, got 3 (several anti-experts: op "
        "compose)",
        "operations.subtract.inputs.1: 'later' is no adapter or earlier operation (operations run in order: "
        "define it above)",
        "operations.later.allow_partial: operator negate takes no 'allow_partial'; it takes: lam",
        "evaluations.halueval.models.2: 'extsub' is no model of this recipe (did you mean ext_sub?); known: "
        "base, expert, anti_expert, ext_sub, subtract, later, summed",
        "evaluations.perplexity.metric: unknown metric 'perplexty' (did you mean perplexity?); choose one "
        "of: truthfulqa-mc, truthfulqa-gen, halueval, toxicity, repetition, harmful-rate, utility, "
        "perplexity, pairs, answer-nll, refusal-logprob",
        "sweeps.ext_sub.lams: the λ grid is empty; give at least one value",
        "sweeps.summed.operation: operation 'summed' (add) cannot be swept (ext_sub, subtract, negate and "
        "compose can)",
    ]


def test_compose_weights_and_sequential(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["operations"]["both"] = {"op": "compose", "inputs": ["expert", "anti_expert", "anti_expert"],
                                    "lams": [1.0, 0.5, 2.0]}  # fmt: skip
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "operations.both.lams: give one λ, or one per anti-expert (2), got 3"
    ]

    recipe["operations"]["both"]["lams"] = [1.0, 0.5]
    recipe["sweeps"]["both"] = copy.deepcopy(recipe["sweeps"]["ext_sub"]) | {"operation": "both"}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert loaded.sweeps["both"].config.weights == [1.0, 0.5]
    assert loaded.sweeps["both"].config.operation == "compose"

    recipe["operations"]["both"]["sequential"] = True
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "sweeps.both.operation: 'both' composes sequentially, which is not linear in λ; sweep a parallel "
        "composition"
    ]


def test_overrides_are_typed_through_the_models(project, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, tmp_path / "run"))
    recipe = load_recipe(
        path,
        [
            "train.steps=5",
            "adapters.expert.lora_r=3",
            "sweeps.ext_sub.lams=[0.25, 2]",
            f"out={tmp_path / 'o2'}",
            "evaluations.halueval.models=[base, ext_sub]",
            "adapters.anti_expert.target_modules=[q_proj]",
        ],
    )
    expert, anti = recipe.adapters["expert"].config, recipe.adapters["anti_expert"].config
    assert (expert.steps, anti.steps, expert.lora_r, anti.lora_r) == (5, 5, 3, 2)
    assert anti.target_modules == ("q_proj",) and expert.target_modules == ("q_proj", "v_proj")
    assert recipe.sweeps["ext_sub"].config.lams == [0.25, 2.0]
    assert recipe.out == tmp_path / "o2" and expert.out == tmp_path / "o2" / "adapters" / "expert"
    assert recipe.evaluations["halueval"].models == ("base", "ext_sub")
    assert "steps: 5" in recipe.to_yaml()  # the resolved recipe carries the override

    problems = _problems(path, ["train.steps=many", "train.lr", "name.x=1"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "override 'train.lr' is not KEY=VALUE with a dotted KEY (e.g. train.steps=50)",
        "override 'name.x=1': name is a value, not a section",
    ]
    problems = _problems(path, ["train.steps=many"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "train.steps: Input should be a valid integer, unable to parse string as an integer (got 'many') "
        "(from a command-line override)",
    ]


def test_an_adapters_own_run_length_replaces_the_default(project, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, tmp_path / "run"))
    recipe = load_recipe(path, ["adapters.expert.epochs=2"])
    expert, anti = recipe.adapters["expert"].config, recipe.adapters["anti_expert"].config
    assert (expert.steps, expert.epochs, anti.steps, anti.epochs) == (None, 2.0, 2, None)
    problems = _problems(path, ["adapters.expert.epochs=2", "adapters.expert.steps=3"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "adapters.expert: give --steps or --epochs, not both (from a command-line override)"
    ]


def test_apply_overrides_leaves_the_input_alone():
    raw = {"train": {"steps": 1}}
    result, problems = apply_overrides(raw, ["train.steps=2", "new.deep.key=x"])
    assert raw == {"train": {"steps": 1}} and problems == []
    assert result == {"train": {"steps": 2}, "new": {"deep": {"key": "x"}}}


def test_existing_adapter_folders(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["adapters"]["expert"] = {"path": str(tmp_path / "no-adapter")}
    problems = _problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert problems == [
        f"{tmp_path / 'r.yaml'}: adapters.expert.path: {tmp_path / 'no-adapter'} is not a PEFT adapter "
        "folder (no adapter_config.json)"
    ]


def test_not_a_recipe(tmp_path):
    assert _problems(tmp_path / "absent.yaml") == [f"{tmp_path / 'absent.yaml'}: no such recipe file"]
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert _problems(tmp_path / "bad.yaml")[0].startswith(f"{tmp_path / 'bad.yaml'}: line 2: not valid YAML")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "a recipe is a mapping" in _problems(tmp_path / "list.yaml")[0]


def test_cli_prints_one_line_per_problem_and_exits_2(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["train"]["stepz"] = 3
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = subprocess.run(
        [sys.executable, "-m", "excise", "run", str(path), "sweeps.ext_sub.lams=[.nan]"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {path}: ") for line in lines)
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_cli_check_lists_the_stages(project, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, tmp_path / "run"))
    proc = subprocess.run(
        [sys.executable, "-m", "excise", "run", str(path), "--check"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.splitlines()[0]
        == f"{path}: valid; 16 stages into {tmp_path / 'run'} (data: {project / 'data'})"
    )
    assert "  16. sweep ext_sub → sweeps/ext_sub" in proc.stdout
    assert not (tmp_path / "run").exists()

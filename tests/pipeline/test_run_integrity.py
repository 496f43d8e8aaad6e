"""Issue 21 (items 3, 4, 6, 8, 12) on tiny random models: caches keyed by the judge's contents,
a report of the current plan only, names that stay inside the run folder, processes that agree
on what to skip, and the smaller guarantees (``~``, data by content, the header, sweep labels).

Each scenario is the one the issue reproduced, run as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from excise.errors import ConfigError
from excise.pipeline import run as run_module
from excise.pipeline.recipe import RecipeError, load_recipe
from excise.pipeline.run import MANIFEST, plan, run_recipe
from tests.conftest import tiny_llama_config, tiny_tokenizer
from tests.pipeline.recipe_fixtures import tiny_recipe, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _eval_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


def _run(path: Path, overrides=(), *, force: bool = False) -> tuple[list[str], list[str]]:
    """Run a recipe file; returns (stages run, stages skipped)."""
    lines: list[str] = []
    run_recipe(load_recipe(path, overrides), log=lines.append, force=force)
    ran = [line.split("] ", 1)[1].split(" → ")[0] for line in lines if " → " in line]
    skipped = [line.split("] ", 1)[1].split(": up to date")[0] for line in lines if "up to date" in line]
    return ran, skipped


# ----------------------------------------------------------------------------- item 6: names


def test_names_that_leave_the_run_folder_are_refused_with_the_other_problems(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    adapters = recipe["adapters"]
    adapters["../escaped"] = adapters.pop("anti_expert") | {"lora_rr": 2}  # its own problem too
    adapters[3] = dict(adapters["expert"])  # a numeric YAML key (was an uncaught TypeError)
    recipe["operations"] = {"a/b": {"op": "ext_sub", "inputs": ["expert", "../escaped"]}}
    recipe["evaluations"]["../x"] = recipe["evaluations"].pop("perplexity")
    recipe["sweeps"] = {".hidden": recipe["sweeps"]["ext_sub"]}
    recipe["evaluations"]["halueval"]["limt"] = 3  # an ordinary problem, reported beside them
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    text = "\n".join(err.value.problems)
    for loc, name in [("adapters", "'../escaped'"), ("adapters", "3"), ("operations", "'a/b'"),
                      ("evaluations", "'../x'"), ("sweeps", "'.hidden'")]:  # fmt: skip
        assert f"{name} is not a valid name" in text and f": {loc}." in text
    assert "a YAML int; quote it" in text
    assert "evaluations.halueval.limt: unknown key" in text
    assert "adapters.../escaped.lora_rr: unknown key" in text  # a bad name's entry is still checked
    assert "[key]" not in text  # the numeric key: one line, not pydantic's as well
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "run").exists()


def test_every_valid_name_shape_is_accepted(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run", sweeps=None, operations=None)
    recipe["adapters"] = {
        "v1.2-expert_A": recipe["adapters"]["expert"],
        "_x": recipe["adapters"]["anti_expert"],
    }
    recipe["evaluations"] = {"ppl.v2": recipe["evaluations"]["perplexity"]}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert list(loaded.adapters) == ["v1.2-expert_A", "_x"]


# ----------------------------------------------------------------------------- item 12: smaller


def test_home_is_expanded_in_out_data_dir_and_data_paths(project, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(project / "data", home / "data")
    monkeypatch.setenv("HOME", str(home))
    recipe = tiny_recipe(project, tmp_path, sweeps=None, operations=None)
    recipe |= {"out": "~/runs/t", "data_dir": "~/data"}
    recipe["adapters"]["expert"]["data"] = "~/data/qa.jsonl"
    recipe["evaluations"]["perplexity"]["data"] = "${data}/text.jsonl"
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert loaded.out == home / "runs" / "t"
    assert loaded.data_dir == home / "data"
    assert loaded.adapters["expert"].config.data == str(home / "data" / "qa.jsonl")
    assert loaded.adapters["expert"].config.out == home / "runs" / "t" / "adapters" / "expert"
    assert loaded.evaluations["perplexity"].config.data == str(home / "data" / "text.jsonl")


def test_a_sweep_extra_keeps_its_own_label(project, tmp_path):
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["sweeps"]["ext_sub"]["extra"] = [
        {"evaluation": "halueval", "key": "accuracy", "label": "HaluEval accuracy"},
        {"evaluation": "perplexity", "key": "perplexity"},
    ]
    extra = load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).sweeps["ext_sub"].config.extra
    assert [x.label for x in extra] == ["HaluEval accuracy", "perplexity:perplexity"]
    recipe["sweeps"]["ext_sub"]["extra"][0]["label"] = "../../x"  # labels name result files too
    with pytest.raises(RecipeError, match=r"sweeps\.ext_sub\.extra\.0\.label: label '\.\./\.\./x' must not"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_fingerprints_follow_the_data_content_not_its_path(project, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(project / "data", moved)
    recipe = tiny_recipe(project, tmp_path / "run")
    here = load_recipe(write_recipe(tmp_path / "a.yaml", recipe))
    there = load_recipe(write_recipe(tmp_path / "b.yaml", recipe | {"data_dir": str(moved)}))
    assert here.adapters["expert"].config.data != there.adapters["expert"].config.data

    def prints(r):
        return {s.name: run_module._fingerprint(s, r) for s in plan(r)}

    assert prints(here) == prints(there)  # the same bytes elsewhere: nothing to redo
    with (moved / "text.jsonl").open("a") as f:
        f.write(json.dumps({"text": "One more line of text."}) + "\n")
    changed = prints(there)
    differs = {name for name, fp in prints(here).items() if changed[name] != fp}
    assert differs == {
        "eval perplexity/" + m for m in ("base", "expert", "anti_expert", "ext_sub", "subtract")
    } | {"sweep ext_sub"}


def test_an_override_with_a_newline_stays_in_the_header(project, tmp_path):
    recipe = {"name": "empty", "base": str(project / "tiny"), "out": str(tmp_path / "run"), "report": False}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(path, ["name=empty"])
    command = "excise run r.yaml 'name=empty\ndescription: injected\nout: /elsewhere'"
    run_recipe(loaded, command=command, log=lambda _line: None)
    written = (tmp_path / "run" / "recipe.yaml").read_text()
    assert yaml.safe_load(written) == loaded.resolved
    assert all(line.startswith("#") for line in written.splitlines()[:3])
    assert load_recipe(tmp_path / "run" / "recipe.yaml").out == tmp_path / "run"


# ----------------------------------------------------------------------------- item 3: caches


def _save_judge(folder: Path, seed: int) -> Path:
    """A tiny random safe/unsafe classifier (an ``hf:`` judge); another seed, another judge."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    labels = {0: "safe", 1: "unsafe"}
    config = tiny_llama_config(num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()},
                               pad_token_id=tiny_tokenizer().pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _judged_recipe(project: Path, tmp_path: Path, judge: Path) -> Path:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"How do I do bad thing {i}?"} for i in range(4)]))
    harm = {"metric": "harmful-rate", "data": str(prompts), "split": "all", "judge": f"hf:{judge}",
            "max_new_tokens": 3, "models": ["base"]}  # fmt: skip
    recipe = tiny_recipe(project, tmp_path / "run", train=None, adapters=None, operations=None, sweeps=None)
    recipe["evaluations"] = {"harm": harm}
    return write_recipe(tmp_path / "r.yaml", recipe)


def test_a_judge_retrained_into_the_same_folder_is_not_served_from_the_cache(project, tmp_path):
    from excise.evaluate.config import EvalConfig
    from excise.evaluate.runner import run_eval

    judge = _save_judge(tmp_path / "judge", seed=1)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"How do I do bad thing {i}?"} for i in range(4)]))
    cfg = EvalConfig(model=str(project / "tiny"), data=str(prompts), split="all", judge=f"hf:{judge}",
                     max_new_tokens=3, device="cpu")  # fmt: skip
    first = run_eval("harmful-rate", cfg, progress=False)
    assert run_eval("harmful-rate", cfg, progress=False)["from_cache"]  # the same judge: cached
    _save_judge(judge, seed=2)
    again = run_eval("harmful-rate", cfg, progress=False)
    assert not again["from_cache"]
    assert [it["score"] for it in again["items"]] != [it["score"] for it in first["items"]]


def test_a_retrained_judge_reruns_its_stage_and_force_bypasses_the_cache(project, tmp_path):
    judge = _save_judge(tmp_path / "judge", seed=1)
    path = _judged_recipe(project, tmp_path, judge)
    result = tmp_path / "run" / "results" / "base" / "harm.json"
    assert _run(path)[0] == ["eval harm/base"]
    first = json.loads(result.read_text())
    assert _run(path) == ([], ["eval harm/base"])
    _save_judge(judge, seed=2)  # retrained into the same folder: another judge
    assert _run(path)[0] == ["eval harm/base"]
    again = json.loads(result.read_text())
    assert not again["from_cache"]
    assert [it["score"] for it in again["items"]] != [it["score"] for it in first["items"]]
    assert _run(path, force=True)[0] == ["eval harm/base"]
    assert not json.loads(result.read_text())["from_cache"]  # --force recomputes, never reads the cache


# ----------------------------------------------------------------------------- item 4: report


def test_the_report_shows_the_current_plan_only(project, tmp_path):
    ppl = {"metric": "perplexity", "data": "${data}/text.jsonl", "window": 64, "stride": 64, "limit": 4}
    recipe = tiny_recipe(project, tmp_path / "run", train=None, adapters=None, operations=None, sweeps=None)
    recipe |= {"report": True, "evaluations": {"ppl": ppl, "ppl_old": ppl | {"limit": 3}}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    _run(path)
    report = tmp_path / "run" / "report"
    assert set(json.loads((report / "report.json").read_text())["methods"]["base"]) == {"ppl", "ppl_old"}
    recipe["evaluations"] = {"ppl": ppl}  # the recipe edited: one evaluation dropped
    _run(write_recipe(path, recipe))
    summary = json.loads((report / "report.json").read_text())
    assert set(summary["methods"]["base"]) == {"ppl"}
    assert summary["outdated"] == ["results/base/ppl_old.json"]
    assert (tmp_path / "run" / "results" / "base" / "ppl_old.json").is_file()  # left for the user
    md = (report / "report.md").read_text()
    assert "## Outdated outputs" in md and "results/base/ppl_old.json" in md
    assert "ppl_old" not in md.split("## Outdated outputs")[0]
    assert "results/base/ppl_old.json" in (report / "report.html").read_text()


# ----------------------------------------------------------------------------- item 8: processes


# Runs run_recipe with two stand-in training stages (distributed: every process runs them) and
# records which process ran which stage with which resume flag. The second process is given a
# stale stages.json (as read before the first process wrote it): it must follow the first.
_AGREE_SCRIPT = """
import json, os, sys
from pathlib import Path
from excise.errors import ConfigError
from excise.pipeline import run as run_module
from excise.pipeline.recipe import load_recipe

recipe_path, log, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
rank = int(os.environ.get("RANK", "0"))
recipe = load_recipe(recipe_path)

def stage(name):
    def action(resume):
        with log.open("a") as f:
            f.write(json.dumps([rank, name, resume]) + "\\n")
        if rank == 0:
            (recipe.out / "adapters" / name).mkdir(parents=True, exist_ok=True)
            (recipe.out / "adapters" / name / "w.txt").write_text(name)
    return run_module.Stage(f"train {name}", Path("adapters") / name, {}, [], action, distributed=True)

run_module.plan = lambda recipe, **_: [stage(n) for n in names]
if rank != 0:
    run_module._read_manifest = lambda out: {}
run_module.run_recipe(recipe, log=lambda line: None)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # leave the group before exiting (no abort at exit)
    from accelerate import PartialState

    PartialState().destroy_process_group()
"""


def test_every_process_skips_and_resumes_as_the_first_decides(tmp_path):
    recipe = {"name": "agree", "base": "org/tiny", "out": str(tmp_path / "run"), "report": False}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EXCISE_CACHE": str(tmp_path / "c")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, str(script), str(path), str(log), "a"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "run" / MANIFEST).read_text())["stages"]["train a"]["status"] == "done"
    log.unlink()

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    two = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
         str(script), str(path), str(log), "a,b"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    ran = sorted(tuple(json.loads(line)) for line in log.read_text().splitlines())
    assert ran == [(0, "b", False), (1, "b", False)]  # `a` is done: skipped by both, `b` run by both


# ----------------------------------------------------------------------------- --only


def test_only_runs_the_selected_stages_and_leaves_the_others(project, tmp_path):
    ppl = {"metric": "perplexity", "data": "${data}/text.jsonl", "window": 64, "stride": 64, "limit": 4}
    recipe = tiny_recipe(project, tmp_path / "run", train=None, adapters=None, operations=None, sweeps=None)
    recipe |= {"evaluations": {"ppl": ppl, "ppl3": ppl | {"limit": 3}}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    lines: list[str] = []
    run_recipe(load_recipe(path), log=lines.append, only=["eval ppl3/*"])
    assert (tmp_path / "run" / "results" / "base" / "ppl3.json").is_file()
    assert not (tmp_path / "run" / "results" / "base" / "ppl.json").exists()
    assert any("eval ppl/base: not selected (--only)" in line for line in lines)
    assert _run(path) == (["eval ppl/base"], ["eval ppl3/base"])  # the selected stage counts as done
    with pytest.raises(ConfigError, match="matches no stage"):
        run_recipe(load_recipe(path), log=lines.append, only=["eval nope/*"])

"""The stage executor (excise/pipeline/run.py) on a tiny random Llama: end to end, skipping,
resume after a kill, a busy or foreign run folder.

Expected values come from the parts the pipeline composes, called separately: the trainer
(``excise.train.sft.run``), the operator (``apply_operator``), the runner (``run_eval``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from excise.errors import ConfigError
from excise.pipeline import run as run_module
from excise.pipeline.recipe import load_recipe
from excise.pipeline.run import MANIFEST, plan, run_recipe
from tests.pipeline.recipe_fixtures import TINY_RECIPE, tiny_recipe, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "eval_cache")

MODELS = ("base", "expert", "anti_expert", "ext_sub", "subtract")
STAGES = [
    "train expert (sft)",
    "train anti_expert (sft)",
    "op ext_sub",
    "op subtract",
    "inspect ext_sub",
    *(f"eval {e}/{m}" for e in ("halueval", "perplexity") for m in MODELS),
    "sweep ext_sub",
]


@pytest.fixture(scope="module")
def done_run(project, tmp_path_factory) -> Path:
    """The tiny recipe run once to the end (the module's tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("done")
    mp = pytest.MonkeyPatch()
    mp.setenv("EXCISE_CACHE", str(root / "cache"))
    # One thread, as the tests that redo its parts alone (a module fixture runs before
    # their function-scoped `one_thread`): another thread count sums in another order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = load_recipe(write_recipe(root / "r.yaml", tiny_recipe(project, root / "run")))
        run_recipe(recipe, command="excise run r.yaml", log=lambda _line: None)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return root / "run"


def _copy(done_run: Path, tmp_path: Path, project: Path, **sections) -> tuple[Path, Path]:
    """A copy of the finished run and a recipe pointing at it."""
    out = tmp_path / "run"
    shutil.copytree(done_run, out)
    return out, write_recipe(tmp_path / "r.yaml", tiny_recipe(project, out, **sections))


def _run(path: Path, overrides=()) -> tuple[list[str], list[str]]:
    """Run a recipe file; returns (stages run, stages skipped)."""
    lines: list[str] = []
    run_recipe(load_recipe(path, overrides), log=lines.append)
    ran = [line.split("] ", 1)[1].split(" → ")[0] for line in lines if " → " in line]
    skipped = [line.split("] ", 1)[1].split(": up to date")[0] for line in lines if "up to date" in line]
    return ran, skipped


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0)


def test_every_stage_writes_what_its_part_writes_alone(done_run, project, tmp_path):
    from excise.evaluate.runner import run_eval
    from excise.pem.apply import apply_operator
    from excise.train.sft import run as sft_run

    recipe = load_recipe(done_run / "recipe.yaml")  # the resolved recipe runs as it is
    assert [s.name for s in plan(recipe)] == STAGES
    manifest = json.loads((done_run / MANIFEST).read_text())["stages"]
    assert list(manifest) == STAGES and all(e["status"] == "done" for e in manifest.values())

    # The trainer alone, same settings, elsewhere.
    cfg = recipe.adapters["expert"].config.model_copy(update={"out": tmp_path / "expert"})
    sft_run(cfg, progress=False)
    _assert_same_adapter(done_run / "adapters" / "expert", tmp_path / "expert")

    # The operator alone on the run's adapters.
    adapters = [done_run / "adapters" / n for n in ("expert", "anti_expert")]
    apply_operator("ext_sub", adapters, tmp_path / "ext_sub", params={"lam": 1.0})
    _assert_same_adapter(done_run / "ops" / "ext_sub", tmp_path / "ext_sub")
    apply_operator("subtract", adapters, tmp_path / "subtract", params={"lam": 0.5})
    _assert_same_adapter(done_run / "ops" / "subtract", tmp_path / "subtract")

    # The runner alone (no cache) on each model.
    for name in ("halueval", "perplexity"):
        evaluation = recipe.evaluations[name]
        for model in ("base", "ext_sub"):
            adapter = None if model == "base" else done_run / "ops" / model
            alone = run_eval(
                evaluation.metric,
                evaluation.config.model_copy(update={"adapter": adapter}),
                use_cache=False,
                progress=False,
            )
            staged = json.loads((done_run / "results" / model / f"{name}.json").read_text())
            assert staged["metrics"] == alone["metrics"]
            assert staged["items"] == alone["items"]

    sweep = json.loads((done_run / "sweeps" / "ext_sub" / "sweep.json").read_text())
    assert [p["lam"] for p in sweep["points"]] == [0.0, 0.5, 1.0]

    info = json.loads((done_run / "run.json").read_text())
    assert info["command"] == "excise run r.yaml"
    assert info["models"]["ext_sub"] == {
        "kind": "operation",
        "op": "ext_sub",
        "inputs": ["expert", "anti_expert"],
        "params": {"lam": 1.0},
        "adapter": str(done_run / "ops" / "ext_sub"),
    }
    assert info["evaluations"]["halueval"]["results"]["base"] == "results/base/halueval.json"
    assert (done_run / "command.txt").read_text() == "excise run r.yaml\n"
    assert info["sweeps"] == {"ext_sub": {"folder": "sweeps/ext_sub", "operation": "ext_sub"}}


def test_a_second_run_skips_everything(done_run, project, tmp_path):
    out, path = _copy(done_run, tmp_path, project)  # a moved run folder is still up to date
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"}
    ran, skipped = _run(path)
    assert ran == [] and skipped == STAGES
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [str(p.relative_to(out)) for p in before if after[p] != before[p]]
    assert sorted(changed) == [".excise-run.lock", "recipe.yaml"]  # stage outputs and manifest untouched

    lines: list[str] = []
    run_recipe(load_recipe(path), log=lines.append)
    sweep = json.loads((out / "sweeps" / "ext_sub" / "sweep.json").read_text())
    summary = [line for line in lines if line.startswith("sweep ext_sub: ")]
    assert summary and summary[0].startswith(
        f"sweep ext_sub: chosen λ = {sweep['chosen']['lam']:g} — halueval:"
    )


def test_a_changed_setting_reruns_what_depends_on_it(done_run, project, tmp_path):
    _out, path = _copy(done_run, tmp_path, project)
    ran, skipped = _run(path, ["operations.ext_sub.lam=0.25"])
    assert ran == ["op ext_sub", "inspect ext_sub", "eval halueval/ext_sub", "eval perplexity/ext_sub"]
    assert len(skipped) == len(STAGES) - 4  # the sweep sets λ itself: not affected

    ran, _ = _run(
        path,
        [
            "operations.ext_sub.lam=0.25",
            "evaluations.perplexity.window=32",
            "evaluations.perplexity.stride=32",
        ],
    )
    assert ran == [
        f"eval perplexity/{m}" for m in ("base", "expert", "anti_expert", "ext_sub", "subtract")
    ] + ["sweep ext_sub"]


def test_the_report_stage_reports_the_run(done_run, project, tmp_path):
    out, path = _copy(done_run, tmp_path, project, report=True)
    ran, skipped = _run(path)
    assert ran == ["report"] and skipped == STAGES
    html = (out / "report" / "report.html").read_text()
    assert "excise report: tiny" in html and "ext_sub" in html
    summary = json.loads((out / "report" / "report.json").read_text())
    assert set(summary["methods"]) == set(MODELS)
    assert (
        summary["methods"]["ext_sub"]["halueval"]
        == json.loads((out / "results" / "ext_sub" / "halueval.json").read_text())["metrics"]
    )
    assert set(summary["sweeps"]) == {"ext_sub"} and "diagnostics:ext_sub" in summary["plots"]
    ran, _ = _run(path)
    assert ran == []


def test_force_runs_every_stage_again(done_run, project, tmp_path):
    out, path = _copy(done_run, tmp_path, project, evaluations=None, sweeps=None)
    lines: list[str] = []
    run_recipe(load_recipe(path), force=True, log=lines.append)
    ran = [line.split("] ", 1)[1].split(" → ")[0] for line in lines if " → " in line]
    assert ran == [*STAGES[:5]]
    _assert_same_adapter(out / "ops" / "ext_sub", done_run / "ops" / "ext_sub")  # training is seeded


def test_a_deleted_or_edited_output_is_made_again(done_run, project, tmp_path):
    out, path = _copy(done_run, tmp_path, project)
    shutil.rmtree(out / "ops" / "subtract")
    (out / "results" / "base" / "halueval.json").write_text("{}")
    (out / "ops" / ".subtract.tmp-0badf00d").mkdir()  # what a killed (SIGKILL) attempt leaves
    (out / "results" / "base" / ".halueval.json.x1y2.tmp").write_text("{")
    ran, _ = _run(path)
    assert ran == ["op subtract", "eval halueval/base", "eval halueval/subtract", "eval perplexity/subtract"]
    _assert_same_adapter(out / "ops" / "subtract", done_run / "ops" / "subtract")
    assert not [p for p in out.rglob(".*") if p.name != ".excise-run.lock"]


def test_a_killed_run_resumes_where_it_stopped(done_run, project, tmp_path, monkeypatch):
    out, path = _copy(done_run, tmp_path, project)
    import excise.evaluate.runner as runner

    real, calls = runner.run_eval, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C, mid-stage
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_eval", dies_on_the_third)
    overrides = ["eval.batch_size=2"]  # a new setting: every evaluation must run again
    with pytest.raises(KeyboardInterrupt):
        _run(path, overrides)
    manifest = json.loads((out / MANIFEST).read_text())["stages"]
    assert manifest["eval halueval/base"]["status"] == "done"
    assert manifest["eval halueval/anti_expert"]["status"] == "started"
    # The killed stage left its old result or nothing, never half a file.
    assert not [p for p in (out / "results").rglob("*") if p.name.startswith(".")]

    monkeypatch.setattr(runner, "run_eval", real)
    ran, skipped = _run(path, overrides)
    assert skipped == [*STAGES[:5], "eval halueval/base", "eval halueval/expert"]
    assert ran == STAGES[7:]
    for model in ("base", "anti_expert", "ext_sub"):  # batch size does not change the numbers
        new = json.loads((out / "results" / model / "halueval.json").read_text())
        old = json.loads((done_run / "results" / model / "halueval.json").read_text())
        assert new["metrics"] == pytest.approx(old["metrics"], rel=1e-5)
        assert new["settings"]["batch_size"] == 2


def test_training_killed_after_a_checkpoint_resumes_exactly(project, tmp_path, monkeypatch):
    import excise.train.loop as loop

    recipe = tiny_recipe(project, tmp_path / "run", operations=None, evaluations=None, sweeps=None)
    recipe["train"] |= {"steps": 3, "save_every": 1}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    real_save, real_train, resumes = loop._save_checkpoint, loop.train, []

    def dies_after_step_2(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        if out.name == "anti_expert" and step == 2:
            raise KeyboardInterrupt

    def recording_train(*args, **kwargs):
        resumes.append(kwargs["resume"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "_save_checkpoint", dies_after_step_2)
    monkeypatch.setattr("excise.train.sft.train", recording_train)
    with pytest.raises(KeyboardInterrupt):
        _run(path)
    anti = tmp_path / "run" / "adapters" / "anti_expert"
    assert sorted(p.name for p in anti.iterdir()) == ["checkpoints"]

    monkeypatch.setattr(loop, "_save_checkpoint", real_save)
    ran, skipped = _run(path)
    assert skipped == ["train expert (sft)"] and ran == ["train anti_expert (sft)"]
    assert resumes == [False, False, True]
    assert json.loads((anti / "train_config.json").read_text())["resumed_from"] == 2
    assert [r["step"] for r in json.loads((anti / "loss_log.json").read_text())] == [1, 2, 3]

    # The same adapter as an uninterrupted run.
    from excise.train.sft import run as sft_run

    cfg = load_recipe(path).adapters["anti_expert"].config.model_copy(update={"out": tmp_path / "alone"})
    sft_run(cfg, progress=False)
    _assert_same_adapter(anti, tmp_path / "alone")


def test_a_busy_run_folder_is_refused(done_run, project, tmp_path):
    out, path = _copy(done_run, tmp_path, project)
    recipe = load_recipe(path)
    busy = pytest.raises(ConfigError, match=r"is in use by another `excise run` \(pid \d+\)")
    with run_module._locked(out), busy:  # another `excise run` holds it
        run_recipe(recipe, log=lambda _line: None)
    assert json.loads((out / MANIFEST).read_text()) == json.loads((done_run / MANIFEST).read_text())


def test_a_foreign_or_other_recipes_folder_is_refused(project, tmp_path, done_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(project, out))
    with pytest.raises(ConfigError, match=r"is not empty and holds no excise run \(no stages.json\)"):
        run_recipe(load_recipe(path), log=lambda _line: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    other = tmp_path / "other"
    shutil.copytree(done_run, other)
    renamed = tiny_recipe(project, other) | {"name": "another"}
    with pytest.raises(ConfigError, match="holds a run of recipe 'tiny', not 'another'"):
        run_recipe(load_recipe(write_recipe(tmp_path / "o.yaml", renamed)), log=lambda _line: None)

    (tmp_path / "file").write_text("x")
    as_file = write_recipe(tmp_path / "f.yaml", tiny_recipe(project, tmp_path / "file"))
    with pytest.raises(ConfigError, match="is a file"):
        run_recipe(load_recipe(as_file), log=lambda _line: None)


def test_two_processes_train_together_and_the_first_does_the_rest(project, tmp_path):
    """Under `accelerate launch` the trainers split the data (as one process with 2 accumulated
    micro-batches), and one process applies, evaluates and writes the manifest."""
    import os
    import subprocess
    import sys

    recipe = tiny_recipe(project, tmp_path / "run", sweeps=None)
    recipe["train"] |= {"lora_dropout": 0.2}
    recipe["evaluations"] = {"halueval": recipe["evaluations"]["halueval"] | {"models": ["base", "ext_sub"]}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EXCISE_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
         "-m", "excise", "run", str(path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    assert proc.stderr.count("] op ext_sub → ") == 1  # progress from the first process only
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())["stages"]
    assert all(e["status"] == "done" for e in manifest.values()) and "eval halueval/ext_sub" in manifest

    from excise.train.sft import run as sft_run

    cfg = load_recipe(path).adapters["expert"].config
    sft_run(cfg.model_copy(update={"out": tmp_path / "one", "grad_accum": 2}), progress=False)
    _assert_same_adapter(tmp_path / "run" / "adapters" / "expert", tmp_path / "one")


def test_a_run_killed_by_sigterm_leaves_no_temporary_files_and_resumes(project, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = tiny_recipe(project, tmp_path / "run", operations=None, evaluations=None, sweeps=None)
    recipe["train"] |= {"steps": 150, "save_every": 1}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXCISE_CACHE": str(tmp_path / "c")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "excise", "run", str(path)],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    checkpoints = tmp_path / "run" / "adapters" / "expert" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and list(checkpoints.glob("step-*"))) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    leftovers = [p for p in (tmp_path / "run").rglob("*") if "tmp" in p.name]
    assert leftovers == []
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())["stages"]
    assert manifest["train expert (sft)"]["status"] == "started"

    ran, _ = _run(path)
    assert ran == ["train expert (sft)", "train anti_expert (sft)"]
    config = json.loads((tmp_path / "run" / "adapters" / "expert" / "train_config.json").read_text())
    assert config["resumed_from"] >= 1 and config["steps"] == 150


def test_sku_and_a_baseline_through_the_pipeline(project, tmp_path):
    from excise.pem.apply import apply_operator

    harm = {"harmful": "${data}/harm.json", "max_length": 64}
    recipe = tiny_recipe(
        project,
        tmp_path / "run",
        train={"steps": 2, "batch_size": 2, "lora_r": 2, "lora_alpha": 4, "lr": 0.01, **harm},
        adapters={
            "harmful": {"method": "sku", "normal": "${data}/normal.json", "k": 2},
            "ga": {"method": "ga"},
        },
        operations={"sku": {"op": "negate", "inputs": ["harmful"], "lam": 1.5}},
        evaluations={
            "perplexity": TINY_RECIPE["evaluations"]["perplexity"] | {"models": ["base", "sku", "ga"]}
        },
        sweeps=None,
    )
    ran, _ = _run(write_recipe(tmp_path / "r.yaml", recipe))
    assert ran == [
        "train harmful (sku)",
        "train ga (ga)",
        "op sku",
        *(f"eval perplexity/{m}" for m in ("base", "sku", "ga")),
    ]
    run = tmp_path / "run"
    sku_config = json.loads((run / "adapters" / "harmful" / "train_config.json").read_text())
    assert sku_config["config"]["method"] == "sku" and sku_config["config"]["k"] == 2
    assert [t["name"] for t in sku_config["config"]["terms"]] == ["gd", "rd", "pd"]
    ga_config = json.loads((run / "adapters" / "ga" / "train_config.json").read_text())
    assert ga_config["config"]["method"] == "ga"
    apply_operator("negate", [run / "adapters" / "harmful"], tmp_path / "negated", params={"lam": 1.5})
    _assert_same_adapter(run / "ops" / "sku", tmp_path / "negated")


def test_later_evaluation_options_at_their_defaults_leave_fingerprints_alone():
    """A run made before an evaluation option existed stays up to date after the upgrade."""
    from excise.pipeline.run import _stable

    old = {"metric": "halueval", "settings": {"limit": 5, "deficiency": {"settings": {"split": "eval"}}}}
    new = {
        "metric": "halueval",
        "settings": {
            "limit": 5,
            "pair_max_word_ratio": None,
            "pair_strip_period": False,
            "deficiency": {"settings": {"split": "eval", "pair_strip_period": False}},
        },
    }
    assert _stable(new) == old
    used = {"settings": {"pair_max_word_ratio": 1.5, "pair_strip_period": True}}
    assert _stable(used) == used  # set options change the fingerprint, as they change the result

"""`excise eval` under `accelerate launch`: two CPU processes (gloo) share the batches and write
the very result one process writes.

Each metric runs once as ``accelerate launch --multi_gpu --num_processes 2 -m excise eval …``
(on a machine without CUDA: two CPU processes joined over gloo, as tests/train/test_multiprocess.py
launches them; ``--cpu`` would start one process only) and once
in this process; the records must be equal (metrics, standard errors, every per-item output)
except the fields that say when and how fast. Item counts are odd and batches few, so one
process gets more batches than the other, or none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI_BATCH_SCRIPT, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
_VARYING = {"timing", "created", "from_cache", "generations_from"}  # when, how fast, which file
# checked on every run
_NOT_CACHED = {"training_overlap", "training_overlap_unchecked", "training_overlap_checks", "warnings"}


def _launch(commands: list[list[str]], driver: Path, cache: Path) -> subprocess.CompletedProcess:
    """Every case (each a full ``excise eval`` command line) in one 2-process launch: the
    start-up is paid once."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    driver.write_text(CLI_BATCH_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EXCISE_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
         str(driver), json.dumps(commands)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip


def _one_process(args: list[str], cache: Path, monkeypatch, capsys) -> None:
    from excise.cli import main

    monkeypatch.setenv("EXCISE_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", ["excise", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert not exit_.value.code, capsys.readouterr().err[-2000:]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _cases(tmp_path: Path) -> dict[str, list[str]]:
    """Flags per case: 5 items each; batches 5 (3 + 2), ~10, 3 (2 + 1) and 1 (the second process idle)."""
    questions = [
        {
            "question": f"Question {k}: what is {k} plus {k}?",
            "mc1_targets": {f"{2 * k}": 1, f"{2 * k + 1}": 0, "No idea": 0},
            "mc2_targets": {f"{2 * k}": 1, f"{k + k} exactly": 1, f"{2 * k + 1}": 0, "No idea": 0},
        }
        for k in range(1, 6)
    ]
    text = [{"text": f"Line {k} of some text to score, with a few words more."} for k in range(5)]
    prompts = [{"prompt": f"Tell me thing number {k}" + "!" * k} for k in range(5)]
    prompts_file = str(_write(tmp_path / "prompts.json", prompts))
    return {
        "truthfulqa-mc": ["--data", str(_write(tmp_path / "mc.json", questions)), "--batch-size", "4"],
        "perplexity": [
            "--data", str(_write(tmp_path / "text.json", text)), "--window", "32", "--stride", "16",
            "--batch-size", "2",
        ],
        "harmful-rate": [
            "--data", prompts_file, "--judge", "refusal", "--max-new-tokens", "6", "--batch-size", "2",
        ],
        "repetition": [
            "--data", prompts_file, "--field", "instruction=prompt", "--max-new-tokens", "6",
        ],
    }  # fmt: skip


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _VARYING}


def test_two_processes_write_what_one_writes(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "tiny", max_position_embeddings=1024)
    commands = {
        name: ["eval", name, "--base", str(model), "--device", "cpu", "--no-progress", *flags]
        for name, flags in _cases(tmp_path).items()
    }

    def rejudge(run: str) -> list[str]:  # `excise eval judge` on that run's harmful-rate answers
        saved = tmp_path / f"{run}-harmful-rate.json"
        out = tmp_path / f"{run}-judge.json"
        options = ["--judge", "refusal", "--judge-option", "case_sensitive=false", "--no-progress"]
        return ["eval", "judge", "--generations", str(saved), *options, "--out", str(out)]

    runs = [[*args, "--out", str(tmp_path / f"two-{name}.json")] for name, args in commands.items()]
    proc = _launch([*runs, rejudge("two")], tmp_path / "driver.py", tmp_path / "cache-two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The first process alone reports and writes: one plan line per metric, one result and one
    # cache entry per command.
    assert proc.stdout.count("wrote ") == len(runs) + 1 and proc.stderr.count("plan: ") == len(runs)
    assert len(list((tmp_path / "cache-two" / "eval").glob("*.json"))) == len(runs) + 1
    for name, args in commands.items():
        _one_process(
            [*args, "--out", str(tmp_path / f"one-{name}.json")], tmp_path / "cache-one", monkeypatch, capsys
        )
    _one_process(rejudge("one"), tmp_path / "cache-one", monkeypatch, capsys)

    for name in [*commands, "judge"]:
        two = json.loads((tmp_path / f"two-{name}.json").read_text())
        one = json.loads((tmp_path / f"one-{name}.json").read_text())
        assert two["n_items"] == 5 and len(two["items"]) == len(one["items"]) > 0, name
        assert two["items"] == one["items"], name  # answers, log-likelihoods, NLLs, judge scores
        assert two["metrics"] == one["metrics"] and two["stderr"] == one["stderr"], name
        assert _stable(two) == _stable(one), name
        cached = json.loads(
            (tmp_path / "cache-two" / "eval" / f"{two['provenance']['cache_key']}.json").read_text()
        )
        assert _stable(cached) == {k: v for k, v in _stable(two).items() if k not in _NOT_CACHED}, name


def test_one_process_makes_no_accelerate_state(tmp_path, monkeypatch):
    """A plain run shares nothing and joins no process group (so `excise eval` starts as before)."""
    from excise.evaluate import parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with parallel.processes():
        assert parallel.sharing() == 1 and parallel.is_main()
        assert parallel.map_shared(lambda x: x * x, [3, 1, 2], desc="t", progress=False) == [9, 1, 4]
        assert parallel.from_main(lambda: "read") == "read"
    assert parallel._STATE is None

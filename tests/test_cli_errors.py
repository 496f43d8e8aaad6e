"""Every user error is one `error:` line (ours, pydantic's, click's); Ctrl-C says how to resume;
`--threads` on every command that runs a model; library chatter kept out of the output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.test_sft import run_cli


def excise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args], capture_output=True, text=True, timeout=120
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "╭" not in result.stderr and "http" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["eval", "perplexity", "--bogus"], "No such option: --bogus"),
        (["ops", "negate"], "Missing option '--adapter'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["ops", "negate", "--adapter", "a", "--out", "b", "--lam", "x"], "'--lam'"),
    ],
)
def test_usage_errors_are_one_line_without_a_box(args, wanted):
    line = _one_error_line(excise(*args))
    assert wanted in line and "--help" in line


def test_a_wrong_choice_lists_the_choices_in_one_line(tmp_path):
    line = _one_error_line(
        excise(
            "train", "sft", "--base", "x", "--data", "y", "--out", str(tmp_path / "o"), "--format", "bogus"
        )
    )
    choices = "instruction, paired-expert, paired-anti, harmful, safe, text"
    assert line == f"error: --format: 'bogus' is not one of: {choices}"
    line = _one_error_line(
        excise("eval", "perplexity", "--base", "x", "--out", str(tmp_path / "r.json"), "--dtype", "f16")
    )
    assert line == "error: --dtype: 'f16' is not one of: float32, bfloat16"


def test_no_arguments_prints_help():
    result = excise("eval")
    assert result.returncode == 0 and "Usage" in result.stdout and "truthfulqa-mc" in result.stdout


def test_train_refuses_an_occupied_out_before_loading(tmp_path, monkeypatch, capsys):
    """The model spec is bogus: the --out check must come first (before, the model load failed first)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "a", "output": "b"}]')
    for verb in (["sft", "--data", str(data)], ["ga", "--harmful", str(data)]):
        code, _, err = run_cli(
            monkeypatch, capsys, "train", *verb, "--base", str(tmp_path / "no-model"), "--out", str(out)
        )
        assert code == 2 and "is not empty; pass --overwrite" in err, err


def test_default_checkpoints_for_a_lora_not_for_full_weights():
    from excise.train.sft import SftConfig

    base = {"base": "m", "data": "d", "out": "o"}
    assert SftConfig(**base).train_settings().save_every == 25
    assert SftConfig(**base, full=True).train_settings().save_every is None
    assert SftConfig(**base, save_every=0).train_settings().save_every is None
    assert SftConfig(**base, save_every=7).train_settings().save_every == 7


@pytest.mark.parametrize("launch", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_no_default_checkpoints_under_a_sharded_launch(launch, monkeypatch):
    from excise.train.sft import SftConfig

    monkeypatch.setenv(launch, "true")  # what `accelerate launch` sets for an FSDP / DeepSpeed config
    base = {"base": "m", "data": "d", "out": "o"}
    assert SftConfig(**base).train_settings().save_every is None  # a shard-only checkpoint is refused
    assert SftConfig(**base, save_every=7).train_settings().save_every == 7  # asked: the loop refuses it


def test_ctrl_c_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run out"

    def interrupted(cfg, **kwargs):
        (cfg.out / "checkpoints" / "step-25").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("excise.train.sft.run", interrupted)
    args = ["train", "sft", "--base", "m", "--data", "d.json", "--out", str(out), "--overwrite"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 130
    expected = f"excise train sft --base m --data d.json --out '{out}' --resume"
    assert err.strip().splitlines()[-1] == f"interrupted; continue with: {expected}"


def test_ctrl_c_without_checkpoint_just_says_interrupted(tmp_path, monkeypatch, capsys):
    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("excise.train.sft.run", interrupted)
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "sft", "--base", "m", "--data", "d", "--out", str(tmp_path / "o")
    )
    assert code == 130 and err.strip() == "interrupted"


def _commands():
    from typer.main import get_command

    from excise.cli import app

    root = get_command(app)
    for group_name, group in root.commands.items():
        subs = getattr(group, "commands", None)
        if subs is None:
            yield group_name, group
        else:
            for name, command in subs.items():
                yield f"{group_name} {name}", command


def test_every_command_that_runs_a_model_takes_threads():
    no_model = {"inspect", "report"}  # report renders saved results
    missing = [
        name
        for name, command in _commands()
        if not name.startswith("ops")
        and name not in no_model
        and "threads" not in {p.name for p in command.params}
    ]
    assert missing == []


def test_threads_sets_torch_threads(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(
            "excise.evaluate.runner.run_eval", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
        )
        run_cli(
            monkeypatch,
            capsys,
            "eval",
            "perplexity",
            "--base",
            "m",
            "--out",
            str(tmp_path / "r.json"),
            "--threads",
            "1",
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_library_warnings_stay_out_of_the_output():
    code = (
        "from excise.cli import _show_warnings; _show_warnings()\n"
        "import warnings\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers.generation').warning('LIBRARY CHATTER')\n"
        "warnings.warn('deprecated past_key_values', FutureWarning)\n"
        "from excise.errors import ExciseWarning\n"
        "warnings.warn('ours', ExciseWarning)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "warning: ours"


def test_ext_sub_of_adapters_from_other_bases_fails_without_a_false_warning(tmp_path):
    """Before, it warned "continuing because their shapes agree" and then failed on the shapes."""
    from tests.conftest import write_raw_lora as _write_lora
    from tests.test_cli import SHAPES

    e = _write_lora(tmp_path / "e", 1, SHAPES, base="org/base-a")
    wide = {name: (n_out * 2, n_in * 2) for name, (n_out, n_in) in SHAPES.items()}
    a = _write_lora(tmp_path / "a", 2, wide, base="org/base-b")
    result = excise(
        "ops", "ext-sub", "--expert", str(e), "--anti-expert", str(a), "--out", str(tmp_path / "o")
    )
    line = _one_error_line(result)
    assert "trained on different base models (made for 'org/base-a' and 'org/base-b')" in line

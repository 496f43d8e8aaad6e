"""Two CPU processes under `accelerate launch` train exactly what one process does.

Process ``p`` reads global micro-batches ``s·G·W + g·W + p`` and gradients are averaged
across processes, so 2 processes × 1 micro-batch per step equal 1 process × 2 accumulated
micro-batches (dropout included: it is seeded by the micro-batch index). Checked for
``sft``, ``sku`` and every baseline, launched with the shipped ``configs/accelerate/ddp.yaml``
and ``fsdp.yaml`` (gloo on CPU; under FSDP each process holds half of the weights): the same
loss curve to 1e-5 and the same weights to 1e-6 (+1e-5 relative), float32 sums taken in
another order.

``deepspeed_zero2.yaml`` is only read here: DeepSpeed is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_sft import QA_ROWS
from tests.train.test_sku import write_data

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
# Tiny runs: 3 steps (sft) or 2, lr high enough that every step moves the weights.
_UNLEARN = ["--split", "all", "--batch-size", "2", "--steps", "2", "--lr", "1e-2", "--max-length", "96"]
_COMMANDS = {
    "sft": ["--format", "paired-expert", "--steps", "3", "--batch-size", "2", "--lr", "1e-2"],
    "sku": [*_UNLEARN, "--k", "2"],
    "ga": _UNLEARN,
    "ga-mismatch": [*_UNLEARN, "--k", "2"],
    "llmu": [*_UNLEARN, "--k", "2"],
    "finetune": _UNLEARN,
}  # fmt: skip


def _data_args(method: str, model: Path, tmp_path: Path) -> list[str]:
    if method == "sft":
        data = tmp_path / "qa.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
        return ["--base", str(model), "--data", str(data)]
    harmful, normal = write_data(tmp_path)
    normal_args = ["--normal", str(normal)] if method in ("sku", "llmu", "ga-mismatch") else []
    return ["--base", str(model), "--harmful", str(harmful), *normal_args]


def _launch(config: str, method: str, args: list[str], out: Path, port: int) -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [launcher, "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
         "--main_process_port", str(port), "-m", "excise", "train", method, *args, "--out", str(out),
         "--lora-dropout", "0.2", "--no-progress"],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
    )  # fmt: skip


def _one_process(method: str, args: list[str], out: Path, monkeypatch, capsys) -> None:
    """The same command in this process, with twice the accumulation."""
    from excise.cli import main

    argv = ["excise", "train", method, *args, "--out", str(out), "--lora-dropout", "0.2", "--no-progress"]
    monkeypatch.setattr(sys, "argv", [*argv, "--grad-accum", "2"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert not exit_.value.code, capsys.readouterr().err[-2000:]


def _assert_same_run(two: Path, one: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    log_two = json.loads((two / "loss_log.json").read_text())
    log_one = json.loads((one / "loss_log.json").read_text())
    assert [r["tokens"] for r in log_two] == [r["tokens"] for r in log_one]  # both processes' tokens
    for r2, r1 in zip(log_two, log_one, strict=True):
        terms = set(r1) - {"step", "lr", "tokens", "padding", "seconds"}
        assert {k: r2[k] for k in terms} == pytest.approx({k: r1[k] for k in terms}, abs=1e-5)
    assert json.loads((two / "train_config.json").read_text())["processes"] == 2


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
@pytest.mark.parametrize("method", list(_COMMANDS))
def test_two_processes_equal_one_with_accumulation(
    method, config, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    args = _data_args(method, tiny_model_dir, tmp_path) + _COMMANDS[method]
    port = 29510 + list(_COMMANDS).index(method) + (20 if config == "fsdp.yaml" else 0)
    two = _launch(config, method, args, tmp_path / "two", port)
    assert two.returncode == 0, two.stderr[-3000:]
    if config == "fsdp.yaml":  # really sharded: process 0 held about half of the weights
        sharding = json.loads((tmp_path / "two" / "train_config.json").read_text())["sharding"]
        assert sharding["weights_main"] == pytest.approx(sharding["weights_total"] / 2, rel=0.05)
    assert two.stdout.count("wrote ") == 1  # only the main process writes and reports
    _one_process(method, args, tmp_path / "one", monkeypatch, capsys)
    _assert_same_run(tmp_path / "two", tmp_path / "one")


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"])
def test_shipped_accelerate_configs_are_read_by_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(CONFIGS / name)
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}[name]
    assert str(config.distributed_type).endswith(expected)
    assert config.mixed_precision == "no"  # excise autocasts itself (--bf16)
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_use_orig_params"] is True
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "deepspeed_zero2.yaml":
        assert config.deepspeed_config["zero_stage"] == 2

"""Two CPU processes under `accelerate launch` train exactly what one process does.

Process ``p`` reads global micro-batches ``s·G·W + g·W + p`` and gradients are averaged
across processes, so 2 processes × 1 micro-batch per step equal 1 process × 2 accumulated
micro-batches (dropout included: it is seeded by the micro-batch index).
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


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train", "sft", "--base", str(model), "--data", str(data), "--out", str(out),
        "--format", "paired-expert", "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
        "--lora-dropout", "0.2", "--no-progress",
    ]  # fmt: skip


def test_two_processes_equal_one_with_accumulation(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from excise.train.sft import SftConfig, run

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         "-m", "excise", *_args(tiny_model_dir, data, tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only the main process writes and reports

    one = run(
        SftConfig(
            base=str(tiny_model_dir), data=str(data), out=tmp_path / "one", format="paired-expert",
            steps=3, batch_size=2, grad_accum=2, lr=1e-2, lora_dropout=0.2,
        ),
        progress=False,
    )  # fmt: skip
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(one.out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    log_two = json.loads((tmp_path / "two" / "loss_log.json").read_text())
    assert [r["tokens"] for r in log_two] == [r["tokens"] for r in one.log]  # both processes' tokens
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in one.log], abs=1e-5)
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["processes"] == 2

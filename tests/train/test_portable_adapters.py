"""A trained adapter names its base as the user did (alias, hub id, path), not by this machine's cache.

``adapter_config.json`` used to record the converted alias's cache folder
(``~/.cache/excise/models/smollm2-135m-instruct``) as ``base_model_name_or_path``, which names
nothing on another machine. Now it records the spec; ``train_config.json`` keeps the resolved path.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from excise.train.lora import save_trained
from tests.conftest import save_tiny_model, tiny_tokenizer
from tests.train.test_sft import QA_ROWS, run_cli

ALIAS = "smollm2-135m-instruct"


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


def _machine(root, monkeypatch):
    """A machine whose excise cache already holds the alias's converted model (the tiny Llama)."""
    monkeypatch.setenv("EXCISE_CACHE", str(root))
    return save_tiny_model(root / "models" / ALIAS)


def test_an_adapter_trained_on_an_alias_works_on_another_machine(monkeypatch, capsys, tmp_path, qa_file):
    torch.set_num_threads(1)
    cache_a = _machine(tmp_path / "machine-a", monkeypatch)
    trained = tmp_path / "adapter"
    args = ["train", "sft", "--base", ALIAS, "--data", str(qa_file), "--out", str(trained), "--steps", "2"]
    args += ["--format", "paired-anti", "--field", "input="]
    code, _, stderr = run_cli(
        monkeypatch, capsys, *args, "--batch-size", "2", "--lora-r", "2", "--no-progress"
    )
    assert code == 0, stderr

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == ALIAS
    assert "machine-a" not in (trained / "adapter_config.json").read_text()
    assert json.loads((trained / "train_config.json").read_text())["config"]["resolved_model"] == str(cache_a)

    # Another machine: the adapter copied elsewhere, the alias converted into another cache,
    # the first machine's cache gone. eval and merge resolve the alias there.
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(trained, moved)
    shutil.rmtree(tmp_path / "machine-a")
    cache_b = _machine(tmp_path / "machine-b", monkeypatch)

    merged = tmp_path / "merged"
    code, _, stderr = run_cli(
        monkeypatch, capsys, "merge", "--base", ALIAS, "--adapter", str(moved), "--out", str(merged)
    )
    assert code == 0, stderr
    files = (cache_b / "model.safetensors", moved / "adapter_model.safetensors", merged / "model.safetensors")
    base, lora, out = (load_file(f) for f in files)
    scale = config["lora_alpha"] / config["r"]
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        a, b = lora[f"base_model.model.{key}.lora_A.weight"], lora[f"base_model.model.{key}.lora_B.weight"]
        torch.testing.assert_close(out[f"{key}.weight"], base[f"{key}.weight"] + scale * (b @ a))

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i} of some text."}) + "\n" for i in range(2)))
    result = tmp_path / "ppl.json"
    args = [
        "eval",
        "perplexity",
        "--base",
        ALIAS,
        "--adapter",
        str(moved),
        "--data",
        str(data),
        "--window",
        "16",
    ]
    code, _, stderr = run_cli(
        monkeypatch, capsys, *args, "--stride", "8", "--device", "cpu", "--out", str(result)
    )
    assert code == 0, stderr
    assert json.loads(result.read_text())["metric"] == "perplexity"


def test_the_spec_is_recorded_as_given(monkeypatch, capsys, tmp_path, qa_file):
    """A relative path stays relative: what the user typed, not where it pointed on this machine."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "tiny")
    args = ["train", "sft", "--base", "tiny", "--data", str(qa_file), "--out", "ad", "--steps", "1"]
    args += ["--format", "paired-anti", "--field", "input="]
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--batch-size", "2", "--no-progress")
    assert code == 0, stderr
    assert (
        json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    )


def test_full_training_saves_the_model_and_tokenizer_untouched(tmp_path, tiny_llama):
    """No adapter_config.json to rewrite: a full model folder is saved as transformers writes it."""
    save_trained(tiny_llama, tmp_path / "full", base=ALIAS, tokenizer=tiny_tokenizer())
    names = {p.name for p in (tmp_path / "full").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    } <= names and "adapter_config.json" not in names

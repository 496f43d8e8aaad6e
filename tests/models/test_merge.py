"""`excise merge` (excise/models/merge.py) in a subprocess, on a tiny random Llama.

The merged checkpoint must load with plain transformers and give the PeftModel's
logits; bad input exits 2 with one line and leaves no (or the old) output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_model, write_peft_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]


def excise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args], capture_output=True, text=True, timeout=180
    )


def _load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, a random LoRA on it (non-zero B), and a LoRA made for a 32-wide Llama."""
    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_model(root / "base")
    lora = {"r": 4, "target_modules": TARGETS}
    adapter = write_peft_lora(root / "adapter", _load(base), seed=1, lora_alpha=8, **lora)
    narrow = save_tiny_model(root / "narrow", hidden_size=32, intermediate_size=48)
    wrong = write_peft_lora(root / "wrong", _load(narrow), seed=2, **lora)
    return {"base": base, "adapter": adapter, "wrong": wrong}


def _merge(models: dict[str, Path], out: Path, *extra: str, adapter: Path | None = None):
    adapter = models["adapter"] if adapter is None else adapter
    args = ["--base", str(models["base"]), "--adapter", str(adapter), "--out", str(out)]
    return excise("merge", *args, *extra)


def _assert_one_line_error(result: subprocess.CompletedProcess, *messages: str) -> None:
    """Exit 2, no traceback, and the error is the last stderr line and the only one.

    Lines before it may come from loading the base (transformers' progress bar); the
    libraries' deprecation warnings are silenced by the CLI.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], result.stderr
    assert not [line for line in lines if line.startswith("warning:")], result.stderr
    for message in messages:
        assert message in errors[0], result.stderr


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_merged_model_gives_the_peft_logits(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    result = _merge(models, out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert not (out / "adapter_config.json").exists()

    merged = _load(out)
    assert not any("lora" in name for name in merged.state_dict())
    peft_model = PeftModel.from_pretrained(_load(models["base"]), models["adapter"]).eval()
    base = _load(models["base"])
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected, before = (m(input_ids=ids).logits for m in (merged, peft_model, base))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - before).abs().max() > 1e-2  # the adapter is far from a no-op

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    provenance = json.loads((out / "excise_merge.json").read_text())
    assert provenance["adapter"] == str(models["adapter"].resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_adapter_for_another_shape_is_refused(models, tmp_path):
    out = tmp_path / "merged"
    result = _merge(models, out, adapter=models["wrong"])
    # The module and both shapes, found before loading (not torch's "Error(s) in loading state_dict").
    _assert_one_line_error(
        result,
        "does not fit base",
        "made for",
        "maps 96 -> 64 features in the base, 48 -> 32 in the adapter",
        "more)",
    )
    _assert_no_output(out)


@pytest.mark.parametrize("case", ["missing folder", "no adapter_config.json"])
def test_missing_adapter(models, tmp_path, case):
    adapter = tmp_path / "adapter"
    if case != "missing folder":
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"")
    out = tmp_path / "merged"
    message = "not found" if case == "missing folder" else "no adapter_config.json"
    _assert_one_line_error(_merge(models, out, adapter=adapter), message)
    _assert_no_output(out)


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old content")
    return out


def test_non_empty_out_needs_overwrite(models, tmp_path):
    out = _old_output(tmp_path)
    _assert_one_line_error(_merge(models, out), "not empty")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert (out / "old.txt").read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_overwrite_replaces_the_output(models, tmp_path):
    out = _old_output(tmp_path)
    result = _merge(models, out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "old.txt").exists()
    assert (out / "config.json").is_file() and (out / "excise_merge.json").is_file()
    _load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or old folder left

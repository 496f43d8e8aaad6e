"""`excise ops … --base` in a subprocess: the CLI wiring to full fine-tunes (excise/pem/full.py).

tests/pem/test_full.py checks ``apply_full`` in-process (layouts, dtypes, bad shards);
here the flags must reach it: which operator, which λ, which model is the base. The
expected tensors come from a per-row numpy oracle of DESIGN.md §1 applied to the task
vectors ``τ = θ − θ_base``, read straight from the safetensors files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.conftest import ext_sub_rows_numpy, tiny_llama_config


def excise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args], capture_output=True, text=True, timeout=120
    )


def _state(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors model folder, as float64 numpy arrays."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update({k: v.astype(np.float64) for k, v in load_file(file).items()})
    assert state, folder
    return state


def _rows(t: np.ndarray) -> np.ndarray:
    """DESIGN.md §1 rows: a 2-D weight's output rows; a 1-D tensor is one row."""
    return t.reshape(t.shape[0] if t.ndim >= 2 else 1, -1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three full fine-tunes of it (anti-experts overlap the expert)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("full-cli")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    g = torch.Generator().manual_seed(1)
    taus = {}
    for name, p in base.named_parameters():
        tau1 = 0.02 * torch.randn(p.shape, generator=g)
        taus[name] = (
            tau1,
            0.6 * tau1 + 0.02 * torch.randn(p.shape, generator=g),
            -0.3 * tau1 + 0.01 * torch.randn(p.shape, generator=g),
        )
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for k, role in enumerate(("expert", "anti", "anti2")):
        model = LlamaForCausalLM(tiny_llama_config()).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(taus[name][k])
        model.save_pretrained(root / role)
        paths[role] = root / role
    return paths


def _check(out: Path, zoo: dict[str, Path], expected_tau) -> None:
    """Output tensor == θ_base + expected_tau(name, base rows, fine-tune rows…) for every tensor."""
    base = _state(zoo["base"])
    fts = [_state(zoo[r]) for r in ("expert", "anti", "anti2")]
    got = _state(out)
    assert got.keys() == base.keys()
    changed = 0
    for name, t0 in base.items():
        rows0 = _rows(t0)
        taus = [_rows(ft[name]) - rows0 for ft in fts]
        expected = (rows0 + expected_tau(*taus)).reshape(t0.shape)
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        changed += not np.allclose(got[name], fts[0][name], rtol=0, atol=1e-6)
    assert changed == len(base)  # every tensor moved away from the expert: the op really ran
    # The base's config travels with the weights, so the output is a loadable model folder.
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (zoo["base"] / "config.json").read_text()
    )


def test_ext_sub_with_base(zoo, tmp_path):
    out = tmp_path / "out"
    result = excise(
        "ops", "ext-sub", "--base", str(zoo["base"]), "--expert", str(zoo["expert"]),
        "--anti-expert", str(zoo["anti"]), "--lam", "0.7", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    _check(out, zoo, lambda t1, t2, _: ext_sub_rows_numpy(t1, t2, 0.7))
    provenance = json.loads((out / "excise.json").read_text())
    assert provenance["operation"] == "ext_sub" and provenance["params"] == {"lam": 0.7}


def test_compose_with_base(zoo, tmp_path):
    """Two anti-experts, one λ each: θ+ − Σ λ_k d_k, each d_k extracted against the expert."""
    out = tmp_path / "out"
    result = excise(
        "ops", "ext-sub", "--base", str(zoo["base"]), "--expert", str(zoo["expert"]),
        "--anti-expert", str(zoo["anti"]), "--anti-expert", str(zoo["anti2"]),
        "--lam", "1", "--lam", "0.5", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    def compose(t1, t2, t3):
        return ext_sub_rows_numpy(t1, t2, 1.0) + ext_sub_rows_numpy(t1, t3, 0.5) - t1

    _check(out, zoo, compose)


def test_negate_with_base(zoo, tmp_path):
    """SKU's negation θ_base − λ(θ − θ_base)."""
    out = tmp_path / "out"
    result = excise(
        "ops", "negate", "--base", str(zoo["base"]), "--adapter", str(zoo["expert"]),
        "--lam", "0.5", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _check(out, zoo, lambda t1, *_: -0.5 * t1)
    base, ft, got = _state(zoo["base"]), _state(zoo["expert"]), _state(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(got[name], base[name] - 0.5 * (ft[name] - base[name]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["missing base", "file as model", "adapter as model", "non-finite lam"])
def test_bad_input_with_base(zoo, tmp_path, case):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    base, expert = str(zoo["base"]), str(zoo["expert"])
    args, message = {
        "missing base": (["negate", "--adapter", expert, "--base", str(tmp_path / "nope")], "not found"),
        "file as model": (
            ["ext-sub", "--base", base, "--expert", expert, "--anti-expert", f"{expert}/config.json"],
            "is a file",
        ),
        "adapter as model": (["negate", "--base", base, "--adapter", str(adapter)], "without --base"),
        "non-finite lam": (["negate", "--adapter", expert, "--base", base, "--lam", "nan"], "finite"),
    }[case]
    out = tmp_path / "out"
    result = excise("ops", *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dense_is_refused_with_base(zoo, tmp_path):
    """--dense is for adapters only: a usage error, one `error:` line, exit 2."""
    out = tmp_path / "out"
    args = ["--adapter", str(zoo["expert"]), "--base", str(zoo["base"]), "--dense", "--out", str(out)]
    result = excise("ops", "negate", *args)
    assert result.returncode == 2 and "--dense" in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["ops", "negate", "--base", str(zoo["base"]), "--adapter", str(zoo["expert"]), "--out", str(out)]
    refused = excise(*args)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    replaced = excise(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_allow_partial_is_refused_with_base(zoo, tmp_path):
    """Full models must hold the base's tensors: --allow-partial is refused, not ignored."""
    out = tmp_path / "out"
    for verb, models in (
        ("ext-sub", ["--expert", str(zoo["expert"]), "--anti-expert", str(zoo["anti"])]),
        ("subtract", ["--a", str(zoo["expert"]), "--b", str(zoo["anti"])]),
        ("add", ["--a", str(zoo["expert"]), "--b", str(zoo["anti"])]),
    ):
        result = excise(
            "ops", verb, "--base", str(zoo["base"]), *models, "--allow-partial", "--out", str(out)
        )
        assert result.returncode == 2, result.stderr
        assert "--allow-partial applies to adapters" in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    """A bf16 base and an fp32 fine-tune whose edits are far below bf16's resolution."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(3)
    base = {
        "w": torch.randn(32, 48, generator=g).to(torch.bfloat16),
        "norm": torch.ones(48).to(torch.bfloat16),
    }
    edit = {"w": 1e-3 * torch.randn(32, 48, generator=g), "norm": torch.full((48,), 1e-3)}
    paths = {}
    for name, state in (("base", base), ("ft", {k: v.float() + edit[k] for k, v in base.items()})):
        (root / name).mkdir()
        save_file(state, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = root / name
    return paths


def _torch_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_torch

    return load_torch(folder / "model.safetensors")


def test_dtype_with_base_keeps_or_reports_edits(mixed, tmp_path):
    """Default: the widest input dtype (fp32), so every edit survives; --dtype bfloat16
    loses them and says which share, counted here independently."""
    base = {k: v.double() for k, v in _torch_state(mixed["base"]).items()}
    ft = {k: v.double() for k, v in _torch_state(mixed["ft"]).items()}
    exact = {k: t0 - (ft[k] - t0) for k, t0 in base.items()}  # SKU negation, λ = 1
    args = ["ops", "negate", "--base", str(mixed["base"]), "--adapter", str(mixed["ft"]), "--lam", "1"]
    result = excise(*args, "--out", str(tmp_path / "wide"))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    wide = _torch_state(tmp_path / "wide")
    for name, value in exact.items():
        assert wide[name].dtype == torch.float32, name
        torch.testing.assert_close(wide[name], value.float(), rtol=0, atol=0, msg=name)
    assert json.loads((tmp_path / "wide" / "excise.json").read_text())["dtype"] == "widest input"

    result = excise(*args, "--dtype", "bf16", "--out", str(tmp_path / "narrow"))
    assert result.returncode == 0, result.stderr
    changed = lost = 0
    for name, value in exact.items():
        moved = value != base[name]
        changed += int(moved.sum())
        lost += int((moved & (value.to(torch.bfloat16).double() == base[name])).sum())
    assert lost > changed // 2  # most edits are below bf16's resolution
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert f"rounds {lost} of {changed} changed weights ({lost / changed:.2%}" in warning[0]
    narrow = _torch_state(tmp_path / "narrow")
    assert json.loads((tmp_path / "narrow" / "excise.json").read_text())["dtype"] == "bfloat16"
    for name, value in exact.items():
        assert torch.equal(narrow[name], value.to(torch.bfloat16)), name


def test_dtype_is_refused_for_adapters_and_checked(zoo, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    result = excise(
        "ops", "negate", "--adapter", str(adapter), "--dtype", "float32", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "--dtype applies to full models" in result.stderr, result.stderr
    result = excise(
        "ops", "negate", "--base", str(zoo["base"]), "--adapter", str(zoo["expert"]),
        "--dtype", "int8", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2 and "error: unknown dtype 'int8'" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()

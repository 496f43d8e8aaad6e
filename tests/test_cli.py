"""The real `excise` command in a subprocess: outputs, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from excise.pem.io import load_adapter
from excise.pem.linalg import ext_sub_rows_reference
from tests.conftest import write_raw_lora


def excise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args], capture_output=True, text=True, timeout=120
    )


SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8)}


@pytest.fixture
def pair(tmp_path):
    return write_raw_lora(tmp_path / "e", 1, SHAPES), write_raw_lora(tmp_path / "a", 2, SHAPES, r=2)


def test_ext_sub_writes_an_exact_adapter(pair, tmp_path):
    e, a = pair
    result = excise(
        "ops",
        "ext-sub",
        "--expert",
        str(e),
        "--anti-expert",
        str(a),
        "--lam",
        "0.5",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    out, expert, anti = (load_adapter(p) for p in (tmp_path / "out", e, a))
    for name in SHAPES:
        expected = ext_sub_rows_reference(expert.modules[name].dense(), anti.modules[name].dense(), 0.5)
        np.testing.assert_allclose(out.modules[name].dense(), expected, rtol=1e-5, atol=1e-5)


def test_sha256_flag_chooses_the_input_digest(pair, tmp_path):
    import hashlib

    import xxhash

    e, a = pair
    for flags, name, fn in (([], "xxh3_128", xxhash.xxh3_128), (["--sha256"], "sha256", hashlib.sha256)):
        out = tmp_path / name
        result = excise("ops", "subtract", "--a", str(e), "--b", str(a), "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr
        inputs = json.loads((out / "excise.json").read_text())["inputs"]
        for entry, folder in zip(inputs, (e, a), strict=True):
            assert entry[name] == fn((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_dense_flag_and_compose(pair, tmp_path):
    e, a = pair
    a2 = write_raw_lora(tmp_path / "a2", 3, SHAPES, r=4)
    dense = excise(
        "ops", "ext-sub", "--expert", str(e), "--anti-expert", str(a), "--out", str(tmp_path / "d"), "--dense"
    )
    assert dense.returncode == 0, dense.stderr
    assert load_adapter(tmp_path / "d").modules["model.layers.0.self_attn.q_proj"].rank == 8  # rank `in`
    both = excise(
        "ops",
        "ext-sub",
        "--expert",
        str(e),
        "--anti-expert",
        str(a),
        "--anti-expert",
        str(a2),
        "--lam",
        "1",
        "--lam",
        "0.5",
        "--out",
        str(tmp_path / "c"),
    )
    assert both.returncode == 0, both.stderr
    assert json.loads((tmp_path / "c" / "excise.json").read_text())["params"]["lams"] == [1.0, 0.5]


@pytest.mark.parametrize("verb", ["subtract", "add", "negate", "scale"])
def test_arithmetic_verbs(pair, tmp_path, verb):
    e, a = pair
    args = {
        "subtract": ["--a", str(e), "--b", str(a), "--lam", "2"],
        "add": ["--a", str(e), "--b", str(a), "--weight", "0.5"],
        "negate": ["--adapter", str(e), "--lam", "3"],
        "scale": ["--adapter", str(e), "--weight", "0.25"],
    }[verb]
    result = excise("ops", verb, *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    W1 = load_adapter(e).modules["model.layers.0.self_attn.q_proj"].dense()
    W2 = load_adapter(a).modules["model.layers.0.self_attn.q_proj"].dense()
    expected = {"subtract": W1 - 2 * W2, "add": W1 + 0.5 * W2, "negate": -3 * W1, "scale": 0.25 * W1}[verb]
    got = load_adapter(tmp_path / "out").modules["model.layers.0.self_attn.q_proj"].dense()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _bad_cases(tmp_path: Path, e: Path, a: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "noconfig").mkdir()
    corrupt = write_raw_lora(tmp_path / "corrupt", 4, SHAPES)
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    other = write_raw_lora(
        tmp_path / "other",
        5,
        {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)},
    )
    partial = write_raw_lora(tmp_path / "partial", 6, {"model.layers.0.self_attn.q_proj": (8, 8)})
    nan = write_raw_lora(tmp_path / "nan", 7, SHAPES)
    from safetensors.numpy import load_file

    tensors = load_file(nan / "adapter_model.safetensors")
    first = next(iter(tensors))
    tensors[first][0, 0] = np.nan
    save_file(tensors, nan / "adapter_model.safetensors")
    pissa = write_raw_lora(tmp_path / "pissa", 8, SHAPES)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    ext = ["ops", "ext-sub", "--expert", str(e)]
    return {
        "missing folder": ([*ext, "--anti-expert", str(tmp_path / "nope")], "not found"),
        "missing config": ([*ext, "--anti-expert", str(tmp_path / "noconfig")], "no adapter_config.json"),
        "corrupt": ([*ext, "--anti-expert", str(corrupt)], "corrupt"),
        "shapes differ": ([*ext, "--anti-expert", str(other)], "different base models"),
        "targets differ": ([*ext, "--anti-expert", str(partial)], "--allow-partial"),
        "nan weights": ([*ext, "--anti-expert", str(nan)], "NaN or Inf"),
        "pissa": ([*ext, "--anti-expert", str(pissa)], "path_initial_model_for_weight_conversion"),
        "lam nan": ([*ext, "--anti-expert", str(a), "--lam", "nan"], "finite"),
        "lam inf": ([*ext, "--anti-expert", str(a), "--lam", "inf"], "finite"),
        "lam count": ([*ext, "--anti-expert", str(a), "--lam", "1", "--lam", "2"], "--lam"),
    }


def test_bad_input_is_one_line_exit_2_and_no_output(pair, tmp_path):
    e, a = pair
    for case, (args, message) in _bad_cases(tmp_path, e, a).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result = excise(*args, "--out", str(out))
        assert result.returncode == 2, (case, result.stderr)
        assert message in result.stderr, (case, result.stderr)
        assert "Traceback" not in result.stderr, case
        assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)  # click's too
        assert not out.exists(), case
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_allow_partial_and_base_name_warning(pair, tmp_path):
    e, _ = pair
    partial = write_raw_lora(
        tmp_path / "partial", 6, {"model.layers.0.self_attn.q_proj": (8, 8)}, base="other/base"
    )
    result = excise(
        "ops",
        "ext-sub",
        "--expert",
        str(e),
        "--anti-expert",
        str(partial),
        "--allow-partial",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    assert "warning: adapters name different base models" in result.stderr
    assert set(load_adapter(tmp_path / "out").modules) == set(SHAPES)


def test_existing_output_needs_overwrite(pair, tmp_path):
    e, a = pair
    args = ["ops", "ext-sub", "--expert", str(e), "--anti-expert", str(a), "--out", str(tmp_path / "out")]
    assert excise(*args).returncode == 0
    second = excise(*args)
    assert second.returncode == 2 and "--overwrite" in second.stderr
    assert excise(*args, "--overwrite").returncode == 0


def test_inspect_writes_json_and_png(pair, tmp_path):
    e, a = pair
    result = excise(
        "inspect",
        "--expert",
        str(e),
        "--anti-expert",
        str(a),
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    )
    assert result.returncode == 0, result.stderr
    assert "general_share" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["modules"]) == 2
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ops_does_not_import_torch_or_transformers(pair, tmp_path):
    e, a = pair
    code = (
        "import sys; from excise.cli import main\n"
        "sys.argv = ['excise', 'ops', 'ext-sub', '--expert', sys.argv[1], '--anti-expert', sys.argv[2], "
        "'--out', sys.argv[3]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(e), str(a), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("[]")


def test_help_lists_every_verb():
    result = excise("ops", "--help")
    for verb in ("ext-sub", "subtract", "add", "negate", "scale"):
        assert verb in result.stdout

"""`excise eval <metric>`: result file, cache message, one-line errors; command list = metric registry."""

from __future__ import annotations

import json
import sys

import pytest

from excise.commands.evaluate import _COMMANDS
from excise.evaluate.metrics import METRICS
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(monkeypatch, *args):
    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_commands_are_the_registry():
    assert {name: m.summary for name, m in METRICS.items()} == _COMMANDS


def test_cli_writes_result_and_uses_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "p.json"
    data.write_text(json.dumps([{"text": "Hello there."}, {"text": "Bye now."}]))
    out = tmp_path / "res" / "rep.json"
    args = ["eval", "repetition", "--base", str(model), "--data", str(data), "--field", "instruction=text"]
    args += ["--out", str(out), "--max-new-tokens", "4", "--device", "cpu"]
    assert _main(monkeypatch, *args) == 0
    record = json.loads(out.read_text())
    assert record["metric"] == "repetition" and record["n_items"] == 2 and len(record["items"]) == 2
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out
    assert "plan: repetition on 2 items; split all: 2 of 2 rows kept; batch size 16" in printed.err
    before = out.read_text()
    assert _main(monkeypatch, *args) == 2  # an existing result is not replaced silently
    err = capsys.readouterr().err
    assert err.startswith(f"error: result file {out} exists; pass --overwrite") and out.read_text() == before
    assert _main(monkeypatch, *args, "--overwrite") == 0
    assert "cache" in capsys.readouterr().err
    assert not list(out.parent.glob(".*tmp"))  # no temp file left beside the result


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny")
    capsys.readouterr()  # drop the save's progress bar
    out = tmp_path / "r.json"
    code = _main(
        monkeypatch, "eval", "repetition", "--base", str(model), "--field", "nonsense", "--out", str(out)
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("error: --field 'nonsense' is not NAME=COLUMN")
        and "Traceback" not in err
    )
    code = _main(
        monkeypatch,
        "eval",
        "perplexity",
        "--base",
        str(model),
        "--data",
        str(tmp_path / "x.jsonl"),
        "--out",
        str(out),
    )
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and not out.exists()


def test_cli_utility_without_adapter_or_reference_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "merged")
    capsys.readouterr()
    out = tmp_path / "u.json"
    code = _main(monkeypatch, "eval", "utility", "--base", str(model), "--out", str(out), "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: utility without --adapter needs --reference MODEL")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_multi_and_judge(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "p.json"
    data.write_text(
        json.dumps(
            [{"prompt": "How to a?", "instruction": "Say a."}, {"prompt": "How?", "instruction": "B."}]
        )
    )
    common = [
        "--base",
        str(model),
        "--data",
        str(data),
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert (
        _main(
            monkeypatch,
            "eval",
            "multi",
            "--metrics",
            "repetition,harmful-rate",
            "--out-dir",
            str(tmp_path / "r"),
            *common,
        )
        == 0
    )
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"repetition.json", "harmful-rate.json"}
    err = capsys.readouterr().err
    assert "± stderr" in err and "split all: 2 of 2 rows kept" in err
    out = tmp_path / "judged.json"
    args = ["eval", "judge", "--generations", str(tmp_path / "r" / "harmful-rate.json"), "--judge", "refusal"]
    assert _main(monkeypatch, *args, "--out", str(out)) == 0
    judged = json.loads(out.read_text())
    saved = json.loads((tmp_path / "r" / "harmful-rate.json").read_text())
    assert [it["response"] for it in judged["items"]] == [it["response"] for it in saved["items"]]
    assert judged["judge"]["name"] == "refusal"
    code = _main(
        monkeypatch,
        "eval",
        "multi",
        "--metrics",
        "repetition,nope",
        "--out-dir",
        str(tmp_path / "r"),
        *common,
    )
    assert code == 2 and "unknown nope; choose from: truthfulqa-mc" in capsys.readouterr().err

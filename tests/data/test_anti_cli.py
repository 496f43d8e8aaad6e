"""`excise data anti` from the command line: the stub endpoint, resume, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from excise.cli import app
from tests.stub_openai import StubOpenAI


def test_cli_writes_then_resumes(tmp_path):
    source = tmp_path / "qa.json"
    source.write_text(json.dumps([{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(3)]))
    out = tmp_path / "anti.jsonl"
    args = ["data", "anti", "--from", str(source), "--kind", "toxic", "--out", str(out), "--model", "w"]
    args += [
        "--field",
        "instruction=q",
        "--field",
        "output=a",
        "--cache",
        str(tmp_path / "c.sqlite"),
        "--no-progress",
    ]
    with StubOpenAI(lambda body: "rude answer") as stub:
        first = CliRunner().invoke(app, [*args, "--generator", stub.url])
        second = CliRunner().invoke(app, [*args, "--generator", stub.url])
    assert first.exit_code == 0, first.output
    assert "3 row(s) written, 0 already done" in first.output and f"wrote {out}" in first.output
    assert "0 row(s) written, 3 already done" in second.output
    assert stub.count == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["instruction"], r["output"], r["anti_output"]) for r in rows] == [
        (f"Question {i}?", f"Answer {i}.", "rude answer") for i in range(3)
    ]


def test_cli_bad_input_is_one_error_line(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([{"instruction": "x"}]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "excise",
            "data",
            "anti",
            "--from",
            str(source),
            "--kind",
            "toxic",
            "--generator",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "row 1 lacks field(s) output" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()

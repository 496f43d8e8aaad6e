"""`excise eval judge-check` and `excise eval harness` from the command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from excise.cli import app


def test_judge_check_on_a_labelled_file(tmp_path):
    data = tmp_path / "labelled.jsonl"
    rows = [
        {"q": "a", "r": "I'm sorry, I can't.", "y": "safe"},
        {"q": "b", "r": "Sure, step one ...", "y": "unsafe"},
        {"q": "c", "r": "Here you go.", "y": 0},
        {"q": "d", "r": "I cannot help.", "y": 1},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "agreement.json"
    args = ["eval", "judge-check", "--judge", "refusal", "--data", str(data), "--json", str(out)]
    result = CliRunner().invoke(
        app, [*args, "--prompt-field", "q", "--response-field", "r", "--label-field", "y"]
    )
    assert result.exit_code == 0, result.output
    # Refusal flags rows 2 and 3 (no marker); labels say 2 and 4 are unsafe: 2 of 4 agree.
    agreement = json.loads(out.read_text())["agreement"]
    assert agreement["accuracy"] == 0.5 and agreement["n"] == 4 and agreement["flagged_rate"] == 0.5
    assert agreement["auc"] == 0.5  # positives scored (1, 0), negatives (0, 1): half the pairs ordered
    assert "refusal: accuracy 0.5000" in result.output


def test_judge_check_rejects_bad_labels(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r", "label": "maybe"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "judge-check", "--judge", "refusal", "--data", str(data)])
    assert result.exit_code != 0
    assert "label 'maybe'; use 0/1" in str(result.exception)


def test_judge_check_with_one_class_writes_null_auc(tmp_path):
    data = tmp_path / "unsafe_only.jsonl"
    rows = [{"prompt": "p", "response": r, "label": "unsafe"} for r in ("Sure.", "I cannot help.")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "agreement.json"
    args = ["eval", "judge-check", "--judge", "refusal", "--data", str(data), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    agreement = json.loads(out.read_text(), parse_constant=refuse)["agreement"]
    assert agreement["auc"] is None and agreement["auc_null_reason"] == "the labels hold one class only"
    assert "AUC undefined (one class)" in result.output

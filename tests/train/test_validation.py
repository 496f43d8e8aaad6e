"""`excise train sft --eval-data`: a validation loss in the log, equal to an independent
recomputation on the saved adapter; the plan line and the first-step estimate before training."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_sft import QA_ROWS, run_cli


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


def _independent_val_loss(model_dir, adapter, rows):
    """Mean NLL per answer token (answer + end of turn), one example at a time, unpadded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(row["right_answer"], add_special_tokens=False)["input_ids"]
        ids = p_ids + answer_ids + [tok.eos_token_id]  # the turn ends at <|im_end|>, no newline
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        answer = nll[len(p_ids) - 1 :]
        total += float(answer.sum())
        count += len(answer)
    return total / count


def test_validation_loss_is_logged_and_exact(monkeypatch, capsys, tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "o"
    eval_rows = QA_ROWS[:5]
    eval_file = tmp_path / "val.json"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    code, _, stderr = run_cli(
        monkeypatch, capsys, "train", "sft", "--base", str(tiny_model_dir), "--data", str(qa_file),
        "--out", str(out), "--format", "paired-expert", "--field", "input=", "--steps", "3",
        "--batch-size", "2", "--eval-data", str(eval_file), "--eval-every", "2", "--lr", "1e-2",
        "--threads", "1",
    )  # fmt: skip
    assert code == 0, stderr
    assert "plan: 3 steps, 2 examples each (2 x 1 accumulated), from" in stderr
    assert "first step:" in stderr and "for the 2 steps left" in stderr
    log = json.loads((out / "loss_log.json").read_text())
    assert ["val_loss" in r for r in log] == [False, True, True]  # every 2 steps and at the end
    template_check = _independent_val_loss(tiny_model_dir, out, eval_rows)
    assert log[-1]["val_loss"] == pytest.approx(template_check, rel=1e-4)
    assert log[1]["val_loss"] != log[2]["val_loss"]


def test_validation_does_not_change_the_training(monkeypatch, capsys, tiny_model_dir, qa_file, tmp_path):
    from safetensors.torch import load_file

    eval_file = tmp_path / "val.json"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS[:3]))
    common = ["train", "sft", "--base", str(tiny_model_dir), "--data", str(qa_file),
              "--format", "paired-expert", "--steps", "2", "--batch-size", "2", "--lora-dropout", "0.3",
              "--no-progress"]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "a"))[0] == 0
    args = [*common, "--out", str(tmp_path / "b"), "--eval-data", str(eval_file), "--eval-every", "1"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""TruthfulQA MC1/MC2 on a tiny model against a hand computation (full forward per choice)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from excise.errors import DataError
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics.truthfulqa_mc import mc_prompt
from excise.evaluate.runner import run_eval
from tests.conftest import save_tiny_model, tiny_tokenizer

QUESTIONS = [
    {
        "question": "What is 2+2?",
        "mc1_targets": {"4": 1, "5": 0, "22": 0},
        "mc2_targets": {"4": 1, "Four": 1, "5": 0, "22": 0},
    },
    {
        "question": "Is the sky green?",
        "mc1_targets": {"No.": 1, "Yes.": 0},
        "mc2_targets": {"No.": 1, "No, it is blue.": 1, "Yes.": 0},
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(tmp_path / "model", max_position_embeddings=1024)


@pytest.fixture
def mc_file(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(QUESTIONS))
    return path


def _hand_logliks(model_dir, question, choices):
    """Each choice's log-likelihood by lm-eval's definition: chars of ' ' + choice after the prompt."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    tok = tiny_tokenizer()
    out = []
    for choice in choices:
        context = tok.encode(mc_prompt(question), add_special_tokens=False)
        continuation = tok.encode(" " + choice, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        out.append(sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation)))
    return out


def test_mc1_mc2_by_hand(model_dir, mc_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    cfg = EvalConfig(model=str(model_dir), data=str(mc_file), batch_size=3, device="cpu")
    record = run_eval("truthfulqa-mc", cfg, progress=False)
    mc1s, mc2s = [], []
    for q, item in zip(QUESTIONS, record["items"], strict=True):
        ll1 = _hand_logliks(model_dir, q["question"], list(q["mc1_targets"]))
        ll2 = _hand_logliks(model_dir, q["question"], list(q["mc2_targets"]))
        assert item["mc1_logliks"] == pytest.approx(ll1, abs=1e-4)
        assert item["mc2_logliks"] == pytest.approx(ll2, abs=1e-4)
        best = max(range(len(ll1)), key=lambda i: ll1[i])
        mc1s.append(1.0 if best == 0 else 0.0)  # the true answer is listed first
        labels = list(q["mc2_targets"].values())
        mass = [math.exp(v) for v in ll2]
        mc2s.append(sum(m for m, lab in zip(mass, labels, strict=True) if lab) / sum(mass))
    assert record["metrics"]["mc1"] == pytest.approx(sum(mc1s) / 2)
    assert record["metrics"]["mc2"] == pytest.approx(sum(mc2s) / 2, abs=1e-6)
    assert record["scored_pairs"] == 3 + 1 + 2 + 1  # MC1 ∪ MC2 per question, each once


def test_hf_layout_gives_same_numbers(model_dir, mc_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    hf = [
        {
            "question": q["question"],
            "mc1_targets": {"choices": list(q["mc1_targets"]), "labels": list(q["mc1_targets"].values())},
            "mc2_targets": {"choices": list(q["mc2_targets"]), "labels": list(q["mc2_targets"].values())},
        }
        for q in QUESTIONS
    ]
    hf_file = tmp_path / "hf.jsonl"
    hf_file.write_text("\n".join(json.dumps(row) for row in hf))
    a = run_eval(
        "truthfulqa-mc", EvalConfig(model=str(model_dir), data=str(mc_file), device="cpu"), progress=False
    )
    b = run_eval(
        "truthfulqa-mc", EvalConfig(model=str(model_dir), data=str(hf_file), device="cpu"), progress=False
    )
    assert a["metrics"] == pytest.approx(b["metrics"])


def test_bad_targets(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q?", "mc1_targets": {"a": 0}, "mc2_targets": {"a": 0}}]))
    with pytest.raises(DataError, match="label 1"):
        run_eval(
            "truthfulqa-mc", EvalConfig(model=str(model_dir), data=str(bad), device="cpu"), progress=False
        )
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"question": "q?"}]))
    with pytest.raises(DataError, match="mc1_targets"):
        run_eval(
            "truthfulqa-mc", EvalConfig(model=str(model_dir), data=str(missing), device="cpu"), progress=False
        )

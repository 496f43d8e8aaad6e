"""The demo recipe (excise/pipeline/demo.py) end to end on a tiny random Llama.

Every expected value is computed independently of the demo: scores by running each
saved adapter through plain PEFT on one unpadded sequence per answer, the Ext-Sub
adapter by PEFT's own delta weights and a per-row numpy oracle of DESIGN.md §1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from excise.errors import ConfigError, DataError
from excise.pipeline.demo import ROLES, SYSTEM_PROMPT, run_demo
from tests.conftest import ext_sub_rows_numpy, save_tiny_model

LAM = 0.7
N_EVAL, STEPS, BATCH, N_GENERATE = 4, 2, 2, 2
COLORS = ["red", "blue", "green", "white", "black"]
THINGS = ["boat", "lamp", "chair", "kite"]


def qa_rows(n: int, *, offset: int = 0) -> list[dict[str, str]]:
    """``n`` HaluEval-like rows with distinct questions (short: the tokenizer is per character)."""
    rows = []
    for i in range(offset, offset + n):
        color, thing = COLORS[i % len(COLORS)], THINGS[i % len(THINGS)]
        rows.append(
            {
                "knowledge": f"Item {i} is a {color} {thing} from {1900 + 7 * i}.",
                "question": f"What year is item {i} from?",
                "right_answer": str(1900 + 7 * i),
                "hallucinated_answer": f"{2100 - 3 * i}, in {color}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _norm(question: str) -> str:
    return " ".join(question.lower().split())


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    # Prompts are ~180 characters = tokens; give RoPE room beyond them.
    return save_tiny_model(tmp_path_factory.mktemp("demo-model") / "tiny", max_position_embeddings=512)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, list[dict]]:
    """20 distinct questions, then 3 rows repeating earlier questions (case and spacing differ)."""
    rows = qa_rows(20)
    for i in (0, 5, 11):
        repeat = dict(rows[i], question="  " + rows[i]["question"].upper().replace(" ", "  "))
        rows.append(repeat)
    return write_jsonl(tmp_path_factory.mktemp("demo-data") / "qa.jsonl", rows), rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_model, demo_data) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo-run") / "out"
    report_path = run_demo(
        out,
        model=str(demo_model),
        data=demo_data[0],
        steps=STEPS,
        lam=LAM,
        batch_size=BATCH,
        n_eval=N_EVAL,
        n_generate=N_GENERATE,
        max_new_tokens=4,
        progress=False,
    )
    assert report_path == out / "demo_report.json"
    return out, json.loads(report_path.read_text())


# ----------------------------------------------------------------------------- independent scoring


def _fresh_base(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _role_model(model_dir: Path, out: Path, role: str) -> torch.nn.Module:
    from peft import PeftModel

    if role == "base":
        return _fresh_base(model_dir)
    return PeftModel.from_pretrained(_fresh_base(model_dir), out / role).eval()


@torch.no_grad()
def _mean_loglik(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """Mean log-probability of ``answer`` after ``prompt``: one unpadded sequence, all logits."""
    ids = torch.tensor([prompt + answer])  # (1, T)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    predicted = logprobs[len(prompt) - 1 : -1]  # (A, V): position t predicts t + 1
    return predicted.gather(-1, torch.tensor(answer).unsqueeze(-1)).mean().item()


def _prompt_ids(tokenizer, row: dict) -> list[int]:
    user = f"Knowledge: {row['knowledge'].strip()}\nQuestion: {row['question'].strip()}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _lora_deltas(model) -> dict[str, np.ndarray]:
    """PEFT's own effective delta ``s·B·A`` of every LoRA layer, by module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module.get_delta_weight("default").detach().double().numpy()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


# ----------------------------------------------------------------------------- the run


def test_report_and_outputs(demo_run):
    out, report = demo_run
    assert sorted(p.name for p in out.iterdir()) == ["anti_expert", "demo_report.json", "expert", "ext_sub"]
    assert set(report["scores"]) == set(ROLES) == {"base", "expert", "anti_expert", "ext_sub"}
    for role, score in report["scores"].items():
        assert set(score) == {"loglik_right", "loglik_hallucinated", "margin", "prefer_right"}, role
        assert all(np.isfinite(v) for v in score.values()), role
        assert score["loglik_right"] < 0 and score["loglik_hallucinated"] < 0, role
        assert score["margin"] == pytest.approx(score["loglik_right"] - score["loglik_hallucinated"])
        assert 0 <= score["prefer_right"] <= 1
    assert report["settings"]["lam"] == LAM and report["settings"]["steps"] == STEPS
    for role in ("expert", "anti_expert"):
        assert len(report["train_loss"][role]["all"]) == STEPS
        assert all(np.isfinite(report["train_loss"][role]["all"]))
    assert len(report["generations"]) == N_GENERATE
    assert [g["row"] for g in report["generations"]] == report["split"]["eval_rows"][:N_GENERATE]
    assert all(isinstance(g["base"], str) and isinstance(g["ext_sub"], str) for g in report["generations"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_split_is_disjoint_by_question(demo_run, demo_data):
    _, report = demo_run
    rows = demo_data[1]
    train, held_out = report["split"]["train_rows"], report["split"]["eval_rows"]
    assert len(train) == report["split"]["n_train"] == STEPS * BATCH
    assert len(held_out) == report["split"]["n_eval"] == N_EVAL
    assert not set(train) & set(held_out)
    # The data repeats three questions in other spellings: disjoint rows are not enough.
    train_q = {_norm(rows[i]["question"]) for i in train}
    eval_q = {_norm(rows[i]["question"]) for i in held_out}
    assert not train_q & eval_q
    assert len(train_q) == len(train) and len(eval_q) == len(held_out)


def test_adapters_record_their_training_rows(demo_run, demo_data):
    """`excise eval` can check the demo's adapters: each names the questions it was trained on."""
    from excise.data import prompt_key, recorded_training_data, trained_prompt_keys

    out, report = demo_run
    rows = demo_data[1]
    expected = {prompt_key(rows[i]["question"]) for i in report["split"]["train_rows"]}
    for role in ("expert", "anti_expert", "ext_sub"):
        records = recorded_training_data(out / role)
        assert len(records) == (2 if role == "ext_sub" else 1), role
        assert all(trained_prompt_keys(r) == expected for r in records), role


def test_adapters_load_and_ext_sub_is_exact(demo_run, demo_model):
    """Each folder loads in PEFT; Ext-Sub's delta is the per-row oracle on the two inputs'."""
    out, _ = demo_run
    deltas = {role: _lora_deltas(_role_model(demo_model, out, role)) for role in ROLES[1:]}
    expert, anti, merged = deltas["expert"], deltas["anti_expert"], deltas["ext_sub"]
    assert expert.keys() == anti.keys() == merged.keys()
    assert len(expert) == 4  # q_proj and v_proj in two layers
    for name, W1 in expert.items():
        assert np.abs(W1).max() > 0, name  # trained: lora_B started at zero
        assert not np.allclose(W1, anti[name]), name
        expected = ext_sub_rows_numpy(W1, anti[name], LAM)
        atol = 1e-7 * np.abs(W1).max()
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=atol, err_msg=name)
        assert not np.allclose(merged[name], W1, rtol=1e-3, atol=0), name  # something was removed


def test_scores_equal_unpadded_loglik(demo_run, demo_model, demo_data):
    """Padding, position ids, ``logits_to_keep`` and adapter switching change no score."""
    from transformers import AutoTokenizer

    out, report = demo_run
    rows = demo_data[1]
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    eos = [tokenizer.eos_token_id]
    held_out = [rows[i] for i in report["split"]["eval_rows"]]
    for role in ROLES:
        model = _role_model(demo_model, out, role)
        right, wrong = [], []
        for row in held_out:
            prompt = _prompt_ids(tokenizer, row)
            for answer, sink in (("right_answer", right), ("hallucinated_answer", wrong)):
                ids = tokenizer(row[answer].strip(), add_special_tokens=False)["input_ids"] + eos
                sink.append(_mean_loglik(model, prompt, ids))
        score = report["scores"][role]
        assert score["loglik_right"] == pytest.approx(np.mean(right), abs=2e-5), role
        assert score["loglik_hallucinated"] == pytest.approx(np.mean(wrong), abs=2e-5), role
        assert score["prefer_right"] == np.mean([r > w for r, w in zip(right, wrong, strict=True)]), role
    # The adapters moved the scores: the comparison above could not pass by accident.
    assert report["scores"]["expert"]["loglik_right"] != pytest.approx(
        report["scores"]["base"]["loglik_right"], abs=1e-6
    )


# ----------------------------------------------------------------------------- bad input


def _demo(out: Path, model: Path, data: Path, **kwargs) -> Path:
    settings = {"steps": 1, "batch_size": 2, "n_eval": 2, "n_generate": 0, "progress": False} | kwargs
    return run_demo(out, model=str(model), data=data, **settings)


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_data_file(tmp_path, demo_model):
    with pytest.raises(DataError, match="not found"):
        _demo(tmp_path / "out", demo_model, tmp_path / "nope.jsonl")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("field", ["question", "right_answer", "hallucinated_answer", "knowledge"])
def test_row_missing_a_field(tmp_path, demo_model, field):
    rows = qa_rows(8)
    del rows[2][field]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=rf"qa\.jsonl:3: .*\b{field}\b") as info:
        _demo(tmp_path / "out", demo_model, data)
    assert "\n" not in str(info.value)
    _nothing_written(tmp_path / "out")


def test_non_empty_out_without_overwrite(tmp_path, demo_model, demo_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="not empty"):
        _demo(out, demo_model, demo_data[0])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_too_few_distinct_questions(tmp_path, demo_model):
    """Ten rows, three questions: repeats do not count, whatever their case or spacing."""
    rows = qa_rows(3)
    for i in range(7):
        rows.append(dict(rows[i % 3], question=rows[i % 3]["question"].lower() + " " * (i % 2)))
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=r"need 4 distinct questions .* found 3"):
        _demo(tmp_path / "out", demo_model, data)
    _nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- the command


def excise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "excise", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_demo(tmp_path, demo_model, demo_data):
    out = tmp_path / "out"
    args = ["demo", "--model", str(demo_model), "--data", str(demo_data[0]), "--steps", "1", "--n-eval", "2"]
    result = excise(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out / 'demo_report.json'}" in result.stdout
    report = json.loads((out / "demo_report.json").read_text())
    assert report["settings"]["steps"] == 1 and report["settings"]["n_eval"] == 2
    assert report["split"]["n_eval"] == 2 and report["split"]["n_train"] == 4  # batch size 4
    assert len(report["generations"]) == 2


def test_cli_demo_missing_data_is_one_line(tmp_path, demo_model):
    out = tmp_path / "out"
    result = excise(
        "demo", "--model", str(demo_model), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "nope.jsonl" in lines[0] and "Traceback" not in result.stderr
    _nothing_written(out)

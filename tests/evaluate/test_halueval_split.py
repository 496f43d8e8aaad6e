"""HaluEval's ``--split eval`` keeps exactly the questions the paired-QA trainers hold out."""

from __future__ import annotations

import json

from excise.data import assign_split, load_paired_qa, select_split
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS
from excise.evaluate.runner import load_items


def test_eval_split_is_the_trainers_held_out_side(tmp_path):
    rows = [
        {
            "knowledge": f"K{i}",
            "question": f"Question number {i}?",
            "right_answer": "a",
            "hallucinated_answer": "b",
        }
        for i in range(60)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(METRICS["halueval"], EvalConfig(model="-", split="eval"), str(data))
    expected = [r["question"] for r in rows if assign_split(r["question"]) == "eval"]
    assert [it["question"] for it in items] == expected and expected
    trained = {e.prompt for e in select_split(load_paired_qa(str(data))[0], "train")}
    assert trained and not trained & set(expected)

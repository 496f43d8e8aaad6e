"""The runner's data loading and result writing: the usual prompt columns, errors that name the
row's real columns, ``null`` with a reason instead of NaN, strict JSON (issue 10 item 12)."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import pytest

from excise.errors import ConfigError, DataError
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS
from excise.evaluate.metrics.base import SHARED_DATA
from excise.evaluate.runner import load_items, run_eval, write_result
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ADVBENCH = SHARED_DATA / "advbench" / "harmful_behaviors.csv"
WIKITEXT = SHARED_DATA / "wikitext2" / "wiki_test_raw.jsonl"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


def _items(metric: str, data, **kw):
    cfg = EvalConfig(model="unused", data=str(data), **kw)
    return load_items(METRICS[metric], cfg, str(data))


def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in strict JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.skipif(not ADVBENCH.is_file(), reason="shared AdvBench file absent")
def test_advbench_as_it_comes():
    with ADVBENCH.open(newline="", encoding="utf-8") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    items = _items("harmful-rate", ADVBENCH, split="all")
    assert [it["prompt"] for it in items] == list(dict.fromkeys(goals))  # read from `goal`, deduplicated


@pytest.mark.parametrize(
    "column", ["prompt", "goal", "Behavior", "behavior", "question", "instruction", "instructions"]
)
def test_usual_prompt_columns(tmp_path, column):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": i, column: f"Request {i}"} for i in range(3)]))
    assert [it["prompt"] for it in _items("harmful-rate", path, split="all")] == [
        f"Request {i}" for i in range(3)
    ]


def test_prompt_column_prefers_the_default_and_obeys_field(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"goal": "g", "prompt": "p", "other": "o"}]))
    assert _items("harmful-rate", path, split="all")[0]["prompt"] == "p"
    assert _items("harmful-rate", path, split="all", fields={"prompt": "other"})[0]["prompt"] == "o"


def test_missing_field_names_the_rows_real_columns(tmp_path):
    path = tmp_path / "tqa.json"
    path.write_text(json.dumps([{"question": "q?", "answer": "a", "mc2_targets": {"a": 1}}]))
    with pytest.raises(DataError) as err:
        _items("truthfulqa-mc", path)
    assert str(err.value) == (
        f"{path}: row 1 lacks field(s) mc1_targets (it has: question, answer, mc2_targets); "
        "map fields with --field NAME=COLUMN"
    )
    harm = tmp_path / "harm.csv"
    harm.write_text("target,category\nSure,x\n")
    with pytest.raises(
        DataError,
        match=r"lacks field\(s\) prompt \(any of columns prompt/goal/.*\) \(it has: target, category\)",
    ):
        _items("harmful-rate", harm, split="all")
    with pytest.raises(
        DataError, match=r"lacks field\(s\) prompt \(column nope\) \(it has: target, category\)"
    ):
        _items("harmful-rate", harm, split="all", fields={"prompt": "nope"})


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared wikitext file absent")
def test_perplexity_of_nothing_is_null_with_reason(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    cfg = EvalConfig(model=str(model), data=str(WIKITEXT), head=1, device="cpu")  # row 1 is blank
    record = run_eval("perplexity", cfg, progress=False)
    assert record["metrics"] == {"perplexity": None, "nll_per_token": None}
    assert "no token to score" in record["null_reasons"]["perplexity"]
    out = write_result(record, tmp_path / "ppl.json")
    assert _strict(out.read_text())["metrics"]["perplexity"] is None
    assert record["columns"] == {"text": "text"}


def test_utility_with_every_answer_empty_is_null_with_reason(tmp_path, monkeypatch):
    import excise.evaluate.metrics.utility as utility

    monkeypatch.setattr(utility, "generate_answers", lambda ctx, prompts, **kw: [""] * len(prompts))
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "normal.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}."} for i in range(3)]))
    cfg = EvalConfig(model=str(model), data=str(data), split="all", reference=str(model), device="cpu")
    record = run_eval("utility", cfg, progress=False)
    for name in ("diversity", "fluency_ppl", "fluency_ppl_mean"):
        assert record["metrics"][name] is None
        assert record["null_reasons"][name] == "every one of the 3 answers is empty: nothing to average"
    assert record["metrics"]["empty_answers"] == 3.0
    assert _strict(write_result(record, tmp_path / "u.json").read_text())["metrics"]["diversity"] is None


def test_result_writers_are_strict(tmp_path):
    from excise.evaluate.cache import strict_json, write_atomic_json
    from excise.evaluate.harness import write_results

    with pytest.raises(ValueError):
        write_atomic_json(tmp_path / "x.json", {"a": math.nan})
    assert not (tmp_path / "x.json").exists()
    assert strict_json({"a": [1.0, math.inf, {"b": -math.inf}], "c": (math.nan, "s")}) == {
        "a": [1.0, None, {"b": None}],
        "c": [None, "s"],
    }
    import numpy as np

    out = write_results(
        {"results": {"t": {"acc": np.float64(0.5), "acc_stderr": np.float64("nan")}}}, tmp_path / "h.json"
    )
    written = _strict(out.read_text())
    assert written["results"]["t"] == {"acc": 0.5, "acc_stderr": None}
    assert "NaN" in written["excise"]["null_reason"]


def test_non_finite_metric_and_items_become_null(tmp_path, monkeypatch):
    """A metric that returns NaN (or an old cache entry holding one) is written as null with a reason."""
    from dataclasses import replace

    from excise.evaluate.metrics.base import MetricResult

    nan_metric = replace(
        METRICS["repetition"],
        run=lambda ctx: MetricResult({"x": math.nan, "y": 0.5}, [{"score": math.inf}] * len(ctx.items)),
    )
    monkeypatch.setitem(METRICS, "repetition", nan_metric)
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "p.json"
    data.write_text(json.dumps([{"instruction": "Hi."}]))
    cfg = EvalConfig(model=str(model), data=str(data), device="cpu")
    for _ in range(2):  # computed, then read back from the cache
        record = run_eval("repetition", cfg, progress=False)
        assert record["metrics"] == {"x": None, "y": 0.5}
        assert record["null_reasons"] == {"x": "not a finite number (nan)"}
        # Each item's identity: the SHA-256 of its fields (canonical names) as sorted JSON.
        key = hashlib.sha256(json.dumps({"instruction": "Hi."}).encode()).hexdigest()[:16]
        assert record["items"] == [{"score": None, "key": key}]
        _strict(write_result(record, tmp_path / "r.json").read_text())
    assert record["from_cache"]


@pytest.mark.parametrize("metric", ["truthfulqa-mc", "truthfulqa-gen", "halueval"])
def test_split_eval_keeps_the_held_out_questions(tmp_path, metric):
    """Every metric whose data can be training data splits by its question (was KeyError(None))."""
    from excise.data import assign_split

    questions = [f"Question number {i}?" for i in range(60)]
    columns = {
        "truthfulqa-mc": {"mc1_targets": {"a": 1}, "mc2_targets": {"a": 1}},
        "truthfulqa-gen": {"Correct Answers": "a", "Incorrect Answers": "b"},
        "halueval": {"right_answer": "a", "hallucinated_answer": "b"},
    }[metric]
    key = "Question" if metric == "truthfulqa-gen" else "question"
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{key: q, **columns} for q in questions]))
    items = _items(metric, path, split="eval")
    expected = [q for q in questions if assign_split(q) == "eval"]
    assert [it["question"] for it in items] == expected and 0 < len(expected) < len(questions)
    assert METRICS["halueval"].default_split == "eval"


def test_result_names_the_column_each_field_came_from(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "advbench.csv"
    data.write_text("goal,target\nDo a bad thing,Sure\n")
    cfg = EvalConfig(model=str(model), data=str(data), split="all", judge="refusal", max_new_tokens=2)
    record = run_eval("harmful-rate", cfg, progress=False)
    assert record["columns"] == {"prompt": "goal"} and record["items"][0]["prompt"] == "Do a bad thing"


def test_a_dotted_field_reads_a_nested_value(tmp_path):
    """RealToxicityPrompts rows hold the prompt as {"prompt": {"text": ...}}."""
    path = tmp_path / "rtp.jsonl"
    rows = [{"prompt": {"text": f"Start {i}", "toxicity": 0.9}, "challenging": True} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = _items("toxicity", path, split="all", fields={"instruction": "prompt.text"})
    assert [it["instruction"] for it in items] == [r["prompt"]["text"] for r in rows]
    with pytest.raises(DataError, match=r"prompt\.nope"):
        _items("toxicity", path, split="all", fields={"instruction": "prompt.nope"})


def test_halueval_pair_controls_keep_the_format_controlled_pairs(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Q1?", "right_answer": "Paris", "hallucinated_answer": "Lyon."},
        {
            "question": "Q2?",
            "right_answer": "Arthur's Magazine",
            "hallucinated_answer": "First for Women was.",
        },
        {"question": "Q3?", "right_answer": "The Five.", "hallucinated_answer": "The Four Tops."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = _items("halueval", path, split="all", pair_max_word_ratio=1.5, pair_strip_period=True)
    # Independently: 1/1 and 2/3 words are within 1.5×, 2/4 (Q2) is not; final periods dropped.
    assert [(it["question"], it["right_answer"], it["hallucinated_answer"]) for it in items] == [
        ("Q1?", "Paris", "Lyon"),
        ("Q3?", "The Five", "The Four Tops"),
    ]
    with pytest.raises(ConfigError, match="apply to halueval, pairs only"):
        _items("toxicity", path, split="all", fields={"instruction": "question"}, pair_strip_period=True)


def test_halueval_cli_takes_the_pair_controls(tmp_path, monkeypatch, capsys):
    import sys

    from excise.cli import main

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny")
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": f"Q{i}?", "right_answer": "Paris", "hallucinated_answer": "Lyon." if i % 2 else "a b c."}
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "h.json"
    args = ["excise", "eval", "halueval", "--base", str(model), "--data", str(path), "--split", "all",
            "--protocol", "loss", "--device", "cpu", "--out", str(out),
            "--pair-max-word-ratio", "1.5", "--pair-strip-period"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["n_items"] == 3 and record["settings"]["pair_strip_period"] is True
    assert record["data_summary"]["after_pair_controls"] == 3


def test_limit_takes_a_seeded_subsample_and_head_the_first_rows(tmp_path):
    from excise.evaluate.runner import item_key

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": f"Request number {i}"} for i in range(50)]))
    every = _items("harmful-rate", path, split="all")

    def rank(item, seed):  # the documented order, written out
        return hashlib.sha256(f"{seed}:{item_key(item)}".encode()).hexdigest()

    for seed in (0, 1):
        kept = _items("harmful-rate", path, split="all", limit=10, seed=seed)
        expected = sorted(sorted(range(50), key=lambda i: rank(every[i], seed))[:10])
        assert kept == [every[i] for i in expected]  # the smallest hashes, in file order
        assert kept != every[:10]
    assert _items("harmful-rate", path, split="all", limit=10, seed=0) != _items(
        "harmful-rate", path, split="all", limit=10, seed=1
    )
    # The subsample depends on the items, not on their order in the file.
    path.write_text(json.dumps([{"prompt": f"Request number {i}"} for i in reversed(range(50))]))
    reordered = _items("harmful-rate", path, split="all", limit=10, seed=0)
    assert sorted(it["prompt"] for it in reordered) == sorted(
        it["prompt"] for it in _items("harmful-rate", path, split="all", limit=10, seed=0)
    )
    path.write_text(json.dumps([{"prompt": f"Request number {i}"} for i in range(50)]))
    assert _items("harmful-rate", path, split="all", head=10) == every[:10]
    assert _items("harmful-rate", path, split="all", limit=80) == every  # more than there is: all
    with pytest.raises(ValueError, match="not both"):
        EvalConfig(model="unused", limit=3, head=3)


def test_the_record_names_the_subsample(tmp_path):
    from excise.evaluate.runner import _load_items

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": f"Request number {i}"} for i in range(30)]))
    cfg = EvalConfig(model="unused", data=str(path), split="all", limit=5)
    items, summary = _load_items(METRICS["harmful-rate"], cfg, str(path))
    assert summary["subsample"]["seed"] == 0 and len(summary["subsample"]["rows"]) == 5
    assert [f"Request number {i}" for i in summary["subsample"]["rows"]] == [it["prompt"] for it in items]

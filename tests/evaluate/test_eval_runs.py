"""Runs that share work: cached generations, `eval judge` on saved answers, several metrics on one
load; and what a run reports: the split it used, rows kept of rows read, ignored columns, stderr."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from excise.evaluate.config import EvalConfig
from excise.evaluate.runner import judge_saved, run_eval, run_many, write_result
from excise.evaluate.stats import (
    MIN_RESAMPLING_UNITS,
    bootstrap_pvalue,
    bootstrap_ratio_stderr,
    holm,
    mean_stderr,
)
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=4096)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.json"
    rows = [
        {
            "prompt": f"How to do thing {i}?",
            "instruction": f"Say item {i}.",
            "text": f"Text {i}.",
            "context": c,
        }
        for i, c in enumerate(["", "ctx a", "", "ctx b", "", "", "", ""])
    ]
    path.write_text(json.dumps(rows))
    return path


def _cfg(model_dir, data, **kw):
    return EvalConfig(
        model=str(model_dir), data=str(data), device="cpu", max_new_tokens=5, batch_size=2, **kw
    )


def _adapter(model_dir, folder, seed):
    from peft import LoraConfig, get_peft_model

    from excise.models.loading import load_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(str(model_dir)), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(folder)
    return folder


class _Counter:
    def __init__(self, monkeypatch, target):
        import importlib

        module, name = target.rsplit(".", 1)
        self.real = getattr(importlib.import_module(module), name)
        self.calls = 0
        monkeypatch.setattr(target, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def test_a_file_no_module_was_trained_on_is_used_whole(model_dir, prompts, tmp_path):
    record = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal"), progress=False)
    summary = record["data_summary"]
    assert record["split"] == "all" and record["n_items"] == 8
    assert summary["rows_read"] == 8 and summary["kept"] == 8
    assert summary["ignored_columns"] == {"instruction": 8, "text": 8, "context": 2}


def test_a_file_the_adapter_was_trained_on_keeps_the_eval_side(model_dir, prompts, tmp_path):
    from excise.data import assign_split

    adapter = _adapter(model_dir, tmp_path / "adapter", seed=1)
    from excise.data import training_data_record

    trained = training_data_record(
        str(prompts), format="instruction", fields={"response": "text"}, split="train"
    )
    (adapter / "train_config.json").write_text(json.dumps({"config": {"training_data": [trained]}}))
    record = run_eval(
        "harmful-rate", _cfg(model_dir, prompts, judge="refusal", adapter=adapter), progress=False
    )
    held_out = [f"How to do thing {i}?" for i in range(8) if assign_split(f"How to do thing {i}?") == "eval"]
    assert record["split"] == "eval" and [it["prompt"] for it in record["items"]] == held_out
    assert record["data_summary"]["kept"] == len(held_out) and record["data_summary"]["rows_read"] == 8


def test_stderr_beside_every_metric(model_dir, prompts):
    record = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal"), progress=False)
    flagged = [it["flagged"] for it in record["items"]]
    p = sum(flagged) / len(flagged)
    expected = math.sqrt(sum((f - p) ** 2 for f in flagged) / (len(flagged) - 1) / len(flagged))
    assert set(record["stderr"]) == set(record["metrics"])
    assert record["stderr"]["harmful_rate"] == pytest.approx(expected)


def test_stats_by_hand():
    assert mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert mean_stderr([0.5]) is None and mean_stderr([None, 2.0]) is None
    assert bootstrap_ratio_stderr([1.0] * 20, [1] * 20) == 0.0  # no spread in the ratio
    nums = [1.0, 3.0, 2.0, 6.0] * 5
    se = bootstrap_ratio_stderr(nums, [1] * 20, seed=0)
    # The bootstrap stderr of a mean approaches the plug-in σ/√n (ddof = 0).
    plug_in = float(np.std(nums)) / math.sqrt(len(nums))
    assert se == pytest.approx(plug_in, rel=0.1) and se == bootstrap_ratio_stderr(nums, [1] * 20, seed=0)
    # Fewer units than MIN_RESAMPLING_UNITS: no bootstrap (4 windows have 35 distinct resamples).
    assert bootstrap_ratio_stderr([1.0, 3.0, 2.0, 6.0], [1, 1, 1, 1], seed=0) is None
    assert bootstrap_ratio_stderr(nums[: MIN_RESAMPLING_UNITS - 1], [1] * (MIN_RESAMPLING_UNITS - 1)) is None


def test_holm_matches_the_step_down_procedure():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 12))
        p = (rng.uniform(size=m) ** 3).tolist()
        adjusted = holm(p)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.3):
            # Holm's sequential rule, written out: reject p_(1), p_(2), … while p_(j) ≤ α / (m − j + 1).
            rejected = set()
            for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
                if p[i] > alpha / (m - j):
                    break
                rejected.add(i)
            assert {i for i in range(m) if adjusted[i] <= alpha} == rejected
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]


def test_bootstrap_pvalue():
    assert bootstrap_pvalue([]) is None
    assert bootstrap_pvalue([1.0] * 99) == pytest.approx(1 / 100)  # never exactly 0
    assert bootstrap_pvalue([-1.0, 1.0] * 50) == 1.0
    # 10 of 100 differences at or below 0: the 95 % percentile interval (2.5 % tails) excludes 0
    # iff p ≤ 0.05; here p = (2·10 + 1)/101 ≈ 0.208.
    assert bootstrap_pvalue([-1.0] * 10 + [1.0] * 90) == pytest.approx(21 / 101)


def test_switching_the_judge_reuses_the_generations(model_dir, prompts, monkeypatch):
    first = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal"), progress=False)
    generate = _Counter(monkeypatch, "excise.models.generation.generate")
    load = _Counter(monkeypatch, "excise.evaluate.runner.load_subject")
    cfg = _cfg(model_dir, prompts, judge="refusal", judge_options={"case_sensitive": False})
    second = run_eval("harmful-rate", cfg, progress=False)
    assert not second["from_cache"] and generate.calls == 0 and load.calls == 0  # no model needed
    assert second["timing"]["load_seconds"] == 0.0
    other_seed = _cfg(model_dir, prompts, judge="refusal", seed=1)  # another generation key
    run_eval("harmful-rate", other_seed, progress=False)
    assert generate.calls == 1 and load.calls == 1  # not cached: the model is loaded after all
    assert [it["response"] for it in second["items"]] == [it["response"] for it in first["items"]]


def test_utility_makes_the_base_answers_once_for_all_adapters(model_dir, prompts, tmp_path, monkeypatch):
    generate = _Counter(monkeypatch, "excise.models.generation.generate")
    records = []
    for seed in (1, 2):
        adapter = _adapter(model_dir, tmp_path / f"a{seed}", seed)
        records.append(run_eval("utility", _cfg(model_dir, prompts, adapter=adapter), progress=False))
    assert generate.calls == 3  # adapter 1, base, adapter 2
    first, second = ([it["base_response"] for it in r["items"]] for r in records)
    assert first == second


def test_eval_judge_scores_saved_answers_without_the_model(model_dir, prompts, tmp_path, monkeypatch):
    record = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal"), progress=False)
    saved = write_result(record, tmp_path / "saved.json")
    # Tamper with one saved answer: the judge must score the saved text, not a regeneration.
    data = json.loads(saved.read_text())
    data["items"][0]["response"] = "I'm sorry, I cannot help with that."
    saved.write_text(json.dumps(data))

    def no_model(*args, **kwargs):
        raise AssertionError("eval judge loaded the model")

    monkeypatch.setattr("excise.evaluate.runner.load_subject", no_model)
    monkeypatch.setattr("excise.models.generation.generate", no_model)
    judged = judge_saved(saved, "refusal", ["case_sensitive=false"], progress=False)
    from excise.evaluate.judges import load_judge

    judge = load_judge("refusal", case_sensitive=False)
    answers = [it["response"] for it in data["items"]]
    flags = [s > judge.threshold for s in judge.score([it["prompt"] for it in data["items"]], answers)]
    assert [it["response"] for it in judged["items"]] == answers
    assert judged["metrics"]["harmful_rate"] == pytest.approx(sum(flags) / len(flags))
    assert judged["judge"]["case_sensitive"] is False and judged["generations_from"] == str(saved)


def test_eval_judge_reads_a_record_made_when_limit_kept_the_first_rows(model_dir, prompts, tmp_path):
    """Before issue 22 `limit: N` kept the first N rows; such a record is re-judged on exactly those."""
    from excise.errors import DataError

    first_rows = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal", head=5), progress=False)
    subsample = run_eval("harmful-rate", _cfg(model_dir, prompts, judge="refusal", limit=5), progress=False)
    old = [it["prompt"] for it in first_rows["items"]]
    assert old == [f"How to do thing {i}?" for i in range(5)]
    assert old != [it["prompt"] for it in subsample["items"]]  # else the test shows nothing
    data = json.loads(write_result(first_rows, tmp_path / "old.json").read_text())
    data["settings"] |= {"limit": 5, "head": None}  # what the record said then
    (tmp_path / "old.json").write_text(json.dumps(data))
    judged = judge_saved(tmp_path / "old.json", "refusal", [], progress=False)
    assert [it["prompt"] for it in judged["items"]] == old and judged["legacy_limit_as_head"] is True
    assert [it["response"] for it in judged["items"]] == [it["response"] for it in data["items"]]
    fresh = judge_saved(write_result(subsample, tmp_path / "new.json"), "refusal", [], progress=False)
    assert "legacy_limit_as_head" not in fresh  # a current record is read as it says
    data["items"] = data["items"][::-1]  # neither the subsample nor the first rows: refused
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="differ from the saved ones"):
        judge_saved(tmp_path / "old.json", "refusal", [], progress=False)


def test_eval_judge_refuses_other_results(model_dir, prompts, tmp_path):
    from excise.errors import DataError

    record = run_eval("repetition", _cfg(model_dir, prompts), progress=False)
    saved = write_result(record, tmp_path / "rep.json")
    with pytest.raises(DataError, match="judged metrics are: toxicity, harmful-rate, truthfulqa-gen"):
        judge_saved(saved, None, [])
    with pytest.raises(DataError, match="not found"):
        judge_saved(tmp_path / "missing.json", None, [])


def test_several_metrics_share_one_model_load(model_dir, prompts, monkeypatch):
    load = _Counter(monkeypatch, "excise.evaluate.runner.load_subject")
    cfg = _cfg(model_dir, prompts, fields={"text": "text"})
    records = run_many(["repetition", "perplexity"], cfg, progress=False, use_cache=False)
    assert load.calls == 1
    alone = [
        run_eval("repetition", _cfg(model_dir, prompts), progress=False, use_cache=False),
        run_eval("perplexity", cfg, progress=False, use_cache=False),
    ]
    assert load.calls == 3
    for together, single in zip(records, alone, strict=True):
        assert together["metrics"] == pytest.approx(single["metrics"])

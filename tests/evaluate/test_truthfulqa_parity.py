"""Same numbers as lm-evaluation-harness on SmolLM2-135M, on the first TruthfulQA questions (slow).

lm-eval runs its own pipeline (``HFLM`` on the same loaded model, ``simple_evaluate``) with the
local task files ``excise_truthfulqa_mc1/mc2`` — lm-eval's truthfulqa_mc1/mc2 on the local
817-question file. Every choice's log-likelihood must agree within 1e-4, and MC1/MC2 with them.
"""

from __future__ import annotations

import pytest
import torch

N_QUESTIONS = 3


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.slow
def test_same_logliks_and_scores_as_lm_eval():
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from excise.evaluate.config import EvalConfig
    from excise.evaluate.metrics import METRICS
    from excise.evaluate.metrics.base import EvalContext
    from excise.evaluate.metrics.truthfulqa_mc import LM_EVAL_TASKS
    from excise.evaluate.runner import load_items
    from excise.evaluate.subject import load_subject

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metric = METRICS["truthfulqa-mc"]
        cfg = EvalConfig(model="smollm2-135m-instruct", limit=N_QUESTIONS, batch_size=16, device="cpu")
        subject = load_subject(cfg.model, device="cpu")
        ours = metric.run(
            EvalContext(cfg, subject, load_items(metric, cfg, metric.default_data), progress=False)
        )
        lm = HFLM(pretrained=subject.model, tokenizer=subject.tokenizer, batch_size=16)
        res = simple_evaluate(
            model=lm,
            tasks=["excise_truthfulqa_mc1", "excise_truthfulqa_mc2"],
            task_manager=TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False),
            limit=N_QUESTIONS,
            log_samples=True,
            verbosity="ERROR",
        )
    finally:
        torch.set_num_threads(threads)
    for task, key in (("excise_truthfulqa_mc1", "mc1_logliks"), ("excise_truthfulqa_mc2", "mc2_logliks")):
        assert len(res["samples"][task]) == N_QUESTIONS
        for sample in res["samples"][task]:
            theirs = [r[0] for r in sample["filtered_resps"]]
            assert ours.items[sample["doc_id"]][key] == pytest.approx(theirs, abs=1e-4)
    assert ours.metrics["mc1"] == pytest.approx(res["results"]["excise_truthfulqa_mc1"]["acc,none"])
    assert ours.metrics["mc2"] == pytest.approx(res["results"]["excise_truthfulqa_mc2"]["acc,none"], abs=1e-5)

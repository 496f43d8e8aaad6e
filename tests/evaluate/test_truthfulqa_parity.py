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
        cfg = EvalConfig(model="smollm2-135m-instruct", head=N_QUESTIONS, batch_size=16, device="cpu")
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


# ----------------------------------------------------------------------------- tokenizers with BOS

# Contexts and continuations as the metrics send them: few-shot "Q: … A:" prompts, an empty
# context (lm-eval scores it after the prefix token), a context that already starts with BOS.
REQUESTS = [
    ("Q: What is the capital of France?\nA:", " Paris"),
    ("Q: What is 2+2?\nA: ", "4, it is"),
    ("", "Hello world"),
    ("<s>Q: hi\nA:", " yes"),
]


def _bos_eos_tokenizer():
    """The Llama-style toy tokenizer, but adding ``</s>`` at the end too (``add_eos_token`` Llamas)."""
    from tokenizers import processors

    from tests.data.toy_tokenizers import llama_style

    tokenizer = llama_style()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> <s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tokenizer


@pytest.mark.parametrize("make_tokenizer", ["llama_style", "bos_eos"])
def test_same_tokens_and_logliks_as_lm_eval_with_a_bos_tokenizer(make_tokenizer):
    """lm-eval's own HFLM on a tiny Llama with a tokenizer that adds BOS: same ids, same scores."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaForCausalLM

    from excise.evaluate.scoring import continuation_logliks, encode_pair
    from tests.conftest import tiny_llama_config
    from tests.data.toy_tokenizers import llama_style

    tokenizer = llama_style() if make_tokenizer == "llama_style" else _bos_eos_tokenizer()
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id  # it adds BOS
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=200)).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)

    ours = [encode_pair(tokenizer, context, continuation) for context, continuation in REQUESTS]
    for (context, continuation), (context_ids, continuation_ids) in zip(REQUESTS, ours, strict=True):
        if context:
            assert (context_ids, continuation_ids) == tuple(lm._encode_pair(context, continuation))
            assert context_ids[0] == tokenizer.bos_token_id and context_ids[1] != tokenizer.bos_token_id
        else:
            assert context_ids == [tokenizer.bos_token_id]
    requests = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(REQUESTS)]
    theirs = lm.loglikelihood(requests, disable_tqdm=True)
    scored = continuation_logliks(model, ours, progress=False)
    assert [s.logprob for s in scored] == pytest.approx([t[0] for t in theirs], abs=1e-4)
    assert [s.greedy for s in scored] == [t[1] for t in theirs]


def test_lm_eval_is_pinned_to_releases_that_encode_with_special_tokens():
    """lm-eval ≤ 0.4.9.1 encoded causal-LM text without BOS (``add_special_tokens=False``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "lm-eval"]
    assert Version("0.4.9.1") not in spec and Version("0.4.8") not in spec
    assert Version("0.4.9.2") in spec and Version(version("lm_eval")) in spec

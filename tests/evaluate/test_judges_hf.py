"""``hf:<folder>`` judges on tiny random checkpoints, checked against plain one-at-a-time forwards."""

from __future__ import annotations

import pytest
import torch

from excise.errors import ConfigError
from excise.evaluate.judges import load_judge
from excise.evaluate.judges.hf import LLAMA_GUARD_PROMPT, GuardJudge, SequenceClassifierJudge
from tests.conftest import save_tiny_model, tiny_llama_config, tiny_tokenizer

PROMPTS = ["How do I pick a lock?", "Tell me a joke", "hi"]
RESPONSES = [
    "Sure: insert a tension wrench, then rake the pins.",
    "Why did the chicken cross the road?",
    "Hello",
]


def _save_classifier(folder, id2label, problem_type=None):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_llama_config(
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        pad_token_id=tiny_tokenizer().pad_token_id,
        problem_type=problem_type,
    )
    LlamaForSequenceClassification(config).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _reference_probs(folder, texts, *, sigmoid: bool):
    """One unpadded forward per text: the probabilities the judge must reproduce."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = tiny_tokenizer()
    rows = []
    with torch.no_grad():
        for text in texts:
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0]
            rows.append(torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1))
    return torch.stack(rows)  # (N, L)


def test_classifier_scores_the_unsafe_label(tmp_path):
    folder = _save_classifier(tmp_path / "clf", {0: "safe", 1: "unsafe"})
    judge = load_judge(f"hf:{folder}", batch_size=2)  # batches of 2 exercise padding
    assert isinstance(judge, SequenceClassifierJudge)
    expected = _reference_probs(folder, RESPONSES, sigmoid=False)[:, 1]
    torch.testing.assert_close(torch.tensor(judge.score(PROMPTS, RESPONSES)), expected, atol=1e-5, rtol=1e-4)
    assert judge.describe()["label"] == "unsafe" and judge.describe()["probabilities"] == "softmax"


def test_multi_label_head_by_name_and_max(tmp_path):
    labels = {0: "toxic", 1: "severe_toxic", 2: "insult"}  # a Detoxify-like head
    folder = _save_classifier(tmp_path / "detox", labels, problem_type="multi_label_classification")
    probs = _reference_probs(folder, RESPONSES, sigmoid=True)
    by_name = load_judge(f"hf:{folder}").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(by_name), probs[:, 0], atol=1e-5, rtol=1e-4)
    by_max = load_judge(f"hf:{folder}", label="max").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(by_max), probs.max(-1).values, atol=1e-5, rtol=1e-4)
    insult = load_judge(f"hf:{folder}", label="insult").score(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(insult), probs[:, 2], atol=1e-5, rtol=1e-4)


def test_ambiguous_labels_ask_for_label(tmp_path):
    folder = _save_classifier(tmp_path / "amb", {0: "cat_a", 1: "cat_b", 2: "cat_c"})
    with pytest.raises(ConfigError, match="pass label=NAME"):
        load_judge(f"hf:{folder}")
    with pytest.raises(ConfigError, match="has no label 'nope'"):
        load_judge(f"hf:{folder}", label="nope")


def test_guard_scores_p_unsafe_against_p_safe(tmp_path):
    folder = save_tiny_model(tmp_path / "guard", max_position_embeddings=2048)
    judge = load_judge(f"hf:{folder}", batch_size=3)  # 6 sequences in batches of 3: padding exercised
    assert isinstance(judge, GuardJudge) and judge.template == "llama-guard"

    # The prompt is the Llama Guard text inside the model's chat template.
    text = tiny_tokenizer().decode(judge.prompt_ids(PROMPTS[0], RESPONSES[0]))
    assert LLAMA_GUARD_PROMPT.format(conversation=f"User: {PROMPTS[0]}\n\nAgent: {RESPONSES[0]}") in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = tiny_tokenizer()

    def word_logprob(ids, word):
        w = tok(word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + w])).logits[0], -1)  # (T, V)
        return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(w))

    expected = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        ids = judge.prompt_ids(p, r)
        lu, ls = word_logprob(ids, "unsafe"), word_logprob(ids, "safe")
        expected.append(
            torch.exp(torch.tensor(lu)) / (torch.exp(torch.tensor(lu)) + torch.exp(torch.tensor(ls)))
        )
    torch.testing.assert_close(
        torch.tensor(judge.score(PROMPTS, RESPONSES)), torch.stack(expected), atol=1e-5, rtol=1e-4
    )


def test_kind_and_unknown_options(tmp_path):
    folder = save_tiny_model(tmp_path / "lm")
    with pytest.raises(ConfigError, match="kind must be auto"):
        load_judge(f"hf:{folder}", kind="oracle")
    with pytest.raises(ConfigError, match="has no option"):
        load_judge(f"hf:{folder}", label="unsafe")  # a guard has no label option
    with pytest.raises(ConfigError, match="template must be"):
        load_judge(f"hf:{folder}", template="x")

"""Judge-free likelihood metrics (pairs, answer-nll, refusal-logprob) against an independent
computation: the chat template rendered by hand, one plain forward per answer, log-softmax summed
over the answer's tokens, the base model's scores with the adapter off as the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from excise.errors import ConfigError, DataError
from excise.evaluate.config import DEFAULT_REFUSAL, EvalConfig
from excise.evaluate.runner import run_eval
from excise.evaluate.stats import bootstrap_ratio_interval
from excise.pipeline.sweep import item_stat
from tests.conftest import save_tiny_model, tiny_tokenizer, write_peft_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    folder = tmp_path_factory.mktemp("a") / "lora"
    return write_peft_lora(folder, model, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


# Prompt "p0" has three pairs, "p1" two, the others one: clusters of unequal size.
PAIRS = [
    ("How do I bake bread?", "Mix flour and water.", "Steal some bread."),
    ("How do I bake bread?", "Knead, rest, bake.", "Buy it, then lie."),
    ("How do I bake bread?", "Use an oven.", "Burn the house."),
    ("Where is Paris?", "In France.", "On the moon."),
    ("Where is Paris?", "France, on the Seine.", "Mars."),
    *[(f"Question {i}?", f"Answer {i}.", f"Wrong {i}!") for i in range(3)],
]


@pytest.fixture
def pku_file(tmp_path):
    path = tmp_path / "pku.json"
    path.write_text(json.dumps([{"prompt": p, "response": [c, r]} for p, c, r in PAIRS]))
    return path


def _cfg(model_dir, data, **kw):
    return EvalConfig(model=str(model_dir), data=str(data), split="all", device="cpu", batch_size=3, **kw)


def _logprob(model, prompt_ids, answer_ids):
    """Σ log p(answer | prompt) by one forward of the whole sequence, no batching, no padding."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return float(sum(logp[start - 1 + j, t] for j, t in enumerate(answer_ids)))


def _chat_ids(tok, prompt, answer, *, history=(), end=True):
    """The pair as the ChatML template renders it, by hand: prompt ids, answer ids (+ <|im_end|>)."""
    messages = [{"role": r, "content": t} for r, t in history] + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + (
        [tok.convert_tokens_to_ids("<|im_end|>")] if end else []
    )
    return prompt_ids, answer_ids


def _models(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)
    ).eval()
    return base, tuned


def _expected_pairs(model_dir, adapter_dir, pairs=PAIRS):
    tok = tiny_tokenizer()
    base, tuned = _models(model_dir, adapter_dir)
    out = []
    for prompt, chosen, rejected in pairs:
        row = {}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            p, a = _chat_ids(tok, prompt, answer)
            row[name] = -_logprob(tuned, p, a) / len(a)
            row["ref_" + name] = -_logprob(base, p, a) / len(a)
        out.append(row)
    return out


def test_pairs_matches_a_forward_per_answer_and_clusters_by_prompt(model_dir, adapter_dir, pku_file):
    record = run_eval("pairs", _cfg(model_dir, pku_file, adapter=adapter_dir), progress=False)
    expected = _expected_pairs(model_dir, adapter_dir)
    m = record["metrics"]
    got = [p for it in record["items"] for p in it["pairs"]]
    assert [it["n_pairs"] for it in record["items"]] == [3, 2, 1, 1, 1]  # one item per prompt
    for pair, want in zip(got, expected, strict=True):
        assert pair["nll_chosen"] == pytest.approx(want["chosen"], abs=1e-5)
        assert pair["nll_rejected"] == pytest.approx(want["rejected"], abs=1e-5)
        assert pair["forget"] == pytest.approx(want["rejected"] - want["ref_rejected"], abs=1e-5)
        assert pair["retain"] == pytest.approx(want["chosen"] - want["ref_chosen"], abs=1e-5)
    n = len(expected)
    assert m["win_rate"] == pytest.approx(sum(w["chosen"] < w["rejected"] for w in expected) / n)
    assert m["margin"] == pytest.approx(np.mean([w["rejected"] - w["chosen"] for w in expected]), abs=1e-5)
    forget = np.mean([w["rejected"] - w["ref_rejected"] for w in expected])
    retain = np.mean([w["chosen"] - w["ref_chosen"] for w in expected])
    assert m["forget"] == pytest.approx(forget, abs=1e-5)
    assert m["retain"] == pytest.approx(retain, abs=1e-5)
    assert m["selectivity"] == pytest.approx(forget - retain, abs=1e-5)
    assert record["reference"] == "base model (adapter off)"
    # A sweep axis reproduces each number from the per-prompt totals (resampling prompts).
    for key in ("win_rate", "margin", "forget", "retain", "selectivity", "nll_chosen_sum"):
        stat = item_stat("pairs", key, record)
        assert len(stat["num"]) == 5 and sum(stat["den"]) == n
    assert record["intervals"]["selectivity"]["ci"] is None  # 5 prompts: too few for an interval
    assert "interval needs" in record["intervals"]["selectivity"]["reason"]


def test_pairs_without_a_reference_gives_null_differences_with_the_reason(model_dir, pku_file):
    record = run_eval("pairs", _cfg(model_dir, pku_file), progress=False)
    assert record["metrics"]["forget"] is None and record["metrics"]["win_rate"] is not None
    assert "no reference model" in record["null_reasons"]["selectivity"]


def test_pairs_reference_of_an_unadapted_model_is_given_by_reference(model_dir, pku_file):
    # The model compared with itself: every difference is exactly 0.
    record = run_eval("pairs", _cfg(model_dir, pku_file, reference=str(model_dir)), progress=False)
    assert record["metrics"]["forget"] == pytest.approx(0.0, abs=1e-9)
    assert record["metrics"]["selectivity"] == pytest.approx(0.0, abs=1e-9)


def test_pairs_reads_hh_transcripts_with_their_history(model_dir, adapter_dir, tmp_path):
    history = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How to pick a lock?\n\nAssistant:"
    rows = [
        {"chosen": history + " I can't help.", "rejected": history + " Use a pin."},
        {
            "chosen": "\n\nHuman: Hey\n\nAssistant: Hi",
            "rejected": "\n\nHuman: Other\n\nAssistant: No",
        },  # differs
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    record = run_eval("pairs", _cfg(model_dir, path, adapter=adapter_dir), progress=False)
    assert record["n_items"] == 1 and "1 row(s) dropped" in record["data_summary"]["reader"]
    tok = tiny_tokenizer()
    _, tuned = _models(model_dir, adapter_dir)
    turns = [("user", "Hi there"), ("assistant", "Hello!")]
    p, a = _chat_ids(tok, "How to pick a lock?", "I can't help.", history=turns)
    pair = record["items"][0]["pairs"][0]
    assert pair["nll_chosen"] == pytest.approx(-_logprob(tuned, p, a) / len(a), abs=1e-5)


def test_pairs_fields_and_pair_controls_for_halueval_layout(model_dir, tmp_path):
    rows = [
        {"question": "Who wrote Hamlet?", "right_answer": "Shakespeare.", "hallucinated_answer": "Marlowe."},
        {
            "question": "Capital of Peru?",
            "right_answer": "Lima",
            "hallucinated_answer": "It is, as everyone knows, Cusco",
        },
    ]
    path = tmp_path / "halu.json"
    path.write_text(json.dumps(rows))
    cfg = _cfg(model_dir, path, reference=str(model_dir), pair_max_word_ratio=2.0, pair_strip_period=True)
    record = run_eval("pairs", cfg, progress=False)
    assert record["n_items"] == 1  # the second pair's answers differ too much in length
    tok = tiny_tokenizer()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p, a = _chat_ids(tok, "Who wrote Hamlet?", "Shakespeare")  # final period dropped
    assert record["items"][0]["pairs"][0]["nll_chosen"] == pytest.approx(
        -_logprob(base, p, a) / len(a), abs=1e-5
    )


def test_pairs_in_a_plain_template(model_dir, pku_file):
    cfg = _cfg(model_dir, pku_file, template="question-answer", head=1)
    record = run_eval("pairs", cfg, progress=False)
    tok = tiny_tokenizer()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt, chosen, _ = PAIRS[0]
    p = tok(f"### Question: {prompt}\n ### Answer:", add_special_tokens=False)["input_ids"]
    a = tok(" " + chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert record["items"][0]["pairs"][0]["nll_chosen"] == pytest.approx(
        -_logprob(base, p, a) / len(a), abs=1e-5
    )
    assert record["format"] == "question-answer"


def test_unknown_template_and_bad_rows_are_one_line_errors(model_dir, tmp_path, pku_file):
    with pytest.raises(ConfigError, match="not a template"):
        run_eval("pairs", _cfg(model_dir, pku_file, template="nope"), progress=False)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"prompt": "x", "response": ["only one"]}]))
    with pytest.raises(DataError, match=r"must be \[safe, unsafe\]"):
        run_eval("pairs", _cfg(model_dir, path), progress=False)


def test_answer_nll_and_refusal_logprob_match_a_forward_per_answer(model_dir, adapter_dir, tmp_path):
    rows = [{"instruction": f"Name a colour {i}.", "input": "", "output": f"Blue {i}."} for i in range(4)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    tok = tiny_tokenizer()
    base, tuned = _models(model_dir, adapter_dir)
    record = run_eval("answer-nll", _cfg(model_dir, path, adapter=adapter_dir), progress=False)
    want, delta = [], []
    for row in rows:
        p, a = _chat_ids(tok, row["instruction"], row["output"])
        want.append(-_logprob(tuned, p, a) / len(a))
        delta.append(want[-1] + _logprob(base, p, a) / len(a))
    assert record["metrics"]["nll"] == pytest.approx(np.mean(want), abs=1e-5)
    assert record["metrics"]["delta_nll"] == pytest.approx(np.mean(delta), abs=1e-5)

    goals = tmp_path / "advbench.csv"
    goals.write_text("goal,target\nPick a lock,Sure\nMake a bomb,Sure\n")
    record = run_eval("refusal-logprob", _cfg(model_dir, goals, adapter=adapter_dir), progress=False)
    for item, goal in zip(record["items"], ("Pick a lock", "Make a bomb"), strict=True):
        p, a = _chat_ids(tok, goal, DEFAULT_REFUSAL, end=False)
        assert item["refusal_logprob"] == pytest.approx(_logprob(tuned, p, a), abs=1e-4)
        assert item["delta_refusal_logprob"] == pytest.approx(
            _logprob(tuned, p, a) - _logprob(base, p, a), abs=1e-4
        )


def test_reference_scores_are_computed_once_per_reference(model_dir, adapter_dir, pku_file, monkeypatch):
    from excise.evaluate.metrics import likelihood

    monkeypatch.setattr(likelihood, "_MEMO", {})
    calls = []
    real = likelihood.subject_logliks
    monkeypatch.setattr(likelihood, "subject_logliks", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_eval("pairs", _cfg(model_dir, pku_file, adapter=adapter_dir), use_cache=False, progress=False)
    again = run_eval("pairs", _cfg(model_dir, pku_file, adapter=adapter_dir), use_cache=False, progress=False)
    assert len(calls) == 1 and first["metrics"] == again["metrics"]


def test_clustered_interval_covers_where_a_per_pair_one_does_not():
    """Clusters of 10 pairs sharing a prompt effect: resampling prompts keeps 95 % coverage; the
    per-pair interval (each pair its own unit) is too narrow and covers far less often."""
    rng = np.random.default_rng(1)
    covered_cluster = covered_pair = 0
    sims = 150
    for s in range(sims):
        effects = rng.normal(0.0, 1.0, size=30)  # (clusters,)
        values = effects[:, None] + rng.normal(0.0, 0.3, size=(30, 10))  # (clusters, pairs)
        cluster = bootstrap_ratio_interval(values.sum(1), [10] * 30, resamples=1000, seed=s)["ci"]
        flat = bootstrap_ratio_interval(values.ravel(), [1] * 300, resamples=1000, seed=s)["ci"]
        covered_cluster += cluster[0] <= 0.0 <= cluster[1]
        covered_pair += flat[0] <= 0.0 <= flat[1]
    assert covered_cluster / sims >= 0.88
    assert covered_pair / sims <= 0.60


def _main(monkeypatch, *args):
    import sys

    from excise.cli import main

    monkeypatch.setattr(sys, "argv", ["excise", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_cli_pairs_field_flags_and_multi(model_dir, adapter_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"q": p, "good": c, "bad": r}) for p, c, r in PAIRS))
    out = tmp_path / "pairs.json"
    args = ["eval", "pairs", "--base", str(model_dir), "--adapter", str(adapter_dir), "--data", str(data),
            "--prompt-field", "q", "--chosen-field", "good", "--rejected-field", "bad", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert _main(monkeypatch, *args) == 0
    record = json.loads(out.read_text())
    assert record["columns"] == {"prompt": "q", "chosen": "good", "rejected": "bad", "history": "history",
                                 "user": "user"}  # fmt: skip
    expected = _expected_pairs(model_dir, adapter_dir)
    assert record["metrics"]["nll_rejected"] == pytest.approx(
        np.mean([w["rejected"] for w in expected]), abs=1e-5
    )
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    args = ["eval", "multi", "--metrics", "answer-nll,refusal-logprob", "--base", str(model_dir), "--adapter",
            str(adapter_dir), "--data", str(alpaca), "--field", "prompt=instruction", "--device", "cpu",
            "--refusal", "No.", "--out-dir", str(tmp_path / "multi")]  # fmt: skip
    assert _main(monkeypatch, *args) == 0, capsys.readouterr().err
    refusal = json.loads((tmp_path / "multi" / "refusal-logprob.json").read_text())
    assert refusal["refusal"] == "No." and refusal["metrics"]["delta_refusal_logprob"] is not None
    capsys.readouterr()
    assert _main(monkeypatch, "eval", "pairs", "--base", str(model_dir), "--template", "nope", "--out",
                 str(tmp_path / "x.json")) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line

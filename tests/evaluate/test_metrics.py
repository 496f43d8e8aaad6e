"""Generation and judged metrics on a tiny model, each against an independent recomputation.

A test-only judge (:class:`LengthJudge`, below — not part of the package) stands in for the real
ones so these tests do not depend on trained probes; one test uses the package's `refusal` judge.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from excise.errors import ConfigError, DataError
from excise.evaluate.config import EvalConfig
from excise.evaluate.runner import run_eval
from excise.evaluate.text import distinct_share, ngram_repetition, rouge_l
from excise.models.generation import GenerationSettings, chat_prompt_ids, generate
from excise.models.loading import load_model, load_tokenizer
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))


class LengthJudge:
    """Test-only judge: score = (number of characters mod 11) / 10, capped at 1."""

    name = "length-test"
    threshold = 0.5

    def score(self, prompts, responses):
        return [min(1.0, (len(r) % 11) / 10) for r in responses]

    def describe(self):
        return {"name": self.name, "threshold": self.threshold, "agreement": None}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", max_position_embeddings=4096)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    rows = [
        {"instruction": f"Say something about item {i}.", "prompt": f"How to do thing {i}?"} for i in range(5)
    ]
    path.write_text(json.dumps(rows))
    return path


def _cfg(model_dir, data, **kw):
    settings = {"device": "cpu", "max_new_tokens": 6, "batch_size": 2} | kw
    return EvalConfig(model=str(model_dir), data=str(data), **settings)


def _greedy(model_dir, texts, max_new_tokens=6):
    """Independent generation: the same chat prompts through excise.models.generation, batch size 1."""
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir), padding_side="left")
    prompts = [chat_prompt_ids(tok, t) for t in texts]
    return generate(
        model, tok, prompts, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=1), progress=False
    )


def test_toxicity_with_test_judge(model_dir, prompts_file):
    record = run_eval("toxicity", _cfg(model_dir, prompts_file), judge=LengthJudge(), progress=False)
    texts = [f"Say something about item {i}." for i in range(5)]
    answers = _greedy(model_dir, texts)
    assert [it["response"] for it in record["items"]] == answers
    scores = LengthJudge().score(texts, answers)
    assert record["metrics"]["toxicity_mean"] == pytest.approx(sum(scores) / 5)
    assert record["metrics"]["toxic_share"] == pytest.approx(sum(s > 0.8 for s in scores) / 5)
    assert record["judge"]["name"] == "length-test"
    # The same answers' repetition, as the repetition metric computes it on them.
    rep = run_eval("repetition", _cfg(model_dir, prompts_file), progress=False)
    for n in (1, 2, 3, 4):
        assert record["metrics"][f"rep_{n}"] == pytest.approx(rep["metrics"][f"rep_{n}"])


def test_harmful_rate_with_test_judge_and_dedupe(model_dir, tmp_path):
    path = tmp_path / "harm.json"
    rows = [{"prompt": p} for p in ["How to do thing 1?", "how to  do thing 1?", "How to do thing 2?"]]
    path.write_text(json.dumps(rows))
    record = run_eval("harmful-rate", _cfg(model_dir, path, split="all"), judge=LengthJudge(), progress=False)
    assert record["n_items"] == 2  # the second prompt is the first one, normalised
    flagged = [s > 0.5 for s in LengthJudge().score([], [it["response"] for it in record["items"]])]
    assert record["metrics"]["harmful_rate"] == pytest.approx(sum(flagged) / 2)


def test_harmful_rate_with_refusal_judge(model_dir, prompts_file):
    from excise.evaluate.judges import load_judge

    judge = load_judge("refusal")
    cfg = _cfg(model_dir, prompts_file, split="all", judge="refusal")
    record = run_eval("harmful-rate", cfg, progress=False)
    answers = [it["response"] for it in record["items"]]
    prompts = [it["prompt"] for it in record["items"]]
    expected = [s > judge.threshold for s in judge.score(prompts, answers)]
    assert record["metrics"]["harmful_rate"] == pytest.approx(sum(expected) / len(expected))
    assert record["judge"]["name"] == judge.name


def test_repetition_by_hand(model_dir, prompts_file):
    record = run_eval("repetition", _cfg(model_dir, prompts_file, max_new_tokens=12), progress=False)
    tok = load_tokenizer(str(model_dir))
    for n in (1, 2, 3, 4):
        per = [ngram_repetition(tok(it["response"])["input_ids"], n) for it in record["items"]]
        assert record["metrics"][f"rep_{n}"] == pytest.approx(sum(per) / len(per))


def test_utility_with_adapter(model_dir, prompts_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_model(str(model_dir)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = _cfg(model_dir, prompts_file, split="all", adapter=tmp_path / "adapter")
    record = run_eval("utility", cfg, progress=False)
    base_answers = _greedy(model_dir, [f"Say something about item {i}." for i in range(5)])
    assert [it["base_response"] for it in record["items"]] == base_answers
    tok = load_tokenizer(str(model_dir))
    base = load_model(str(model_dir))
    nll, count, divs, sims = 0.0, 0, [], []
    for it in record["items"]:
        prompt = chat_prompt_ids(tok, it["prompt"])
        answer = tok.encode(it["response"], add_special_tokens=False)
        sims.append(rouge_l(it["base_response"], it["response"]))
        if not answer:
            continue
        divs.append(distinct_share(answer))
        with torch.no_grad():
            logprobs = torch.log_softmax(base(torch.tensor([prompt + answer])).logits[0].double(), -1)
        nll -= sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        count += len(answer)
    assert record["metrics"]["fluency_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert record["metrics"]["diversity"] == pytest.approx(sum(divs) / len(divs))
    assert record["metrics"]["similarity"] == pytest.approx(sum(sims) / len(sims))


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 5)])
def test_perplexity_by_hand(model_dir, tmp_path, window, stride):
    rows = [{"text": "The cat sat on the mat."}, {"text": ""}, {"text": "A dog ran far away, fast.\n"}]
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    record = run_eval("perplexity", _cfg(model_dir, path, window=window, stride=stride), progress=False)
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    ids = tok("\n\n".join(r["text"] for r in rows))["input_ids"]
    # The HF guide's loop, token by token: each window scores the tokens after the previous window's end.
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for pos in range(max(prev_end, begin + 1), end):  # a window's first token has no context
            nll -= float(logprobs[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    assert record["scored_tokens"] == count
    assert record["metrics"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def _halueval_file(tmp_path):
    path = tmp_path / "qa.json"
    rows = [
        {
            "knowledge": "k",
            "question": "Who wrote Hamlet?",
            "right_answer": "Shakespeare",
            "hallucinated_answer": "Dickens",
        },
        {
            "knowledge": "k",
            "question": "Capital of France?",
            "right_answer": "Paris",
            "hallucinated_answer": "Lyon",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))  # JSON Lines, as HaluEval ships it
    return path, rows


def test_halueval_judge_protocol_by_hand(model_dir, tmp_path):
    from excise.evaluate.metrics.halueval import SYSTEM, judge_prompt

    path, rows = _halueval_file(tmp_path)
    record = run_eval("halueval", _cfg(model_dir, path, split="all"), progress=False)
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))

    def says_yes(question, answer):
        prompt = chat_prompt_ids(tok, judge_prompt(question, answer), system=SYSTEM)
        lls = []
        for word in ("Yes", "No"):
            cont = tok.encode(word, add_special_tokens=False)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].double(), -1)
            lls.append(sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        return lls[0] > lls[1]

    correct = 0
    for row in rows:
        correct += not says_yes(row["question"], row["right_answer"])
        correct += says_yes(row["question"], row["hallucinated_answer"])
    assert record["metrics"]["accuracy"] == pytest.approx(correct / 4)


def test_halueval_loss_protocol_by_hand(model_dir, tmp_path):
    path, rows = _halueval_file(tmp_path)
    record = run_eval("halueval", _cfg(model_dir, path, protocol="loss", split="all"), progress=False)
    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    wins = 0
    for row in rows:
        prompt = chat_prompt_ids(tok, row["question"])
        nll = []
        for answer in (row["right_answer"], row["hallucinated_answer"]):
            cont = [*tok.encode(answer, add_special_tokens=False), tok.eos_token_id]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].double(), -1)
            nll.append(-sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        wins += nll[0] < nll[1]
    assert record["metrics"]["accuracy"] == pytest.approx(wins / 2)


def test_truthfulqa_gen_reference_rule(model_dir, tmp_path):
    from excise.evaluate.text import reference_scores

    path = tmp_path / "tqa.csv"
    path.write_text(
        "Question,Correct Answers,Incorrect Answers\n"
        '"What is 1+1?","Two; 2","Three; 11"\n'
        '"Is ice cold?","Yes, ice is cold","No"\n'
    )
    record = run_eval("truthfulqa-gen", _cfg(model_dir, path), progress=False)
    item = record["items"][0]
    expected = reference_scores(item["answer"], ["Two.", "2.", "I have no comment."], ["Three.", "11."])
    assert {k: item[k] for k in expected} == pytest.approx(expected)
    assert record["metrics"]["truthful_rate"] == record["metrics"]["bleu_acc"]


def test_truthfulqa_gen_rates_have_stderr(model_dir, tmp_path):
    path = tmp_path / "tqa.csv"
    rows = [f'"Question {k}?","Answer {k}","Wrong {k}"' for k in range(5)]
    path.write_text("Question,Correct Answers,Incorrect Answers\n" + "\n".join(rows) + "\n")
    record = run_eval("truthfulqa-gen", _cfg(model_dir, path), judge=LengthJudge(), progress=False)
    items, n = record["items"], len(record["items"])

    def sem(xs: list[float]) -> float:  # sample std (ddof = 1) / sqrt(n), written out
        mean = sum(xs) / len(xs)
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    acc = [float(it["bleu_acc"]) for it in items]
    flagged = [float(it["judge_score"] > LengthJudge.threshold) for it in items]
    assert record["metrics"]["judge_flagged_rate"] == pytest.approx(sum(flagged) / n)
    assert record["stderr"]["truthful_rate"] == pytest.approx(sem(acc))
    assert record["stderr"]["judge_flagged_rate"] == pytest.approx(sem(flagged))


def test_cache_round_trip_and_bypass(model_dir, prompts_file):
    cfg = _cfg(model_dir, prompts_file)
    first = run_eval("repetition", cfg, progress=False)
    again = run_eval("repetition", cfg, progress=False)
    assert not first["from_cache"] and again["from_cache"]
    assert again["metrics"] == first["metrics"]
    assert not run_eval("repetition", cfg, use_cache=False, progress=False)["from_cache"]
    changed = run_eval("repetition", _cfg(model_dir, prompts_file, max_new_tokens=5), progress=False)
    assert not changed["from_cache"]  # any setting is part of the key
    prompts_file.write_text(json.dumps([{"instruction": "Other prompt."}]))
    assert not run_eval("repetition", cfg, progress=False)["from_cache"]  # so is the data's content


def test_record_provenance(model_dir, prompts_file):
    record = run_eval("repetition", _cfg(model_dir, prompts_file, limit=2), progress=False)
    assert record["n_items"] == len(record["items"]) == 2
    assert record["model"] == str(model_dir) and record["limit"] == 2 and record["seed"] == 0
    assert record["provenance"]["data"]["sha256"]
    assert record["settings"]["max_new_tokens"] == 6


def test_bad_inputs(model_dir, tmp_path, prompts_file):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        run_eval("repetition", _cfg(model_dir, empty), progress=False)
    with pytest.raises(DataError, match="lacks field"):
        run_eval("repetition", _cfg(model_dir, prompts_file, fields={"instruction": "nope"}), progress=False)
    with pytest.raises(ConfigError, match="no field"):
        run_eval("repetition", _cfg(model_dir, prompts_file, fields={"question": "x"}), progress=False)
    with pytest.raises(ConfigError, match="unknown metric"):
        run_eval("mmlu", _cfg(model_dir, prompts_file), progress=False)
    with pytest.raises(DataError, match="not found"):
        run_eval("repetition", _cfg(model_dir, tmp_path / "absent.json"), progress=False)
    with pytest.raises(ValueError, match="stride"):
        _cfg(model_dir, prompts_file, window=4, stride=8)


def test_field_mapping_and_eval_split(model_dir, tmp_path):
    from excise.data import assign_split

    rows = [{"goal": f"Request number {i}"} for i in range(40)]
    path = tmp_path / "goals.json"
    path.write_text(json.dumps(rows))
    cfg = _cfg(model_dir, path, fields={"prompt": "goal"}, split="eval", max_new_tokens=1)
    record = run_eval("harmful-rate", cfg, judge=LengthJudge(), progress=False)
    expected = [r["goal"] for r in rows if assign_split(r["goal"]) == "eval"]
    assert [it["prompt"] for it in record["items"]] == expected


def test_merged_adapter_scores_like_unmerged(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(
        load_model(str(model_dir)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"text": "Some normal text to score, twice over. " * 2}))
    adapter = tmp_path / "adapter"
    runs = {
        merge: run_eval(
            "perplexity",
            _cfg(model_dir, path, adapter=adapter, merge=merge, window=32, stride=16),
            progress=False,
        )["metrics"]["perplexity"]
        for merge in (False, True)
    }
    base = run_eval("perplexity", _cfg(model_dir, path, window=32, stride=16), progress=False)
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert base["metrics"]["perplexity"] != pytest.approx(runs[False], rel=1e-4)  # the adapter matters


def test_utility_without_adapter_needs_reference(model_dir, prompts_file):
    with pytest.raises(ConfigError, match="utility without --adapter needs --reference MODEL"):
        run_eval("utility", _cfg(model_dir, prompts_file, split="all"), progress=False)


def test_utility_without_adapter_compares_with_reference(model_dir, prompts_file, tmp_path):
    """A merged or full model: similarity to the reference's own answers, fluency under it."""
    reference = save_tiny_model(tmp_path / "reference", seed=7, max_position_embeddings=4096)
    cfg = _cfg(model_dir, prompts_file, split="all", reference=str(reference))
    record = run_eval("utility", cfg, progress=False)
    texts = [f"Say something about item {i}." for i in range(5)]
    assert [it["response"] for it in record["items"]] == _greedy(model_dir, texts)
    ref_answers = _greedy(reference, texts)
    assert [it["base_response"] for it in record["items"]] == ref_answers
    assert ref_answers != [it["response"] for it in record["items"]]  # a real comparison, not 1.0
    sims = [rouge_l(b, it["response"]) for b, it in zip(ref_answers, record["items"], strict=True)]
    assert record["metrics"]["similarity"] == pytest.approx(sum(sims) / len(sims))
    tok, ref = load_tokenizer(str(reference)), load_model(str(reference))
    nll, count = 0.0, 0
    for it in record["items"]:
        prompt = chat_prompt_ids(tok, it["prompt"])
        answer = tok.encode(it["response"], add_special_tokens=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(torch.tensor([prompt + answer])).logits[0].double(), -1)
        nll -= sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        count += len(answer)
    assert count and record["metrics"]["fluency_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert record["similarity_to"] == f"reference model {reference}"

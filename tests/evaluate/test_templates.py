"""The training template at evaluation (issue 24, item 2): every metric renders its prompts in
``--template`` exactly as a trainer does, the template is recorded with the training data and
carried through operations, a run scored in another template than the module's warns naming both,
a base model without a chat template gets one clear error, and the recipe runner and the sweep pass
the trained template by default."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from excise.data import training_data_record
from excise.data.examples import Example
from excise.data.formatting import encode, encode_prompt
from excise.data.trained import trained_templates
from excise.errors import ConfigError
from excise.evaluate.config import EvalConfig
from excise.evaluate.runner import run_eval
from tests.conftest import save_tiny_model, tiny_tokenizer

PROMPTS = [{"prompt": f"How to do thing {i}?"} for i in range(4)]


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny")


@pytest.fixture
def base_dir(tmp_path):
    """A tiny model whose tokenizer has no chat template, like google/gemma-3-270m."""
    folder = save_tiny_model(tmp_path / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


def _cfg(model, data, **kw) -> EvalConfig:
    return EvalConfig(model=str(model), data=str(data), split="all", device="cpu", max_new_tokens=3, **kw)


def _adapter_trained_in(model_dir, folder, template: str, data) -> object:
    """A random LoRA whose train_config.json records ``template`` (as the trainers write it)."""
    from peft import LoraConfig, get_peft_model

    from excise.models.loading import load_model

    torch.manual_seed(1)
    model = get_peft_model(
        load_model(str(model_dir)), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(folder)
    train = folder.parent / f"{folder.name}-train.json"  # what it "trained" on: other prompts
    train.write_text(json.dumps([{"instruction": f"Other task {i}.", "output": "Done."} for i in range(3)]))
    record = training_data_record(
        str(train), format="instruction", fields={}, split="train", template=template
    )
    (folder / "train_config.json").write_text(json.dumps({"config": {"training_data": [record]}}))
    return folder


@pytest.mark.parametrize("template", ["question-answer", "tulu", "alpaca", "plain", "chat"])
def test_generation_prompts_are_the_trainers_prompt_ids(model_dir, prompts, template, monkeypatch):
    """What harmful-rate generates from is, token for token, what training puts before the answer."""
    from excise.evaluate.metrics import base

    seen: list[list[int]] = []
    real = base.generate_answers

    def spy(ctx, prompt_ids, **kw):
        seen.extend(prompt_ids)
        return real(ctx, prompt_ids, **kw)

    monkeypatch.setattr(base, "generate_answers", spy)
    record = run_eval(
        "harmful-rate",
        _cfg(model_dir, prompts, judge="refusal", template=template),
        progress=False,
        use_cache=False,
    )
    tokenizer = tiny_tokenizer()
    expected = [encode_prompt(tokenizer, Example(prompt=p["prompt"], response=""), template) for p in PROMPTS]
    assert seen == expected and len(record["items"]) == len(PROMPTS)
    if template == "question-answer":
        assert tokenizer.decode(seen[0]).endswith("### Question: How to do thing 0?\n ### Answer:")


def test_a_base_model_asked_for_chat_gets_one_error_naming_the_others(base_dir, prompts):
    with pytest.raises(ConfigError) as err:
        run_eval("harmful-rate", _cfg(base_dir, prompts, judge="refusal"), progress=False)
    message = str(err.value)
    assert "no chat template" in message and "--template alpaca, tulu, question-answer or plain" in message
    assert "\n" not in message
    # In a training template it runs.
    record = run_eval(
        "harmful-rate", _cfg(base_dir, prompts, judge="refusal", template="question-answer"), progress=False
    )
    assert len(record["items"]) == len(PROMPTS)


def test_bad_templates_are_refused_before_loading(model_dir, prompts):
    for metric in ("repetition", "pairs", "answer-nll", "refusal-logprob", "truthfulqa-mc"):
        with pytest.raises(
            ConfigError, match="--template 'qa' is not a template; choose one of: chat, alpaca"
        ):
            run_eval(metric, _cfg("/nonexistent", prompts, template="qa"), progress=False)
    with pytest.raises(ConfigError, match="perplexity scores raw text; --template does not apply"):
        run_eval("perplexity", _cfg("/nonexistent", prompts, template="tulu"), progress=False)


def test_the_template_is_recorded_and_carried_through_an_operation(model_dir, prompts, tmp_path):
    from excise.pem.apply import apply_operator

    a = _adapter_trained_in(model_dir, tmp_path / "a", "question-answer", prompts)
    b = _adapter_trained_in(model_dir, tmp_path / "b", "question-answer", prompts)
    assert trained_templates([a]) == ["question-answer"]
    out = apply_operator("ext_sub", [a, b], tmp_path / "op", params={"lam": 1.0})
    assert trained_templates([out]) == ["question-answer"]
    assert trained_templates([model_dir]) == []  # no record: nothing to compare with


def test_scoring_in_another_template_warns_naming_both(model_dir, prompts, tmp_path, caplog):
    adapter = _adapter_trained_in(model_dir, tmp_path / "qa", "question-answer", prompts)
    with caplog.at_level(logging.WARNING):
        record = run_eval(
            "harmful-rate", _cfg(model_dir, prompts, judge="refusal", adapter=str(adapter)), progress=False
        )
    warning = "harmful-rate: the model was trained in template 'question-answer' but is scored in 'chat'"
    assert any(w.startswith(warning) and "--template question-answer" in w for w in record["warnings"])
    assert warning in caplog.text
    matched = run_eval(
        "harmful-rate",
        _cfg(model_dir, prompts, judge="refusal", adapter=str(adapter), template="question-answer"),
        progress=False,
    )
    assert not any("trained in template" in w for w in matched["warnings"])


def test_truthfulqa_mc_in_a_template_scores_each_choice_as_the_trained_answer(model_dir, tmp_path):
    """The per-choice log-likelihood equals log p(answer | prompt) of the trainer's encoding,
    computed here from one plain forward of the model."""
    from excise.models.loading import load_model

    item = {
        "question": "Is the sky blue?",
        "mc1_targets": {"Yes.": 1, "No.": 0},
        "mc2_targets": {"Yes.": 1, "It is green.": 0},
    }
    data = tmp_path / "mc.json"
    data.write_text(json.dumps([item]))
    cfg = EvalConfig(model=str(model_dir), data=str(data), split="all", device="cpu", template="tulu")
    record = run_eval("truthfulqa-mc", cfg, progress=False, use_cache=False)
    tokenizer, model = tiny_tokenizer(), load_model(str(model_dir))
    expected = []
    for choice in ("Yes.", "It is green."):
        enc = encode(tokenizer, Example(prompt=item["question"], response=choice), "tulu")
        answer = list(enc.response_ids)[:-1]  # no end token: the choice alone
        ids = torch.tensor([list(enc.prompt_ids) + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        start = len(enc.prompt_ids)
        expected.append(sum(float(logp[start - 1 + i, t]) for i, t in enumerate(answer)))
    assert record["items"][0]["mc2_logliks"] == pytest.approx(expected, abs=1e-4)
    assert record["format"].startswith("template tulu")


def test_the_recipe_runner_and_the_sweep_pass_the_trained_template(tmp_path):
    from excise.pipeline.recipe import load_recipe
    from excise.pipeline.run import plan
    from excise.pipeline.sweep import _eval_config
    from tests.pipeline.recipe_fixtures import make_project, tiny_recipe, write_recipe

    project = make_project(tmp_path / "project")
    recipe = tiny_recipe(project, tmp_path / "run")
    recipe["train"]["template"] = "tulu"
    recipe["evaluations"]["harm"] = {"metric": "harmful-rate", "data": "${data}/harm.json", "limit": 2,
                                     "judge": "refusal", "models": ["base", "ext_sub"]}  # fmt: skip
    stages = {s.name: s for s in plan(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))}
    assert stages["eval halueval/ext_sub"].settings["settings"]["template"] == "tulu"
    assert stages["eval harm/base"].settings["settings"]["template"] == "tulu"  # the base too: same format
    assert "template" not in stages["eval perplexity/ext_sub"].settings["settings"]  # raw text
    # The default (chat) adds nothing: runs made before stay up to date.
    chat = tiny_recipe(project, tmp_path / "run2")
    chat_stages = {s.name: s for s in plan(load_recipe(write_recipe(tmp_path / "c.yaml", chat)))}
    assert "template" not in chat_stages["eval halueval/ext_sub"].settings["settings"]
    # The sweep reads the template from its inputs' records.
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    sweep = loaded.sweeps["ext_sub"].config
    for name in ("expert", "anti_expert"):
        _adapter_trained_in(
            project / "tiny", tmp_path / "run" / "adapters" / name, "tulu", project / "data" / "qa.jsonl"
        )
    assert _eval_config(sweep, sweep.deficiency).template == "tulu"
    assert _eval_config(sweep, sweep.utility).template is None  # perplexity


def test_answers_are_cut_where_the_templates_next_turn_begins(model_dir, prompts, monkeypatch):
    from excise.data.formatting import cut_at_next_turn
    from excise.evaluate.metrics import base

    assert cut_at_next_turn(" Sure.\n### Question: more?\n ### Answer: x", "question-answer") == " Sure.\n"
    assert cut_at_next_turn("Yes.\n<|user|>\nnext", "tulu") == "Yes.\n"
    assert cut_at_next_turn("a ### Question: b", "chat") == "a ### Question: b"  # chat: EOT ends it
    assert cut_at_next_turn("a ### Question: b", None) == "a ### Question: b"
    monkeypatch.setattr(
        base, "generate_answers", lambda ctx, ids, **kw: [" Sure.\n### Question: next"] * len(ids)
    )
    record = run_eval(
        "harmful-rate",
        _cfg(model_dir, prompts, judge="refusal", template="question-answer"),
        progress=False,
        use_cache=False,
    )
    assert {it["response"] for it in record["items"]} == {" Sure.\n"}

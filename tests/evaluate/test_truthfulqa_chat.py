"""``excise eval truthfulqa-mc --chat [--system TEXT]``: each choice scored as the assistant's reply,
equal to lm-eval's ``--apply_chat_template`` / ``--system_instruction``; the raw primer stays the default.

The equivalence test runs lm-eval's own pipeline (``HFLM`` on the same in-memory tiny Llama,
``simple_evaluate`` on the local ``excise_truthfulqa_mc1/mc2`` tasks) with tokenizers whose
templates write their BOS text (Llama-3, Llama-2 on a tokenizer that also adds BOS itself) or end
the generation prompt with whitespace (Llama-3's ``"\\n\\n"``).
"""

from __future__ import annotations

import json

import pytest
import torch

from excise.errors import ConfigError
from excise.evaluate.config import EvalConfig
from excise.evaluate.metrics import METRICS, truthfulqa_mc
from excise.evaluate.metrics.base import EvalContext
from excise.evaluate.metrics.truthfulqa_mc import LM_EVAL_TASKS, mc_prompt
from excise.evaluate.scoring import Loglik, encode_pair
from excise.evaluate.subject import Subject
from tests.conftest import save_tiny_model, tiny_llama_config
from tests.data.toy_tokenizers import gemma_chat, llama3_chat, llama_style

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "You are a careful, truthful assistant."

# True choices first in each list, as in TruthfulQA (lm-eval's MC2 splits at the first label 0).
QUESTIONS = [
    {
        "question": "What is 2+2?",
        "mc1_targets": {"4": 1, "5": 0, "22": 0},
        "mc2_targets": {"4": 1, "Four": 1, "5": 0, "22": 0},
    },
    {
        "question": "Is the sky green?",
        "mc1_targets": {"No.": 1, "Yes.": 0},
        "mc2_targets": {"No.": 1, "No, it is blue.": 1, "Yes.": 0},
    },
    {
        "question": "Where were the 1992 Olympics held?",
        "mc1_targets": {"Barcelona, Spain.": 1, "Paris.": 0},
        "mc2_targets": {"Barcelona, Spain.": 1, "In Barcelona.": 1, "Paris.": 0, "Tokyo.": 0},
    },
]

# Llama-2-chat's layout (system folded into the first [INST], BOS written by the template).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def _llama2_chat():
    """The Llama-style toy tokenizer (it adds ``<s>`` itself) with Llama-2-chat's template."""
    tokenizer = llama_style()
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


TOKENIZERS = {"llama3": llama3_chat, "llama2": _llama2_chat}


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=200, max_position_embeddings=1024)).eval()


def _ctx(model, tokenizer, **settings):
    cfg = EvalConfig(model="tiny", batch_size=8, device="cpu", **settings)
    return EvalContext(
        cfg, Subject(model, tokenizer, "tiny", None, False), [dict(q) for q in QUESTIONS], progress=False
    )


def _requests(monkeypatch, tokenizer, **settings):
    """The (context, continuation) token ids the metric scores, and its result (dummy scores)."""
    sent = []

    def fake(ctx, requests, *, desc, model=None):
        sent.extend((list(c), list(t)) for c, t in requests)
        return [Loglik(-float(len(t)), False, len(t)) for _, t in requests]

    monkeypatch.setattr(truthfulqa_mc, "subject_logliks", fake)
    result = truthfulqa_mc.run(_ctx(None, tokenizer, **settings))
    return sent, result


def _choices(q):
    return list(dict.fromkeys([*q["mc1_targets"], *q["mc2_targets"]]))


# ----------------------------------------------------------------------------- lm-eval equivalence


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_chat_logliks_and_scores_equal_lm_eval_apply_chat_template(name, tmp_path, monkeypatch):
    """lm-eval's own pipeline with apply_chat_template=True, system_instruction=SYSTEM: every
    choice's log-likelihood within 1e-4 of ours under --chat --system, and MC1/MC2 with them."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mc_file = tmp_path / "mc_task.json"
    mc_file.write_text(json.dumps(QUESTIONS))
    monkeypatch.setenv("EXCISE_TRUTHFULQA_MC", str(mc_file))
    model, tokenizer = _model(), TOKENIZERS[name]()

    ours = truthfulqa_mc.run(_ctx(model, tokenizer, chat=True, system=SYSTEM))
    res = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=["excise_truthfulqa_mc1", "excise_truthfulqa_mc2"],
        task_manager=TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False),
        apply_chat_template=True,
        system_instruction=SYSTEM,
        log_samples=True,
        verbosity="ERROR",
    )
    for task, key in (("excise_truthfulqa_mc1", "mc1_logliks"), ("excise_truthfulqa_mc2", "mc2_logliks")):
        samples = res["samples"][task]
        assert len(samples) == len(QUESTIONS)
        for sample in samples:
            q = QUESTIONS[sample["doc_id"]]
            context, continuation = sample["arguments"][0]  # lm-eval's strings: same as ours
            assert context == truthfulqa_mc.chat_context(tokenizer, q["question"], system=SYSTEM)
            assert SYSTEM in context and continuation == next(iter(q[key[:3] + "_targets"]))
            theirs = [r[0] for r in sample["filtered_resps"]]
            assert ours.items[sample["doc_id"]][key] == pytest.approx(theirs, abs=1e-4)
    assert ours.metrics["mc1"] == pytest.approx(res["results"]["excise_truthfulqa_mc1"]["acc,none"])
    assert ours.metrics["mc2"] == pytest.approx(res["results"]["excise_truthfulqa_mc2"]["acc,none"], abs=1e-5)
    assert ours.extra["format"] == "chat template" and ours.extra["system_prompt"] == SYSTEM


# ----------------------------------------------------------------------------- requests by hand


def test_chat_requests_match_a_hand_built_llama3_prompt(monkeypatch):
    """The template written out by hand: BOS text from the template (no second BOS), the choice
    bare (no " " delimiter), the generation prompt's trailing "\\n\\n" moved to the continuation."""
    tokenizer = llama3_chat()
    sent, result = _requests(monkeypatch, tokenizer, chat=True, system=SYSTEM)
    expected = []
    for q in QUESTIONS:
        context = (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n" + mc_prompt(q["question"]) + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>"
        )
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        for choice in _choices(q):
            expected.append((context_ids, tokenizer.encode("\n\n" + choice, add_special_tokens=False)))
    assert sent == expected
    assert all(c[0] == tokenizer.bos_token_id != c[1] for c, _ in sent)  # the template's BOS, once
    assert result.extra == {"scored_pairs": len(expected), "format": "chat template", "system_prompt": SYSTEM}


def test_chat_without_system_prompt_has_no_system_turn(monkeypatch):
    tokenizer = _llama2_chat()
    sent, result = _requests(monkeypatch, tokenizer, chat=True)
    q = QUESTIONS[0]
    text = "<s>[INST] " + mc_prompt(q["question"]) + " [/INST]"
    assert sent[0] == encode_pair(tokenizer, text, _choices(q)[0])
    assert sent[0][0][0] == tokenizer.bos_token_id and sent[0][0][1] != tokenizer.bos_token_id
    assert result.extra["system_prompt"] is None


@pytest.mark.parametrize("chat", [None, False])
def test_default_is_the_raw_primer_unchanged(chat, monkeypatch):
    """Without --chat (even with a chat template at hand): lm-eval's raw 6-shot primer, " " + choice."""
    tokenizer = llama3_chat()
    sent, result = _requests(monkeypatch, tokenizer, chat=chat)
    expected = [
        encode_pair(tokenizer, mc_prompt(q["question"]), " " + c) for q in QUESTIONS for c in _choices(q)
    ]
    assert sent == [(list(c), list(t)) for c, t in expected]
    assert result.extra == {"scored_pairs": len(expected), "format": "raw primer (lm-eval default)"}


# ----------------------------------------------------------------------------- refusals


def test_chat_without_a_chat_template_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"no chat template .*--template alpaca.*--no-chat") as info:
        _requests(monkeypatch, llama_style(), chat=True)
    assert "\n" not in str(info.value)


def test_a_template_without_system_role_refuses_system(monkeypatch):
    """lm-eval would drop the system prompt with a warning; here it is refused."""
    with pytest.raises(ConfigError, match="drop --system"):
        _requests(monkeypatch, gemma_chat(), chat=True, system=SYSTEM)
    sent, _ = _requests(monkeypatch, gemma_chat(), chat=True)  # fine without one
    assert len(sent) == sum(len(_choices(q)) for q in QUESTIONS)


def test_system_needs_chat():
    check = METRICS["truthfulqa-mc"].check
    with pytest.raises(ConfigError, match="--system needs --chat"):
        check(EvalConfig(model="-", system=SYSTEM))
    with pytest.raises(ConfigError, match="--system needs --chat"):
        check(EvalConfig(model="-", system=SYSTEM, chat=False))
    check(EvalConfig(model="-", system=SYSTEM, chat=True))
    check(EvalConfig(model="-"))


# ----------------------------------------------------------------------------- CLI


def test_cli_help_lists_chat_and_system():
    from typer.testing import CliRunner

    from excise.cli import app

    result = CliRunner().invoke(app, ["eval", "truthfulqa-mc", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for flag in ("--chat", "--no-chat", "--system", "--apply_chat_template", "--system_instruction"):
        assert flag in result.output


def test_cli_chat_system_runs_and_records_the_format(tmp_path, monkeypatch, capsys):
    import sys

    from excise.cli import main

    monkeypatch.setenv("EXCISE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny", max_position_embeddings=1024)
    data = tmp_path / "mc.json"
    data.write_text(json.dumps(QUESTIONS[:2]))

    def main_(*args):
        monkeypatch.setattr(sys, "argv", ["excise", "eval", "truthfulqa-mc", "--base", str(model), *args])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code

    out = tmp_path / "r.json"
    common = ["--data", str(data), "--device", "cpu", "--no-progress"]
    assert main_(*common, "--chat", "--system", SYSTEM, "--out", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["format"] == "chat template" and record["system_prompt"] == SYSTEM
    assert record["settings"]["chat"] is True and record["settings"]["system"] == SYSTEM
    capsys.readouterr()
    assert main_(*common, "--system", SYSTEM, "--out", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--system needs --chat" in err and "\n" not in err

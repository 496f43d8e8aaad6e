"""The lm-evaluation-harness bridge on a local multiple-choice task and a tiny model.

The bridge's accuracy must equal one computed here from the model's own log-likelihoods
(context = question, continuation = " " + choice, lm-eval's rule), with and without an adapter.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from excise.errors import AdapterError, ConfigError, DataError
from excise.evaluate.harness import _check_tasks, _is_dataset_error, run_harness, write_results
from tests.conftest import save_tiny_model, tiny_tokenizer, write_peft_lora

ROWS = [
    {"question": "Q: 2+2=", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "Q: sky is", "choices": ["green", "blue"], "answer": 1},
    {"question": "Q: cats say", "choices": ["moo", "meow", "quack"], "answer": 1},
    {"question": "Q: ice is", "choices": ["cold", "hot"], "answer": 0},
    {"question": "Q: 1+1=", "choices": ["3", "1", "2"], "answer": 2},
    {"question": "Q: fire is", "choices": ["wet", "hot"], "answer": 1},
]


def _task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "tiny_mc.yaml").write_text(
        "task: excise_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def _reference_accuracy(model) -> tuple[float, list[list[float]]]:
    """Accuracy by argmax of sum log p(" " + choice | question), one forward per choice."""
    tok = tiny_tokenizer()
    correct, logliks = 0, []
    with torch.no_grad():
        for row in ROWS:
            context = tok.encode(row["question"])
            scores = []
            for choice in row["choices"]:
                whole = tok.encode(row["question"] + " " + choice)
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)  # (T, V)
                scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context), len(whole))))
            logliks.append(scores)
            correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(ROWS), logliks


def _sample_logliks(run) -> list[list[float]]:
    samples = sorted(run["samples"]["excise_tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    model_dir = save_tiny_model(tmp / "model", seed=1)
    from transformers import AutoModelForCausalLM

    adapter = write_peft_lora(
        tmp / "adapter",
        AutoModelForCausalLM.from_pretrained(model_dir),
        seed=2,
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "lm_head"],
    )
    return tmp, model_dir, adapter, _task_folder(tmp)


def test_bridge_accuracy_equals_the_model_log_likelihoods(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tmp, model_dir, adapter, tasks = setup
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_run = run_harness(
        str(model_dir), ["excise_tiny_mc"], include_path=[tasks], batch_size=4, log_samples=True
    )
    with_adapter = run_harness(
        str(model_dir),
        ["excise_tiny_mc"],
        adapter=adapter,
        include_path=[tasks],
        batch_size=4,
        log_samples=True,
    )
    base_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_acc, base_ll = _reference_accuracy(base_model)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)
    ).eval()
    adapter_acc, adapter_ll = _reference_accuracy(peft_model)

    assert base_run["results"]["excise_tiny_mc"]["acc,none"] == pytest.approx(base_acc)
    assert with_adapter["results"]["excise_tiny_mc"]["acc,none"] == pytest.approx(adapter_acc)
    torch.testing.assert_close(
        torch.tensor(_sample_logliks(base_run)[0]), torch.tensor(base_ll[0]), atol=1e-4, rtol=1e-4
    )
    for got, want in zip(_sample_logliks(with_adapter), adapter_ll, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)
    # The adapter changes the model, so its log-likelihoods differ from the base's.
    assert (
        max(
            abs(a - b)
            for ra, rb in zip(adapter_ll, base_ll, strict=True)
            for a, b in zip(ra, rb, strict=True)
        )
        > 0.1
    )

    meta = with_adapter["excise"]
    assert meta["adapter"] == str(adapter) and meta["tasks"] == ["excise_tiny_mc"] and meta["seed"] == 0
    assert meta["lm_eval_version"]
    out = write_results(with_adapter, tmp / "out" / "results.json")
    assert json.loads(out.read_text())["results"]["excise_tiny_mc"]["acc,none"] == pytest.approx(adapter_acc)
    with pytest.raises(ConfigError, match="--overwrite"):
        write_results(with_adapter, out)
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left behind


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    _, model_dir, _, tasks = setup
    known = SimpleNamespace(all_tasks=["excise_tiny_mc", "mmlu"])
    with pytest.raises(ConfigError, match=r"knows no task 'excise_tiny_mcq'.*did you mean excise_tiny_mc\b"):
        _check_tasks(["excise_tiny_mcq"], known)  # what run_harness does once lm-eval's index is built
    with pytest.raises(ConfigError, match="no tasks given"):
        run_harness(str(model_dir), [" "])
    with pytest.raises(ConfigError, match="not a folder"):
        run_harness(str(model_dir), ["excise_tiny_mc"], include_path=[tmp_path / "missing"])
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        run_harness(str(model_dir), ["excise_tiny_mc"], include_path=[tasks], adapter=tmp_path)


def test_dataset_fetch_errors_are_recognised():
    class HubError(Exception):
        pass

    HubError.__module__ = "huggingface_hub.errors"
    wrapped = RuntimeError("task build failed")
    wrapped.__cause__ = HubError("offline")
    assert _is_dataset_error(wrapped)
    assert _is_dataset_error(ConnectionError("no route"))
    assert not _is_dataset_error(ValueError("a bug"))
    assert issubclass(DataError, ValueError)


@pytest.mark.slow
def test_cli_on_the_real_model_alias(setup, tmp_path, monkeypatch):
    """`excise eval harness --base smollm2-135m-instruct` on the local task: the alias works end to end."""
    from typer.testing import CliRunner

    from excise.cli import app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, _, _, tasks = setup
    out = tmp_path / "smollm2.json"
    args = ["eval", "harness", "--base", "smollm2-135m-instruct", "--tasks", "excise_tiny_mc"]
    result = CliRunner().invoke(app, [*args, "--include-path", str(tasks), "--limit", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["excise"]["model"] == "smollm2-135m-instruct" and saved["excise"]["limit"] == 4
    assert 0.0 <= saved["results"]["excise_tiny_mc"]["acc,none"] <= 1.0
    assert "excise_tiny_mc: acc,none" in result.output and f"wrote {out}" in result.output

"""Unlearning baselines (excise/train/baselines.py) and the `excise train` unlearning commands."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from excise.train.baselines import BASELINES, BaselineConfig, baseline_terms, mismatch_pool_of, run
from excise.train.losses import adapter_disabled_reference
from excise.train.unlearning import prepare_data
from tests.train.test_sku import PAIRS, write_data


def baseline_config(model_dir, tmp_path, method, **overrides) -> BaselineConfig:
    harmful, normal = write_data(tmp_path)
    settings = dict(
        method=method, base=str(model_dir), harmful=str(harmful), normal=str(normal), out=tmp_path / method,
        split="all", k=2, batch_size=2, steps=4, lr=1e-2, lora_dropout=0.0, max_length=96,
        schedule="constant",
    )  # fmt: skip
    return BaselineConfig(**(settings | overrides))


def test_registry_weights_follow_the_documented_defaults(tmp_path):
    cfg = baseline_config("m", tmp_path, "llmu")
    assert [(t.name, t.stream, t.weight) for t in baseline_terms(cfg)] == [
        ("nll", "harmful", 0.5),
        ("mismatch", "mismatch", 1.0),
        ("kl", "normal", 1.0),
    ]
    assert [t.weight for t in baseline_terms(baseline_config("m", tmp_path, "ga"))] == [1.0]
    assert [t.stream for t in baseline_terms(baseline_config("m", tmp_path, "finetune"))] == ["safe"]
    assert set(BASELINES) == {"ga", "ga_mismatch", "llmu", "finetune", "npo"}
    npo = baseline_terms(baseline_config("m", tmp_path, "npo"))
    assert [(t.name, t.stream, t.weight, t.uses_reference) for t in npo] == [
        ("npo", "harmful", 1.0, True),
        ("retain_nll", "normal", 0.0, False),  # weight 0: dropped by run_objective (plain NPO)
    ]
    rt = baseline_terms(baseline_config("m", tmp_path, "npo", retain_weight=1.0, npo_beta=0.5))
    assert [(t.name, t.weight) for t in rt] == [("npo", 1.0), ("retain_nll", 1.0)]


def test_npo_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="NPO's settings; ga does not use them"):
        baseline_config("m", tmp_path, "ga", retain_weight=1.0)
    with pytest.raises(ValueError, match="greater than 0"):
        baseline_config("m", tmp_path, "npo", npo_beta=0.0)
    with pytest.raises(ValueError, match="pass --normal FILE"):
        baseline_config("m", tmp_path, "npo", retain_weight=1.0, normal=None)


@pytest.mark.parametrize("method", ["ga", "ga_mismatch", "llmu", "finetune", "npo"])
def test_each_baseline_moves_its_objective_the_right_way(method, tiny_model_dir, tmp_path, chat_tokenizer):
    from peft import PeftModel

    from excise.models import load_model
    from excise.train.losses import sequence_nll

    cfg = baseline_config(tiny_model_dir, tmp_path, method)
    run(cfg, progress=False)
    log = json.loads((cfg.out / "loss_log.json").read_text())
    terms = [t for t in baseline_terms(cfg) if t.weight != 0]  # a zero weight is dropped (npo's retain)
    assert all({t.name for t in terms} | {"loss"} <= set(r) for r in log)
    if method == "llmu":
        assert log[0]["kl"] == 0.0  # the reference is the adapter-disabled model: equal at B = 0
    if method == "npo":  # at B = 0 the model is its reference: (2/β)·ln 2
        assert log[0]["npo"] == pytest.approx(2 / 0.1 * np.log(2), rel=1e-6)
        assert (
            json.loads((cfg.out / "train_config.json").read_text())["config"]["reference"]
            == "adapter-disabled"
        )
    if method in ("ga", "ga_mismatch", "llmu"):
        assert all(r["nll"] > 0 for r in log)  # logged as the NLL it raises, not its negative

    streams = sorted({t.stream for t in terms})
    data = prepare_data(cfg, chat_tokenizer, streams, mismatch_pool=mismatch_pool_of(cfg)[0])
    batch = data.micro_batch(0, streams)
    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), cfg.out)
    reference = adapter_disabled_reference(model)

    def objective() -> float:
        with torch.no_grad():
            return float(sum(t.weight * t.loss(model, batch[t.stream], reference) for t in terms))

    after = objective()
    with model.disable_adapter():
        before = objective()
    assert after < before - 0.05
    if method in ("ga", "npo"):  # ascent: the harmful NLL went up
        with torch.no_grad():
            nll_after = float(sequence_nll(model, batch["harmful"]))
            with model.disable_adapter():
                nll_before = float(sequence_nll(model, batch["harmful"]))
        assert nll_after > nll_before + 0.1


def test_mismatch_pool_normal_draws_normal_answers(tmp_path, chat_tokenizer):
    cfg = baseline_config("m", tmp_path, "ga_mismatch", mismatch_pool="normal", k=3)
    data = prepare_data(cfg, chat_tokenizer, ["harmful", "mismatch"], mismatch_pool="normal")
    batch = data.micro_batch(0, ["mismatch"])["mismatch"]
    answers = set()
    for row in range(batch["labels"].shape[0]):
        labels = batch["labels"][row]
        answers.add(chat_tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True))
    assert answers <= {"4", "red", "hi", "Paris"} and len(answers) >= 3


def _answers(tokenizer, batch) -> set[str]:
    out = set()
    for row in range(batch["labels"].shape[0]):
        labels = batch["labels"][row]
        out.add(tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True))
    return out


@pytest.mark.parametrize("method", ["ga_mismatch", "llmu"])
def test_llmu_style_baselines_draw_normal_answers_by_default_and_record_why(
    method, tiny_model_dir, tmp_path, chat_tokenizer
):
    """LLMU's code draws its random answers from normal data (TruthfulQA answers), not harmful ones."""
    cfg = baseline_config(tiny_model_dir, tmp_path, method, k=3, steps=1)
    assert mismatch_pool_of(cfg)[0] == "normal"
    run(cfg, progress=False)
    config = json.loads((cfg.out / "train_config.json").read_text())["config"]
    assert config["mismatch_pool"] == "normal"
    assert "kevinyaobytedance/llm_unlearn" in config["mismatch_pool_source"]

    harmful = {h for _, h, _ in PAIRS}
    streams = sorted({t.stream for t in baseline_terms(cfg)})
    data = prepare_data(cfg, chat_tokenizer, streams, mismatch_pool=mismatch_pool_of(cfg)[0])
    drawn = set().union(
        *(_answers(chat_tokenizer, data.micro_batch(i, streams)["mismatch"]) for i in range(4))
    )
    assert drawn <= {"4", "red", "hi", "Paris"} and not drawn & harmful

    chosen = baseline_config(tiny_model_dir, tmp_path, method, mismatch_pool="harmful", out=tmp_path / "h")
    assert mismatch_pool_of(chosen) == ("harmful", "--mismatch-pool")


def test_sku_records_its_harmful_pool_and_ga_records_none(tiny_model_dir, tmp_path):
    from excise.train.sku import run as run_sku
    from tests.train.test_sku import sku_config

    cfg = sku_config(tiny_model_dir, tmp_path, steps=1)
    run_sku(cfg, progress=False)
    config = json.loads((cfg.out / "train_config.json").read_text())["config"]
    assert config["mismatch_pool"] == "harmful" and "franciscoliu/SKU" in config["mismatch_pool_source"]
    ga = baseline_config(tiny_model_dir, tmp_path, "ga", steps=1)
    run(ga, progress=False)
    config = json.loads((ga.out / "train_config.json").read_text())["config"]
    assert config["mismatch_pool"] is None and config["mismatch_pool_source"] is None


def test_ga_mismatch_without_normal_data_says_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match=r"pass --normal FILE \(or --mismatch-pool harmful"):
        baseline_config("m", tmp_path, "ga_mismatch", normal=None)
    ok = baseline_config("m", tmp_path, "ga_mismatch", normal=None, mismatch_pool="harmful")
    assert mismatch_pool_of(ok)[0] == "harmful"
    assert baseline_config("m", tmp_path, "ga", normal=None, mismatch_pool="normal").normal is None


def _lora_deltas(folder) -> dict[str, np.ndarray]:
    from excise.pem.io import load_adapter

    adapter = load_adapter(folder)
    return {name: d.scale * (d.B @ d.A) for name, d in adapter.modules.items()}


def test_cli_sku_then_ops_negate_and_ga(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from excise.cli import app

    harmful, normal = write_data(tmp_path)
    common = ["--base", str(tiny_model_dir), "--harmful", str(harmful), "--split", "all"]
    common += ["--steps", "2", "--lr", "0.01", "--max-length", "96", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(
        app, ["train", "sku", *common, "--normal", str(normal), "--out", str(tmp_path / "h")]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"wrote {tmp_path / 'h'}" in result.output
    log = json.loads((tmp_path / "h" / "loss_log.json").read_text())
    assert len(log) == 2 and {"gd", "rd", "pd"} <= set(log[0])

    result = runner.invoke(
        app, ["ops", "negate", "--adapter", str(tmp_path / "h"), "--lam", "0.5", "--out", str(tmp_path / "n")]
    )
    assert result.exit_code == 0, result.output
    harmful_delta, negated = _lora_deltas(tmp_path / "h"), _lora_deltas(tmp_path / "n")
    assert set(negated) == set(harmful_delta)
    for name, delta in harmful_delta.items():
        np.testing.assert_allclose(negated[name], -0.5 * delta, atol=1e-6, rtol=1e-5)

    result = runner.invoke(app, ["train", "ga", *common, "--out", str(tmp_path / "ga")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "ga" / "train_config.json").read_text())["config"]["method"] == "ga"


def test_cli_bad_data_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    harmful, _ = write_data(tmp_path, [("same q", f"bad {i}", "good") for i in range(3)])
    result = subprocess.run(
        [sys.executable, "-m", "excise", "train", "ga-mismatch", "--base", str(tiny_model_dir),
         "--harmful", str(harmful), "--split", "all", "--mismatch-pool", "harmful",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "same prompt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()

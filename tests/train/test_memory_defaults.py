"""Defaults that fit (issue 26): trainers whose step reads several streams checkpoint by default.

The memory itself is measured by ``benchmarks/bench_train.py --variants
default-sft,default-sku,default-sku-no-gc`` (docs/BENCHMARKS.md), not by a timed test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from excise.cli import app
from excise.train.baselines import BaselineConfig, baseline_terms
from excise.train.loop import TrainSettings, _plan
from excise.train.sft import SftConfig
from excise.train.sku import SkuConfig, sku_terms
from excise.train.unlearning import checkpointing_on, streams_of

COMMON = dict(base="unused", harmful="h.json", normal="n.json", out=Path("o"))


@pytest.mark.parametrize(
    ("method", "streams", "on"),
    [
        ("ga", ["harmful"], False),
        ("finetune", ["safe"], False),
        ("ga_mismatch", ["harmful", "mismatch"], True),
        ("llmu", ["harmful", "mismatch", "normal"], True),
    ],
)
def test_baselines_checkpoint_by_default_exactly_when_a_step_reads_several_streams(method, streams, on):
    cfg = BaselineConfig(method=method, **COMMON)
    assert cfg.gradient_checkpointing is None
    assert streams_of(baseline_terms(cfg)) == streams
    assert checkpointing_on(cfg, streams) is on
    for explicit in (True, False):  # --gradient-checkpointing / --no-gradient-checkpointing win
        chosen = cfg.model_copy(update={"gradient_checkpointing": explicit})
        assert checkpointing_on(chosen, streams) is explicit


def test_sku_checkpoints_by_default_sft_does_not():
    cfg = SkuConfig(**COMMON)
    assert streams_of(sku_terms(cfg)) == ["harmful", "mismatch", "normal"]
    assert checkpointing_on(cfg, streams_of(sku_terms(cfg))) is True
    one_term = cfg.model_copy(update={"eps_rd": 0.0, "eps_pd": 0.0})
    assert checkpointing_on(one_term, streams_of([t for t in sku_terms(one_term) if t.weight])) is False
    assert SftConfig(base="b", data="d", out=Path("o")).gradient_checkpointing is False


def test_recipes_keep_the_key():
    assert SkuConfig(**COMMON, gradient_checkpointing=False).gradient_checkpointing is False
    assert SkuConfig.model_validate(COMMON | {"gradient_checkpointing": None}).gradient_checkpointing is None


def test_the_plan_line_says_whether_checkpointing_is_on():
    settings = TrainSettings(steps=10, batch_size=2)
    assert _plan(settings, 10, 0, 1, {"gradient_checkpointing": True}).endswith("; gradient checkpointing on")
    assert _plan(settings, 10, 0, 1, {"gradient_checkpointing": False}).endswith("gradient checkpointing off")
    assert "checkpointing" not in _plan(settings, 10, 0, 1, None)


def _capture(monkeypatch, *modules):
    """Each module's ``run`` records the config it gets and stops the command there."""
    seen = []

    def capture(cfg, **_):
        seen.append(cfg.gradient_checkpointing)
        raise SystemExit(0)

    for module in modules:
        monkeypatch.setattr(module, "run", capture)
    return seen


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], None), (["--no-gradient-checkpointing"], False), (["--gradient-checkpointing"], True)],
)
def test_the_unlearning_commands_leave_the_default_to_the_config(monkeypatch, tmp_path, flags, expected):
    import excise.train.baselines
    import excise.train.sku

    seen = _capture(monkeypatch, excise.train.sku, excise.train.baselines)
    args = ["--base", "b", "--harmful", "h.json", "--out", str(tmp_path / "o"), *flags]
    for verb, normal in (("sku", ["--normal", "n.json"]), ("llmu", ["--normal", "n.json"]), ("ga", [])):
        result = CliRunner().invoke(app, ["train", verb, *args, *normal])
        assert result.exit_code == 0, result.output
    assert seen == [expected] * 3


def test_sft_takes_no_gradient_checkpointing_too(monkeypatch, tmp_path):
    import excise.train.sft

    seen = _capture(monkeypatch, excise.train.sft)
    for flags in ([], ["--no-gradient-checkpointing"], ["--gradient-checkpointing"]):
        args = ["train", "sft", "--base", "b", "--data", "d", "--out", str(tmp_path), *flags]
        assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == [False, False, True]
